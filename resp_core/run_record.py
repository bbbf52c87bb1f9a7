"""The run record (``run.json``): status, the process that runs it, its heartbeat, and staleness.

**Status**: ``running`` → ``finished`` | ``failed`` (a run-time failure, message in
``error``) | ``interrupted`` (SIGTERM/SIGINT).  A ``running`` record whose process is gone (same
host and the pid is dead, or no heartbeat for :data:`STALE_AFTER_S` seconds) is reported as
``stale``.  ``interrupted``, ``failed`` and stale runs continue with ``respctl run --resume DIR``.
The ``process`` object (pid, host, times) is always the record's last key.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import threading
import time
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path

from .atomic_io import write_json
from .errors import RespError

HEARTBEAT_S = 30.0
STALE_AFTER_S = 600.0


@lru_cache(maxsize=1)
def source_commit() -> str | None:
    """The git commit of the RESP checkout this process imported (read once per process)."""
    here = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired):
        return None


# --------------------------------------------------------------------------------------------------
# The run record (run.json): status, process, heartbeat
# --------------------------------------------------------------------------------------------------

def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _age_s(stamp: str | None) -> float | None:
    if not stamp:
        return None
    try:
        return (datetime.now(timezone.utc) - datetime.fromisoformat(stamp.replace("Z", "+00:00"))).total_seconds()
    except ValueError:
        return None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def effective_status(info: dict) -> tuple[str, str]:
    """``(status, detail)``: the recorded status, or ``stale`` for a ``running`` record whose
    process is gone (same host and dead pid, or no heartbeat for STALE_AFTER_S)."""
    status = info.get("status") or "unknown"
    proc = info.get("process") or {}
    if status != "running":
        return status, ""
    pid, host = proc.get("pid"), proc.get("host")
    where = f"process {pid} on {host}"
    if host == socket.gethostname() and isinstance(pid, int) and not pid_alive(pid):
        return "stale", f"{where} is gone"
    age = _age_s(proc.get("heartbeat"))
    if age is not None and age > STALE_AFTER_S:
        return "stale", f"no heartbeat from {where} for {age / 60:.0f} minutes"
    return "running", f"{where} is alive"


class RunRecord:
    """``run.json``, written atomically under a lock, with a heartbeat thread while the run lives.

    The ``process`` object (pid, host, started, heartbeat, seconds, resumed_at) is always the last
    key; everything else is a deterministic function of the recipe, seed and software."""

    def __init__(self, path: Path, info: dict | None = None):
        self.path = Path(path)
        self.info: dict = dict(info or {})
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = time.monotonic()
        self._prior_seconds = float((self.info.get("process") or {}).get("seconds") or 0.0)

    def _process(self) -> dict:
        proc = dict(self.info.pop("process", None) or {})
        proc.update(pid=os.getpid(), host=socket.gethostname(), heartbeat=_now(),
                    seconds=round(self._prior_seconds + time.monotonic() - self._t0, 1))
        proc.setdefault("started", proc["heartbeat"])
        return proc

    def write(self, **updates) -> None:
        with self._lock:
            self.info.update(updates)
            proc = self._process()
            self.info["process"] = proc  # last key
            write_json(self.path, self.info)

    def begin(self, resumed_from: int | None = None) -> None:
        proc = dict(self.info.get("process") or {})
        if resumed_from is not None:
            proc["resumed_at_step"] = list(proc.get("resumed_at_step", [])) + [resumed_from]
        self.info["process"] = proc
        for key in ("error",):
            self.info.pop(key, None)
        self.write(status="running")
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="resp-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with contextlib.suppress(Exception):  # a missed heartbeat is not worth a failed run
                self.write()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self._thread = None

    def end(self, status: str, **updates) -> str | None:
        """Final status; returns None, or a note when run.json itself could not be written."""
        self.stop()
        try:
            self.write(status=status, **updates)
        except RespError as exc:
            return str(exc)
        return None


__all__ = ["RunRecord", "effective_status", "pid_alive", "source_commit", "HEARTBEAT_S", "STALE_AFTER_S"]
