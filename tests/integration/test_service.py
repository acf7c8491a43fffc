"""The real BentoML service: `bentoml serve` on 127.0.0.1 with a freshly trained and registered model.

One module-scoped project trains a tiny simple_cnn (1 epoch, 32 px, synthetic DICOMs), registers it
as version 1 of `cxr` and makes it the champion; one server serves it for all the tests here. Every
server runs in its own process group and is killed at teardown.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from PIL import Image as PILImage
from prometheus_client.parser import text_string_to_metric_families
from pydicom.uid import RLELossless

from cxr.data.sources.synthetic import Encoding, encode, make_dataset, render
from cxr.serving.input_checks import image_stats
from cxr.serving.monitoring import Z_BUCKETS, drift_z, warning_reasons
from cxr.tracking.runs import use_store
from cxr.tracking.uris import load_predictor
from support.chromium import Chromium, find_chromium
from support.cli import cxr_here
from support.films import chest_dicom, png
from support.reader_fuzz import fixed_cases, mutant, png_ihdr, rle_with_one_flipped_bit
from support.serve_process import ServiceProcess as Server

pytestmark = pytest.mark.slow

TINY = [
    "data.synthetic.n_patients=30",
    "data.synthetic.size=96",
    "prepare.sizes=[32]",
    "model.image_size=32",
    "model.width=8",
    "train.epochs=1",
    "train.batch_size=16",
    "prepare.workers=1",
]
MAX_BYTES = 3_000_000  # imaging.max_bytes of the served project: small, so the 413 path is cheap to hit
PHI = ("Doe^Jane", "Doe", "MRN-998877", "19700101", "20240229")
ANSWER_KEYS = {"probabilities", "prediction", "positive", "threshold", "ood", "model", "warnings"}


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """Trained, registered and promoted: `models:/cxr@champion` is version 1 in project/mlflow.db."""
    work = tmp_path_factory.mktemp("served")
    (work / "params.yaml").write_text(f"imaging:\n  max_bytes: {MAX_BYTES}\n")
    for step in ("ingest", "prepare", "train", "register"):
        cxr_here(work, step, overrides=TINY)
    # never evaluated, so the gate refuses it: the service tests need a champion, not a good one
    reason = "service tests: any trained model will do"
    cxr_here(work, "promote", "1", "--force", "--reason", reason, overrides=TINY)
    return work


@pytest.fixture(scope="module")
def server(project: Path) -> Iterator[Server]:
    """With adaptive batching: the model in its own BentoML service (the more involved path)."""
    srv = Server(project, project / "serve.log", CXR_BATCHING="1")
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def champion(project: Path):
    """The champion loaded in this process through the same Predictor (the reference answers)."""
    uri = f"sqlite:///{project / 'mlflow.db'}"
    use_store(uri)
    return load_predictor("models:/cxr@champion")


# --- inputs -----------------------------------------------------------------------------------------


def synthetic_dicom(seed: int, size: int = 96, **header) -> bytes:
    """A synthetic chest DICOM carrying (fictitious) identifying fields the service must never echo."""
    return chest_dicom(seed, size, label=seed % 2, monochrome1=seed % 3 == 0, identifying=True, **header)


def film_png(seed: int = 0, size: int = 64) -> bytes:
    return png((render(np.random.default_rng(seed), 0, 0.6, size) * 255).astype(np.uint8))


def multiframe_dicom() -> bytes:
    ds = pydicom.dcmread(io.BytesIO(synthetic_dicom(1, 64)))
    arr = ds.pixel_array
    ds.NumberOfFrames = 2
    ds.PixelData = np.stack([arr, arr]).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


def colour_dicom() -> bytes:
    ds = pydicom.dcmread(io.BytesIO(synthetic_dicom(2, 64)))
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelData = np.zeros((64, 64, 3), np.uint8).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


def huge_png() -> bytes:
    """20000 x 20000 pixels in ~400 kB: decoding it would take 400 MB."""
    buf = io.BytesIO()
    PILImage.new("L", (20000, 20000)).save(buf, format="PNG")
    return buf.getvalue()


def rle_chest_dicom(seed: int = 21) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(synthetic_dicom(seed, 64)))
    ds.compress(RLELossless, generate_instance_uid=False)
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


def absurd_rows_dicom() -> bytes:
    """Rows=65535 on a 96 x 96 image: within imaging.max_pixels, so the decoder meets the short pixel data."""
    ds = pydicom.dcmread(io.BytesIO(synthetic_dicom(6)))
    ds.Rows = 65535
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


def nonchest(request: pytest.FixtureRequest) -> bytes:
    """The NEMA tibia: refused (422) rather than warned, because its header says EXTREMITY outright."""
    return (request.getfixturevalue("dicom_dir") / "wg04_RG3_J2KI_NONCHEST_extremity_jpeg2000.dcm").read_bytes()


# name, file name, bytes (built lazily, given the test's request), expected status, phrase of the message
BAD_INPUTS: list[tuple[str, str, Callable[[pytest.FixtureRequest], bytes], int, str]] = [
    ("garbage", "scan.bin", lambda _: np.random.default_rng(0).bytes(5000), 422, "not a DICOM, PNG or JPEG"),
    ("truncated dicom", "cut.dcm", lambda _: synthetic_dicom(4)[:3000], 422, "decode"),
    ("20000x20000 png", "huge.png", lambda _: huge_png(), 422, "exceed"),
    ("png claiming 100000x100000", "bomb.png", lambda _: png_ihdr(100_000, 100_000, film_png()), 422, "exceed"),
    ("rle dicom, one bit flipped", "rle.dcm", lambda _: rle_with_one_flipped_bit(), 422, "cannot decode DICOM pixel"),
    ("absurd Rows", "rows.dcm", lambda _: absurd_rows_dicom(), 422, "cannot decode DICOM pixel"),
    ("pdf named .dcm", "report.dcm", lambda _: dict(fixed_cases([]))["pdf"], 422, "not a DICOM"),
    ("empty", "empty.dcm", lambda _: b"", 422, "empty"),
    ("text named .dcm", "notes.dcm", lambda _: b"patient list\nnothing to see here\n" * 20, 422, "not a DICOM"),
    ("multi-frame dicom", "cine.dcm", lambda _: multiframe_dicom(), 422, "multi-frame"),
    ("colour dicom", "rgb.dcm", lambda _: colour_dicom(), 422, "colour"),
    (
        "non-chest body part",
        "hand.dcm",
        lambda _: synthetic_dicom(5, BodyPartExamined="HAND"),
        422,
        "chest radiographs only",
    ),
    ("NEMA tibia (real)", "tibia.dcm", nonchest, 422, "BodyPartExamined=EXTREMITY"),
    ("over imaging.max_bytes", "big.dcm", lambda _: b"\0" * (MAX_BYTES + 2_000_000), 413, "upload limit"),
]


def assert_answers_like(
    server: Server, other: Server, uploads: list[bytes], then: Callable[[Server], None] | None = None
) -> None:
    """``other`` becomes ready, answers every upload exactly as ``server`` does, passes ``then``, and is stopped."""
    try:
        other.wait_ready()
        for data in uploads:
            a = httpx.post(f"{server.url}/predict", files={"file": ("x", data)}, timeout=60).json()
            b = httpx.post(f"{other.url}/predict", files={"file": ("x", data)}, timeout=60).json()
            assert a == b
        if then is not None:
            then(other)
    finally:
        other.stop()


# --- tests ----------------------------------------------------------------------------------------------


def test_synthetic_dicoms_get_the_in_process_answer(server: Server, champion, project: Path):
    files = sorted((project / "data" / "raw" / "images").glob("*.dcm"))[:6] + [None]
    for path in files:
        data = path.read_bytes() if path else film_png(7)
        r = httpx.post(f"{server.url}/predict", files={"file": ("x.dcm", data)}, timeout=60)
        assert r.status_code == 200, r.text
        body = r.json()
        assert ANSWER_KEYS <= set(body) <= ANSWER_KEYS | {"abstain_reason"}
        assert body["model"] == {"name": "cxr", "version": "1", "uri": "models:/cxr@champion"}
        want = champion.predict_files([data])[0]
        assert body["probabilities"] == pytest.approx(want["probabilities"], abs=1e-6)
        assert body["ood"]["checked"] and body["ood"]["in_distribution"] == want["ood"]["in_distribution"]
        assert body["ood"]["score"] == pytest.approx(want["ood"]["score"], rel=1e-4)
        assert (body["prediction"], body["positive"], body["threshold"]) == (
            want["prediction"],
            want["positive"],
            want["threshold"],
        )
    assert not any("view" in w for w in body["warnings"])  # a PNG cannot carry a view: nothing to warn about


def test_real_dicoms_get_the_in_process_answer(server: Server, champion, dicom_dir: Path):
    chest = [p for p in sorted(dicom_dir.glob("*.dcm")) if "NONCHEST" not in p.name]
    assert len(chest) == 4
    for path in chest:
        r = httpx.post(f"{server.url}/predict", files={"file": (path.name, path.read_bytes())}, timeout=60)
        assert r.status_code == 200, r.text
        want = champion.predict_files([path])[0]
        assert r.json()["probabilities"] == pytest.approx(want["probabilities"], abs=1e-6)
    fake_m1 = next(p for p in chest if "MONOCHROME1" in p.name)  # an inverted grey scale, as a broken reader gives
    warnings = httpx.post(f"{server.url}/predict", files={"file": ("a.dcm", fake_m1.read_bytes())}, timeout=60).json()
    assert any("far from the chest radiographs" in w for w in warnings["warnings"])


def test_batch_equals_single_requests(server: Server):
    uploads = [synthetic_dicom(i) for i in range(3)] + [film_png(1)]
    r = httpx.post(
        f"{server.url}/predict_batch", files=[("files", (f"{i}.dcm", d)) for i, d in enumerate(uploads)], timeout=60
    )
    assert r.status_code == 200, r.text
    singles = [httpx.post(f"{server.url}/predict", files={"file": ("x", d)}, timeout=60).json() for d in uploads]
    # the same answers; the out-of-distribution score moves by ~1e-4 of itself with the batch (OodDetector.score)
    batch = r.json()
    for batched, single in zip(batch, singles):
        assert batched["ood"].pop("score") == pytest.approx(single["ood"].pop("score"), rel=1e-3)
    assert batch == singles
    bad = httpx.post(
        f"{server.url}/predict_batch", files=[("files", ("a", uploads[0])), ("files", ("b", b"junk"))], timeout=60
    )
    assert bad.status_code == 422 and bad.json()["error"].startswith("file 2 of 2: upload: not a DICOM")


@pytest.mark.parametrize("name,filename,make,status,phrase", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_is_refused_and_the_service_lives_on(server: Server, request, name, filename, make, status, phrase):
    r = httpx.post(f"{server.url}/predict", files={"file": (filename, make(request))}, timeout=60)
    assert r.status_code == status, r.text
    assert phrase in r.json()["error"]
    assert httpx.get(f"{server.url}/healthz", timeout=10).status_code == 200
    ok = httpx.post(f"{server.url}/predict", files={"file": ("ok.png", film_png())}, timeout=60)
    assert ok.status_code == 200  # the model worker survived


def fuzzed_uploads() -> list[tuple[str, bytes]]:
    """Seeded mutants (support.reader_fuzz) of chest films in each container, and the fuzzer's fixed cases."""
    jpeg = io.BytesIO()
    PILImage.open(io.BytesIO(film_png(6))).save(jpeg, format="JPEG", quality=90)
    seeds = {"dicom": synthetic_dicom(20, 64), "rle": rle_chest_dicom(), "png": film_png(5), "jpeg": jpeg.getvalue()}
    cases = []
    for i, (name, data) in enumerate(seeds.items()):
        for k in range(12):
            kind, bad = mutant(data, [26, i, k])
            cases.append((f"{name} mutant {k} ({kind})", bad))
    return cases + fixed_cases(list(seeds.values()))


