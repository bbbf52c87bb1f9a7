"""The run loop: the only loop in RESP.

    calibration = source.build()
    for step in schedule.steps():                      # e.g. 5%, 10%, ... 40%
        scores = scorer.score(model, calibration)        # on the current masked model
        mask'  = allocator.allocate(scores, mask, step.sparsity)
        scorer.before_removal(mask, mask')               # weight edits (FLAP, SparseGPT)
        apply_mask(mask'); save masks/step_XX
        if step.milestone:
            evaluate; save masks/milestone_s
            if step.regenerate_fraction: calibration = source.regenerate(calibration, ρ)
    compact, check against the masked model, save

Everything is recorded in the run folder as it happens.
"""

from __future__ import annotations

import json
import platform
import shutil
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from . import __version__
from .errors import RespError
from .fingerprint import model_fingerprint
from .interfaces import CalibrationSet, Progress, RunContext
from .loading import load_model_and_tokenizer
from .model.adapter import adapter_for
from .model.compaction import compacted_copy, save_pruned
from .model.masks import MaskSet, apply_mask, kept_parameter_count, sparsity_of
from .model.structures import build_structures
from .recipe import ResolvedRecipe, dump_recipe
from .rundir import RunDir, source_commit, write_json, write_jsonl


@dataclass
class RunResult:
    run_dir: RunDir
    rows: list[dict] = field(default_factory=list)  # one per evaluated point (dense, milestones)
    final_mask: MaskSet | None = None
    compaction_max_abs_diff: float | None = None


def _calibration_rows(samples) -> list[dict]:
    return [s.to_json() for s in samples]


def _trace_stats(samples) -> dict:
    flags = [s.meta.get("correct") for s in samples if "correct" in s.meta]
    out = {"calibration_samples": len(samples),
           "calibration_mean_target_tokens": sum(len(s.target_ids) for s in samples) / max(1, len(samples))}
    if flags:
        out["calibration_correct_fraction"] = sum(bool(f) for f in flags) / len(flags)
    return out


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
    return metrics


def run_recipe(resolved: ResolvedRecipe, run_path, progress: Progress | None = None,
               on_row: Callable[[dict], None] | None = None, model_and_tokenizer=None) -> RunResult:
    """Run a resolved recipe into a new run folder at ``run_path``.

    A user error found only while running (e.g. a calibration source that yields too few
    samples) removes the folder this call created, so bad input leaves nothing behind; any
    other failure leaves the folder with ``status: failed`` in ``run.json`` for inspection."""
    RunDir.check_new(run_path)
    model, tokenizer = model_and_tokenizer or load_model_and_tokenizer(resolved.recipe.model)
    run_dir = RunDir.create(run_path)
    try:
        return _run(resolved, run_dir, model, tokenizer, progress or Progress(), on_row)
    except RespError:
        shutil.rmtree(run_dir.path, ignore_errors=True)
        raise
    except BaseException as exc:
        info_file = run_dir.file("run.json")
        info = json.loads(info_file.read_text()) if info_file.is_file() else {}
        info.update(status="failed", error=f"{type(exc).__name__}: {exc}")
        write_json(info_file, info)
        raise


