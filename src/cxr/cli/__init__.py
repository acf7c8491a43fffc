"""The `cxr` command line: each command parses arguments and calls one library function.

``app`` holds the Typer app and what commands share; each other module registers its commands on it when imported
(the pipeline's stages, tuning, the registry, serving, external evaluation).
"""

# isort: off
# Imported for their commands, in the order `cxr --help` lists them.
from cxr.cli import pipeline  # noqa: F401
from cxr.cli import tuning  # noqa: F401
from cxr.cli import registry  # noqa: F401
from cxr.cli import serving  # noqa: F401
from cxr.cli import external  # noqa: F401

# isort: on
from cxr.cli.app import app, tables
from cxr.cli.external import external_table, site_table

__all__ = ["app", "external_table", "main", "site_table", "tables"]


def main() -> None:  # pragma: no cover - console entry point
    app()
