"""The run folder: layout, atomic writes, and the record of what produced it.

    <run>/recipe.yaml            the validated recipe, defaults filled in
    <run>/run.json               status, versions, commit, model fingerprint, timings
    <run>/calibration/*.jsonl    calibration samples of each generation (traces with their meta)
    <run>/masks/step_XX.safetensors, masks/milestone_0.XX.safetensors
    <run>/eval/*.jsonl           per-item evaluation records
    <run>/metrics.json           one row per evaluated milestone
    <run>/model/                 the compacted model (load with resp_core.load_pruned)
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from .errors import RespError


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def write_jsonl(path: Path, rows) -> None:
    atomic_write_text(path, "".join(json.dumps(r, default=str) + "\n" for r in rows))


def source_commit() -> str | None:
    here = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired):
        return None


class RunDir:
    def __init__(self, path: Path):
        self.path = Path(path)

    @staticmethod
    def check_new(path: Path) -> None:
        p = Path(path)
        if p.exists():
            raise RespError(f"run folder {p} already exists; choose another with --out (nothing was written)")

    @classmethod
    def create(cls, path: Path) -> "RunDir":
        cls.check_new(path)
        Path(path).mkdir(parents=True)
        for sub in ("calibration", "masks", "eval"):
            (Path(path) / sub).mkdir()
        return cls(path)

    def file(self, *parts: str) -> Path:
        return self.path.joinpath(*parts)

    def read_json(self, *parts: str):
        return json.loads(self.file(*parts).read_text())

    @classmethod
    def open_finished(cls, path: Path) -> "RunDir":
        p = Path(path)
        info = p / "run.json"
        if not info.is_file():
            raise RespError(f"{p} is not a RESP run folder (no run.json)")
        status = json.loads(info.read_text()).get("status")
        if status != "finished":
            raise RespError(f"{p} is not a finished run (status: {status})")
        return cls(p)
