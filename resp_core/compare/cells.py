"""Running a comparison's cells: the dense model once, then every pruning path left to run, through
an executor (:mod:`resp_core.executors`), plus new seeds on the runs already finished.

A *pruning path* is one run folder of a comparison: a method (its scorer, calibration source,
allocator and schedule) pruned to every sparsity in one progressive run, or — for a one-shot
method — to one target.  Each path is independent of the others (same model, prompts,
structures and seeds; its own run folder), so the Ray executor runs one task per path that
requests the resources its recipe needs (``num_gpus`` = 1 on a CUDA device, times the vLLM
generator's ``tensor_parallel_size``; ``num_cpus`` = 1), and every task writes its finished run
into the same comparison folder the serial executor writes to.  A sweep stopped half way is
continued by running ``respctl compare`` again on the same folder, with either executor:
finished runs are kept; unfinished ones start over on Ray, and continue from their last
checkpoint with the serial executor.

With ``path_seeds`` every method has one path per path seed (``runs/<method>/path<s>/``, the
run's ``seed`` = s), each evaluated with the same evaluation seeds; new path seeds extend a
finished comparison like new methods do.

A path is a pure function of the comparison recipe, its label and its path seed (evaluation
seeds included), so the serial and the Ray executor give identical results
(tests/test_executors.py).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Iterator

import yaml

from ..atomic_io import atomic_write_text, write_json
from ..errors import RespError, RunFailed
from ..executors import Job, SerialExecutor
from ..resolve import resolve
from ..rundir import RunDir
from .paths import write_extra_records
from .results import _per_seed, collect_results, write_results
from .schema import (CompareMethod, CompareRecipe, check_extension, dense_recipe, method_recipe, method_runs,
                     resolve_compare, saved_compare)


def path_resources(cmp, label: str) -> dict:
    """What one path's task asks Ray for: GPUs when the model runs on CUDA (times the vLLM
    generator's tensor-parallel size), one CPU."""
    gpus = 0
    if cmp.model.device.startswith("cuda"):
        gpus = 1
        if cmp.generator.name == "vllm":
            gpus = int(cmp.generator.params.get("tensor_parallel_size", 1))
    return {"num_gpus": gpus, "num_cpus": 1}


def _summary(job: dict, result) -> dict:
    return {"label": job["label"], "target": job["target"], "sub": job["sub"],
            "run_dir": str(result.run_dir.path), "rows": len(result.rows)}


def _path_words(path_seed: int | None) -> str:
    return "" if path_seed is None else f", path seed {path_seed}"


def run_path(compare_json: dict, protocol: dict, folder: str, job: dict) -> dict:
    """Run one pruning path into ``folder/job['sub']`` from the comparison recipe as JSON (in a
    Ray worker: what an executor that runs elsewhere than here is given)."""
    from ..interfaces import Progress
    from ..pipeline import run_recipe
    from ..registry import get_registry

    cmp = CompareRecipe.model_validate(compare_json)
    cmp._protocol = dict(protocol)
    method = next(m for m in cmp.methods if m.label == job["label"])
    reg = get_registry()
    res = resolve(method_recipe(cmp, method, reg, job["target"], Path(folder), job.get("path_seed")), reg)
    return _summary(job, run_recipe(res, Path(folder) / job["sub"], Progress()))


