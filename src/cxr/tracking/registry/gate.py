"""The promotion gate: the rules a version must pass to become champion, each refusal naming its rule."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

from cxr.tracking.registry.errors import RegistryError

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion

    from cxr.config import Config

log = logging.getLogger(__name__)


# The promotion gate's numbers; every refusal names the rule (below) that refused.
MIN_SCORE_STD = 0.01  # validation probabilities spread less than a point apart say the same thing of every patient


CHANCE_AUROC = 0.5  # an AUROC interval reaching 0.5 has not shown the model ranks cases better than a coin


class Rule(StrEnum):
    """The gate's rules, by the name a refusal, the history and the version's card show."""

    ALREADY_CHAMPION = "already-champion"  # nothing to move (not overridable)
    NEVER_EVALUATED = "never-evaluated"  # registered without `cxr evaluate` on the data it was validated on
    NEAR_CONSTANT = "near-constant-scores"  # validation probability std below MIN_SCORE_STD
    SINGLE_CLASS = "single-predicted-class"  # every validation image gets the same prediction at the threshold
    CHANCE = "auroc-ci-includes-chance"  # the validation AUROC CI does not lie above CHANCE_AUROC
    OTHER_DATA = "different-data"  # validated on other data than the champion: numbers not comparable
    NOT_BETTER = "does-not-beat-champion"  # validation AUROC not above the champion's by registry.promote_margin
    NO_OOD_CHECK = "no-ood-check"  # no out-of-distribution check, with registry.require_ood (else a warning)


class PromotionRefused(RegistryError):
    """The candidate fails a rule of the gate (or is not comparable with the champion)."""


@dataclass
class Decision:
    promote: bool
    reason: str
    rule: Rule | None = None  # the rule that refused (None when the gate passes)


def refuse(rule: Rule, why: str) -> Decision:
    return Decision(False, why, rule)


def _evaluated(tags: dict[str, str]) -> Decision | None:
    if tags.get("evaluated") != "true":
        return refuse(
            Rule.NEVER_EVALUATED,
            "registered without an evaluation: run `cxr evaluate` on its model, then register again",
        )
    trained, evaluated = tags.get("dataset_hash"), tags.get("eval_dataset_hash")
    if trained != evaluated:
        return refuse(
            Rule.NEVER_EVALUATED,
            f"evaluated on data {str(evaluated)[:12]}, not on the data it was trained and validated on "
            f"({str(trained)[:12]}): evaluate it on its own prepared data, then register again",
        )
    return None


def _spread(tags: dict[str, str]) -> Decision | None:
    std = _float_tag(tags, "val_score_std")
    if std is None:
        return refuse(
            Rule.NEAR_CONSTANT,
            "its evaluation recorded no validation scores (no val split, or an older cxr): evaluate, register again",
        )
    if std < MIN_SCORE_STD:
        return refuse(
            Rule.NEAR_CONSTANT, f"validation probabilities are near-constant (std {std:.4g} < {MIN_SCORE_STD})"
        )
    if tags.get("val_distinct_predictions") == "1":
        return refuse(
            Rule.SINGLE_CLASS,
            f"every validation image gets the same prediction at its threshold {tags.get('threshold')}",
        )
    return None


def _above_chance(tags: dict[str, str]) -> Decision | None:
    auc = _float_tag(tags, "val_auroc")
    low, high = _float_tag(tags, "val_auroc_ci_low"), _float_tag(tags, "val_auroc_ci_high")
    if auc is None or low is None or high is None:
        return refuse(
            Rule.CHANCE,
            "no validation AUROC confidence interval recorded (evaluate.bootstrap=0, or one class in val): "
            "evaluate with bootstrap, register again",
        )
    if low <= CHANCE_AUROC:
        return refuse(
            Rule.CHANCE,
            f"validation AUROC {auc:.4f} has CI [{low:.4f}, {high:.4f}], which does not lie above chance ({CHANCE_AUROC})",
        )
    return None


def candidate_checks(tags: dict[str, str]) -> list[Decision]:
    """The rules a version must pass on its own, whatever the champion: each failing one's refusal."""
    checks = [_evaluated(tags)]
    if checks[0] is None:  # the score rules read an evaluation
        checks += [_spread(tags), _above_chance(tags)]
    return [c for c in checks if c is not None]


