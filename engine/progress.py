"""The one progress bar of the product: training, dataset loading, synthesis, calibration and replay."""

from __future__ import annotations

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