def test_fuzzed_uploads_are_answered_or_refused_never_a_server_error(server: Server):
    """Every mutant gets 200 (it still decodes) or a 4xx with a JSON `error`; a good upload works afterwards."""
    statuses: Counter = Counter()
    cases = fuzzed_uploads()
    for name, data in cases:
        r = httpx.post(f"{server.url}/predict", files={"file": ("x.dcm", data)}, timeout=60)
        statuses[r.status_code] += 1
        assert r.status_code == 200 or 400 <= r.status_code < 500, f"{name}: HTTP {r.status_code} {r.text[:500]}"
        assert r.status_code == 200 or isinstance(r.json().get("error"), str), f"{name}: {r.text[:500]}"
    refused = [data for _, data in cases[:48:6]]  # mutants through the batch and explain endpoints too
    batch = httpx.post(
        f"{server.url}/predict_batch", files=[("files", (f"{i}.dcm", d)) for i, d in enumerate(refused)], timeout=60
    )
    assert batch.status_code in (200, 422), batch.text[:500]
    for data in refused:
        r = httpx.post(f"{server.url}/explain", files={"file": ("x.dcm", data)}, timeout=60)
        assert r.status_code == 200 or (400 <= r.status_code < 500 and "error" in r.json()), r.text[:500]
    print(f"service fuzz: {len(cases)} uploads, statuses {dict(statuses)}")
    assert statuses[200] > 0 and statuses[422] > 0  # both decodable and refused mutants were sent
    ok = httpx.post(f"{server.url}/predict", files={"file": ("ok.png", film_png())}, timeout=60)
    assert ok.status_code == 200  # the model worker survived


