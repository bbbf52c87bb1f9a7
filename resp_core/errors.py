"""User-facing errors: the CLI prints their message on one line and exits with code 2."""

from __future__ import annotations

import difflib


class RespError(Exception):
    """A problem with the user's input (recipe, paths, names). Never a bug in RESP."""


def did_you_mean(name: str, choices) -> str:
    close = difflib.get_close_matches(name, list(choices), n=3, cutoff=0.5)
    return f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
