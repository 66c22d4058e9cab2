"""Rich progress bars for long loops (training epochs, encoding, scoring)."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

# markup off: paths and messages are printed as they are ("runs/[bold]x" stays "runs/[bold]x")
console = Console(stderr=True, markup=False, highlight=False)


def progress(enabled: bool = True) -> Progress:
    """A progress display on stderr; use as a context manager and add tasks to it."""
    return Progress(TextColumn("{task.description}", style="bold", markup=False), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}", markup=False),
                    console=console, disable=not enabled, transient=False)
