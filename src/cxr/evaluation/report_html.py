"""The external-evaluation report as ONE self-contained HTML file: inline CSS, PNGs embedded as base64,
no script and no external resource, so it opens offline and can be mailed or archived as is.
Jinja2 escapes every value (file names and service messages come from outside)."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

from jinja2 import Environment

TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>External evaluation: {{ title }}</title>
<style>
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.8em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: .5em 0; font-size: .9em; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.bad { color: #b00020; font-weight: bold; } .ok { color: #176117; }
.plots img { width: 360px; margin: .3em; border: 1px solid #ddd; }
.note { background: #fff6d5; padding: .5em .8em; border-left: 4px solid #e0b000; }
</style></head><body>
<h1>External evaluation: {{ title }}</h1>
<table>
<tr><th>Endpoint</th><td>{{ r.endpoint }}</td></tr>
<tr><th>Model</th><td>{{ r.model.uri or "?" }} (name {{ r.model.name or "?" }}, version {{ r.model.version or "?" }},
 training run {{ r.model.run_id or "?" }})</td></tr>
<tr><th>Task</th><td>{{ r.model.task }}: {{ r.model.labels | join(", ") }}; threshold {{ r.model.threshold }}</td></tr>
<tr><th>External data</th><td>{{ r.data.description }}<br>dataset hash {{ r.data.dataset_hash }}</td></tr>
<tr><th>Labels</th><td>{% for k, v in r.data.labels.items() %}{{ k }}: {{ v }}{% if not loop.last %}, {% endif %}{% endfor %}
 (mapped: {% for k, v in r.data.label_mapping.items() %}{{ k }} &rarr; {{ v }}{% if not loop.last %}, {% endif %}{% endfor %})</td></tr>
<tr><th>Created</th><td>{{ r.created }}</td></tr>
</table>
{% for note in r.data.notes %}<p class="note">{{ note }}</p>{% endfor %}

{% set ood = r.out_of_distribution %}
{% if ood %}<h2>Out of distribution: is this set what the model was built for?</h2>
<p class="{{ 'bad' if ood.level == 'not_built_for' else 'note' if ood.level == 'notable' else '' }}">{{ ood.verdict }}</p>
{% if ood.checked %}<p>The service abstains on a film whose features lie farther from the training films' than
the threshold it was given on validation; the metrics below "all films" include those films' probabilities.</p>
<table><tr><th>metric</th><th>in-distribution films ({{ ood.images - ood.flagged }})</th><th>all films ({{ ood.images }})</th></tr>
{% for name, m in metric_rows %}{% if ood.in_distribution_metrics and name in ood.in_distribution_metrics %}
<tr><td>{{ name }}</td><td class="num">{{ fmt_ci(ood.in_distribution_metrics[name]) }}</td><td class="num">{{ fmt_ci(m) }}</td></tr>
{% endif %}{% endfor %}</table>
{% for attr, values in ood.by_subgroup.items() %}<h3>share out of distribution by {{ attr }}</h3>
<table><tr><th>{{ attr }}</th><th>images</th><th>out of distribution</th></tr>
{% for value, g in values.items() %}<tr><td>{{ value }}</td><td class="num">{{ g.images }}</td>
<td class="num">{{ g.flagged }} ({{ "%.0f" | format(100 * g.share) }}%)</td></tr>{% endfor %}</table>{% endfor %}
{% endif %}{% endif %}

<h2>Requests</h2>
<table><tr><th>images</th><th>sent</th><th>from cache</th><th>scored</th><th>refused (4xx)</th><th>failed</th></tr>
<tr><td class="num">{{ r.data.n_images }}</td><td class="num">{{ r.requests.sent }}</td>
<td class="num">{{ r.requests.from_cache }}</td><td class="num ok">{{ r.requests.ok }}</td>
<td class="num {{ 'bad' if r.requests.refused }}">{{ r.requests.refused }}</td>
<td class="num {{ 'bad' if r.requests.failed }}">{{ r.requests.failed }}</td></tr></table>
<p>Metrics are computed on the {{ r.requests.ok }} scored images; every other image is listed under Failures.</p>

{% if r.site_calibration_skipped %}<p class="note">No site threshold: {{ r.site_calibration_skipped }}.</p>{% endif %}
{% set sc = r.site_calibration %}
{% if sc %}<p class="note">Site calibration: {{ sc.split.calibration.in_distribution }} scored images in distribution
({{ sc.split.calibration[sc.split.unit ~ "s"] }} {{ sc.split.unit }}s) chose the site threshold; every metric, plot and
subgroup below is on the other {{ sc.split.evaluation.scored }} ({{ sc.split.evaluation[sc.split.unit ~ "s"] }}
{{ sc.split.unit }}s) only, and both operating points on their {{ sc.split.evaluation.in_distribution }} films in
distribution.</p>{% endif %}
<h2>Metrics at the model's own threshold ({{ ci_pct }}% bootstrap CIs)</h2>
{% if r.comparison.available %}<p>Internal test metrics from {{ r.comparison.source }}.</p>
{% else %}<p class="note">No internal comparison: {{ r.comparison.reason }}</p>{% endif %}
<table><tr><th>metric</th><th>external</th><th>internal test</th><th>drop (internal &minus; external)</th><th>CIs overlap</th></tr>
{% for name, m in metric_rows %}<tr><td>{{ name }}</td><td class="num">{{ fmt_ci(m) }}</td>
{% set c = comparison.get(name) %}
<td class="num">{{ fmt_ci(c.internal) if c else "" }}</td>
<td class="num {{ 'bad' if c and c.notably_worse }}">{{ "%+.4f" | format(c.drop) if c else "" }}</td>
<td>{% if c and c.cis_overlap is not none %}<span class="{{ 'ok' if c.cis_overlap else 'bad' }}">{{ "yes" if c.cis_overlap else "no" }}</span>{% endif %}</td></tr>
{% endfor %}</table>
{% if r.metrics.confusion is defined %}<p>Confusion at threshold {{ r.metrics.threshold }}:
TN {{ r.metrics.confusion.tn }}, FP {{ r.metrics.confusion.fp }}, FN {{ r.metrics.confusion.fn }}, TP {{ r.metrics.confusion.tp }}.</p>{% endif %}

{% if sc %}<h2>Operating points: the model's threshold vs the site's ({{ ci_pct }}% bootstrap CIs)</h2>
<p>Split by {{ sc.split.unit }} (seed {{ sc.split.seed }}, stratified by label): calibration
{% for k, v in sc.split.calibration.labels.items() %}{{ k }} {{ v }}{% if not loop.last %}, {% endif %}{% endfor %};
evaluation {% for k, v in sc.split.evaluation.labels.items() %}{{ k }} {{ v }}{% if not loop.last %}, {% endif %}{% endfor %}.
Site threshold rule: {{ sc.rule.method }}{% if sc.rule.target_sensitivity is defined %} (target sensitivity
{{ sc.rule.target_sensitivity }}){% endif %}, from {{ sc.rule["from"] }}.
{% if sc.saved_as %}Saved on the registered version as <code>{{ sc.saved_as }}</code>.{% endif %}</p>
<table><tr><th>metric</th><th>model threshold {{ "%.4f" | format(sc.thresholds.model) }}</th>
<th>site threshold {{ "%.4f" | format(sc.thresholds.site) }}</th><th>internal test</th></tr>
{% for name in site_rows %}{% set c = comparison.get(name) %}<tr><td>{{ name }}</td>
<td class="num">{{ fmt_ci(sc.operating_points.model[name]) }}</td><td class="num">{{ fmt_ci(sc.operating_points.site[name]) }}</td>
<td class="num">{{ fmt_ci(c.internal) if c else "" }}</td></tr>
{% endfor %}</table>{% endif %}

{% if r.score_shift %}<h2>Score shift: internal test vs external</h2>
{% if not r.score_shift.internal.available %}<p class="note">{{ r.score_shift.internal.reason }}</p>
{% else %}<p>Internal test scores from {{ r.score_shift.internal.source }}.</p>{% endif %}
<table><tr><th>true class</th><th>set</th><th>n</th><th>median score (IQR)</th>
{% for t in shift_names %}<th>share &ge; {{ t }} threshold</th>{% endfor %}</tr>
{% for label, sets in r.score_shift.per_class.items() %}{% for name in ("internal", "external") %}{% set d = sets[name] %}
{% if d %}<tr><td>{{ label }}</td><td>{{ name }}</td><td class="num">{{ d.n }}</td>
<td class="num">{{ "%.3f" | format(d.median) }} ({{ "%.3f" | format(d.q25) }}-{{ "%.3f" | format(d.q75) }})</td>
{% for t in shift_names %}<td class="num">{{ "%.3f" | format(d.above_threshold[t]) }}</td>{% endfor %}</tr>{% endif %}
{% endfor %}{% endfor %}</table>
<p>For the negative class the share above a threshold is 1 &minus; specificity there; for the positive class it is
the sensitivity. Negatives scoring higher at the new site than internally push the specificity down at a fixed
threshold even when the ranking (AUROC) holds.</p>{% endif %}

<h2>Plots</h2>
<div class="plots">{% for name, data in images %}<img alt="{{ name }}" title="{{ name }}" src="data:image/png;base64,{{ data }}">{% endfor %}</div>

{% if r.metrics.subgroups %}<h2>Subgroups</h2>
{% for attr, values in r.metrics.subgroups.items() %}<h3>{{ attr }}</h3>
<table><tr><th>value</th><th>n</th><th>AUROC</th><th>sensitivity</th><th>specificity</th><th>accuracy</th><th>flag</th></tr>
{% for value, m in values.items() %}<tr><td>{{ value }}</td><td class="num">{{ m.n }}</td>
{% if m.skipped %}<td colspan="5">skipped: {{ m.reason }}</td>{% else %}
<td class="num">{{ fmt_ci(m.auroc) }}</td><td class="num">{{ fmt_ci(m.sensitivity) }}</td>
<td class="num">{{ fmt_ci(m.specificity) }}</td><td class="num">{{ fmt_ci(m.accuracy) }}</td>
<td class="{{ 'bad' if m.too_small }}">{{ m.too_small or "" }}</td>{% endif %}</tr>
{% endfor %}</table>{% endfor %}{% endif %}

<h2>Failures ({{ r.failures | length }})</h2>
{% if r.failures %}<table><tr><th>file</th><th>label</th><th>status</th><th>HTTP</th><th>message</th></tr>
{% for f in r.failures %}<tr><td>{{ f.file }}</td><td>{{ f.label }}</td><td class="bad">{{ f.status }}</td>
<td>{{ f.http_status if f.http_status is not none else "" }}</td><td>{{ f.error }}</td></tr>{% endfor %}</table>
<p>"refused": the service rejected the file (it will be refused again); "failed": no answer after every retry
(run the command again: only these are re-sent).</p>
{% else %}<p class="ok">Every image was scored.</p>{% endif %}
{% if r.service_warnings %}<h2>Service warnings</h2><table><tr><th>warning</th><th>images</th></tr>
{% for w, n in r.service_warnings.items() %}<tr><td>{{ w }}</td><td class="num">{{ n }}</td></tr>{% endfor %}</table>{% endif %}
</body></html>
"""


