"""`cxr evaluate-external`: a trained model scored on an external set, in-process and over HTTP.

The HTTP tests script failures with a stand-in (the service's own answer function behind a Starlette app,
reached through httpx's ASGI transport: no socket); the last test starts the real BentoML service.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import httpx
import mlflow
import numpy as np
import pandas as pd
import pytest
from PIL import Image as PILImage

from cxr.config import Config
from cxr.data.ingest import ingest
from cxr.data.prepare import prepare
from cxr.data.sources.synthetic import SITE_MANIFEST, write_site
from cxr.evaluation.evaluate import evaluate
from cxr.evaluation.external import LOCAL_NAMES_NOTE, MLFLOW_NAMES_NOTE, evaluate_external, load_in_process
from cxr.tracking.runs import use_store
from cxr.training.fit import fit
from support.cli import cxr_here, flags

pytestmark = pytest.mark.slow

TINY = [
    "data.synthetic.n_patients=30",
    "data.synthetic.size=96",
    "prepare.sizes=[32]",
    "model.image_size=32",
    "model.width=8",
    "train.epochs=1",
    "train.batch_size=16",
    "evaluate.bootstrap=50",
    "prepare.workers=1",
]
# The external set: the same generator with another seed (other fictitious patients), ~30 images.
EXTERNAL = ["data.synthetic.seed=11", "data.synthetic.n_patients=14"]


def cxr(workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return cxr_here(workdir, *args, check=check)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A trained (1 epoch) and evaluated model with MLflow tracking in its folder, as a team would have
    after `cxr ingest/prepare/train/evaluate` (called in-process: four interpreter starts saved)."""
    work = tmp_path_factory.mktemp("project")
    cfg = config(work)  # an absolute store: mlflow caches stores by URI, and other tests use sqlite:///mlflow.db
    with contextlib.chdir(work):  # the config's data and model paths are relative to the project
        ingest(cfg)
        prepare(cfg)
        fit(cfg)
        evaluate(cfg)
    return work


def config(project: Path, *extra: str):
    """The project's config as the CLI sees it there, with the tracking store given by absolute path."""
    return Config().override(
        [
            *TINY,
            *extra,
            f"mlflow.tracking_uri=sqlite:///{project / 'mlflow.db'}",
            f"mlflow.artifact_location={project / 'mlartifacts'}",
        ]
    )


