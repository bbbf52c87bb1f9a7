"""A run's context and evaluation: the task factory, the :class:`RunContext` of a model, one
evaluated point (every evaluator, per-item records written to ``eval/``), and the compaction
check (masked vs compacted logits).  Used by the run loop (:mod:`resp_core.pipeline`), by
comparisons and by the recovery stage."""

from __future__ import annotations

import json

import torch

from .atomic_io import kill_point, write_jsonl
from .interfaces import CalibrationSet, Progress, RunContext
from .model.adapter import adapter_for
from .model.masks import MaskSet
from .model.structures import build_structures
from .resolve import ResolvedRecipe
from .rundir import RunDir


def task_factory(resolved: ResolvedRecipe):
    """``tasks(name=None, params=None)``: the task ``name`` (default: the recipe's) built with
    ``params``; without params, the recipe's own task instance when the name is the recipe's."""
    recipe = resolved.recipe
    cache = {(recipe.task.name, "{}"): resolved.task}

    def tasks(name: str | None = None, params: dict | None = None):
        name = name or recipe.task.name
        key = (name, json.dumps(params or {}, sort_keys=True, default=str))
        if key not in cache:
            cache[key] = resolved.registry.create("task", name, params or {}, f"task {name}")
        return cache[key]

    return tasks


def build_context(resolved: ResolvedRecipe, model, tokenizer, progress: Progress, prunable: bool = True) -> RunContext:
    """The run context for ``model``. ``prunable=False`` for an already compacted model that is
    only evaluated (it has per-layer widths, so no adapter geometry or structures)."""
    recipe = resolved.recipe
    resolved.generator.bind(model, tokenizer)
    adapter = adapter_for(model) if prunable else None
    structures = build_structures(adapter, recipe.structures.spec()) if prunable else None
    return RunContext(model=model, tokenizer=tokenizer, adapter=adapter, structures=structures,
                      generator=resolved.generator, tasks=task_factory(resolved), seed=recipe.seed,
                      device=recipe.model.device, progress=progress,
                      mask=MaskSet.full(adapter.geometry) if prunable else None, allocator=resolved.allocator)


def evaluate_point(resolved: ResolvedRecipe, ctx: RunContext, run_dir: RunDir, label: str) -> dict:
    metrics: dict = {}
    for i, (name, ev) in enumerate(resolved.evaluators):
        res = ev.evaluate(ctx)
        metrics.update(res.metrics)
        if res.records:
            write_jsonl(run_dir.file("eval", f"{label}_{i}_{name}.jsonl"), res.records)
        kill_point("evaluate")
    return metrics


@torch.no_grad()
def compaction_check(masked, compact, samples, pad_id: int, n: int = 8) -> float:
    """Max |logit difference| between the masked and compacted models on calibration sequences."""
    calib = CalibrationSet(samples[:n], pad_id)
    batch = next(calib.batches(n, "full"))
    device = next(masked.parameters()).device
    a = masked(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device)).logits
    b = compact(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device)).logits
    keep = batch.attention_mask.to(device).bool()
    return float((a - b).abs()[keep].max())
