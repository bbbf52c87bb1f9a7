"""The run folder: layout, atomic writes, the run record, and resumable checkpoints.

    <run>/recipe.yaml            the validated recipe, defaults filled in
    <run>/run.json               status, versions, commit, model fingerprint; ``process``: pid, host,
                                 start, heartbeat and wall time (the only fields that differ
                                 between two runs of the same recipe and seed)
    <run>/calibration/*.jsonl    calibration samples of each generation (traces with their meta)
    <run>/masks/step_XX.safetensors, masks/milestone_0.XX.safetensors
    <run>/eval/*.jsonl           per-item evaluation records
    <run>/metrics.json           one row per evaluated milestone
    <run>/model/                 the compacted model (load with resp_core.load_pruned)
    <run>/resume/step_XX.*       the last completed step's checkpoint (removed when the run finishes)

**Atomicity.**  Every artifact is written through :func:`atomic_write_bytes` (or its text/JSON/
JSONL/safetensors wrappers, or :func:`atomic_file` for writers that want a path): the bytes go to
a hidden temporary file in the same folder, which is flushed and fsynced, then renamed over the
final name, and the folder is fsynced.  A reader sees the old file or the new one, never a cut
one.  A folder of files (a saved model) is built under a hidden temporary name by
:func:`atomic_dir` and renamed into place only when complete, so it appears whole or not at all.
Files are created with the ordinary mode (0666 minus the umask, 0644 usually), whatever library
wrote them.  A write that fails (disk full, read-only folder) raises :class:`RunFailed` with one
line naming the file; what was written before stays intact.  Temporaries left by a killed process
(``.NAME.tmp-*``, ``.NAME.old-*``) are removed by :meth:`RunDir.remove_temporaries` on resume.

**Status** (``run.json``): ``running`` → ``finished`` | ``failed`` (a run-time failure, message in
``error``) | ``interrupted`` (SIGTERM/SIGINT).  A ``running`` record whose process is gone (same
host and the pid is dead, or no heartbeat for :data:`STALE_AFTER_S` seconds) is reported as
``stale``.  ``interrupted``, ``failed`` and stale runs continue with ``respctl run --resume DIR``.

**Determinism.**  Two runs of the same recipe and seed with the same software write the same
bytes into every file, except ``run.json``'s ``process`` object (pid, host, times), which is always
its last key.  Safetensors headers are written with sorted keys (:func:`safetensors_bytes`).

**Test hook.**  ``RESP_TEST_KILL_AT=<phase>:<n>[:TERM|INT]`` makes the process send itself SIGKILL
(or SIGTERM/SIGINT) at the n-th :func:`kill_point` of that phase: ``score`` (after a step's
scoring), ``generate`` (after a calibration generation, before it is saved), ``evaluate`` (after
an evaluator, before its row is recorded), ``save`` (a folder complete, before its rename),
``write`` (a file complete, before its rename).  Only the tests set it.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path

from .errors import RespError, RunFailed
from .safetensors_io import safetensors_bytes

HEARTBEAT_S = 30.0
STALE_AFTER_S = 600.0
CHECKPOINT_DIR = "resume"

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
# Deterministic safetensors
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


# --------------------------------------------------------------------------------------------------
# RNG state (torch, CUDA, python random, numpy) as JSON
# --------------------------------------------------------------------------------------------------

def rng_state() -> dict:
    import random

    import torch

    def b64(t) -> str:
        return base64.b64encode(t.cpu().numpy().tobytes()).decode()

    state = {"torch": b64(torch.random.get_rng_state()), "python": json.loads(json.dumps(random.getstate()))}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [b64(s) for s in torch.cuda.get_rng_state_all()]
    np = sys.modules.get("numpy")
    if np is not None:
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        state["numpy"] = [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)]
    return state


def set_rng_state(state: dict) -> None:
    import random

    import torch

    def tensor(s: str):
        return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()

    torch.random.set_rng_state(tensor(state["torch"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensor(s) for s in state["cuda"]])
    np = sys.modules.get("numpy")
    if np is not None and state.get("numpy"):
        kind, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))


def seed_everything(seed: int) -> None:
    """Seed torch (every device), python ``random`` and numpy's global generator."""
    import random

    import torch

    torch.manual_seed(seed)
    random.seed(seed)
    np = sys.modules.get("numpy")
    if np is not None:
        np.random.seed(seed % (2 ** 32))


