"""User-facing errors: the CLI prints their message on one line and exits with code 2."""

from __future__ import annotations

import difflib


class RespError(Exception):
    """A problem with the user's input (recipe, paths, names). Never a bug in RESP.

    Found before a run starts: nothing is written.  Found mid-run: the run folder that run
    created is removed (bad input leaves nothing behind)."""


class RunFailed(RespError):
    """A run-time failure that is not the user's input: non-finite loss/gradients/scores,
    empty calibration, a disk that is full or read-only.  Printed as one line (exit 2); the run
    folder is kept with ``status: failed`` and the message in ``run.json``."""


class NumericalError(RunFailed):
    """Non-finite or degenerate numbers (loss, gradients, scores); the message names the step,
    layer and unit kind."""


class RunInterrupted(RunFailed):
    """SIGTERM or SIGINT during a run: the run folder is kept with ``status: interrupted`` and
    continues with ``respctl run --resume``.  The CLI exits with 128 + the signal number."""

    def __init__(self, message: str, signum: int = 15):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


def did_you_mean(name: str, choices) -> str:
    close = difflib.get_close_matches(name, list(choices), n=3, cutoff=0.5)
    return f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
