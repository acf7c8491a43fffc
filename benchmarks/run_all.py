"""`make bench`: run every benchmark script, then regenerate the table in benchmarks/README.md."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = [
    ["quality.py", "pneumoniamnist"],
    ["quality.py", "kermany"],
]
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def table() -> str:
    rows = ["| benchmark | figures | machine | commit | when |", "|---|---|---|---|---|"]
    for path in sorted((HERE / "results").glob("*.json")):
        r = json.loads(path.read_text())
        f = r["figures"]
        if "test" in f:
            t = f["test"]
            figs = (f"test AUROC {t['auroc']['value']:.4f} [{t['auroc']['ci_low']:.3f}, {t['auroc']['ci_high']:.3f}], "
                    f"accuracy {t['accuracy']['value']:.4f}, sens {t['sensitivity']['value']:.3f}, "
                    f"spec {t['specificity']['value']:.3f}; {f['arch']} {f['image_size']} px, "
                    f"{f['epochs_trained']} epochs, train {f['train_seconds']} s")
        else:
            figs = json.dumps(f)[:200]
        m = r["machine"]
        rows.append(f"| {r['benchmark']} | {figs} | {m['cpu_count']}x {m['cpu']} | {r['git_commit']} | {r['when']} |")
    return "\n".join(rows)


def main() -> None:
    for script in SCRIPTS:
        print("==", " ".join(script), flush=True)
        subprocess.run([sys.executable, str(HERE / script[0]), *script[1:]], check=True)
    readme = HERE / "README.md"
    text = readme.read_text()
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    readme.write_text(text[:start] + "\n" + table() + "\n" + text[end:])


if __name__ == "__main__":
    main()