@pytest.mark.parametrize(
    "request_kwargs",
    [
        {"content": b""},
        {"content": b"", "headers": {"content-type": "multipart/form-data; boundary=x"}},
        {"content": b"--x--\r\n", "headers": {"content-type": "multipart/form-data; boundary=x"}},
        {"content": b"\x89PNG garbage", "headers": {"content-type": "image/png"}},
    ],
    ids=["no body", "empty multipart body", "multipart with no parts", "raw bytes, no form"],
)
def test_an_empty_or_formless_body_is_a_4xx_with_a_json_error(server: Server, request_kwargs):
    r = httpx.post(f"{server.url}/predict", timeout=30, **request_kwargs)
    assert 400 <= r.status_code < 500, f"HTTP {r.status_code}: {r.text[:500]}"
    assert isinstance(r.json().get("error"), str), r.text[:500]


@pytest.mark.parametrize(
    "request_kwargs,phrase",
    [
        ({"data": {"file": "http://127.0.0.1:9/x.dcm"}, "files": {"other": ("x", b"1")}}, "must be a file upload"),
        ({"files": {"image": ("x.dcm", b"123")}}, "unexpected file field `image`"),
        ({"json": {}}, "validation error"),
    ],
    ids=["url in the file field", "wrong field name", "no file"],
)
def test_malformed_requests_are_400(server: Server, request_kwargs, phrase):
    r = httpx.post(f"{server.url}/predict", timeout=30, **request_kwargs)
    assert r.status_code == 400 and phrase in r.text


