"""Rich progress bars for long-running predictor work."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


@contextmanager
def bar(description: str, total: int | None) -> Iterator[Callable[[int], None]]:
    """``with bar("x", total=n) as advance: advance(k)``; rendered on stderr."""
    from rich.console import Console

    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True),
                        transient=False)
    with progress:
        task = progress.add_task(description, total=total)
        yield lambda k=1: progress.advance(task, k)
