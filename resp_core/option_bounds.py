"""Bounds of the numeric command-line options: each checked before its command does any work.

``@bounded(name=Bound(...))`` on a command function checks the named keyword arguments when the
command is called and raises one :class:`RespError` line naming the option (``--prompt-tokens:
0 is outside [1, 1048576]``); NaN and infinities are refused as not finite.  The bounds stay on
the function (``__resp_bounds__``), so the test suite can require one for every numeric option
of every command.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from .errors import RespError


def _number(x: float) -> str:
    """``1048576`` for a whole number, ``0.4`` otherwise."""
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


@dataclass(frozen=True)
class Bound:
    """An interval for one option; an end is open when its ``*_open`` flag is set."""

    low: float
    high: float
    low_open: bool = False
    high_open: bool = False

    def describe(self) -> str:
        return (f"{'(' if self.low_open else '['}{_number(self.low)}, {_number(self.high)}"
                f"{')' if self.high_open else ']'}")

    def contains(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def check(self, option: str, value) -> None:
        if value is None:  # an optional option left out
            return
        if isinstance(value, float) and not math.isfinite(value):
            raise RespError(f"{option}: {value} is not a finite number")
        if not self.contains(value):
            raise RespError(f"{option}: {_number(value)} is outside {self.describe()}")


def option_name(parameter: str) -> str:
    """The flag Typer derives from a parameter name: ``prompt_tokens`` -> ``--prompt-tokens``."""
    return "--" + parameter.replace("_", "-")


def bounded(**bounds: Bound):
    """Check the named numeric options of a command before it runs (see the module docstring)."""
    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            for name, bound in bounds.items():
                bound.check(option_name(name), kwargs.get(name))
            return fn(*args, **kwargs)

        wrapper.__resp_bounds__ = dict(bounds)
        return wrapper
    return decorate
