"""The package's structure rules that import-linter does not check: imports sit at the top of a file.

(import-linter, run by `make lint`, checks the layers and that no sibling modules import each other in a
circle, counting imports inside functions too.)
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "cxr"
REASON = "# lazy:"  # the one-line reason an import inside a function must carry


def imports_inside_functions(path: Path) -> list[tuple[int, str]]:
    """(line, statement) of every import of a cxr module made inside a function of ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for sub in ast.walk(node):
                own = isinstance(sub, ast.ImportFrom) and (sub.module or "").split(".")[0] == "cxr"
                own |= isinstance(sub, ast.Import) and any(a.name.split(".")[0] == "cxr" for a in sub.names)
                if own:
                    found.append((sub.lineno, ast.unparse(sub)))
    return found


def test_package_imports_sit_at_the_top_of_a_file_or_say_why_not():
    lines = {p: p.read_text().splitlines() for p in SRC.rglob("*.py")}
    unexplained = [
        f"{p.relative_to(SRC.parent)}:{n}: {stmt}"
        for p in sorted(lines)
        for n, stmt in imports_inside_functions(p)
        if REASON not in lines[p][n - 1]
    ]
    assert not unexplained, "imports inside functions without a `# lazy: <why>` reason:\n" + "\n".join(unexplained)


def test_the_check_sees_an_import_inside_a_function(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("import os\n\ndef f():\n    from cxr.config import Config\n    return Config\n")
    assert imports_inside_functions(module) == [(4, "from cxr.config import Config")]
