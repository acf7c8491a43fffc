"""`cxr` commands for the pipeline's stages: config, ingest, synthesize-site, prepare, train, ensemble, evaluate, export, import-weights."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
import yaml

from cxr.cli.app import Overrides, ParamsFile, app, console, load, user_errors
from cxr.errors import UserError


@app.command()
@user_errors
def config(params: ParamsFile = Path("params.yaml"), overrides: Overrides = None) -> None:
    """Print the resolved configuration (params.yaml plus overrides) as YAML."""
    cfg = load(params, overrides)
    typer.echo(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


@app.command()
@user_errors
def ingest(params: ParamsFile = Path("params.yaml"), overrides: Overrides = None) -> None:
    """Materialise the configured data source into paths.raw (images + manifest)."""
    from cxr.data.ingest import ingest as run  # lazy: a stage pulls in torch/mlflow, `cxr --help` must not

    cfg = load(params, overrides)
    run(cfg)  # says what it ingested


@app.command("synthesize-site")
@user_errors
def synthesize_site(
    site: Annotated[str, typer.Option(help="Site profile: hospital_b, or internal (the training patients again).")] = (
        "hospital_b"
    ),
    out: Annotated[
        Path | None, typer.Option(help="Output folder: <label>/ sub-folders of DICOM files plus manifest.csv.")
    ] = None,
    patients: Annotated[int | None, typer.Option(help="Patients to generate (default: the site's own count).")] = None,
    seed: Annotated[int | None, typer.Option(help="Generator seed (default: data.synthetic.seed).")] = None,
    params: ParamsFile = Path("params.yaml"),
    overrides: Overrides = None,
) -> None:
    """Write a synthetic hospital's labelled films, an external test set for `cxr evaluate-external --data`."""
    from cxr.data.sources.synthetic import write_site  # lazy: numpy/pydicom/scipy, `cxr --help` must not

    cfg = load(params, overrides)
    out = out or Path("data/external") / site
    manifest = write_site(cfg, site, out, n_patients=patients, seed=seed)
    counts = manifest["label"].value_counts().sort_index()
    console.print(
        f"wrote {len(manifest)} SYNTHETIC films of {manifest['patient_id'].nunique()} patients of site {site} "
        f"into {out} (" + ", ".join(f"{n} {label}" for label, n in counts.items()) + "); "
        f"score a model on it with `cxr evaluate-external --data {out}`"
    )


@app.command()
@user_errors
def prepare(params: ParamsFile = Path("params.yaml"), overrides: Overrides = None) -> None:
    """Decode, preprocess and split the raw data into memory-mappable arrays plus a dataset card."""
    from cxr.data.prepare import prepare as run  # lazy: a stage pulls in torch/mlflow, `cxr --help` must not

    cfg = load(params, overrides)
    card = run(cfg)
    console.print(
        f"prepared {card['n_images']} images ({card['n_rejected']} rejected) into {cfg.paths.prepared}: "
        + json.dumps(card["images_per_split"])
    )


@app.command()
@user_errors
def train(params: ParamsFile = Path("params.yaml"), overrides: Overrides = None) -> None:
    """Train a model on the prepared data; writes paths.model and an MLflow run."""
    from cxr.training.fit import fit  # lazy: a stage pulls in torch/mlflow, `cxr --help` must not

    cfg = load(params, overrides)
    result = fit(cfg)
    if not result.main_process:  # under torchrun, rank 0 reports for all
        return
    what = (
        f"{cfg.model.arch}: best val AUROC {result.best_val_auroc:.4f} at epoch {result.best_epoch} of "
        f"{result.epochs_trained}"
        if cfg.train.ensemble == 1
        else f"an ensemble of {cfg.train.ensemble} {cfg.model.arch}: val AUROC {result.best_val_auroc:.4f} "
        f"(best epochs {result.best_epoch}, {result.epochs_trained} epochs in all)"
    )
    console.print(
        f"trained {what}; model in {result.model_dir}" + (f"; MLflow run {result.run_id}" if result.run_id else "")
    )