def run_compare(cmp: CompareRecipe, source: str, folder: Path, progress, console=None, executor=None) -> dict:
    """Run (or extend) a comparison.  ``executor`` (:mod:`resp_core.executors`): where the pruning
    paths run; default: here, one after the other (:class:`~resp_core.executors.SerialExecutor`)."""
    from ..loading import load_model_and_tokenizer
    from ..pipeline import build_context, evaluate_point, run_recipe
    from ..registry import get_registry

    executor = SerialExecutor() if executor is None else executor
    resolved_methods = resolve_compare(cmp, source)
    reg = get_registry()
    if folder.exists():
        check_extension(folder, cmp)
        saved = saved_compare(folder)
        known = {m.label for m in saved.methods}
        given = {m.label: m for m in cmp.methods}
        kept = [m.model_copy(update={"reference": given[m.label].reference}) if m.label in given else m
                for m in saved.methods]  # a method's reference only pairs its results: the recipe's
        merged = saved.model_copy(update={
            "methods": kept + [m for m in cmp.methods if m.label not in known],
            "seeds": saved.seeds + [s for s in cmp.seeds if s not in saved.seeds],
            **({} if saved.path_seeds is None else
               {"path_seeds": saved.path_seeds + [s for s in cmp.path_seeds if s not in saved.path_seeds]}),
            "reference": cmp.reference,
            "speedup": cmp.speedup,
        })
        merged._protocol = cmp.protocol()  # mode: paper's record, for the methods run now
    else:
        folder.mkdir(parents=True)
        merged = cmp
    atomic_write_text(folder / "compare.yaml",
                      yaml.safe_dump(merged.model_dump(mode="json", exclude_none=True), sort_keys=False))
    (folder / "runs").mkdir(exist_ok=True)

    def say(msg):
        if console is not None:
            console.print(msg)

    # dense, evaluated once
    dense_dir = folder / "dense"
    if not (dense_dir / "metrics.json").is_file():
        say("[bold]dense[/]: evaluating")
        dr = resolve(dense_recipe(merged, reg), reg)
        model, tok = load_model_and_tokenizer(merged.model)
        dense_dir.mkdir(exist_ok=True)
        (dense_dir / "eval").mkdir(exist_ok=True)
        ctx = build_context(dr, model, tok, progress)
        metrics = evaluate_point(dr, ctx, RunDir(dense_dir), "dense")
        params = ctx.adapter.parameter_count()
        write_json(dense_dir / "metrics.json", [{"step": 0, "sparsity": 0.0, "sparsity_prunable_blocks": 0.0,
                                                  "sparsity_all_blocks": 0.0, "target": 0.0, "parameters": params,
                                                  **metrics}])
    else:
        _extend_seeds(merged, dense_dir, None, progress, reg)

    if executor.in_process:  # here: the recipe as parsed, and this process's progress display
        def run_one(method: CompareMethod, target: float | None, sub: str, path_seed: int | None = None) -> dict:
            res = resolve(method_recipe(merged, method, reg, target, folder, path_seed), reg)
            return _summary({"label": method.label, "target": target, "sub": sub},
                            run_recipe(res, folder / sub, progress))
    else:
        run_one = run_path
    executor.run(_paths_to_run(merged, resolved_methods, folder, executor.in_process, say, progress, reg),
                 run_one, say)
    if merged.speedup is not None:  # every milestone model timed against the dense model, here
        from .timing import measure_speedups

        measure_speedups(merged, folder, say)
    results = collect_results(folder)
    write_results(folder, results)
    return results