def _run(resolved: ResolvedRecipe, run_dir: RunDir, model, tokenizer, progress: Progress,
         on_row: Callable[[dict], None] | None) -> RunResult:
    recipe = resolved.recipe
    torch.manual_seed(recipe.seed)
    started = time.time()
    (run_dir.file("recipe.yaml")).write_text(dump_recipe(recipe))
    ctx = build_context(resolved, model, tokenizer, progress)
    dense_params = ctx.adapter.parameter_count()
    info = {
        "status": "running", "name": recipe.name, "resp_version": __version__, "commit": source_commit(),
        "torch": torch.__version__, "python": platform.python_version(),
        "model": recipe.model.path, "model_fingerprint": model_fingerprint(model), "seed": recipe.seed,
        "dense_parameters": dense_params,
        "prunable_parameters": ctx.structures.prunable_parameter_total(),
        "protected_layers": [i for i, p in enumerate(ctx.structures.prunable_layers.tolist()) if not p],
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    write_json(run_dir.file("run.json"), info)
    result = RunResult(run_dir)

    def record(row: dict) -> None:
        result.rows.append(row)
        write_json(run_dir.file("metrics.json"), result.rows)
        if on_row:
            on_row(row)

    if recipe.evaluation.evaluate_dense and resolved.evaluators:
        metrics = evaluate_point(resolved, ctx, run_dir, "dense")
        record({"step": 0, "sparsity": 0.0, "target": 0.0, "parameters": dense_params, "milestone": True,
                **metrics})

    samples = resolved.calibration.build(ctx)
    if not samples:
        raise RespError("calibration: the source produced no samples")
    generation = 0
    write_jsonl(run_dir.file("calibration", f"generation_{generation:02d}.jsonl"), _calibration_rows(samples))
    trace_stats = _trace_stats(samples)
    mask = ctx.mask
    costs = ctx.structures.costs
    steps = resolved.schedule.steps()
    for k, step in enumerate(steps, start=1):
        ctx.step, ctx.target = k, step.sparsity
        calib = CalibrationSet(samples, tokenizer.pad_token_id)
        scores = resolved.scorer.score(ctx, calib)
        resolved.allocator.prepare(ctx, calib)
        new_mask = resolved.allocator.allocate(scores, ctx.structures, mask, step.sparsity)
        if not new_mask.is_subset_of(mask):
            raise RuntimeError("allocator revived pruned units; masks must be nested")
        resolved.scorer.before_removal(ctx, mask, new_mask)
        apply_mask(ctx.adapter, new_mask)
        mask = ctx.mask = new_mask
        reached = sparsity_of(mask, ctx.structures)
        mask.save(run_dir.file("masks", f"step_{k:02d}.safetensors"),
                  {"target": step.sparsity, "sparsity": reached, "step": k})
        progress.log(f"step {k}/{len(steps)}: target {step.sparsity:.3f}, reached {reached:.3f}")
        if not step.milestone:
            continue
        mask.save(run_dir.file("masks", f"milestone_{step.sparsity:.2f}.safetensors"),
                  {"target": step.sparsity, "sparsity": reached, "step": k})
        if recipe.output.save_milestone_models:
            milestone_model, milestone_record = compacted_copy(model, mask)
            save_pruned(milestone_model, milestone_record, run_dir.file("models", f"milestone_{step.sparsity:.2f}"),
                        tokenizer)
            del milestone_model
        metrics = evaluate_point(resolved, ctx, run_dir, f"milestone_{step.sparsity:.2f}") if resolved.evaluators else {}
        record({"step": k, "sparsity": round(reached, 4), "target": step.sparsity,
                "parameters": kept_parameter_count(ctx.adapter, mask, costs), "milestone": True,
                **trace_stats, **metrics})
        if step.regenerate_fraction > 0 and resolved.calibration.regenerable:
            samples = resolved.calibration.regenerate(ctx, samples, step.regenerate_fraction)
            generation += 1
            write_jsonl(run_dir.file("calibration", f"generation_{generation:02d}.jsonl"),
                        _calibration_rows(samples))
            trace_stats = _trace_stats(samples)
    result.final_mask = mask

    if recipe.output.save_model:
        compact_model, record_json = compacted_copy(model, mask)
        result.compaction_max_abs_diff = compaction_check(model, compact_model, samples, tokenizer.pad_token_id)
        save_pruned(compact_model, record_json, run_dir.file("model"), tokenizer)
        info["compacted_parameters"] = sum(p.numel() for p in {id(p): p for p in compact_model.parameters()}.values())
        info["compaction_max_abs_logit_diff"] = result.compaction_max_abs_diff
    info.update(status="finished", seconds=round(time.time() - started, 1), final_sparsity=sparsity_of(mask, ctx.structures))
    write_json(run_dir.file("run.json"), info)
    return result


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
