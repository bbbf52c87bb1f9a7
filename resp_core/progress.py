"""Progress for long work (generation, scoring, evaluation), and the consoles ``respctl`` prints to.

On a terminal: rich progress bars that disappear when done.  Anywhere else (a pipe, ``nohup``,
Slurm, ``tee``): plain log lines that survive in a file — one line when a phase finishes, with
its elapsed time, and for long phases a line every ``interval`` seconds with the ETA.  lm-eval's
and the ``datasets`` library's own tqdm bars are switched off there (their work is reported
through RESP's phases instead).

Output that is not a terminal is never cut to 80 columns: :func:`make_console` makes a console
that is as wide as its content then, so ``respctl plugins | grep self_generated`` finds it.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager

from rich.console import Console, ConsoleDimensions
from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .interfaces import Progress

WIDE = 10_000  # columns when the output is not a terminal: wide enough for any name


class _Console(Console):
    """A rich console that never truncates or wraps when its output is not a terminal."""

    @property
    def size(self) -> ConsoleDimensions:
        dims = super().size
        if not self.is_terminal:  # COLUMNS, which rich would honour, does not apply to a pipe or file
            return ConsoleDimensions(WIDE, dims.height)
        return dims

    @size.setter
    def size(self, new_size) -> None:  # pragma: no cover - rich API compatibility
        Console.size.fset(self, new_size)


def make_console(stderr: bool = False) -> Console:
    return _Console(stderr=stderr)


def format_seconds(s: float) -> str:
    s = max(0.0, s)
    if s < 60:
        return f"{s:.1f}s"
    m, sec = divmod(int(round(s)), 60)
    if m < 60:
        return f"{m}m{sec:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m"


def quiet_third_party_bars() -> None:
    """Switch off tqdm bars of lm-eval, ``datasets`` and the hub (for non-terminal output)."""
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        import datasets

        datasets.disable_progress_bars()
    except Exception:  # datasets absent or too old: its bars stay
        pass


class RichProgressReporter(Progress):
    """Transient bars on a terminal; :class:`PlainProgressReporter` lines otherwise."""

    def __new__(cls, console: Console, *args, **kwargs):
        if cls is RichProgressReporter and not console.is_terminal:
            return PlainProgressReporter(console, *args, **kwargs)
        return super().__new__(cls)

    def __init__(self, console: Console):
        self.console = console

    @contextmanager
    def task(self, description: str, total: int):
        with RichProgress(
            TextColumn("[bold blue]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TimeRemainingColumn(), console=self.console, transient=True,
        ) as bar:
            tid = bar.add_task(description, total=total)
            # advance(n, description=...): a new description too (a training loss)
            yield lambda n=1, description=None: bar.update(tid, advance=n, **(
                {"description": description} if description else {}))

    def log(self, message: str) -> None:
        self.console.print(f"[dim]{message}[/]", highlight=False)


class PlainProgressReporter(Progress):
    """One plain line per finished phase (elapsed time), and every ``interval`` seconds of a
    long phase a line with its progress and ETA; the run's own log lines carry the time since
    the reporter started."""

    def __init__(self, console: Console, interval: float = 60.0, clock=time.monotonic):
        self.console = console
        self.interval = interval
        self.clock = clock
        self.started = clock()
        quiet_third_party_bars()

    def _print(self, text: str) -> None:
        self.console.print(text, highlight=False, markup=False, soft_wrap=True)

    @contextmanager
    def task(self, description: str, total: int):
        start = self.clock()
        state = {"done": 0, "last": start, "text": description}

        def advance(n: int = 1, description: str | None = None) -> None:  # description: a new one (a loss)
            state["done"] += n
            state["text"] = description or state["text"]
            now = self.clock()
            if now - state["last"] >= self.interval and total:
                state["last"] = now
                done, elapsed = state["done"], now - start
                eta = elapsed / done * (total - done) if done else float("nan")
                eta_s = format_seconds(eta) if eta == eta else "?"
                self._print(f"{state['text']}: {done}/{total} ({done / total:.0%}), "
                            f"{format_seconds(elapsed)} elapsed, ETA {eta_s}")

        yield advance
        elapsed = self.clock() - start
        count = f"{state['done']}/{total}" if total else f"{state['done']}"
        self._print(f"{description}: {count} done in {format_seconds(elapsed)}")

    def log(self, message: str) -> None:
        self._print(f"[{format_seconds(self.clock() - self.started)}] {message}")