def test_no_phi_in_answers_or_logs(server: Server):
    texts = []
    for data in (synthetic_dicom(8), synthetic_dicom(9)[:2000], synthetic_dicom(10, BodyPartExamined="KNEE")):
        texts.append(
            httpx.post(f"{server.url}/predict", files={"file": ("Doe_Jane_19700101.dcm", data)}, timeout=60).text
        )
        texts.append(
            httpx.post(
                f"{server.url}/explain", files={"file": ("Doe_Jane_19700101.dcm", data)}, timeout=60
            ).headers.get("x-cxr-warnings", "")
        )
    time.sleep(0.5)  # let the access log flush
    everything = "\n".join(texts) + server.text()
    assert [p for p in PHI if p in everything] == []


def test_explain_returns_a_heatmap_png_and_the_lung_share(server: Server):
    r = httpx.post(f"{server.url}/explain", files={"file": ("x.dcm", synthetic_dicom(3, 256))}, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    image = PILImage.open(io.BytesIO(r.content))
    assert image.size == (384, 384) and image.mode == "RGB"
    assert r.headers["x-cxr-label"] == "pneumonia"
    share, warnings = r.headers["x-cxr-lung-share"], json.loads(r.headers["x-cxr-warnings"])
    if share == "none":  # an empty Grad-CAM (a barely trained model) or no lung mask, and the warning says which
        assert any(w.startswith(("Grad-CAM is empty", "no lung fields")) for w in warnings), warnings
    else:
        assert 0.0 <= float(share) <= 1.0
    assert json.loads(r.headers["x-cxr-model"])["version"] == "1"
    refused = httpx.post(f"{server.url}/explain", files={"file": ("x.dcm", b"junk")}, timeout=60)
    assert refused.status_code == 422 and "not a DICOM" in refused.json()["error"]


def test_metadata_health_and_readiness(server: Server, project: Path):
    info = json.loads((project / "models" / "cxr" / "model.json").read_text())
    meta = httpx.post(f"{server.url}/metadata", json={}, timeout=30).json()
    assert meta["model"] == {"name": "cxr", "version": "1", "uri": "models:/cxr@champion"}
    assert meta["training"]["dataset_hash"] == info["training"]["dataset_hash"]
    assert meta["training"]["run_id"] == info["training"]["run_id"]
    assert meta["training"]["environment"] == info["training"]["environment"]  # what the weights were trained with
    assert meta["labels"] == info["labels"] and meta["threshold"] == info["threshold"]
    assert meta["preprocess"] == info["preprocess"] and meta["precision"] == "fp32"  # CXR_PRECISION unset
    assert meta["metrics"]["best_val_auroc"] == pytest.approx(info["training"]["val_auroc"])
    assert httpx.post(f"{server.url}/healthz", json={}, timeout=10).json() == {"status": "ok"}
    ready = httpx.post(f"{server.url}/readyz", json={}, timeout=10).json()
    assert ready == {"ready": True, "model": meta["model"]}
    for probe in ("/healthz", "/readyz", "/livez"):  # BentoML's own GET probes, for Kubernetes
        assert httpx.get(f"{server.url}{probe}", timeout=10).status_code == 200


def test_docs_page_renders_in_chromium(server: Server, tmp_path: Path):
    executable = find_chromium()
    if not executable:
        pytest.skip("chromium is not installed (tests/system_packages.sh installs it)")
    browser = Chromium(executable, tmp_path / "profile")
    try:
        browser.open(f"{server.url}/")
        browser.wait_for("document.querySelectorAll('.opblock').length > 0", "Swagger UI's operations")
        dom = browser.evaluate("document.documentElement.outerHTML")
        shot = tmp_path / "docs.png"
        browser.screenshot(shot)
    finally:
        browser.close()
    for api in ("/predict", "/predict_batch", "/explain", "/metadata", "/healthz", "/readyz"):
        assert api in dom, f"{api} missing from the rendered docs page"
    pixels = np.asarray(PILImage.open(shot).convert("L"))
    assert pixels.std() > 10  # a page, not a blank screen


def test_2000_requests_at_concurrency_16_without_errors_or_memory_growth(server: Server):
    data = film_png(3, 64)

    async def hammer(n: int) -> list[int]:
        statuses: list[int] = []
        todo = iter(range(n))
        async with httpx.AsyncClient(
            base_url=server.url, timeout=60, limits=httpx.Limits(max_connections=16, max_keepalive_connections=16)
        ) as client:

            async def worker() -> None:
                for _ in todo:
                    r = await client.post("/predict", files={"file": ("x.png", data)})
                    statuses.append(r.status_code)

            await asyncio.gather(*(worker() for _ in range(16)))
        return statuses

    warm = asyncio.run(hammer(300))
    assert set(warm) == {200}, Counter(warm)
    before = server.rss()
    statuses = asyncio.run(hammer(2000))
    after = server.rss()
    assert len(statuses) == 2000 and set(statuses) == {200}, Counter(statuses)
    assert after < 1.10 * before, f"RSS grew from {before / 2**20:.0f} MiB to {after / 2**20:.0f} MiB"


def non_chest_dicom() -> bytes:
    """A long bone's outline on a dark field (no lungs, no mediastinum) whose header names no body part."""
    yy, xx = np.mgrid[:256, :256]
    bone = (xx - 128) ** 2 / 30**2 + (yy - 128) ** 2 / 115**2 < 1
    rng = np.random.default_rng(0)
    ds = make_dataset(np.where(bone, 0.85, 0.15) + rng.normal(0, 0.02, bone.shape), Encoding(), rng)
    del ds.BodyPartExamined  # the header no longer refuses it: the model's own check must
    return encode(ds)


def test_films_unlike_the_training_films_abstain_unless_the_caller_asks_to_decide(server: Server):
    noise = png(np.random.default_rng(0).integers(0, 256, (96, 96), dtype=np.uint8))
    before = scrape(server)
    for data in (noise, non_chest_dicom()):
        body = httpx.post(f"{server.url}/predict", files={"file": ("x", data)}, timeout=60).json()
        assert (body["prediction"], body["positive"], body["ood"]["in_distribution"]) == ("abstain", None, False)
        assert body["ood"]["score"] > body["ood"]["threshold"] and "out of distribution" in body["abstain_reason"]
        decided = httpx.post(
            f"{server.url}/predict", files={"file": ("x", data)}, data={"abstain": "false"}, timeout=60
        ).json()
        assert decided["prediction"] in ("normal", "pneumonia") and decided["ood"]["in_distribution"] is False
        explained = httpx.post(f"{server.url}/explain", files={"file": ("x", data)}, timeout=60)
        assert json.loads(explained.headers["X-CXR-OOD"])["in_distribution"] is False
        assert any("out of distribution" in w for w in json.loads(explained.headers["X-CXR-Warnings"]))
    after = scrape(server)
    version = body["model"]["version"]
    for outcome in ("abstained", "decided"):
        key = ("cxr_out_of_distribution_total", frozenset({"outcome": outcome, "model_version": version}.items()))
        assert after[key] - before[key] == 2
    meta = httpx.post(f"{server.url}/metadata", json={}, timeout=30).json()["out_of_distribution"]
    assert meta["checked"] and meta["method"] == "feature_mahalanobis" and 0.9 <= meta["val_pass_rate"] <= 1


def scrape(server: Server) -> Counter:
    """Every sample on /metrics, keyed by (name, labels)."""
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    return Counter(
        {
            (sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }
    )


def test_metrics_count_what_the_service_answered_and_refused(server: Server, champion):
    """Each cxr_ metric moves by what these requests make it (both HTTP workers' values summed)."""
    uploads = [synthetic_dicom(3, ViewPosition="LL"), film_png(5)]  # seed 3: a MONOCHROME1 DICOM
    before = scrape(server)
    answers = [httpx.post(f"{server.url}/predict", files={"file": ("x", d)}, timeout=60).json() for d in uploads]
    for data in (b"junk", b"\0" * (MAX_BYTES + 2_000_000)):
        assert httpx.post(f"{server.url}/predict", files={"file": ("x", data)}, timeout=60).status_code in (413, 422)
    after = scrape(server)

    def moved(name: str, **labels: str) -> float:
        key = (name, frozenset(labels.items()))
        return after[key] - before[key]

    version = answers[0]["model"]["version"]
    for prediction, n in Counter(a["prediction"] for a in answers).items():
        assert (
            moved("cxr_predictions_total", prediction=prediction, model_version=version, operating_point="model") == n
        )
    assert moved("cxr_score_count", label="pneumonia", model_version=version) == 2
    assert moved("cxr_score_sum", label="pneumonia", model_version=version) == pytest.approx(
        sum(a["probabilities"]["pneumonia"] for a in answers), abs=1e-6
    )
    reasons = Counter(r for a in answers for w in a["warnings"] for r in warning_reasons(w))
    assert reasons["non_frontal_view"] == 1
    for reason, n in reasons.items():
        assert moved("cxr_input_warnings_total", reason=reason) == n
    assert moved("cxr_inputs_total", format="dicom", view="LATERAL", photometric="MONOCHROME1") == 1
    assert moved("cxr_inputs_total", format="png", view="N/A", photometric="N/A") == 1
    assert moved("cxr_refusals_total", reason="not_an_image") == 1
    assert moved("cxr_refusals_total", reason="too_large") == 1  # by the upload limit, before any decoding

    stats = [image_stats(champion.prepare_input(champion.read(d))) for d in uploads]
    reference = champion.card.train_intensity
    assert reference is not None and reference.images > 0  # training wrote the drift reference into model.json
    zs = [drift_z(s, reference) for s in stats]
    for stat in ("mean", "std"):
        assert moved("cxr_input_intensity_count", stat=stat) == 2
        assert moved("cxr_input_intensity_sum", stat=stat) == pytest.approx(sum(s[stat] for s in stats), abs=1e-5)
        for bound in Z_BUCKETS:
            assert moved("cxr_input_drift_zscore_bucket", stat=stat, le=str(bound)) == sum(z[stat] <= bound for z in zs)


def test_without_batching_and_with_two_http_workers_answers_the_same(project: Path, server: Server, tmp_path: Path):
    """CXR_BATCHING=0: no batcher, one request per forward pass; CXR_HTTP_WORKERS=2: two HTTP processes,
    whose metrics /metrics adds up. The same answers."""
    uploads = [synthetic_dicom(11), film_png(2)] * 4

    def counted_every_answer(other: Server) -> None:
        answered = sum(v for (name, _), v in scrape(other).items() if name == "cxr_predictions_total")
        assert answered == len(uploads)

    other = Server(project, tmp_path / "direct.log", home=tmp_path / "home", CXR_BATCHING="0", CXR_HTTP_WORKERS="2")
    assert_answers_like(server, other, uploads, then=counted_every_answer)


def test_no_champion_stops_the_service_with_one_clear_message_and_a_failing_status(project: Path, tmp_path: Path):
    """Supervisors (systemd, Docker restart policies, Kubernetes) and scripts read the exit status: without
    a model `bentoml serve` must not report success."""
    from cxr.serving.lifecycle import EXIT_CANNOT_START

    srv = Server(project, tmp_path / "fail.log", home=tmp_path / "home", CXR_MODEL_URI="models:/cxr@nobody")
    try:
        status = srv.proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the service kept running without a model:\n{srv.text()[-3000:]}")
    finally:
        srv.stop()
    log = srv.text()
    assert status == EXIT_CANNOT_START != 0, log[-3000:]
    lines = [line for line in log.splitlines() if "cannot start" in line]
    assert len(lines) == 1, log[-3000:]
    assert "models:/cxr@nobody" in lines[0] and "cxr promote" in lines[0]
    assert "Traceback" not in log


def build_bento(tmp_path: Path) -> tuple[str, Path]:
    """`bentoml build` offline from bentofile.yaml into a BentoML home under ``tmp_path``: (tag, home)."""
    repo = Path(__file__).resolve().parents[2]
    home = tmp_path / "bentoml_home"
    built = subprocess.run(
        [BENTOML, "build", "-f", str(repo / "bentofile.yaml"), "--output", "tag", str(repo / "src")],
        cwd=tmp_path,
        env=bentoml_env(home),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    tag = built.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    assert tag.startswith("cxr-service:"), built.stdout
    return tag, home


def bentoml_env(home: Path) -> dict[str, str]:
    return {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true"}


BENTOML = str(Path(sys.executable).with_name("bentoml"))


def test_the_built_bento_serves_the_champion(project: Path, server: Server, tmp_path: Path):
    """`bentoml build` offline from bentofile.yaml, then `bentoml serve <tag>` answers like the source service."""
    tag, home = build_bento(tmp_path)
    # a bento runs in its own folder, so the registry is named the way a deployment names it
    bento = Server(
        project, tmp_path / "bento.log", home=home, target=tag, MLFLOW_TRACKING_URI=f"sqlite:///{project / 'mlflow.db'}"
    )
    assert_answers_like(server, bento, [synthetic_dicom(12), film_png(3)])


def docker_unavailable() -> str | None:
    """Why no Docker engine can be used here, or None when `docker info` answers."""
    if shutil.which("docker") is None:
        return "no `docker` command"
    try:
        info = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return "`docker info` did not answer in 60 s"
    if info.returncode != 0:
        lines = (info.stderr or info.stdout).strip().splitlines()
        return f"`docker info` fails: {lines[-1] if lines else info.returncode}"
    return None


@pytest.fixture(scope="module")
def docker_engine() -> None:
    """Skips (before the module's model is trained, when named first) where no Docker engine answers."""
    why = docker_unavailable()
    if why:
        pytest.skip(f"no Docker engine reachable ({why})")


def docker(*args: str, timeout: float = 120) -> str:
    return subprocess.run(["docker", *args], capture_output=True, text=True, check=True, timeout=timeout).stdout


def ready(url: str) -> bool:
    try:
        return httpx.post(f"{url}/readyz", json={}, timeout=5).status_code == 200
    except httpx.TransportError:
        return False


def test_bentoml_containerize_builds_an_image_that_serves_the_model(
    docker_engine: None, project: Path, server: Server, tmp_path: Path
):
    """`bentoml containerize` on the built bento, then the image serves the trained model directory (mounted)
    and answers like the source service. Needs a Docker engine, and PyPI for the image's packages."""
    tag, home = build_bento(tmp_path)
    image = f"cxr-service-test:{tag.partition(':')[2]}"
    built = subprocess.run(
        [BENTOML, "containerize", tag, "-t", image],
        env=bentoml_env(home),
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert built.returncode == 0, (built.stdout + built.stderr)[-5000:]
    container = None
    try:
        model = f"{project / 'models' / 'cxr'}:/model:ro"
        run = ["run", "-d", "--rm", "-p", "127.0.0.1::3000", "-e", "CXR_MODEL_URI=/model", "-v", model, image]
        container = docker(*run).strip()
        port = docker("port", container, "3000").strip().splitlines()[0].rsplit(":", 1)[-1]
        data = synthetic_dicom(13)
        deadline = time.monotonic() + 300
        while not ready(f"http://127.0.0.1:{port}"):
            if time.monotonic() > deadline:
                logs = subprocess.run(["docker", "logs", container], capture_output=True, text=True, timeout=60)
                pytest.fail(f"the container was not ready in 300 s:\n{(logs.stdout + logs.stderr)[-3000:]}")
            time.sleep(1)
        got = httpx.post(f"http://127.0.0.1:{port}/predict", files={"file": ("x", data)}, timeout=60).json()
        want = httpx.post(f"{server.url}/predict", files={"file": ("x", data)}, timeout=60).json()
        assert got["probabilities"] == pytest.approx(want["probabilities"], abs=1e-6)
    finally:
        if container:
            subprocess.run(["docker", "stop", container], capture_output=True, timeout=120)
        subprocess.run(["docker", "rmi", "-f", image], capture_output=True, timeout=300)
