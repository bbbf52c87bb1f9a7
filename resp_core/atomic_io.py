"""Atomic file writes: every artifact of a run or comparison folder goes through these writers.

**Atomicity.**  Every artifact is written through :func:`atomic_write_bytes` (or its text/JSON/
JSONL/safetensors wrappers, or :func:`atomic_file` for writers that want a path): the bytes go to
a hidden temporary file in the same folder, which is flushed and fsynced, then renamed over the
final name, and the folder is fsynced.  A reader sees the old file or the new one, never a cut
one.  A folder of files (a saved model) is built under a hidden temporary name by
:func:`atomic_dir` and renamed into place only when complete, so it appears whole or not at all.
Files are created with the ordinary mode (0666 minus the umask, 0644 usually), whatever library
wrote them.  A write that fails (disk full, read-only folder) raises :class:`RunFailed` with one
line naming the file; what was written before stays intact.  Temporaries left by a killed process
(``.NAME.tmp-*``, ``.NAME.old-*``) are removed by :meth:`resp_core.rundir.RunDir.remove_temporaries`
on resume.  Safetensors headers are written with sorted keys (:func:`safetensors_bytes`).

**Test hook.**  ``RESP_TEST_KILL_AT=<phase>:<n>[:TERM|INT]`` makes the process send itself SIGKILL
(or SIGTERM/SIGINT) at the n-th :func:`kill_point` of that phase: ``score`` (after a step's
scoring), ``generate`` (after a calibration generation, before it is saved), ``evaluate`` (after
an evaluator, before its row is recorded), ``save`` (a folder complete, before its rename),
``write`` (a file complete, before its rename).  Only the tests set it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import itertools
import json
import os
import shutil
import signal
import time
from pathlib import Path

from .errors import RunFailed
from .safetensors_io import safetensors_bytes

# --------------------------------------------------------------------------------------------------
# Test hook
# --------------------------------------------------------------------------------------------------

_kill_counts: dict[str, int] = {}


def kill_point(phase: str) -> None:
    """Test hook (see the module docstring): a no-op unless ``RESP_TEST_KILL_AT`` names ``phase``."""
    spec = os.environ.get("RESP_TEST_KILL_AT")
    if not spec:
        return
    parts = spec.split(":")
    if parts[0] != phase:
        return
    _kill_counts[phase] = _kill_counts.get(phase, 0) + 1
    if _kill_counts[phase] != int(parts[1]):
        return
    sig = {"TERM": signal.SIGTERM, "INT": signal.SIGINT}.get(parts[2] if len(parts) > 2 else "", signal.SIGKILL)
    os.kill(os.getpid(), sig)
    time.sleep(0.1)  # let a Python-level handler run here, at the kill point


# --------------------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------------------

def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()
FILE_MODE = 0o666 & ~_UMASK
DIR_MODE = 0o777 & ~_UMASK
_tmp_counter = itertools.count()


def _tmp_name(path: Path, kind: str = "tmp") -> Path:
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}-{next(_tmp_counter)}{path.suffix}")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _fsync_path(path: Path) -> None:
    """fsync a file or folder by path (folders: where the OS allows it)."""
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if path.is_dir() else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        if path.is_dir():
            return
        raise
    try:
        os.fsync(fd)
    except OSError as exc:
        if not path.is_dir() or exc.errno not in (errno.EINVAL, errno.EBADF):
            raise
    finally:
        os.close(fd)


def write_failed(path: Path, exc: OSError) -> RunFailed:
    reason = exc.strerror or str(exc) or type(exc).__name__
    return RunFailed(f"could not write {path}: {reason}")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same folder, fsync, rename, fsync folder).

    Raises :class:`RunFailed` naming ``path`` when the disk refuses; ``path`` is then unchanged."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _tmp_name(path)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            _write_all(fd, data)
        finally:
            os.close(fd)
        _fsync_path(tmp)
        kill_point("write")
        os.replace(tmp, path)
        tmp = None
        _fsync_path(path.parent)
    except OSError as exc:
        raise write_failed(path, exc) from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def write_jsonl(path: Path, rows) -> None:
    atomic_write_text(path, "".join(json.dumps(r, default=str) + "\n" for r in rows))


def _normalize_modes(root: Path) -> None:
    """Ordinary modes (0666/0777 minus the umask) for everything under ``root`` (some writers,
    e.g. safetensors, create files 0600), then fsync every file and folder."""
    for dirpath, dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        os.chmod(d, DIR_MODE)
        for name in filenames:
            os.chmod(d / name, FILE_MODE)
            _fsync_path(d / name)
        _fsync_path(d)


@contextlib.contextmanager
def atomic_file(path: Path):
    """``with atomic_file(p) as tmp: writer(tmp)``: for writers that need a path (savefig,
    safetensors); ``tmp`` keeps ``path``'s suffix.  Committed like :func:`atomic_write_bytes`."""
    path = Path(path)
    tmp = _tmp_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        os.chmod(tmp, FILE_MODE)
        _fsync_path(tmp)
        kill_point("write")
        os.replace(tmp, path)
        _fsync_path(path.parent)
    except OSError as exc:
        raise write_failed(path, exc) from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_dir(path: Path):
    """``with atomic_dir(out) as tmp: write files into tmp``: the folder ``out`` appears whole
    or not at all.  The files are written into a hidden sibling folder, fsynced and given
    ordinary modes, and the folder is renamed to ``out`` (an existing ``out`` is replaced).
    On any error the temporary folder is removed and ``out`` is left as it was."""
    path = Path(path)
    tmp = _tmp_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        yield tmp
        _normalize_modes(tmp)
        kill_point("save")
        old = None
        if path.exists():
            old = _tmp_name(path, "old")
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_path(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        raise write_failed(path, exc) from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# Deterministic safetensors; file hashes
# --------------------------------------------------------------------------------------------------

def write_safetensors(path: Path, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """``tensors`` as a canonical safetensors file (:func:`~resp_core.safetensors_io.safetensors_bytes`),
    written atomically."""
    atomic_write_bytes(path, safetensors_bytes(tensors, metadata))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


__all__ = ["atomic_dir", "atomic_file", "atomic_write_bytes", "atomic_write_text", "write_json", "write_jsonl",
           "write_safetensors", "safetensors_bytes", "write_failed", "kill_point", "sha256_file",
           "FILE_MODE", "DIR_MODE"]
