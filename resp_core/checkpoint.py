"""A run's checkpoints (``resume/step_XX.*``): saving one after a step, finding the newest
complete one, restoring a run from it, and loading the model weights it holds.

A checkpoint is written after step 0 and after every step, the JSON last (the commit point):
``step_XX.json`` names the mask (``step_XX.mask.safetensors``), the model weights when the scorer
edits them (``step_XX.weights.safetensors``), the calibration generation it ran on, the metric
rows so far, the calibration source's state and the RNG states.  The folder's name is
:data:`resp_core.rundir.CHECKPOINT_DIR`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from .atomic_io import atomic_file, sha256_file, write_json
from .interfaces import CalibrationSample, RunContext
from .model.adapter import DecoderAdapter
from .model.masks import MaskSet, apply_mask
from .rng_state import rng_state
from .rundir import CHECKPOINT_DIR, RunDir

CHECKPOINT_FORMAT = 1


def generation_file(generation: int) -> str:
    """The run-folder path of calibration generation ``generation``."""
    return f"calibration/generation_{generation:02d}.jsonl"


def checkpoint_folder(run: Path) -> Path:
    """The checkpoint folder of the run folder ``run``."""
    return Path(run) / CHECKPOINT_DIR


def saved_checkpoints(folder: Path) -> Iterator:
    """The checkpoint JSONs in ``folder`` that parse, newest first, whatever they hold."""
    for f in sorted(folder.glob("step_*.json"), reverse=True):
        try:
            state = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        yield state


def save_checkpoint(run_dir: RunDir, step: int, n_steps: int, mask: MaskSet, weights_of, generation: int,
                    rows: list[dict], trace_stats: dict, source) -> None:
    """Everything step ``step + 1`` depends on; ``weights_of``: the model when the scorer edits
    weights (else None: the weights are the dense ones with ``mask`` applied)."""
    from safetensors.torch import save_model

    folder = checkpoint_folder(run_dir.path)
    name = f"step_{step:02d}"
    mask.save(folder / f"{name}.mask.safetensors", {"step": step})
    weights = None
    if weights_of is not None:
        weights = f"{name}.weights.safetensors"
        with atomic_file(folder / weights) as tmp:
            save_model(weights_of, str(tmp))
    calib = generation_file(generation)
    state_dict = getattr(source, "state_dict", None)
    write_json(folder / f"{name}.json", {
        "format": CHECKPOINT_FORMAT, "step": step, "steps": n_steps, "generation": generation,
        "calibration_file": calib, "calibration_sha256": sha256_file(run_dir.file(calib)),
        "mask_file": f"{name}.mask.safetensors", "weights_file": weights,
        "rows": rows, "trace_stats": trace_stats,
        "source_state": state_dict() if callable(state_dict) else None,
        "rng": rng_state(),
    })
    for old in folder.iterdir():  # the older checkpoints are superseded
        if old.name.startswith("step_") and not old.name.startswith(name + "."):
            old.unlink(missing_ok=True)


def latest_checkpoint(run_dir: RunDir) -> dict | None:
    """The newest complete checkpoint (its JSON parses and its files are there), or None."""
    folder = checkpoint_folder(run_dir.path)
    if not folder.is_dir():
        return None
    for state in saved_checkpoints(folder):
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            continue
        calib = run_dir.file(state["calibration_file"])
        if not calib.is_file() or sha256_file(calib) != state["calibration_sha256"]:
            continue
        if not (folder / state["mask_file"]).is_file():
            continue
        if state.get("weights_file") and not (folder / state["weights_file"]).is_file():
            continue
        return state
    return None


def restore_checkpoint(run_dir: RunDir, state: dict, ctx: RunContext, source) -> tuple[list[CalibrationSample], MaskSet]:
    """Put the model, mask and calibration source where they were after ``state['step']``."""
    folder = checkpoint_folder(run_dir.path)
    lines = run_dir.file(state["calibration_file"]).read_text().splitlines()
    samples = [CalibrationSample.from_json(json.loads(line)) for line in lines if line.strip()]
    if state.get("weights_file"):
        load_weights(ctx.model, folder / state["weights_file"])
    mask = MaskSet.load(folder / state["mask_file"], ctx.adapter.geometry)
    apply_mask(ctx.adapter, mask)
    ctx.mask = mask
    load_state = getattr(source, "load_state_dict", None)
    if state.get("source_state") is not None and callable(load_state):
        load_state(state["source_state"])
    return samples, mask


def load_weights(model, path: Path) -> None:
    """Load a full weight checkpoint, first creating the biases a scorer added (FLAP)."""
    from safetensors import safe_open
    from safetensors.torch import load_model

    with safe_open(str(path), framework="pt") as fh:
        keys = list(fh.keys())
    have = model.state_dict()
    for key in keys:
        if key not in have and key.endswith(".bias"):
            DecoderAdapter.ensure_bias(model.get_submodule(key[: -len(".bias")]))
    load_model(model, str(path), strict=True, device=str(next(model.parameters()).device))
