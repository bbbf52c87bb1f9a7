"""Rich progress bars for long work (generation, scoring, evaluation)."""

from __future__ import annotations

from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .interfaces import Progress


class RichProgressReporter(Progress):
    def __init__(self, console: Console):
        self.console = console

    @contextmanager
    def task(self, description: str, total: int):
        with RichProgress(
            TextColumn("[bold blue]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TimeRemainingColumn(), console=self.console, transient=True,
        ) as bar:
            tid = bar.add_task(description, total=total)
            yield lambda n=1: bar.advance(tid, n)

    def log(self, message: str) -> None:
        self.console.print(f"[dim]{message}[/]", highlight=False)
