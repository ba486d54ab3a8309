"""The one progress bar of the product: training, dataset loading, synthesis, calibration and replay."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def progress_bar(console: Console | None = None, label: str | None = None, field: str | None = None,
                 suffix: str = "", elapsed: bool = False) -> Progress:
    """A rich bar: description (or a fixed ``label``), bar, done/total, the task's ``field`` with
    ``suffix`` (e.g. ``fps``), time elapsed (``elapsed``) and left. On stderr unless ``console``
    says otherwise, so that stdout stays clean for machine-readable output."""
    columns = [TextColumn(escape(label) if label is not None else "[bold]{task.description}"), BarColumn(),
               MofNCompleteColumn()]
    if field:
        columns.append(TextColumn(f"{{task.fields[{field}]}}{(' ' + suffix) if suffix else ''}"))
    if elapsed:
        columns.append(TimeElapsedColumn())
    columns.append(TimeRemainingColumn())
    return Progress(*columns, console=console or Console(stderr=True), transient=False)


class progress_steps:  # noqa: N801 — used as a function: with progress_steps(…) as advance
    """A rich progress bar, or nothing; yields an ``advance()`` callable either way."""

    def __init__(self, enabled: bool, total: int, label: str) -> None:
        self.enabled, self.total, self.label = enabled, total, label
        self._bar: Any = None

    def __enter__(self) -> Any:
        if not self.enabled:
            return lambda: None
        self._bar = progress_bar()
        self._bar.__enter__()
        task = self._bar.add_task(self.label, total=self.total)
        return lambda: self._bar.advance(task)

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
