"""`make bench`: run the benchmark scripts, then regenerate the table in benchmarks/README.md.

    python benchmarks/run_all.py              # the default set, < 20 minutes on a 2-core CPU
    python benchmarks/run_all.py --full       # also the long ones (Kermany quality ~5-12 min, 50-trial tuning ~60 min)
    python benchmarks/run_all.py --table-only # only rebuild the README table from results/*.json

A script that fails does not stop the others; the run exits non-zero when any failed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from common import write_result

HERE = Path(__file__).resolve().parent
# (command, rough minutes on the 2-core reference machine when it is quiet)
SCRIPTS = [
    (["quality.py", "pneumoniamnist"], 2),
    (["data_path.py"], 4),
    (["train_overhead.py"], 2),
    (["serving.py"], 5),
    (["tuning.py", "--trials", "6", "--epochs", "4", "--name", "tuning_quick"], 4),
]
FULL_ONLY = [
    (["quality.py", "pneumoniamnist", "--seeds", "1,2,3,4,5"], 12),  # is the default's quality a lucky seed?
    (["quality.py", "kermany"], 20),
    (["external_shift.py"], 1),  # the Kermany model above, through the service, on PneumoniaMNIST's test set
    (["tuning.py"], 60),  # 50 trials per arm: percentile pruner and none
    (["quality.py", "pneumoniamnist", "--tuned"], 2),
    (["serving.py", "--precision", "bf16"], 3),  # bfloat16 forward pass: for CPUs with AMX and GPUs
]
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def threshold_rules(f: dict) -> str:
    rules = f.get("threshold_rules")
    if rules is None:
        return ""
    return (
        " (test accuracy by threshold: "
        + ", ".join(f"{rule} {r['test_accuracy']:.4f}" for rule, r in rules.items())
        + ")"
    )


def figures_cell(f: dict) -> str:
    """A benchmark's key figures: its own one-line summary, else the quality fields, else the raw JSON."""
    if "summary" in f:
        return str(f["summary"])
    if "test" in f:
        t = f["test"]
        return (
            f"test AUROC {t['auroc']['value']:.4f} [{t['auroc']['ci_low']:.3f}, {t['auroc']['ci_high']:.3f}], "
            f"accuracy {t['accuracy']['value']:.4f}, sens {t['sensitivity']['value']:.3f}, "
            f"spec {t['specificity']['value']:.3f}; {f['arch']} {f['image_size']} px, "
            f"{f['epochs_trained']} epochs, train {f['train_seconds']} s" + threshold_rules(f)
        )
    return json.dumps(f)[:300]


def table() -> str:
    rows = ["| benchmark | key figures | machine | commit | when |", "|---|---|---|---|---|"]
    for path in sorted((HERE / "results").glob("*.json")):
        r = json.loads(path.read_text())
        m = r["machine"]
        cell = figures_cell(r["figures"]).replace("|", "/")
        rows.append(
            f"| {r['benchmark']} | {cell} | {m['cpu_count']}x {m['cpu']} | {r['git_commit']}{' + changes' if r.get('code_dirty') else ''} | {r['when']} |"
        )
    return "\n".join(rows)


def write_table() -> None:
    readme = HERE / "README.md"
    text = readme.read_text()
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    readme.write_text(text[:start] + "\n" + table() + "\n" + text[end:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="also run the long benchmarks")
    ap.add_argument("--table-only", action="store_true", help="only regenerate the README table")
    args = ap.parse_args()
    failed = []
    if not args.table_only:
        scripts = SCRIPTS + (FULL_ONLY if args.full else [])
        print(f"== {len(scripts)} benchmarks, about {sum(m for _, m in scripts)} min", flush=True)
        t_all = time.perf_counter()
        seconds: dict[str, float] = {}
        for script, _ in scripts:
            label = " ".join(script)
            print("==", label, flush=True)
            t0 = time.perf_counter()
            rc = subprocess.run([sys.executable, str(HERE / script[0]), *script[1:]], cwd=HERE.parent).returncode
            seconds[label] = round(time.perf_counter() - t0, 1)
            print(f"== {label}: exit {rc}, {seconds[label]:.0f} s", flush=True)
            if rc:
                failed.append(label)
        total = time.perf_counter() - t_all
        print(f"== all benchmarks: {total:.0f} s", flush=True)
        write_result(
            "make_bench_full" if args.full else "make_bench",
            {
                "summary": f"{len(scripts)} scripts in {total / 60:.1f} min ({len(failed)} failed; target for the default set: < 20 min)",
                "total_seconds": round(total, 1),
                "seconds_per_script": seconds,
                "failed": failed,
            },
            command="make bench" + (" BENCH_ARGS=--full" if args.full else ""),
        )
    write_table()
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