@pytest.fixture(scope="module")
def png_folder(tmp_path_factory) -> tuple[Path, list[str]]:
    """NORMAL/ and PNEUMONIA/ PNGs (Kermany layout, test split folder) plus broken files among them."""
    root = tmp_path_factory.mktemp("hospital_b") / "chest_xray" / "test"
    rng = np.random.default_rng(3)
    for label, n in (("NORMAL", 12), ("PNEUMONIA", 12)):
        (root / label).mkdir(parents=True)
        for i in range(n):
            arr = rng.normal(90, 25, (48, 48))
            if label == "PNEUMONIA":
                arr[10:30, 8:24] += rng.uniform(20, 90)
            PILImage.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(root / label / f"{label.lower()}_{i}.png")
    good = (root / "NORMAL" / "normal_0.png").read_bytes()
    broken = {
        "NORMAL/zz_garbage.png": rng.bytes(300),
        "PNEUMONIA/truncated.png": good[: len(good) // 3],
        "PNEUMONIA/empty.dcm": b"",
        "NORMAL/not_dicom.dcm": b"DICM" * 40,
    }
    for rel, data in broken.items():
        (root / rel).write_bytes(data)
    return root.parent.parent, sorted(broken)


# --- in-process ---------------------------------------------------------------------------------


def test_in_process_cli_writes_self_contained_report_and_mlflow_run(project: Path):
    res = cxr(
        project, "evaluate-external", "--model", "models/cxr", "--out", "reports/ext_local", *flags([*TINY, *EXTERNAL])
    )
    assert "images scored" in res.stderr
    folder = project / "reports" / "ext_local" / "report"
    report = json.loads((folder / "external.json").read_text())
    n = report["data"]["n_images"]
    assert 25 <= n <= 40 and report["requests"] == {"sent": n, "from_cache": 0, "ok": n, "refused": 0, "failed": 0}
    m = report["metrics"]
    for key in ("auroc", "auprc", "accuracy", "sensitivity", "specificity", "ppv", "npv", "f1"):
        assert set(m[key]) == {"value", "ci_low", "ci_high"}, key
    assert m["threshold"] == json.loads((project / "models" / "cxr" / "model.json").read_text())["threshold"]
    assert {"view", "sex", "age_band"} & set(m["subgroups"])  # the synthetic manifest carries them
    # internal test metrics come from the model's training run, with CIs, so the drop is visible
    comp = report["comparison"]
    assert comp["available"] and "evaluation.json" in comp["source"]
    auroc = comp["metrics"]["auroc"]
    assert auroc["drop"] == pytest.approx(auroc["internal"]["value"] - m["auroc"]["value"])
    assert isinstance(auroc["cis_overlap"], bool)

    # the internal test scores kept by `cxr evaluate` show the shift per class
    shift = report["score_shift"]
    assert shift["internal"]["available"] and "MLflow run" in shift["internal"]["source"]
    assert shift["per_class"]["normal"]["internal"]["n"] + shift["per_class"]["pneumonia"]["internal"]["n"] > 0
    assert "site_calibration" not in report  # no --calibrate: one operating point, as before

    html = (folder / "external.html").read_text()
    # ROC, PR, confusion, calibration, calibration internal vs external, score shift
    assert html.count("data:image/png;base64,") == 6
    assert "<script" not in html and "<link" not in html and 'src="http' not in html
    assert "Failures (0)" in html

    # films from the training site's generator: few out of distribution, and the report leads with it
    ood = report["out_of_distribution"]
    assert ood["checked"] and ood["images"] == n and ood["share"] <= 0.3 and ood["level"] != "not_built_for"
    assert "out of distribution:" in res.stderr and html.index("Out of distribution") < html.index("Requests")

    use_store(f"sqlite:///{project / 'mlflow.db'}")
    run = mlflow.get_run(res.stderr.split("MLflow run")[-1].split()[0])
    info = json.loads((project / "models" / "cxr" / "model.json").read_text())
    assert run.data.metrics["ood_share"] == ood["share"] and run.data.tags["ood_verdict"] == ood["verdict"]
    assert run.data.tags["model_run_id"] == info["training"]["run_id"]
    assert run.data.tags["external_dataset_hash"] == report["data"]["dataset_hash"]
    assert run.data.tags["endpoint"] == "in-process"
    assert run.info.run_name.startswith("external synthetic: ")  # named after the data, not by MLflow
    assert [d.dataset.name for d in run.inputs.dataset_inputs] == ["external synthetic"]
    assert run.data.metrics["external_auroc"] == m["auroc"]["value"]
    assert run.data.metrics["internal_test_auroc"] == auroc["internal"]["value"]
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "external")}
    assert {"external/external.json", "external/external.html", "external/plots"} <= artifacts


def test_a_strongly_shifted_site_is_mostly_out_of_distribution(project: Path, tmp_path: Path):
    """Another hospital's scanner (synthetic hospital_b: tighter field, blur, another response curve, collimation)."""
    write_site(config(project), "hospital_b", tmp_path / "hospital_b", n_patients=20, workers=1)
    manifest = tmp_path / "hospital_b" / SITE_MANIFEST
    report = evaluate_external(config(project), data=manifest, model=project / "models" / "cxr", out=tmp_path / "out")
    ood = report["out_of_distribution"]
    assert ood["share"] >= 0.7 and ood["level"] == "not_built_for" and "not built for" in ood["verdict"]
    assert set(ood["by_subgroup"]) and all(
        g["flagged"] <= g["images"] for v in ood["by_subgroup"].values() for g in v.values()
    )
    predictions = pd.read_csv(tmp_path / "out" / "report" / "predictions.csv")
    assert (predictions["prediction"] == '"abstain"').sum() == ood["flagged"] == (~predictions["in_distribution"]).sum()