# The metrics shown side by side for the model's and the site's operating point.
SITE_ROWS = ("sensitivity", "specificity", "accuracy", "balanced_accuracy", "ppv", "npv", "f1")


def _fmt_ci(entry: Any) -> str:
    if not isinstance(entry, dict) or entry.get("value") is None:
        return "n/a"
    text = f"{entry['value']:.4f}"
    if entry.get("ci_low") is not None and entry.get("ci_high") is not None:
        text += f" ({entry['ci_low']:.4f}-{entry['ci_high']:.4f})"
    return text


def render(report: dict[str, Any], images: list[Path]) -> str:
    env = Environment(autoescape=True, trim_blocks=True, lstrip_blocks=True)
    metric_rows = [(k, v) for k, v in report["metrics"].items() if isinstance(v, dict) and "value" in v]
    model = report["model"]
    title = f"{model.get('name') or model.get('uri') or 'model'}" + (
        f" v{model['version']}" if model.get("version") else ""
    )
    ci = (report["metrics"].get("bootstrap") or {}).get("ci", 0.95)
    return env.from_string(TEMPLATE).render(
        r=report,
        title=title,
        metric_rows=metric_rows,
        comparison=report["comparison"].get("metrics", {}),
        images=[(p.stem, base64.b64encode(p.read_bytes()).decode("ascii")) for p in images],
        site_rows=SITE_ROWS,
        shift_names=["model", "site"] if report.get("site_calibration") else ["model"],
        fmt_ci=_fmt_ci,
        ci_pct=round(100 * ci),
    )
