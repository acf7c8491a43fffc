"""The MLflow model registry: register a trained model, gate its promotion to ``champion``, roll back.

Aliases only (the stages API is deprecated). A version records the evaluation its run came with (tags the
gate judges) and carries a Markdown model card as its description. The gate refuses a version that fails
one of its rules (:class:`Rule`), naming the rule; ``--force`` with a reason overrides. Every alias move is
recorded as a registered-model tag ``promotion.ID`` holding JSON (who, when, from, to, why, forced and the
rule it overrode), so the history lives next to the model in whatever registry the team uses, and
``rollback`` can walk it back.

Concurrent ``promote``/``rollback`` commands take turns: each reads the champion and the history, decides, moves
the alias and records the move while holding the store's promotion lock (a file lock beside a sqlite or file
store; for a remote registry, which offers no lock, a registered model created as a mutex). Each entry's ID is
unique and sorts after every earlier one (UTC time, nudged past the last entry's, plus a random tail), so no
entry can overwrite another; entries numbered ``promotion.0001``... by older versions of cxr sort first.

One module a job: ``versions`` (register, list), ``gate`` (the rules), ``promotion`` (alias moves and their history),
``sites`` (operating points, out-of-distribution shares).
"""

from cxr.tracking.registry.errors import RegistryError
from cxr.tracking.registry.gate import MIN_SCORE_STD, Decision, PromotionRefused, Rule, candidate_checks, compare
from cxr.tracking.registry.promotion import history, new_event_id, promote, rollback
from cxr.tracking.registry.sites import check_site_name, operating_points, record_external_ood, save_operating_point
from cxr.tracking.registry.versions import WEIGHTS_TAG, champion, register, version_tags, versions

__all__ = [
    "Decision",
    "MIN_SCORE_STD",
    "PromotionRefused",
    "RegistryError",
    "Rule",
    "WEIGHTS_TAG",
    "candidate_checks",
    "champion",
    "check_site_name",
    "compare",
    "history",
    "new_event_id",
    "operating_points",
    "promote",
    "record_external_ood",
    "register",
    "rollback",
    "save_operating_point",
    "version_tags",
    "versions",
]