def test_broken_files_are_counted_and_listed(project: Path, png_folder, tmp_path: Path):
    root, broken = png_folder
    report = evaluate_external(config(project), data=root, model=project / "models" / "cxr", out=tmp_path)
    assert report["requests"]["refused"] == len(broken) and report["requests"]["ok"] == 24
    assert sorted(f["file"].split("/", 2)[-1] for f in report["failures"]) == broken
    assert all(f["status"] == "refused" and f["error"] for f in report["failures"])
    assert report["metrics"]["n"] == 24  # metrics on the scored images only
    assert report["data"]["label_mapping"] == {"NORMAL": "normal", "PNEUMONIA": "pneumonia"}
    html = (tmp_path / "report" / "external.html").read_text()
    assert f"Failures ({len(broken)})" in html and all(Path(b).name in html for b in broken)
    predictions = (tmp_path / "report" / "predictions.csv").read_text()
    assert predictions.count("refused") == len(broken)


def test_mlflow_holds_salted_hashes_of_the_file_names_and_the_local_report_the_names(
    project: Path, png_folder, tmp_path: Path
):
    """File names are often patient names in PACS exports: none may reach MLflow (artifacts, tags, params, name)."""
    root, broken = png_folder
    data = tmp_path / "pacs_export"
    shutil.copytree(root, data)
    patient = data / "chest_xray" / "test" / "PNEUMONIA" / "Doe_Jane_19700101.png"
    shutil.copy(data / "chest_xray" / "test" / "NORMAL" / "normal_0.png", patient)
    (data / "chest_xray" / "test" / "NORMAL" / "Roe_Richard_truncated.png").write_bytes(patient.read_bytes()[:200])
    report = evaluate_external(config(project), data=data, model=project / "models" / "cxr", out=tmp_path / "out")
    names = {p.name for p in data.rglob("*") if p.is_file()}
    assert {"Doe_Jane_19700101.png", "Roe_Richard_truncated.png", *(Path(b).name for b in broken)} <= names
    patients = ("Doe_Jane", "Roe_Richard")

    local = tmp_path / "out" / "report"
    predictions = pd.read_csv(local / "predictions.csv")
    assert {Path(f).name for f in predictions["file"]} == names  # the local report keeps the names ...
    assert any(f["file"].endswith("Roe_Richard_truncated.png") for f in report["failures"])
    for page in ("external.json", "external.html"):
        assert LOCAL_NAMES_NOTE in (local / page).read_text()  # ... and says so

    run = mlflow.get_run(report["mlflow_run_id"])
    logged = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, dst_path=str(tmp_path / "logged")))
    files = [p for p in logged.rglob("*") if p.is_file()]
    assert {"predictions.csv", "external.json", "external.html"} <= {p.name for p in files}
    said = "\n".join(p.read_bytes().decode(errors="replace") for p in files)
    said += json.dumps([run.info.run_name, run.data.tags, run.data.params, [str(d) for d in run.inputs.dataset_inputs]])
    assert [n for n in names | set(patients) if n in said] == []
    shared = pd.read_csv(logged / "external" / "predictions.csv")
    assert "file" not in shared and shared["file_id"].tolist() == predictions["file_id"].tolist()  # rows match
    assert shared["file_id"].str.fullmatch("[0-9a-f]{20}").all() and shared["file_id"].is_unique
    assert MLFLOW_NAMES_NOTE in (logged / "external" / "external.json").read_text()


