"""Progress bars (rich) that can be switched off for logs and tests."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

T = TypeVar("T")


def make_progress(console: Console | None = None, *, enabled: bool = True) -> Progress:
    """A rich progress display with count, rate, elapsed and remaining time."""
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console or Console(file=sys.stderr),
        disable=not enabled,
        transient=False,
    )


def track(
    items: Iterable[T], *, total: int | None = None, description: str = "", enabled: bool = True
) -> Iterator[T]:
    """Iterate over ``items`` while showing a progress bar on stderr."""
    with make_progress(enabled=enabled) as progress:
        task = progress.add_task(description, total=total, rate="")
        for item in items:
            yield item
            task_obj = progress.tasks[task]
            speed = task_obj.speed
            progress.update(task, advance=1, rate=f"{speed:.0f}/s" if speed else "")
