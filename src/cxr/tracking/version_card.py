"""A registered version's description: a short model card in Markdown (the MLflow UI renders it).

Built from the typed ModelCard logged with the run, the evaluation the version was registered with and
the version's tags, never from the current config.
"""

from __future__ import annotations

from typing import Any

from cxr.models.card import ModelCard

# The evaluation's metrics shown in the card, in order, when the task has them.
CARD_METRICS = (
    ("auroc", "AUROC"),
    ("macro_auroc", "macro AUROC"),
    ("auprc", "AUPRC"),
    ("accuracy", "accuracy"),
    ("balanced_accuracy", "balanced accuracy"),
    ("sensitivity", "sensitivity"),
    ("specificity", "specificity"),
    ("macro_f1", "macro F1"),
)
INTENDED_USE = (
    "Research and engineering of the cxr pipeline: scores chest X-rays for {labels}. Not a medical device; "
    "not for diagnosis or triage without a clinical validation of its own."
)


def _cell(entry: Any) -> str:
    if not isinstance(entry, dict) or entry.get("value") is None:
        return "-"
    if entry.get("ci_low") is None or entry.get("ci_high") is None:
        return f"{entry['value']:.4f}"
    return f"{entry['value']:.4f} ({entry['ci_low']:.4f}-{entry['ci_high']:.4f})"


def metrics_table(report: dict[str, Any] | None, tags: dict[str, str]) -> list[str]:
    """Validation and test metrics with their bootstrap CIs (or why there are none)."""
    if report is None:
        auc = tags.get("val_auroc")
        seen = f" Training saw a best validation AUROC of {float(auc):.4f}, without a CI." if auc else ""
        return [f"**Not evaluated**: no `cxr evaluate` before registration.{seen}"]
    splits = report["splits"]
    level = next((r.get("bootstrap", {}).get("ci") for r in splits.values() if r.get("bootstrap")), None)
    names = [(key, label) for key, label in CARD_METRICS if any(key in r for r in splits.values())]
    lines = [
        f"Metrics ({f'{level:.0%} bootstrap CI' if level else 'no CI'}) on data `{str(report['data'].get('dataset_hash'))[:12]}`:",
        "",
        "| metric | " + " | ".join(splits) + " |",
        "|---|" + "---|" * len(splits),
    ]
    lines += [f"| {label} | " + " | ".join(_cell(r.get(key)) for r in splits.values()) + " |" for key, label in names]
    return lines


def _threshold(card: ModelCard) -> str:
    value = card.threshold
    shown = (
        ", ".join(f"{t:.4f}" for t in value) if isinstance(value, list) else "-" if value is None else f"{value:.4f}"
    )
    rule = card.threshold_method or "not recorded"
    return f"{shown} (rule: {rule}, chosen on validation" + (
        f" with {card.threshold_augmented_copies} augmented copies)" if card.threshold_augmented_copies else ")"
    )


def _findings_of(card: ModelCard) -> str:
    if card.task.binary and len(card.labels) == 2:
        return f"{card.labels[1]} (against {card.labels[0]})"
    return ", ".join(card.labels)


def limits(card: ModelCard, report: dict[str, Any] | None, findings: list[str]) -> list[str]:
    out = []
    if card.training.synthetic:
        out.append("synthetic data: no clinical meaning")
    if report is None:
        out.append("never evaluated: no validated performance")
    elif not report["data"].get("same_data_as_training", True):
        out.append("evaluated on other data than it was trained on")
    out += [f"promotion gate: {f}" for f in findings]
    out += [
        f"input: images preprocessed to {card.preprocess.size} px ({card.preprocess.resize}); "
        f"larger than {card.read_limits.max_pixels} pixels or smaller than {card.read_limits.min_side} px refused",
        "the threshold holds for the validation data's prevalence; another population moves sensitivity/specificity",
    ]
    return [f"- {line}" for line in out]


def _ood(card: ModelCard) -> str:
    if card.ood is None:
        return "none: every film gets a decision, however unlike the training films"
    return (
        f"{card.ood.method} over {len(card.ood.stages)} stages; threshold {card.ood.threshold:.2f} passes "
        f"{card.ood.val_pass_rate:.1%} of validation films; films beyond it are answered `abstain`"
    )


def describe(
    name: str, version: str, card: ModelCard, tags: dict[str, str], report: dict[str, Any] | None, findings: list[str]
) -> str:
    """The Markdown model card of ``name`` version ``version``."""
    lineage = card.training
    facts = [
        ("Data source", lineage.source),
        ("Dataset hash", f"`{lineage.dataset_hash}`"),
        ("Synthetic data", "yes" if lineage.synthetic else "no"),
        ("Architecture", f"{card.arch} ({card.task}: {', '.join(card.labels)})"),
        ("Threshold", _threshold(card)),
        ("Out-of-distribution check", _ood(card)),
        ("Training run", f"`{tags.get('run_id', lineage.run_id)}`, git `{tags.get('git_commit', lineage.git_commit)}`"),
        ("Evaluated", tags.get("evaluated", "false")),
    ]
    return "\n".join(
        [
            f"## Model card: {name} v{version}",
            "",
            "| | |",
            "|---|---|",
            *[f"| {k} | {v} |" for k, v in facts],
            "",
            *metrics_table(report, tags),
            "",
            f"**Intended use.** {INTENDED_USE.format(labels=_findings_of(card))}",
            "",
            "**Limits.**",
            "",
            *limits(card, report, findings),
            "",
        ]
    )
