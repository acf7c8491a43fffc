"""`evaluate-external --calibrate`: a site whose negatives score higher than at the training site.

A stand-in service (Starlette through httpx's ASGI transport: no socket, no model) answers each film with a
scripted score: positives around 0.72, negatives around 0.40 where the internal test set had them near 0. At
the model's threshold (0.5) about one external negative in ten is then a false positive, while the internal
specificity was 0.99; a threshold chosen on part of the site's films should bring it back on the rest.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image as PILImage

from cxr.config import Config
from cxr.errors import UserError
from cxr.evaluation.external import evaluate_external

LABELS = ["normal", "pneumonia"]
MODEL_THRESHOLD = 0.5
INTERNAL = {"test_specificity": 0.99, "test_sensitivity": 0.97, "test_auroc": 0.999, "test_accuracy": 0.98}
N_PATIENTS = 200  # per patient two films of the same label
CFG = ["mlflow.enabled=false", "evaluate.bootstrap=200"]


def metadata(version: str | None = "7") -> dict:
    return {
        "model": {"name": "cxr", "version": version, "uri": "models:/cxr@champion"},
        "task": "binary",
        "labels": LABELS,
        "threshold": MODEL_THRESHOLD,
        "threshold_method": "youden",
        "training": {"run_id": None, "dataset_hash": "internal"},
        "metrics": INTERNAL,
    }


class ShiftedSite:
    """/metadata and /predict answering each upload with the score scripted for its bytes."""

    def __init__(self, scores: dict[str, float], version: str | None = "7", outside: set[str] | None = None):
        from starlette.applications import Starlette
        from starlette.responses import JSONResponse
        from starlette.routing import Route

        async def meta(request):
            return JSONResponse(metadata(version))

        async def predict(request):
            data = await (await request.form())["file"].read()
            key = hashlib.sha256(data).hexdigest()
            p = scores[key]
            answer = {
                "probabilities": {LABELS[0]: 1 - p, LABELS[1]: p},
                "prediction": LABELS[int(p >= MODEL_THRESHOLD)],
                "positive": p >= MODEL_THRESHOLD,
                "threshold": MODEL_THRESHOLD,
                "model": metadata(version)["model"],
                "warnings": [],
            }
            if outside is not None:  # a model with an out-of-distribution check: these films it abstains on
                inside = key not in outside
                answer["ood"] = {
                    "checked": True,
                    "score": 1.0 if inside else 9.0,
                    "threshold": 5.0,
                    "in_distribution": inside,
                }
                if not inside:
                    answer.update(prediction="abstain", positive=None, abstain_reason="out of distribution")
            return JSONResponse(answer)

        self.app = Starlette(
            routes=[Route("/metadata", meta, methods=["POST"]), Route("/predict", predict, methods=["POST"])]
        )

    def transport(self) -> httpx.ASGITransport:
        return httpx.ASGITransport(app=self.app)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> tuple[Path, dict[str, float]]:
    """A manifest CSV (patient ids, two films each) and the score the stand-in gives each film."""
    root = tmp_path_factory.mktemp("hospital_c")
    rng = np.random.default_rng(5)
    rows, scores = ["path,label,patient_id,sex"], {}
    for patient in range(N_PATIENTS):
        label = patient % 2
        for film in range(2):
            buf = io.BytesIO()
            PILImage.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(buf, format="PNG")
            path = root / f"p{patient}_{film}.png"
            path.write_bytes(buf.getvalue())
            centre, spread = (0.72, 0.07) if label else (0.40, 0.08)
            scores[hashlib.sha256(buf.getvalue()).hexdigest()] = float(np.clip(rng.normal(centre, spread), 0.01, 0.99))
            rows.append(f"{path.name},{LABELS[label]},P{patient},{'MF'[patient // 2 % 2]}")
    (root / "site.csv").write_text("\n".join(rows) + "\n")
    return root / "site.csv", scores


def run(site, tmp_path: Path, **kwargs) -> dict:
    manifest, scores = site
    return evaluate_external(
        Config().override(CFG),
        data=manifest,
        url="http://site",
        out=tmp_path,
        transport=ShiftedSite(scores, kwargs.pop("version", "7"), kwargs.pop("outside", None)).transport(),
        backoff=0,
        **kwargs,
    )


def test_site_threshold_recovers_the_internal_specificity(site, tmp_path: Path):
    report = run(site, tmp_path, calibrate="0.5")
    part = report["site_calibration"]
    split = part["split"]
    assert (
        split["unit"] == "patient" and split["calibration"]["patients"] + split["evaluation"]["patients"] == N_PATIENTS
    )
    assert split["calibration"]["images"] + split["evaluation"]["images"] == 2 * N_PATIENTS
    assert split["calibration"]["labels"] == {"normal": 100, "pneumonia": 100}  # stratified, whole patients
    assert part["rule"] == {"method": "youden", "from": "model card"}
    # every metric in the report is on the evaluation part only
    assert report["metrics"]["n"] == split["evaluation"]["scored"] == 200
    at_model, at_site = (part["operating_points"][k]["specificity"]["value"] for k in ("model", "site"))
    internal = INTERNAL["test_specificity"]
    assert at_model < internal - 0.05  # the drop at the model's own threshold
    assert at_site > internal - 0.05  # recovered at the site's
    assert part["thresholds"]["site"] > MODEL_THRESHOLD
    assert part["operating_points"]["site"]["sensitivity"]["value"] > 0.85  # not bought with all the positives
    for point in part["operating_points"].values():
        assert {"value", "ci_low", "ci_high"} == set(point["specificity"]) and point["specificity"][
            "ci_low"
        ] is not None
        assert point["n"] == 200
    # why: the external negatives sit far above where the threshold was chosen
    normal = report["score_shift"]["per_class"]["normal"]["external"]
    assert normal["above_threshold"]["model"] == pytest.approx(1 - at_model)
    assert not report["score_shift"]["internal"]["available"]  # a service with no training run: said so

    saved = json.loads((tmp_path / "report" / "external.json").read_text())
    assert saved["site_calibration"]["thresholds"] == part["thresholds"]
    html = (tmp_path / "report" / "external.html").read_text()
    assert (
        f"model threshold {MODEL_THRESHOLD:.4f}" in html and f"site threshold {part['thresholds']['site']:.4f}" in html
    )
    assert f"{at_model:.4f}" in html and f"{at_site:.4f}" in html
    assert "internal test scores unavailable" in html
    assert (tmp_path / "report" / "plots" / "score_shift.png").exists()
    assert html.count("data:image/png;base64,") == 6


def test_without_calibrate_the_report_has_no_site_part_and_uses_every_film(site, tmp_path: Path):
    report = run(site, tmp_path)
    assert "site_calibration" not in report and report["metrics"]["n"] == 2 * N_PATIENTS
    assert "score_shift" in report  # the shift is shown either way


def test_a_target_sensitivity_replaces_the_model_rule(site, tmp_path: Path):
    report = run(site, tmp_path, calibrate="150", target_sensitivity=0.99)
    part = report["site_calibration"]
    assert part["rule"]["method"] == "sensitivity" and part["rule"]["target_sensitivity"] == 0.99
    assert abs(part["split"]["calibration"]["images"] - 150) <= 2  # whole patients of two films each
    assert part["operating_points"]["site"]["sensitivity"]["value"] >= 0.95


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"calibrate": "0.5", "save_site": "b"}, "registered model version"),  # mlflow is off here
        ({"calibrate": "0.5", "save_site": "b", "version": None}, "registered model version"),
        ({"save_site": "b"}, "need --calibrate"),
        ({"calibrate": "1.5"}, "fraction in \\(0, 1\\)"),
        ({"calibrate": "400"}, "leaves no images"),
        ({"calibrate": "0.5", "save_site": "no way"}, "site name"),
    ],
)
def test_site_options_misused_are_one_line_errors(site, tmp_path: Path, kwargs, message):
    with pytest.raises(UserError, match=message) as err:
        run(site, tmp_path, **kwargs)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "report").exists()


def test_the_site_threshold_is_chosen_on_the_films_the_service_decides(site, tmp_path: Path):
    manifest, scores = site
    keys = sorted(scores)
    outside = set(keys[::3])  # a third of the films out of distribution
    report = run(site, tmp_path / "third", calibrate="0.5", outside=outside)
    split = report["site_calibration"]["split"]
    for part in ("calibration", "evaluation"):
        assert split[part]["in_distribution"] < split[part]["scored"] == split[part]["images"]
    assert split["calibration"]["in_distribution"] + split["evaluation"]["in_distribution"] == len(keys) - len(outside)
    ood = report["out_of_distribution"]
    assert (ood["images"], ood["flagged"]) == (len(keys), len(outside))  # the whole set: a property of the set
    assert report["site_calibration"]["operating_points"]["site"]["n"] == split["evaluation"]["in_distribution"]

    everything = run(site, tmp_path / "all", calibrate="0.5", outside=set(keys))
    assert (
        "site_calibration" not in everything
        and "too few films in distribution" in everything["site_calibration_skipped"]
    )
    assert everything["out_of_distribution"]["level"] == "not_built_for"
    assert everything["out_of_distribution"]["in_distribution_metrics"] is None
    assert everything["metrics"]["n"] > 0  # the films' probabilities are still scored and reported