# --------------------------------------------------------------------------------------------------
# The folder
# --------------------------------------------------------------------------------------------------

class RunDir:
    def __init__(self, path: Path):
        self.path = Path(path)

    @staticmethod
    def check_new(path: Path) -> None:
        p = Path(path)
        if p.exists():
            hint = ""
            info = p / "run.json"
            if info.is_file():
                with contextlib.suppress(ValueError, OSError):
                    status, detail = effective_status(json.loads(info.read_text()))
                    if status in ("stale", "interrupted", "failed"):
                        hint = (f"; it is a {status} run" + (f" ({detail})" if detail else "")
                                + f": continue it with `respctl run --resume {p}`")
            raise RespError(f"run folder {p} already exists{hint}; choose another with --out (nothing was written)")

    @classmethod
    def create(cls, path: Path) -> "RunDir":
        cls.check_new(path)
        try:
            Path(path).mkdir(parents=True)
            for sub in ("calibration", "masks", "eval"):
                (Path(path) / sub).mkdir()
        except OSError as exc:
            shutil.rmtree(path, ignore_errors=True)
            raise RespError(f"cannot create run folder {path}: {exc.strerror or exc} (nothing was written)") from None
        return cls(path)

    def file(self, *parts: str) -> Path:
        return self.path.joinpath(*parts)

    def read_json(self, *parts: str):
        f = self.file(*parts)
        try:
            return json.loads(f.read_text())
        except (OSError, ValueError) as exc:
            raise RespError(f"{f}: cannot read ({exc})") from None

    def info(self) -> dict:
        info = self.file("run.json")
        if not info.is_file():
            raise RespError(f"{self.path} is not a RESP run folder (no run.json)")
        data = self.read_json("run.json")
        if not isinstance(data, dict):
            raise RespError(f"{info}: not a run record")
        return data

    @classmethod
    def open_finished(cls, path: Path) -> "RunDir":
        rd = cls(path)
        status, detail = effective_status(rd.info())
        if status != "finished":
            more = f" ({detail})" if detail else ""
            if status in ("stale", "interrupted", "failed"):
                more += f"; continue it with `respctl run --resume {rd.path}`"
            raise RespError(f"{rd.path} is not a finished run (status: {status}{more})")
        return rd

    @classmethod
    def open_resumable(cls, path: Path) -> "RunDir":
        rd = cls(path)
        if not rd.path.is_dir():
            raise RespError(f"--resume: {rd.path} does not exist")
        status, detail = effective_status(rd.info())
        if status == "finished":
            raise RespError(f"--resume: {rd.path} is already finished (nothing to do)")
        if status == "running":
            raise RespError(f"--resume: {rd.path} is still running ({detail}); stop it first")
        if status not in ("stale", "interrupted", "failed"):
            raise RespError(f"--resume: {rd.path} has status {status!r}; only interrupted, failed or stale runs resume")
        if not rd.file("recipe.yaml").is_file():
            raise RespError(f"--resume: {rd.path} has no recipe.yaml (the run never started); start it again")
        return rd

    def remove_temporaries(self) -> None:
        """Remove temporary files and folders a killed process left (``.NAME.tmp-*``, ``.NAME.old-*``)."""
        for p in sorted(self.path.rglob(".*")):
            if ".tmp-" in p.name or ".old-" in p.name:
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                elif p.exists():
                    with contextlib.suppress(OSError):
                        p.unlink()


__all__ = ["RunDir", "RunRecord", "atomic_dir", "atomic_file", "atomic_write_bytes", "atomic_write_text",
           "write_json", "write_jsonl", "write_safetensors", "safetensors_bytes", "kill_point", "source_commit",
           "effective_status", "rng_state", "set_rng_state", "seed_everything", "sha256_file"]