@app.command()
@user_errors
def ensemble(
    models: Annotated[
        list[str], typer.Argument(help="Two or more trained models: directories or MLflow URIs (models:/cxr/3).")
    ],
    out: Annotated[Path | None, typer.Option(help="Where the ensemble is saved (default: paths.model).")] = None,
    params: ParamsFile = Path("params.yaml"),
    overrides: Overrides = None,
) -> None:
    """Combine models of any architectures and prepared sizes into one, weighted on validation; writes an MLflow run.

    Example: cxr ensemble models/cnn models/mlp models:/cxr/3 --out models/ensemble
    """
    from cxr.models.predictor import read_card  # lazy: pulls in torch, `cxr --help` must not
    from cxr.training.combine import combine  # lazy: a stage pulls in torch/mlflow, `cxr --help` must not

    cfg = load(params, overrides)
    result = combine(cfg, models, out)
    members = read_card(result.model_dir).training.members or []
    weights = ", ".join(f"{m.arch} {m.image_size}px {m.weight:.2f}" for m in members)
    console.print(
        f"ensemble of {weights} (weights chosen on validation): val AUROC {result.best_val_auroc:.4f}; "
        f"model in {result.model_dir}" + (f"; MLflow run {result.run_id}" if result.run_id else ""),
        highlight=False,
    )


@app.command()
@user_errors
def evaluate(
    params: ParamsFile = Path("params.yaml"),
    overrides: Overrides = None,
    model: Annotated[str | None, typer.Option(help="Model directory or MLflow URI (default: paths.model).")] = None,
) -> None:
    """Evaluate the model on val and test: metrics with CIs, subgroups, PNG plots in paths.reports."""
    from cxr.evaluation.evaluate import evaluate as run  # lazy: a stage pulls in torch/mlflow, `cxr --help` must not

    cfg = load(params, overrides)
    report = run(cfg, model)
    for split, result in report["splits"].items():
        parts = [
            f"{k} {result[k]['value']:.4f}"
            for k in ("auroc", "macro_auroc", "accuracy", "sensitivity", "specificity")
            if isinstance(result.get(k), dict) and result[k].get("value") is not None
        ]
        console.print(f"{split}: " + ", ".join(parts))


@app.command()
@user_errors
def export(
    model: Annotated[str | None, typer.Option(help="Model directory or MLflow URI (default: paths.model).")] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            help="Write a copy of the model with its graph here (default: a directory gets it inside; "
            "an MLflow URI's copy goes beside paths.model, named after the version)."
        ),
    ] = None,
    params: ParamsFile = Path("params.yaml"),
    overrides: Overrides = None,
) -> None:
    """Export the model to ONNX (model.onnx beside model.safetensors, its sha256 in the card), checked against torch."""
    from cxr.tracking.onnx_artifacts import export_model  # lazy: pulls in torch/mlflow, `cxr --help` must not

    cfg = load(params, overrides)
    path = export_model(cfg, model, out)
    console.print(f"exported {path} (serve it with CXR_RUNTIME=onnx)")


@app.command("import-weights")
@user_errors
def import_weights(
    src: Annotated[
        Path | None,
        typer.Argument(help="A TorchXRayVision checkpoint (a pickled DenseNet) or a torchvision state dict."),
    ] = None,
    out: Annotated[Path, typer.Option(help="Folder for NAME.safetensors and NAME.json.")] = Path("models/imported"),
    download: Annotated[
        str | None, typer.Option(help="Fetch TorchXRayVision weights by name instead, e.g. densenet121-res224-all.")
    ] = None,
    arch: Annotated[str, typer.Option(help="The cxr architecture the weights must load into.")] = "densenet121",
    labels: Annotated[str | None, typer.Option(help="Comma-separated output order, if the file does not say.")] = None,
    mean: Annotated[float | None, typer.Option(help="Input mean on [0, 1] (default: the source's convention).")] = None,
    std: Annotated[float | None, typer.Option(help="Input std on [0, 1] (default: the source's convention).")] = None,
) -> None:
    """Convert pretrained weights into safetensors plus a JSON (normalisation, labels) for model.weights=PATH.

    The one command that opens a pickle: only a TorchXRayVision DenseNet's module classes are allowed in it."""
    from cxr.models import import_weights as convert  # lazy: pulls in torch, `cxr --help` must not
    from cxr.models import xrv_download  # lazy: pulls in torch, `cxr --help` must not

    if (src is None) == (download is None):
        raise UserError("give either a checkpoint file SRC or --download NAME")
    if download is not None:
        src = xrv_download.download(download)
        labels = labels or ",".join(xrv_download.labels_of(download))
    assert src is not None
    names = labels.split(",") if labels else None
    done = convert.import_weights(src, out, arch=arch, labels=names, mean=mean, std=std)
    info = done.description
    console.print(
        f"converted {src} ({info.source.kind}) into {done.weights} and {done.info.name} "
        f"({info.arch}, {info.in_channels}-channel input, normalisation {info.norm_mean:g} / {info.norm_std:g}); "
        f"train from it with `cxr train -s model.arch={info.arch} -s model.weights={done.weights}`"
    )
