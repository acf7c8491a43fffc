"""evaluate_external: a model on another hospital's data, through the deployed service's HTTP API.

Every image is sent to ``{url}/predict`` (bounded concurrency, retries, a progress bar); answers are
cached in the output folder so an interrupted run resumes. The report holds the metrics with bootstrap
CIs at the model's own threshold, subgroups, plots, every refused or failed file, and a comparison with
the model's internal test metrics, as JSON plus one self-contained HTML file, and is logged to MLflow as
an evaluation run tagged with the served model version. With ``model=`` (``models:/NAME@champion`` or a
model directory) the same happens in-process, through the service's own answer function (cxr.serving.served),
when no service is running. For a binary model the report also sets the external score distributions and
calibration beside the internal test set's (why a specificity drops at a fixed threshold); with
``calibrate`` it chooses a site threshold on part of the set and judges both thresholds on the rest
(cxr.evaluation.site). File names (often patient names in PACS exports) stay in the local report: what is
logged to MLflow holds a salted hash of each instead (``FileIds``).

One module a job: ``answering`` (who answers), ``scoring``, ``internal`` (the model's own test metrics),
``report`` (with ``sections`` and ``privacy``), ``mlflow_log``, and ``command`` (evaluate_external).
"""

from cxr.evaluation.external.answering import EvaluatedModel, load_in_process
from cxr.evaluation.external.command import evaluate_external
from cxr.evaluation.external.internal import compare
from cxr.evaluation.external.mlflow_log import external_run_name
from cxr.evaluation.external.privacy import LOCAL_NAMES_NOTE, MLFLOW_NAMES_NOTE, FileIds, without_file_names
from cxr.evaluation.external.report import build_report

__all__ = [
    "EvaluatedModel",
    "FileIds",
    "LOCAL_NAMES_NOTE",
    "MLFLOW_NAMES_NOTE",
    "build_report",
    "compare",
    "evaluate_external",
    "external_run_name",
    "load_in_process",
    "without_file_names",
]