def test_manifest_csv_labels_and_demographics(project: Path, png_folder, tmp_path: Path):
    root, broken = png_folder
    images = sorted(p for p in (root / "chest_xray" / "test").rglob("*.png") if p.name.startswith(("normal", "pneum")))
    rows = ["path,label,sex,view,patient_id"] + [
        f"{p},{'1' if 'PNEUMONIA' in str(p) else '0'},{'MF'[i % 2]},PA,P{i}" for i, p in enumerate(images)
    ]
    (tmp_path / "hospital_b.csv").write_text("\n".join(rows) + "\n")
    report = evaluate_external(
        config(project), data=tmp_path / "hospital_b.csv", model=project / "models" / "cxr", out=tmp_path / "out"
    )
    assert report["data"]["label_mapping"] == {"0": "normal", "1": "pneumonia"}
    assert report["requests"]["ok"] == 24 and set(report["metrics"]["subgroups"]) == {"sex"}  # one view only
    assert {v["n"] for v in report["metrics"]["subgroups"]["sex"].values()} == {12}


# --- over HTTP, against a scripted stand-in service -----------------------------------------------


class StandIn:
    """The service's answers (cxr.serving.served, as src/cxr/serving/service.py uses it) over a scripted Starlette app:
    ``script`` answers chosen calls with an error status, ``fail_after`` every call after that many."""

    def __init__(self, served, script: dict[int, int] | None = None, fail_after: int | None = None):
        from starlette.applications import Starlette
        from starlette.responses import JSONResponse
        from starlette.routing import Route

        self.calls: list[bytes] = []
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request, whatever its answer
        self.script, self.fail_after = script or {}, fail_after

        async def metadata(request):
            return JSONResponse(served.metadata())

        async def predict(request):
            data = await (await request.form())["file"].read()
            self.calls.append(data)
            n = len(self.calls)
            if n in self.script or (self.fail_after is not None and n > self.fail_after):
                return JSONResponse(
                    {"error": "overloaded"}, status_code=self.script.get(n, 503), headers={"Retry-After": "0"}
                )
            (result,) = served.predict([data])
            return (
                JSONResponse({"error": result["error"]}, status_code=result["status"])
                if "error" in result
                else JSONResponse(result)
            )

        app = Starlette(
            routes=[Route("/metadata", metadata, methods=["POST"]), Route("/predict", predict, methods=["POST"])]
        )

        async def recording(scope, receive, send):
            if scope["type"] == "http":
                self.requests.append((scope["method"], scope["path"]))
            await app(scope, receive, send)

        self.app = recording

    def transport(self) -> httpx.ASGITransport:
        return httpx.ASGITransport(app=self.app)


def test_retries_transient_errors_but_never_a_refusal(project: Path, png_folder, tmp_path: Path):
    root, broken = png_folder
    standin = StandIn(load_in_process(project / "models" / "cxr"), script={1: 503, 2: 429, 3: 500})
    report = evaluate_external(
        config(project),
        data=root,
        url="http://standin",
        out=tmp_path,
        transport=standin.transport(),
        backoff=0,
        concurrency=1,
    )
    assert report["requests"]["failed"] == 0 and report["requests"]["refused"] == len(broken)
    # the first file met 503, 429 and 500 and got through on its fourth try; every other file, the refused
    # ones included, was sent exactly once
    calls = Counter(standin.calls)
    assert calls.pop((root / "chest_xray/test/NORMAL/normal_0.png").read_bytes()) == 4
    assert set(calls.values()) == {1} and len(calls) == 27
    # the metadata is asked for once, by POST (the method of the service's API): no GET probe first
    assert [r for r in standin.requests if r[1] == "/metadata"] == [("POST", "/metadata")]


