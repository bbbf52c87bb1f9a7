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
        checkpoint: resume/step_XX.*
    compact, check against the masked model, save

Everything is recorded in the run folder as it happens, through the atomic writers of
:mod:`resp_core.atomic_io`.

**Resume.**  After step 0 (dense evaluation and the first calibration generation) and after every
step, a checkpoint ``resume/step_XX.json`` (:mod:`resp_core.checkpoint`) records what the next step depends on: the mask
(``resume/step_XX.mask.safetensors``), the model weights when the scorer edits them
(``before_removal`` overridden: ``resume/step_XX.weights.safetensors``; otherwise the weights are
the dense ones with the mask applied), the current calibration generation (file and sha256), the
metric rows so far, the calibration source's state (``state_dict()``/``load_state_dict()`` when the
source has them) and the RNG states (torch, CUDA, python ``random``, numpy).  The JSON is written
last and is the commit point.  :func:`resume_run` (``respctl run --resume DIR``) loads the folder's
recipe and model, restores the latest checkpoint and runs the remaining steps; since every step
is a deterministic function of that state, the finished folder is byte-identical to an
uninterrupted run's (``run.json``'s ``process`` object aside).  The checkpoints are removed when
the run finishes.

**Failures.**  A user error found mid-run removes the folder the run created; a run-time failure
(:class:`RunFailed`, a write the disk refuses) keeps it with ``status: failed``; SIGTERM/SIGINT
keep it with ``status: interrupted`` (:class:`RunInterrupted`).  Each is one line for the CLI.
"""

from __future__ import annotations

import platform
import shutil
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import __version__
from .atomic_io import atomic_write_text, kill_point, write_json, write_jsonl
from .checkpoint import generation_file, latest_checkpoint, restore_checkpoint, save_checkpoint
from .errors import RespError, RunFailed, RunInterrupted
from .export import export_at_end
from .fingerprint import model_fingerprint
from .interfaces import CalibrationSample, CalibrationSet, Progress, Scorer
from .loading import load_model_and_tokenizer
from .model.compaction import compacted_copy
from .model.saving import save_compacted, save_pruned
from .model.masks import MaskSet, apply_mask, kept_parameter_count, sparsity_of, sparsity_report
from .model.structures import check_plan
from .init_from import load_init_point
from .recipe import dump_recipe
from .resolve import ResolvedRecipe
from .rng_state import seed_everything, set_rng_state
from .run_record import RunRecord, source_commit
from .run_context import build_context, compaction_check, evaluate_point, task_factory  # noqa: F401
from .recovery_stage import RecoveryStage
from .rundir import CHECKPOINT_DIR, RunDir


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


def run_recipe(resolved: ResolvedRecipe, run_path, progress: Progress | None = None,
               on_row: Callable[[dict], None] | None = None, model_and_tokenizer=None) -> RunResult:
    """Run a resolved recipe into a new run folder at ``run_path``.

    A user error found only while running (e.g. a calibration source that yields too few
    samples) removes the folder this call created, so bad input leaves nothing behind; a
    run-time failure leaves it with ``status: failed`` (SIGTERM/SIGINT: ``interrupted``) in
    ``run.json``, ready for :func:`resume_run`."""
    RunDir.check_new(run_path)
    model, tokenizer = model_and_tokenizer or load_model_and_tokenizer(resolved.recipe.model)
    run_dir = RunDir.create(run_path)
    return _guarded(run_dir, RunRecord(run_dir.file("run.json")), True,
                    lambda record: _run(resolved, run_dir, record, model, tokenizer, progress or Progress(), on_row,
                                        resume=False))


def resume_run(run_path, progress: Progress | None = None, on_row: Callable[[dict], None] | None = None,
               model_and_tokenizer=None) -> RunResult:
    """Continue an interrupted, failed or stale run from its last checkpoint (``respctl run --resume``)."""
    from .recipe import parse_recipe
    from .resolve import resolve

    run_dir = RunDir.open_resumable(Path(run_path))
    info = run_dir.info()
    recipe_file = run_dir.file("recipe.yaml")
    resolved = resolve(parse_recipe(recipe_file.read_text(), str(recipe_file)))
    model, tokenizer = model_and_tokenizer or load_model_and_tokenizer(resolved.recipe.model)
    saved = info.get("model_fingerprint")
    if saved and saved != model_fingerprint(model):
        raise RespError(f"--resume: model {resolved.recipe.model.path!r} is not the model this run started from "
                        f"(fingerprint {model_fingerprint(model)}, run.json has {saved}); nothing was changed")
    run_dir.remove_temporaries()
    return _guarded(run_dir, RunRecord(run_dir.file("run.json"), info), False,
                    lambda record: _run(resolved, run_dir, record, model, tokenizer, progress or Progress(), on_row,
                                        resume=True))


def _raise_interrupt(signum, frame):
    raise RunInterrupted(f"interrupted by {signal.Signals(signum).name}", signum)


def _guarded(run_dir: RunDir, record: RunRecord, created: bool, body: Callable[[RunRecord], RunResult]) -> RunResult:
    """Run ``body`` with SIGTERM/SIGINT turned into :class:`RunInterrupted` and every way out
    recorded in ``run.json``: finished, interrupted, failed (one line), or removed (a user error
    in a run folder this call created)."""
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, _raise_interrupt)

    def restore_signals():
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        previous.clear()

    resume_hint = f"continue with `respctl run --resume {run_dir.path}`"

    def kept(status: str, note: str | None) -> str:
        if note:  # run.json itself could not be written: the run will read as stale
            return f"(run folder {run_dir.path} kept, not marked {status}: {note}; {resume_hint})"
        return f"(run folder {run_dir.path} kept, status {status}; {resume_hint})"

    try:
        return body(record)
    except (RunInterrupted, KeyboardInterrupt) as exc:
        restore_signals()
        if record.info.get("status") == "finished":
            raise
        signum = getattr(exc, "signum", signal.SIGINT)
        message = f"run {run_dir.path} interrupted by {signal.Signals(signum).name}"
        note = record.end("interrupted", error=message)
        raise RunInterrupted(f"{message} {kept('interrupted', note)}", signum) from None
    except RunFailed as exc:
        restore_signals()
        note = record.end("failed", error=str(exc))
        raise RunFailed(f"{exc} {kept('failed', note)}") from None
    except RespError as exc:
        restore_signals()
        if created:
            record.stop()
            shutil.rmtree(run_dir.path, ignore_errors=True)
        else:
            record.end("failed", error=str(exc))
        raise
    except OSError as exc:
        restore_signals()
        where = f"{exc.filename}: " if exc.filename else ""
        failed = RunFailed(f"{where}{exc.strerror or exc}")
        note = record.end("failed", error=str(failed))
        raise RunFailed(f"{failed} {kept('failed', note)}") from None
    except BaseException as exc:
        restore_signals()
        record.end("failed", error=f"{type(exc).__name__}: {exc}")
        raise
    finally:
        restore_signals()
        record.stop()


def _run(resolved: ResolvedRecipe, run_dir: RunDir, record: RunRecord, model, tokenizer, progress: Progress,
         on_row: Callable[[dict], None] | None, resume: bool) -> RunResult:
    """The run's phases in order: start (or restore the latest checkpoint), the steps still to
    run, finish."""
    run = _Run(resolved, run_dir, record, model, tokenizer, progress, on_row)
    checkpoint = latest_checkpoint(run_dir) if resume else None
    run.plan()
    if checkpoint is None:
        run.start(resumed_from=0 if resume else None)
    else:
        run.restore(checkpoint)
    for k, step in enumerate(run.steps, start=1):
        if run.pending(k, step):
            run.step(k, step)
    return run.finish()


class _Run:
    """One run between its phases: :meth:`start` (or :meth:`restore` from a checkpoint), one
    :meth:`step` per schedule step (its :meth:`milestones` and regenerations), :meth:`finish`."""

    def __init__(self, resolved: ResolvedRecipe, run_dir: RunDir, record: RunRecord, model, tokenizer,
                 progress: Progress, on_row: Callable[[dict], None] | None):
        self.resolved, self.recipe = resolved, resolved.recipe
        self.run_dir, self.record, self.model, self.tokenizer = run_dir, record, model, tokenizer
        self.progress, self.on_row = progress, on_row
        self.ctx = build_context(resolved, model, tokenizer, progress)
        self.result = RunResult(run_dir)
        self.edits_weights = type(resolved.scorer).before_removal is not Scorer.before_removal
        self.recovery = RecoveryStage(resolved, run_dir, progress) if resolved.recovery is not None else None
        self.steps: list = []
        self.init = None
        self.dense_params = 0
        self.samples: list[CalibrationSample] = []
        self.mask: MaskSet | None = None
        self.generation = 0
        self.trace_stats: dict = {}
        self.first = 1  # the first step still to run
        self.previous = 0.0  # the sparsity measured before the next step (milestones crossed)

    def plan(self) -> None:
        """The schedule's steps; a target (or measured milestone) the structures cannot reach: one
        line, before anything runs; then the saved run to start from (``init_from``), if any."""
        resolved, ctx = self.resolved, self.ctx
        self.steps = resolved.schedule.steps()
        budget = getattr(getattr(resolved.allocator, "params", None), "budget", "parameters")
        check_plan(ctx.structures, self.steps, budget)
        if self.recipe.init_from:
            self.init = load_init_point(self.recipe.init_from, ctx.adapter, ctx.structures)

    def record_row(self, row: dict) -> None:
        self.result.rows.append(row)
        write_json(self.run_dir.file("metrics.json"), self.result.rows)
        if self.on_row:
            self.on_row(row)

    def save_generation(self) -> None:
        """Write the current calibration samples as generation ``self.generation``."""
        write_jsonl(self.run_dir.file(generation_file(self.generation)), _calibration_rows(self.samples))
        self.trace_stats = _trace_stats(self.samples)

    def checkpoint(self, step: int) -> None:
        save_checkpoint(self.run_dir, step, len(self.steps), self.mask, self.model if self.edits_weights else None,
                        self.generation, self.result.rows, self.trace_stats, self.resolved.calibration)

    def start(self, resumed_from: int | None) -> None:
        """A new run: seed, recipe and run record, the dense evaluation, the first calibration
        generation (and ``init_from``'s mask and regeneration), checkpoint 0."""
        recipe, resolved, ctx, record, init = self.recipe, self.resolved, self.ctx, self.record, self.init
        seed_everything(recipe.seed)
        atomic_write_text(self.run_dir.file("recipe.yaml"), dump_recipe(recipe))
        self.dense_params = ctx.adapter.parameter_count()
        record.info = {
            "status": "running", "name": recipe.name, "resp_version": __version__, "commit": source_commit(),
            "torch": torch.__version__, "python": platform.python_version(),
            "model": recipe.model.path, "model_fingerprint": model_fingerprint(self.model), "seed": recipe.seed,
            "dense_parameters": self.dense_params,
            "prunable_parameters": ctx.structures.prunable_parameter_total(),
            "protected_layers": [i for i, p in enumerate(ctx.structures.prunable_layers.tolist()) if not p],
            "plugins": resolved.plugin_versions(),
            **({"process": record.info["process"]} if "process" in record.info else {}),
            "mode": recipe.mode, **({"protocol": recipe.protocol()} if recipe.mode == "paper" else {}),
            **({"init_from": init.record()} if init is not None else {}),
        }
        record.begin(resumed_from=resumed_from)
        if recipe.evaluation.evaluate_dense and resolved.evaluators:
            metrics = evaluate_point(resolved, ctx, self.run_dir, "dense")
            self.record_row({"step": 0, **sparsity_report(ctx.mask, ctx.structures), "target": 0.0,
                             "parameters": self.dense_params, "milestone": True, **metrics})

        self.samples = resolved.calibration.build(ctx)
        kill_point("generate")
        if not self.samples:
            raise RespError("calibration: the source produced no samples")
        self.generation = 0
        self.save_generation()
        if self.recovery is not None:  # the dense model's top-k on these traces (resp_core/recovery_stage.py)
            self.recovery.prepare(self)
        self.mask = ctx.mask
        if init is not None:  # a saved run's mask (resp_core/init_from.py), then its milestone's regeneration
            apply_mask(ctx.adapter, init.mask)
            self.mask = ctx.mask = init.mask
            rho = init.regenerate_fraction(self.steps)
            self.progress.log(f"starting from {init.path} (sparsity {init.sparsity:.3f}); "
                              f"regenerating {rho:.0%} of the traces")
            if rho > 0 and resolved.calibration.regenerable:
                self.samples = resolved.calibration.regenerate(ctx, self.samples, rho)
                self.generation += 1
                self.save_generation()
        self.first = 1
        self.checkpoint(0)
        self.previous = sparsity_of(self.mask, ctx.structures)

    def restore(self, checkpoint: dict) -> None:
        """A resumed run: the state after the checkpoint's step, the RNG states last."""
        self.dense_params = self.record.info["dense_parameters"]
        self.progress.log(f"resuming {self.run_dir.path} after step {checkpoint['step']}")
        self.record.begin(resumed_from=checkpoint["step"])
        self.generation, self.trace_stats = checkpoint["generation"], checkpoint["trace_stats"]
        self.samples, self.mask = restore_checkpoint(self.run_dir, checkpoint, self.ctx, self.resolved.calibration)
        self.result.rows = list(checkpoint["rows"])
        write_json(self.run_dir.file("metrics.json"), self.result.rows)
        self.first = checkpoint["step"] + 1
        set_rng_state(checkpoint["rng"])
        self.previous = sparsity_of(self.mask, self.ctx.structures)

    def pending(self, k: int, step) -> bool:
        """Step ``k`` still to run: not done before a resume, not at/below ``init_from``'s point, not
        after the schedule's ``stop_at`` (a measured sparsity: ``progressive``'s ``grid_end``)."""
        stop = getattr(self.resolved.schedule, "stop_at", None)
        return not (k < self.first or (self.init is not None and self.init.skips(step))
                    or (stop is not None and self.previous >= stop))

    def step(self, k: int, step) -> None:
        """Score, allocate, remove, save the mask; then the step's milestones, the calibration
        regenerations they ask for, and checkpoint ``k``."""
        resolved, ctx = self.resolved, self.ctx
        ctx.step, ctx.target = k, step.sparsity
        calib = CalibrationSet(self.samples, self.tokenizer.pad_token_id)
        resolved.generator.before_scoring()  # e.g. vLLM frees its KV cache while gradients are computed
        try:
            scores = resolved.scorer.score(ctx, calib)
        finally:
            resolved.generator.after_scoring()
        kill_point("score")
        resolved.allocator.prepare(ctx, calib)
        new_mask = resolved.allocator.allocate(scores, ctx.structures, self.mask, step.sparsity)
        if not new_mask.is_subset_of(self.mask):
            raise RuntimeError("allocator revived pruned units; masks must be nested")
        resolved.scorer.before_removal(ctx, self.mask, new_mask)
        apply_mask(ctx.adapter, new_mask)
        self.mask = ctx.mask = new_mask
        reached = sparsity_of(self.mask, ctx.structures)
        self.mask.save(self.run_dir.file("masks", f"step_{k:02d}.safetensors"),
                       {"target": step.sparsity, "sparsity": reached, "step": k})
        self.progress.log(f"step {k}/{len(self.steps)}: target {step.sparsity:.3f}, reached {reached:.3f}")
        # milestones of this step: the planned one, and those crossed on the measured sparsity
        # (Step.milestones_crossed); each is saved and recorded, the model evaluated once
        points = step.milestones_crossed(self.previous, reached)
        self.previous = reached
        if step.milestone and f"{step.sparsity:.2f}" not in {f"{m:.2f}" for m, _ in points}:
            points.append((step.sparsity, step.regenerate_fraction))
        self.milestones(k, points, reached)
        self.regenerate(k, points)
        self.checkpoint(k)

    def milestones(self, k: int, points: list, reached: float) -> None:
        """Step ``k``'s milestones ``points``: each mask (and compacted model) saved and a metrics
        row recorded, the model evaluated once."""
        resolved, ctx, mask = self.resolved, self.ctx, self.mask
        metrics = None
        recover = self.recovery is not None and self.recovery.applies(self, k)  # the recovered model is evaluated
        for target, _ in points:
            mask.save(self.run_dir.file("masks", f"milestone_{target:.2f}.safetensors"),
                      {"target": target, "sparsity": reached, "step": k})
            if self.recipe.output.save_milestone_models and not recover:
                # compacted on the host straight to disk: no second model, nothing on the device
                save_compacted(self.model, mask, self.run_dir.file("models", f"milestone_{target:.2f}"), self.tokenizer)
            if metrics is None:
                metrics = (evaluate_point(resolved, ctx, self.run_dir, f"milestone_{target:.2f}")
                           if resolved.evaluators else {})
                if recover:
                    metrics = self.recovery.at_point(self, k, [t for t, _ in points], metrics)
            report = {key: round(v, 4) for key, v in sparsity_report(mask, ctx.structures).items()}
            self.record_row({"step": k, **report, "target": target,
                             "parameters": kept_parameter_count(ctx.adapter, mask, ctx.structures.costs),
                             "milestone": True, **self.trace_stats, **metrics})

    def regenerate(self, k: int, points: list) -> None:
        """The calibration regenerations step ``k``'s milestones ask for (none after the last step)."""
        resolved = self.resolved
        for target, rho in points:
            if rho > 0 and k < len(self.steps) and self.pending(k + 1, self.steps[k]) \
                    and resolved.calibration.regenerable:
                self.samples = resolved.calibration.regenerate(self.ctx, self.samples, rho)
                kill_point("generate")
                self.generation += 1
                self.save_generation()

    def finish(self) -> RunResult:
        """Milestones not reached, the compacted model and the other export formats, ``status:
        finished``; the checkpoints are removed."""
        recipe, result, mask, model, previous = self.recipe, self.result, self.mask, self.model, self.previous
        result.final_mask = mask
        info = self.record.info
        missed = sorted(m for m in (self.steps[-1].measured_milestones if self.steps else {}) if m > previous)
        if missed:  # milestones judged on the measured sparsity that the last step did not reach
            info["milestones_not_reached"] = missed
            self.progress.log(f"warning: milestones {missed} were not reached (the last step measured "
                              f"{previous:.4f}); raise schedule.params.target")
        if self.recovery is not None:  # the recovered weights into the masked model, for model/ and the exports
            info.update(self.recovery.finish(self))
        if recipe.output.save_model and "compacted" in recipe.output.formats:
            compact_model, record_json = compacted_copy(model, mask)  # shares every uncut tensor with model
            result.compaction_max_abs_diff = compaction_check(model, compact_model, self.samples,
                                                              self.tokenizer.pad_token_id)
            save_pruned(compact_model, record_json, self.run_dir.file("model"), self.tokenizer)
            unique = {id(p): p for p in compact_model.parameters()}
            info["compacted_parameters"] = sum(p.numel() for p in unique.values())
            info["compaction_max_abs_logit_diff"] = result.compaction_max_abs_diff
            del compact_model
        if recipe.output.save_model and set(recipe.output.formats) - {"compacted"}:
            info["exports"] = export_at_end(recipe.output.formats, model, mask, self.run_dir.path, self.tokenizer,
                                            self.progress.log)
        self.record.stop()
        self.record.write(status="finished", final_sparsity=sparsity_of(mask, self.ctx.structures))
        shutil.rmtree(self.run_dir.file(CHECKPOINT_DIR), ignore_errors=True)
        return result
