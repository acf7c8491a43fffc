"""Progress: live rich bars on a terminal, a few plain lines elsewhere (CI logs, pipes, NO_COLOR).

One live display at a time is all rich allows, so nested loops (a tuning study's trials, each trial's epochs)
share one ``Progress`` and each adds its own row. Without a terminal, or with ``NO_COLOR`` or
``CXR_NO_PROGRESS`` set, a loop logs a line at every tenth of its work (every step when it has few), so a
log shows that work moves without a line per file.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

log = logging.getLogger("cxr.progress")
CONSOLE = Console(stderr=True, soft_wrap=True)  # bars and log lines share it, so a log line prints above the live bars
PLAIN_EVERY_STEP_UP_TO = 50  # loops this short log every step (epochs, trials); longer ones every tenth
_live: Progress | None = None

Advance = Callable[..., None]


def live_bars() -> bool:
    """Bars only where a person watches a terminal that accepts them."""
    quiet = os.environ.get("NO_COLOR") or os.environ.get("CXR_NO_PROGRESS")
    return not quiet and sys.stdout.isatty() and sys.stderr.isatty()


def describe(fields: dict[str, object]) -> str:
    return "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items())


@contextmanager
def progress_bar(description: str, total: int | None, *, plain_lines: bool = True) -> Iterator[Advance]:
    """Yields ``advance(n=1, **fields)``; fields (e.g. ``loss=0.31``) are shown beside the bar.

    ``plain_lines=False``: a detail (an epoch's steps) that only a live bar shows."""
    if live_bars():
        with _bar(description, total) as advance:
            yield advance
    else:
        yield _plain(description, total) if plain_lines else (lambda n=1, **fields: None)


@contextmanager
def _bar(description: str, total: int | None) -> Iterator[Advance]:
    global _live
    owner = _live is None
    if owner:
        _live = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
            console=CONSOLE,
        )
        _live.start()
    bars = _live
    task = bars.add_task(description, total=total, info="")

    def advance(n: int = 1, **fields: object) -> None:
        bars.update(task, advance=n, **({"info": describe(fields)} if fields else {}))

    try:
        yield advance
    finally:
        if owner:
            bars.stop()
            _live = None
        else:  # an inner loop's row goes when it ends; the outer bar keeps the summary
            bars.remove_task(task)


def _plain(description: str, total: int | None) -> Advance:
    state = {"done": 0, "shown": 0}
    every = 1 if not total or total <= PLAIN_EVERY_STEP_UP_TO else max(1, total // 10)

    def advance(n: int = 1, **fields: object) -> None:
        state["done"] += n
        done = state["done"]
        if n and (done - state["shown"] >= every or done == total):
            state["shown"] = done
            suffix = f"  {describe(fields)}" if fields else ""
            log.info("%s: %d/%s%s", description, done, total if total else "?", suffix)

    return advance
