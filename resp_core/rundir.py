"""The run folder: its layout, creating it, and opening it to report on or to resume.

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

Every file is written atomically (:mod:`resp_core.atomic_io`); ``run.json`` is the run record
(:mod:`resp_core.run_record`).

**Determinism.**  Two runs of the same recipe and seed with the same software write the same
bytes into every file, except ``run.json``'s ``process`` object (pid, host, times), which is always
its last key.  Safetensors headers are written with sorted keys
(:func:`~resp_core.safetensors_io.safetensors_bytes`).
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

from .errors import RespError
from .run_record import effective_status

CHECKPOINT_DIR = "resume"


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



__all__ = ["RunDir", "CHECKPOINT_DIR"]