def _paths_to_run(merged: CompareRecipe, resolved_methods, folder: Path, here: bool, say, progress,
                  reg) -> Iterator[Job]:
    """The pruning paths left to run, each prepared as it is taken: a finished run gets its new
    seeds and is skipped; an unfinished one is continued from its last checkpoint when ``here``
    (an executor that runs in this process), else removed and run again.  A job's ``args``:
    ``(method, target, sub[, path seed])`` here, else :func:`run_path`'s arguments."""
    shipped = None
    for method, _ in resolved_methods:
        for sub, target, path_seed in method_runs(merged, method):
            run = folder / sub
            info = run / "run.json"
            who = method.label if path_seed is None else f"{method.label} (path seed {path_seed})"
            if info.is_file() and json.loads(info.read_text()).get("status") == "finished":
                _extend_seeds(merged, run, method, progress, reg, target, path_seed)
                continue
            if run.exists() and here and _continue_unfinished(run, who, say, progress):
                continue
            if run.exists():  # an unfinished run that cannot be continued: start it again
                shutil.rmtree(run)
            if target is None:
                say(f"[bold]{method.label}[/]: pruning to {', '.join(f'{s:.0%}' for s in merged.sparsities)}"
                    f"{_path_words(path_seed)}")
            else:
                say(f"[bold]{method.label}[/]: pruning to {target:.0%} in one shot from the dense model"
                    f"{_path_words(path_seed)}")
            if here:
                args = (method, target, sub) + (() if path_seed is None else (path_seed,))
            else:
                if shipped is None:
                    shipped = (json.loads(json.dumps(merged.model_dump(mode="json", exclude_none=True))),
                               merged.protocol(), str(folder.resolve()))
                args = (*shipped, {"label": method.label, "target": target, "sub": sub, "path_seed": path_seed})
            title = f"[bold]{method.label}[/]{'' if target is None else f' ({target:.0%})'}"
            yield Job(key=sub, name=method.label, title=title + ("" if path_seed is None else f" path {path_seed}"),
                      args=args, resources=path_resources(merged, method.label))


def _continue_unfinished(run: Path, label: str, say, progress) -> bool:
    """Continue an interrupted, failed or stale run of this comparison from its last complete
    checkpoint (as ``respctl run --resume``); False when it cannot be (no complete checkpoint, a
    live process still holds it, a damaged folder): the caller starts it again."""
    from ..pipeline import latest_checkpoint, resume_run

    if latest_checkpoint(RunDir(run)) is None:
        return False
    say(f"[bold]{label}[/]: continuing the unfinished run from its last checkpoint")
    try:
        resume_run(run, progress)
    except RespError as exc:
        if isinstance(exc, RunFailed):
            raise
        say(f"[bold]{label}[/]: cannot continue ({exc}); starting it again")
        return False
    return True


def _extend_seeds(cmp: CompareRecipe, run: Path, method: CompareMethod | None, progress, reg,
                  target: float | None = None, path_seed: int | None = None) -> None:
    """Evaluate seeds not yet in a finished run, on its saved milestone models (or the dense model).
    With path seeds, the new seeds' per-item records are kept too (``eval/*.extra.jsonl``)."""
    from ..loading import load_model_and_tokenizer
    from ..model.pruned_model import load_pruned
    from ..pipeline import build_context

    rows = json.loads((run / "metrics.json").read_text())
    extra_file = run / "extra_seeds.json"
    extra = json.loads(extra_file.read_text()) if extra_file.is_file() else {}
    for row in rows:
        key = f"{row['target']:.2f}"
        have = set()
        for metric, per in _per_seed(row).items():
            have |= set(per)
        for metric, per in extra.get(key, {}).items():
            have |= {int(s) for s in per}
        missing = [s for s in cmp.seeds if s not in have]
        if not missing:
            continue
        sub = cmp.model_copy(update={"seeds": missing})
        rec = dense_recipe(sub, reg) if method is None else method_recipe(sub, method, reg, target,
                                                                          path_seed=path_seed)
        res = resolve(rec, reg)
        model, tok = load_model_and_tokenizer(cmp.model)
        if method is not None:
            model = load_pruned(run / "models" / f"milestone_{row['target']:.2f}")
        ctx = build_context(res, model, tok, progress, prunable=method is None)
        for i, (name, ev) in enumerate(res.evaluators):
            result = ev.evaluate(ctx)
            for metric, per in _per_seed(result.metrics).items():
                extra.setdefault(key, {}).setdefault(metric, {}).update({str(s): v for s, v in per.items()})
            if cmp.path_seeds is not None and result.records:
                label = "dense" if method is None else f"milestone_{row['target']:.2f}"
                write_extra_records(run / "eval" / f"{label}_{i}_{name}.extra.jsonl", result.records)
        write_json(extra_file, extra)
