"""What each DVC stage runs and reads, derived from the code, against what dvc.yaml says it depends on.

A stage's command is ``cxr <command>``; the cli package's function for that command imports the one library function
it calls (``from cxr.training.fit import fit``). The code the stage runs is that module's import closure inside the
``cxr`` package (grimp), with the packages above each module (their ``__init__`` runs on import) and the modules a
package loads by name (``importlib.import_module(f"cxr.data.sources.{name}")``: every module under that package).
The config keys a stage reads are recorded while its library function runs (:func:`cxr.config.record_reads`).
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import grimp
import yaml

REPO = Path(__file__).resolve().parents[2]
SRC = REPO / "src"
PACKAGE = "cxr"

# Config sections a stage may read without naming them in its params; each says why that cannot leave it stale.
EXEMPT_SECTIONS = {
    "paths": "where a stage's inputs and outputs live: dvc.yaml names them as its deps and outs (${paths.*})",
    "mlflow": "where runs are logged, not what a stage writes to its outs",
}


def load_dvc_yaml(path: Path = REPO / "dvc.yaml") -> dict[str, Any]:
    return yaml.safe_load(Path(path).read_text())


def stage_entry(cmd: str, cli: Path = SRC / PACKAGE / "cli") -> tuple[str, str]:
    """``cxr train`` -> ("cxr.training.fit", "fit"): the library module and function the cli package's command
    calls."""
    words = cmd.split()
    if len(words) < 2 or words[0] != "cxr":
        raise ValueError(f"stage command {cmd!r} is not `cxr <command>`: this check cannot see what it runs")
    command = words[1].replace("-", "_")
    for module in sorted(Path(cli).glob("*.py")):
        for node in ast.walk(ast.parse(module.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name == command:
                imports = [
                    n for n in ast.walk(node) if isinstance(n, ast.ImportFrom) and (n.module or "").startswith(PACKAGE)
                ]
                if len(imports) != 1 or len(imports[0].names) != 1:
                    raise ValueError(f"{module.name}'s {command}() should import exactly one library function")
                return imports[0].module, imports[0].names[0].name  # type: ignore[return-value]
    raise ValueError(f"the cli package has no command {command!r} (stage command {cmd!r})")


def module_file(module: str) -> Path:
    """``cxr.data.sources`` -> src/cxr/data/sources/__init__.py (relative to the repository)."""
    base = SRC.joinpath(*module.split("."))
    path = base / "__init__.py" if base.is_dir() else base.with_suffix(".py")
    return path.relative_to(REPO)


def _loaded_by_name(graph: grimp.ImportGraph, module: str) -> set[str]:
    """Modules ``module`` imports by a name built at run time: ``import_module(f"pkg.{x}")`` -> all under pkg."""
    found: set[str] = set()
    tree = ast.parse((REPO / module_file(module)).read_text())
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and node.args):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
        if name not in ("import_module", "__import__"):
            continue
        arg = node.args[0]
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
            target = arg.value
        elif isinstance(arg, ast.JoinedStr) and arg.values and isinstance(arg.values[0], ast.Constant):
            target = str(arg.values[0].value).rsplit(".", 1)[0]  # "cxr.data.sources.{name}" -> cxr.data.sources
        else:
            raise ValueError(f"{module} imports a module whose name this check cannot read (line {node.lineno})")
        if target == PACKAGE or target.startswith(PACKAGE + "."):
            found |= {target} | graph.find_descendants(target) if target in graph.modules else {target}
    return found


def code_closure(entry: str, graph: grimp.ImportGraph | None = None) -> set[str]:
    """The ``cxr`` modules that running ``entry`` may execute."""
    graph = graph or grimp.build_graph(PACKAGE, cache_dir=None)
    seen: set[str] = set()
    todo = [entry]
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        parts = module.split(".")
        ancestors = {".".join(parts[:i]) for i in range(1, len(parts))}
        todo += [*graph.find_modules_directly_imported_by(module), *ancestors, *_loaded_by_name(graph, module)]
    return seen


def stage_code(stages: dict[str, Any], graph: grimp.ImportGraph | None = None) -> dict[str, set[str]]:
    """Stage name -> the files under src/ it runs (repository-relative, posix)."""
    graph = graph or grimp.build_graph(PACKAGE, cache_dir=None)
    return {
        name: {module_file(m).as_posix() for m in code_closure(stage_entry(stage["cmd"])[0], graph)}
        for name, stage in stages.items()
    }


def dep_covers(dep: str, file: str) -> bool:
    """A dep (a file, or a folder: everything under it) covers ``file``."""
    dep = dep.rstrip("/")
    return file == dep or file.startswith(dep + "/")


def param_covers(entry: str, key: str) -> bool:
    """A params entry (a section, or a key: everything below it) covers the dotted ``key``."""
    return key == entry or key.startswith(entry + ".")


def param_entries(stage: dict[str, Any]) -> list[str]:
    """The dotted keys a stage's ``params`` list names in params.yaml."""
    out: list[str] = []
    for entry in stage.get("params", []):
        if isinstance(entry, str):
            out.append(entry)
        elif isinstance(entry, dict):  # {params.yaml: [keys]} (other files' params are not config keys)
            out += [k for k in entry.get("params.yaml", []) or []]
    return out


def uncovered(
    stages: dict[str, Any], code: dict[str, set[str]], reads: dict[str, Iterable[str]] | None = None
) -> list[str]:
    """Every gap between what stages run and read and what dvc.yaml lists; empty when the graph cannot go stale."""
    problems: list[str] = []
    for name, stage in stages.items():
        deps = [str(d) for d in stage.get("deps", [])]
        src_deps = [d for d in deps if d.startswith("src/")]
        for file in sorted(code.get(name, ())):
            if not any(dep_covers(d, file) for d in src_deps):
                problems.append(f"stage {name} runs {file} but no dep covers it")
        for dep in src_deps:
            if not (REPO / dep).exists():
                problems.append(f"stage {name} depends on {dep}, which does not exist")
            elif not any(dep_covers(dep, f) for f in code.get(name, ())):
                problems.append(f"stage {name} depends on {dep} but runs nothing under it")
        if reads is None or name not in reads:
            continue
        params = param_entries(stage)
        for key in sorted(reads[name]):
            if key.split(".")[0] in EXEMPT_SECTIONS:
                continue
            if not any(param_covers(p, key) for p in params):
                problems.append(f"stage {name} reads {key} but its params do not cover it")
    return problems