def test_interrupted_run_resumes_and_matches_in_process(project: Path, png_folder, tmp_path: Path):
    root, broken = png_folder
    cfg = config(project)
    served = load_in_process(project / "models" / "cxr")
    # the service goes down after 12 requests: the rest are reported as failed, never dropped
    dying = StandIn(served, fail_after=12)
    first = evaluate_external(
        cfg,
        data=root,
        url="http://standin",
        out=tmp_path,
        transport=dying.transport(),
        retries=1,
        backoff=0,
        concurrency=4,
    )
    assert first["requests"]["failed"] == 28 - 12 and len(first["failures"]) == 28 - 12 + first["requests"]["refused"]
    assert first["metrics"]["n"] + first["requests"]["refused"] == 12
    # the second run re-sends only what got no final answer
    healthy = StandIn(served)
    second = evaluate_external(
        cfg, data=root, url="http://standin", out=tmp_path, transport=healthy.transport(), backoff=0
    )
    assert len(healthy.calls) == second["requests"]["sent"] == 28 - 12
    assert second["requests"]["from_cache"] == 12 and second["requests"]["failed"] == 0
    local = evaluate_external(cfg, data=root, model=project / "models" / "cxr", out=tmp_path / "local")
    assert second["metrics"] == local["metrics"]
    assert second["data"]["dataset_hash"] == local["data"]["dataset_hash"]