def compare(candidate: "ModelVersion", champion: "ModelVersion | None", margin: float) -> Decision:
    """The promotion gate: a healthy evaluated model, better than the champion by ``margin`` on the same data."""
    if champion is not None and str(candidate.version) == str(champion.version):
        return refuse(Rule.ALREADY_CHAMPION, f"version {candidate.version} already is the champion")
    refusals = candidate_checks(candidate.tags)
    if refusals:
        return refusals[0]
    if champion is None:
        return Decision(True, "no current champion; the candidate passes the checks")
    c_hash, h_hash = candidate.tags.get("dataset_hash"), champion.tags.get("dataset_hash")
    if not c_hash or c_hash != h_hash:
        return refuse(
            Rule.OTHER_DATA,
            f"not comparable: candidate was validated on data {str(c_hash)[:12]}, the champion "
            f"(version {champion.version}) on {str(h_hash)[:12]}; retrain on the same prepared data",
        )
    c_auc, h_auc = _float_tag(candidate.tags, "val_auroc"), _float_tag(champion.tags, "val_auroc")
    if h_auc is None:
        return refuse(
            Rule.NOT_BETTER, f"champion v{champion.version} has no validation AUROC to beat; promote with --force"
        )
    if c_auc > h_auc + margin:
        return Decision(
            True, f"val AUROC {c_auc:.4f} beats champion v{champion.version} {h_auc:.4f} by more than {margin}"
        )
    return refuse(
        Rule.NOT_BETTER,
        f"val AUROC {c_auc:.4f} does not beat champion v{champion.version} {h_auc:.4f} "
        f"by more than the margin {margin}",
    )


def four_places(value: str | None) -> str | None:
    try:
        return f"{float(value):.4f}"
    except (TypeError, ValueError):
        return value


def val_auroc_interval(tags: dict[str, str]) -> str | None:
    low, high = four_places(tags.get("val_auroc_ci_low")), four_places(tags.get("val_auroc_ci_high"))
    return f"[{low}, {high}]" if low and high else None


def _float_tag(tags: dict[str, str], key: str) -> float | None:
    value = tags.get(key)
    return float(value) if value not in (None, "") else None


def decide(
    cfg: "Config", candidate: "ModelVersion", current: "ModelVersion | None", force: bool, reason: str | None
) -> Decision:
    """The gate's decision, or the forced one (with the rule it overrides); raises when the move is refused."""
    decision = compare(candidate, current, cfg.registry.promote_margin)
    if decision.promote:
        decision = ood_check(candidate, cfg.registry.require_ood) or decision
    if decision.promote:
        return decision
    overridable = decision.rule is not Rule.ALREADY_CHAMPION
    if not force or not overridable:
        hint = "; `--force --reason WHY` overrides, on the record" if overridable and not force else ""
        raise PromotionRefused(
            f"version {candidate.version} not promoted (rule {decision.rule}): {decision.reason}{hint}"
        )
    if not reason:
        raise RegistryError(
            f"--force needs --reason: version {candidate.version} fails rule {decision.rule}, and the "
            "history keeps why it was promoted anyway"
        )
    return Decision(True, f"forced ({reason}); rule {decision.rule} refused: {decision.reason}", decision.rule)


def ood_check(candidate: "ModelVersion", required: bool) -> Decision | None:
    """A refusal when the version has no out-of-distribution check and one is required; else a warning, or None."""
    if candidate.tags.get("ood_method", "none") != "none":
        return None
    why = (
        f"version {candidate.version} has no out-of-distribution check: the service will decide every film, "
        "however unlike its training films"
    )
    if required:
        return refuse(Rule.NO_OOD_CHECK, why + " (registry.require_ood is on)")
    log.warning("%s (set registry.require_ood to refuse such versions)", why)
    return None
