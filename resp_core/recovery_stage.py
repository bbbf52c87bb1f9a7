"""Recovery as a stage of the run (``recovery: {name, params, at}``): the teacher's top-k at the
start, the recovered model at the final step (``at: final``) or at every milestone
(``at: milestones``), and the final model's weights handed back to the exports.

* **Start** (dense model, after calibration generation 0): a recoverer that asks for a teacher
  (:meth:`~resp_core.interfaces.Recoverer.teacher`) gets the dense model's top-k log-probabilities
  on those traces, written once to ``recovery/teacher_topk.safetensors``
  (:mod:`resp_core.recovery.teacher`); the pruned student never meets the dense model in memory.
* **A recovered point** (a milestone of the last step with ``at: final``, every milestone with
  ``at: milestones``): the masked model is evaluated as always (the row's ``pre_recovery``
  metrics; its per-item records move to ``eval/pre_recovery/``), then its compacted copy
  (:func:`~resp_core.model.compaction.compacted_copy`: per-layer widths, the speedup kept) is
  trained by the recoverer and evaluated; the row's metrics are the recovered model's, its
  ``recovery`` entry the training summary, and ``models/milestone_S`` (with
  ``output.save_milestone_models``) holds the recovered model.  The pruning path itself is not
  changed: the next steps prune the masked model as without recovery.
* **The end**: the final recovered model's kept weights are written back into the masked model
  (:func:`~resp_core.export.expand_into`), so ``model/`` and every ``export/final-<format>`` hold
  the recovered weights, plain models without adapters.

The compacted copy shares its embeddings, norms and output head with the masked model; a
recoverer may change the projection weights only (checked: any other tensor replaced or written
in place stops the run with one line).  Training state lives under ``resume/recovery/step_XX/``
(:mod:`resp_core.recovery.trainer`); the loss of every step goes to ``recovery/step_XX.json``.
"""

from __future__ import annotations

import json
import shutil

from .atomic_io import sha256_file, write_json
from .checkpoint import generation_file
from .errors import RespError
from .export import expand_into
from .interfaces import CalibrationSample, RecoveryContext
from .model.compaction import compacted_copy
from .model.saving import save_pruned
from .recovery.teacher import TEACHER_FILE, compute_teacher, describe, save_teacher, teacher_metadata
from .recovery.trainer import PROJECTIONS
from .run_context import build_context, compaction_check, evaluate_point, task_factory
from .rundir import CHECKPOINT_DIR

STATE_DIR = "recovery"  # under resume/