def test_no_service_is_a_clear_error(tmp_path: Path, monkeypatch):
    from typer.testing import CliRunner

    from cxr.cli import app

    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    res = runner.invoke(
        app, ["evaluate-external", "--url", "http://127.0.0.1:9", "--retries", "0", "--out", str(tmp_path)]
    )
    assert res.exit_code == 2 and "cannot reach the cxr service" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, ["evaluate-external", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "--url" in res.output and "--model" in res.output


# --- the real service ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def champion(project: Path) -> str:
    """The trained model registered as version 1 of `cxr` with the champion alias."""
    use_store(f"sqlite:///{project / 'mlflow.db'}")
    run_id = json.loads((project / "models" / "cxr" / "model.json").read_text())["training"]["run_id"]
    # the logged model's URI, as `cxr register` uses: the version then knows its logged model
    version = mlflow.register_model(mlflow.get_run(run_id).data.tags["model_uri"], "cxr")
    mlflow.MlflowClient().set_registered_model_alias("cxr", "champion", version.version)
    # a site operating point stored before the service starts: the service reads it at load
    point = {"threshold": 0.999, "rule": {"method": "youden"}, "n_calibration": 10, "dataset_hash": "h", "created": "t"}
    mlflow.MlflowClient().set_model_version_tag("cxr", version.version, "operating_point.hospital_a", json.dumps(point))
    return "models:/cxr@champion"


@pytest.fixture(scope="module")
def service(project: Path, champion: str, start_service) -> str:
    """The real service (tests/integration/conftest.py) serving the champion from project/mlflow.db."""
    (project / "params.yaml").write_text("{}\n")  # defaults: sqlite:///mlflow.db, models:/cxr@champion
    return start_service(project, project / "serve.log").url


def test_through_the_service_equals_in_process(project: Path, service: str, champion: str, png_folder, tmp_path: Path):
    root, broken = png_folder
    cfg = config(project)
    # one request in flight: the service then runs one image per forward pass, as in-process mode does
    remote = evaluate_external(cfg, data=root, url=service, out=tmp_path / "remote", concurrency=1)
    local = evaluate_external(cfg, data=root, model=champion, out=tmp_path / "local")
    assert remote["metrics"] == local["metrics"]  # to the last float, CIs and subgroups included
    assert remote["requests"]["refused"] == local["requests"]["refused"] == len(broken)
    assert [f["error"] for f in remote["failures"]] == [f["error"] for f in local["failures"]]
    assert remote["model"]["version"] == local["model"]["version"] == "1"
    remote_predictions = pd.read_csv(tmp_path / "remote" / "report" / "predictions.csv").drop(columns="file_id")
    local_predictions = pd.read_csv(tmp_path / "local" / "report" / "predictions.csv").drop(columns="file_id")
    pd.testing.assert_frame_equal(remote_predictions, local_predictions)  # file_id: salted per report

    run = mlflow.get_run(remote["mlflow_run_id"])
    assert run.data.tags["endpoint"] == f"{service}/predict" and run.data.tags["model_version"] == "1"
    assert run.data.tags["model_name"] == "cxr" and run.data.metrics["external_n_refused"] == len(broken)
    # the registered version's logged model lists the external metrics next to the training run's
    source = mlflow.MlflowClient().get_model_version("cxr", "1").source  # models:/m-<logged model id>
    logged = mlflow.get_logged_model(source.removeprefix("models:/"))
    assert {"external_auroc", "test_auroc"} <= {m.key for m in logged.metrics}
    # the version knows how much of this set was out of distribution
    tags = mlflow.MlflowClient().get_model_version("cxr", "1").tags
    key = f"external_ood_share.{remote['data']['dataset_hash'][:12]}"
    assert float(tags[key]) == pytest.approx(remote["out_of_distribution"]["share"], abs=1e-4)
    # the second run finds every answer in its cache
    again = evaluate_external(cfg, data=root, url=service, out=tmp_path / "remote", concurrency=4)
    assert again["requests"]["sent"] == 0 and again["metrics"] == remote["metrics"]


def test_the_service_answers_at_a_named_site_only_when_asked(service: str, png_folder):
    root, _ = png_folder
    upload = {"file": ("a.png", (root / "chest_xray/test/NORMAL/normal_0.png").read_bytes(), "image/png")}
    plain = httpx.post(f"{service}/predict", files=upload, timeout=60).json()
    by_query = httpx.post(f"{service}/predict", params={"site": "hospital_a"}, files=upload, timeout=60).json()
    by_header = httpx.post(f"{service}/predict", headers={"X-CXR-Site": "hospital_a"}, files=upload, timeout=60)
    assert "operating_point" not in plain
    assert by_query["operating_point"] == "hospital_a" and by_query["threshold"] == 0.999
    assert by_header.json() == by_query and by_query["probabilities"] == plain["probabilities"]
    unknown = httpx.post(f"{service}/predict", params={"site": "nowhere"}, files=upload, timeout=60)
    assert unknown.status_code == 400 and "known: hospital_a" in unknown.json()["error"]
    meta = httpx.post(f"{service}/metadata", json={}, timeout=60).json()
    assert meta["operating_points"]["hospital_a"]["threshold"] == 0.999


def test_calibrate_and_save_site_on_the_registered_version(project: Path, champion: str):
    res = cxr(
        project,
        "evaluate-external",
        "--model",
        champion,
        "--calibrate",
        "0.4",
        "--save-site",
        "hospital_b",
        "--out",
        "reports/ext_site",
        *flags([*TINY, *EXTERNAL]),
    )
    assert "site threshold" in res.stdout and "saved as operating_point.hospital_b" in res.stderr
    report = json.loads((project / "reports/ext_site/report/external.json").read_text())
    part = report["site_calibration"]
    assert part["split"]["unit"] == "patient" and part["saved_as"] == "operating_point.hospital_b"
    assert report["metrics"]["n"] == part["split"]["evaluation"]["scored"] < report["data"]["n_images"]

    use_store(f"sqlite:///{project / 'mlflow.db'}")
    tag = json.loads(mlflow.MlflowClient().get_model_version("cxr", "1").tags["operating_point.hospital_b"])
    assert tag["threshold"] == part["thresholds"]["site"] and tag["dataset_hash"] == report["data"]["dataset_hash"]
    assert tag["n_calibration"] == part["split"]["calibration"]["scored"]
    run = mlflow.get_run(res.stderr.split("MLflow run")[-1].split()[0])
    assert run.data.metrics["site_threshold"] == part["thresholds"]["site"]
    assert "external_site_specificity" in run.data.metrics
    # a model directory is no registered version: nothing to store the threshold on
    refused = cxr(
        project,
        "evaluate-external",
        "--model",
        "models/cxr",
        "--calibrate",
        "0.4",
        "--save-site",
        "b",
        *flags([*TINY, *EXTERNAL]),
        check=False,
    )
    assert (
        refused.returncode == 2 and "registered model version" in refused.stderr and "Traceback" not in refused.stderr
    )
