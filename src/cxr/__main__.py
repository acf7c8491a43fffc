"""`python -m cxr` runs the command line."""

from cxr.cli import app

app()
