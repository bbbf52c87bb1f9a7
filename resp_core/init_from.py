"""Starting a run from a saved run's mask (``init_from: RUN/masks/<file>.safetensors``).

The paper's Table 3 path (uncc-efficient-ai/RESP ``configs/section5/ablations/refresh_ratio_*.yaml``:
``restore: true`` with ``restore_config.checkpoint_path`` and ``refresh_ratio``;
``resp/pruners/data_refresh_GISP.py`` ``restore_to_prune`` and ``update_data``): take the
RESP-without-regeneration checkpoint at 30%, regenerate a fraction ρ of its traces once with
that pruned model, and continue pruning to 40%.

Semantics in a run:

* the calibration set is built first, by the dense model (the source run's traces: with the same
  recipe and seed, or a trace cache, the very same ones);
* then the saved mask is applied and becomes the run's starting mask (recorded in ``run.json``
  under ``init_from``: file, source run, its milestone, its position and the sparsity measured on
  this run's structures and basis);
* when the saved file is a milestone of this run's schedule (a planned milestone step, or a
  milestone judged on the measured sparsity), that milestone's regeneration happens now (ρ, e.g.
  ``regenerate_overrides: {0.3: ρ}``); the milestone is not evaluated again (its run did);
* the schedule continues after the saved point: steps whose planned target is at or below the
  saved point's are skipped.  The saved point's position is the planned target of the source
  run's step that produced the mask (``masks/step_XX.safetensors`` of that run, in the
  schedule's own units: a sparsity, or a count ratio under ``budget: count``), else the file's
  own ``target``, else its measured sparsity.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open

from .errors import RespError
from .model.masks import MaskSet, sparsity_of

TOLERANCE = 1e-6


def check_init_from(path: str, field: str = "init_from") -> None:
    """Up-front check: an existing, readable safetensors mask file (geometry is checked at run time)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise RespError(f"{field}: {path} does not exist (give a saved mask, e.g. RUN/masks/milestone_0.30.safetensors)")
    if p.suffix != ".safetensors":
        raise RespError(f"{field}: {path} is not a .safetensors mask file")
    try:
        with safe_open(str(p), framework="pt") as fh:
            keys = set(fh.keys())
    except Exception as exc:  # safetensors raises its own error types for a bad header
        raise RespError(f"{field}: {path} is not a readable mask file ({type(exc).__name__})") from None
    missing = {"q_head", "kv_group", "mlp_channel", "layer"} - keys
    if missing:
        raise RespError(f"{field}: {path} is not a RESP mask file (no {', '.join(sorted(missing))})")


@dataclass
class InitPoint:
    path: Path
    mask: MaskSet
    milestone: float  # the file's target: the milestone (or step target) the saved mask stands for
    position: float  # the planned target of the source step, in the schedule's units
    sparsity: float  # measured on this run's structures and basis
    metadata: dict

    def skips(self, step) -> bool:
        """A step at or below the saved point: already pruned."""
        return step.sparsity <= self.position + TOLERANCE

    def regenerate_fraction(self, steps) -> float:
        """ρ of the saved point when it is a milestone of ``steps`` (planned or measured), else 0."""
        for s in steps:
            if s.milestone and not s.measured_milestones and abs(s.sparsity - self.milestone) <= TOLERANCE:
                return s.regenerate_fraction
        for s in steps:
            for m, rho in s.measured_milestones.items():
                if abs(m - self.milestone) <= TOLERANCE:
                    return rho
        return 0.0

    def record(self) -> dict:
        run = self.path.resolve().parent.parent
        out = {"path": str(self.path), "milestone": self.milestone, "position": self.position,
               "sparsity": round(self.sparsity, 6), "source_step": self.metadata.get("step"),
               "source_run": str(run)}
        info = run / "run.json"
        if info.is_file():
            try:
                out["source_name"] = json.loads(info.read_text()).get("name")
            except ValueError:
                pass
        return out


def _metadata(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as fh:
        return {k: v for k, v in (fh.metadata() or {}).items() if not k.startswith("geometry.")}


def _float(meta: dict, key: str) -> float | None:
    try:
        return float(meta[key])
    except (KeyError, ValueError):
        return None


def load_init_point(path: str, adapter, structures) -> InitPoint:
    """The saved mask for this model (one-line error if it was made for another geometry)."""
    check_init_from(path)
    p = Path(path).expanduser()
    mask = MaskSet.load(p, adapter.geometry)
    meta = _metadata(p)
    reached = sparsity_of(mask, structures)
    milestone = _float(meta, "target")
    milestone = reached if milestone is None else milestone
    position = milestone
    step = meta.get("step")
    if step is not None and step.isdigit():
        step_file = p.parent / f"step_{int(step):02d}.safetensors"
        if step_file.is_file():
            planned = _float(_metadata(step_file), "target")
            position = milestone if planned is None else planned
    return InitPoint(p, mask, milestone, position, reached, meta)