class RecoveryStage:
    def __init__(self, resolved, run_dir, progress):
        self.resolved, self.run_dir, self.progress = resolved, run_dir, progress
        self.section, self.recoverer = resolved.recipe.recovery, resolved.recovery
        self.current = None  # (step, recovered compacted model, record, summary) kept for the end

    # ---- start ---------------------------------------------------------------------------------
    def prepare(self, run) -> None:
        """The teacher's top-k on calibration generation 0, from the (still dense) model."""
        spec = self.recoverer.teacher()
        if spec is None:
            return
        tensors = compute_teacher(run.model, run.samples, run.tokenizer.pad_token_id, spec, self.progress)
        vocab = run.model.get_output_embeddings().weight.shape[0]
        calib = sha256_file(self.run_dir.file(generation_file(0)))
        save_teacher(self.run_dir.file(TEACHER_FILE), tensors, teacher_metadata(spec, vocab, len(run.samples), calib))

    def samples(self) -> list[CalibrationSample]:
        """Calibration generation 0 (the dense model's traces), as the run folder holds it."""
        lines = self.run_dir.file(generation_file(0)).read_text().splitlines()
        return [CalibrationSample.from_json(json.loads(line)) for line in lines if line.strip()]

    # ---- points --------------------------------------------------------------------------------
    @staticmethod
    def is_last(run, k: int) -> bool:
        """Step ``k`` is the run's last: no step after it will run (a schedule may stop early)."""
        return not any(run.pending(j, step) for j, step in enumerate(run.steps[k:], start=k + 1))

    def applies(self, run, k: int) -> bool:
        return self.section.at == "milestones" or self.is_last(run, k)

    def at_point(self, run, k: int, targets: list[float], metrics: dict) -> dict:
        """Recover step ``k``'s model and evaluate it (``targets``: the step's milestones, the first
        names the evaluation); the metrics row's evaluation part.  With
        ``output.save_milestone_models`` the recovered model is each milestone's model."""
        label = f"milestone_{targets[0]:.2f}"
        aside = self.run_dir.file("eval", "pre_recovery")
        for f in sorted(self.run_dir.file("eval").glob(f"{label}_*.jsonl")):
            aside.mkdir(exist_ok=True)
            f.replace(aside / f.name)
        model, record, summary = self.recover(run, k)
        resolved = self.resolved
        recovered = {}
        if resolved.evaluators:
            ctx = build_context(resolved, model, run.tokenizer, self.progress, prunable=False)
            try:
                recovered = evaluate_point(resolved, ctx, self.run_dir, label)
            finally:
                resolved.generator.bind(run.model, run.tokenizer)
        if resolved.recipe.output.save_milestone_models:
            for target in targets:
                save_pruned(model, record, self.run_dir.file("models", f"milestone_{target:.2f}"), run.tokenizer)
        self.current = (k, model, record, summary) if self.is_last(run, k) else None
        return {**recovered, "pre_recovery": metrics, "recovery": summary}

    def recover(self, run, k: int):
        """The compacted model of the current mask, trained by the recoverer (resuming from its
        state); ``(model, record, summary)``."""
        label = f"step_{k:02d}"
        root = self.run_dir.file(CHECKPOINT_DIR, STATE_DIR)
        if root.is_dir():  # earlier points' states are done (their step's checkpoint is written)
            for old in root.iterdir():
                if old.name != label:
                    shutil.rmtree(old, ignore_errors=True)
        samples = self.samples()
        model, record = compacted_copy(run.model, run.mask)
        check = compaction_check(run.model, model, samples, run.tokenizer.pad_token_id)
        before = _shared_tensors(model)
        teacher = self.run_dir.file(TEACHER_FILE)
        recipe = self.resolved.recipe
        ctx = RecoveryContext(model=model, tokenizer=run.tokenizer, samples=samples, tasks=task_factory(self.resolved),
                              state_dir=root / label, teacher_file=teacher if teacher.is_file() else None,
                              seed=recipe.seed, device=recipe.model.device, progress=self.progress, label=label)
        self.progress.log(f"recovery ({self.section.name}) of step {k}")
        summary = dict(self.recoverer.recover(ctx) or {})
        _check_shared(model, before, self.section.name)
        losses = summary.pop("losses", None)
        summary["compaction_max_abs_logit_diff"] = check
        write_json(self.run_dir.file("recovery", f"{label}.json"),
                   {"recovery": self.section.name, "at": self.section.at, "step": k, "summary": summary,
                    "losses": losses})
        return model, record, summary

    # ---- the end -------------------------------------------------------------------------------
    def finish(self, run) -> dict:
        """The final recovered model's weights into the masked model (for ``model/`` and every
        export); ``run.json``'s ``recovery`` entry."""
        masks = sorted(self.run_dir.file("masks").glob("step_*.safetensors"))
        k = int(masks[-1].stem.removeprefix("step_")) if masks else 0
        if self.current is not None and self.current[0] == k:
            _, model, record, summary = self.current
        else:
            model, record, summary = self.recover(run, k)
        expand_into(run.model, model, record, run.mask)
        self.current = None
        out = {"name": self.section.name, "at": self.section.at, "params": self.section.params,
               "final_step": k, "final": summary}
        teacher = self.run_dir.file(TEACHER_FILE)
        if teacher.is_file():
            out["teacher"] = {"file": TEACHER_FILE, **describe(teacher)}
        return {"recovery": out}


def _shared_tensors(model) -> dict:
    """Every tensor of ``model`` a recoverer may not change (all but the projection weights), with
    its in-place version counter."""
    out = {}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        owner = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else ""
        if owner not in PROJECTIONS:
            out[name] = (t, t._version)
    return out


def _check_shared(model, before: dict, name: str) -> None:
    now = dict(list(model.named_parameters()) + list(model.named_buffers()))
    for key, (t, version) in before.items():
        if now.get(key) is not t or t._version != version:
            raise RespError(f"recovery {name!r} changed {key}, which the compacted model shares with the run's "
                            "model; a recoverer may change the projection weights (or adapters merged into them) only")


__all__ = ["RecoveryStage"]
