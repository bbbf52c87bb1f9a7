"""Side-by-side comparisons: methods × sparsities × seeds on one model, task, structures and prompts.

A comparison recipe names the shared parts once (model, task, structures, generator, default
calibration, evaluators, sparsities, seeds) and lists methods (scorer, and optionally their own
calibration source, allocator and schedule overrides).  Each method is one ordinary RESP run
whose progressive schedule has a milestone at every sparsity, so 20/30/40% cost one pruning
path, not three (masks are nested).  A method with ``schedule: {name: oneshot}`` is instead one
run per sparsity, each pruned in one shot from the dense model (the authors' Wanda-sp protocol:
uncc-efficient-ai/RESP ``configs/section5/main/wanda_gsm8k_{20,30,40}.yaml``, one
``baseline_uniform_wanda`` run per target).  Evaluators that accept ``seeds`` sample once per seed.

Folder layout::

    <dir>/compare.yaml          the validated comparison recipe
    <dir>/dense/metrics.json    the dense model, evaluated once
    <dir>/runs/<slug>/          one run folder per method (models/ keeps each milestone's model)
    <dir>/runs/<slug>/<s>/      one run folder per sparsity s (0.20, ...) for a one-shot method
    <dir>/results.json|csv      one row per method × sparsity: mean, 95% CI, per-seed values
    <dir>/report.md, accuracy.png

Re-running ``respctl compare`` on an existing folder extends it: finished methods are kept,
new methods are run, and new seeds are evaluated on the saved milestone models.  Changing what
must be shared (model, task, structures, generator, seed, sparsities) is refused.
"""

from __future__ import annotations

import io
import json
import re
import time
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from .errors import RespError, RunFailed
from .recipe import (EvaluationSection, ModelSection, OutputSection, PluginRef, Recipe, SharedSections,
                     StructuresSection, _Strict,
                     _first_error, check_model_path, dump_recipe, resolve)
from .rundir import RunDir, atomic_write_text, write_json
from .stats import ci95_halfwidth, json_safe, mean
from .validation import Seed

SHARED_FIELDS = ("model", "task", "structures", "generator", "seed", "sparsities", "calibration", "evaluators",
                 "steps")


class InitFromMethod(_Strict):
    """An earlier method's milestone mask in the same comparison (the paper's Table 3 path)."""

    method: str
    milestone: float


class CompareMethod(_Strict):
    label: str
    scorer: PluginRef
    calibration: PluginRef | None = None  # default: the comparison's calibration
    allocator: PluginRef | None = None  # default: global
    # overrides of the progressive schedule's params; {name: oneshot}: one run per sparsity, each from dense
    schedule: dict[str, Any] = Field(default_factory=dict)
    # start from a saved mask: a file, or {method: <earlier label>, milestone: <sparsity>} of this comparison
    init_from: "str | InitFromMethod | None" = None
    # Only to catch mistakes: a method may not prune other structures or another model.
    model: ModelSection | None = None
    structures: StructuresSection | None = None


class CompareRecipe(SharedSections):
    sparsities: list[float]
    steps: int = Field(8, ge=1)  # equal pruning steps up to the largest sparsity (plus every milestone)
    seeds: list[Seed] = Field(default_factory=lambda: [0])
    evaluators: list[PluginRef]
    methods: list[CompareMethod]
    output: OutputSection = Field(default_factory=OutputSection)

    @field_validator("sparsities")
    @classmethod
    def _sparsities(cls, v):
        if not v:
            raise ValueError("give at least one sparsity")
        for s in v:
            if not 0.0 < s < 1.0:
                raise ValueError(f"sparsity {s} is outside (0, 1)")
        if any(b <= a for a, b in zip(v, v[1:])):
            raise ValueError(f"sparsities must be strictly increasing, got {v}")
        return v

    @model_validator(mode="after")
    def _methods(self):
        for i, m in enumerate(self.methods):
            name = m.schedule.get("name", "progressive")
            if name not in SCHEDULES:
                raise ValueError(f"methods[{i}].schedule.name: {name!r} is not one of {', '.join(SCHEDULES)}")
            if name == "oneshot" and set(m.schedule) != {"name"}:
                raise ValueError(f"methods[{i}].schedule: a one-shot method takes no other schedule fields "
                                 "(it is pruned once per sparsity, each time from the dense model)")
        for i, m in enumerate(self.methods):
            ref = m.init_from
            if isinstance(ref, InitFromMethod):
                earlier = {x.label: x for x in self.methods[:i]}
                if ref.method not in earlier:
                    raise ValueError(f"methods[{i}].init_from.method: {ref.method!r} is not a method listed "
                                     "before this one")
                if round(ref.milestone, 6) not in {round(s, 6) for s in self.sparsities}:
                    raise ValueError(f"methods[{i}].init_from.milestone: {ref.milestone} is not one of the "
                                     f"comparison's sparsities {self.sparsities}")
        labels = [m.label for m in self.methods]
        if len(set(labels)) != len(labels):
            raise ValueError(f"method labels must be unique, got {labels}")
        if not self.methods:
            raise ValueError("list at least one method")
        if not self.seeds:
            raise ValueError("give at least one seed")
        return self


SCHEDULES = ("progressive", "oneshot")


def is_oneshot(method: CompareMethod) -> bool:
    return method.schedule.get("name") == "oneshot"


def method_runs(cmp: "CompareRecipe", method: CompareMethod) -> list[tuple[str, float | None]]:
    """(run folder relative to the comparison folder, one-shot target or None) of a method."""
    if is_oneshot(method):
        return [(f"runs/{slug(method.label)}/{s:.2f}", s) for s in cmp.sparsities]
    return [(f"runs/{slug(method.label)}", None)]


def slug(label: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-") or "method"


def parse_compare(text: str | dict, source: str) -> CompareRecipe:
    """A comparison recipe from YAML text (or an already parsed mapping)."""
    from .recipe import load_yaml_document

    data = load_yaml_document(text, source) if isinstance(text, str) else text
    if not isinstance(data, dict):
        raise RespError(f"{source}: a comparison recipe must be a YAML mapping")
    report = None
    if data.get("mode") == "paper":
        from .paper import apply_to_compare

        data, report = apply_to_compare(data)
    try:
        cmp = CompareRecipe.model_validate(data)
    except ValidationError as exc:
        raise RespError(f"{source}: {_first_error(exc)}") from None
    if report is not None:  # method entries keyed by label: methods[<label>].<field>
        labels = [m.label for m in cmp.methods]
        cmp._protocol = {part: {re.sub(r"^methods\[(\d+)\]", lambda g: f"methods[{labels[int(g.group(1))]}]", k): v
                                for k, v in entries.items()} for part, entries in report.to_json().items()}
    for i, m in enumerate(cmp.methods):
        if m.model is not None and m.model != cmp.model:
            raise RespError(f"{source}: methods[{i}].model differs from the comparison's model "
                            f"({m.model.path} vs {cmp.model.path}); every method must prune the same model")
        if m.structures is not None and m.structures != cmp.structures:
            raise RespError(f"{source}: methods[{i}].structures differs from the comparison's structures; "
                            "every method must prune the same structures")
    return cmp


def _evaluators_with_seeds(cmp: CompareRecipe, registry) -> list[PluginRef]:
    out = []
    for i, ev in enumerate(cmp.evaluators):
        entry = registry.get("evaluator", ev.name, f"evaluators[{i}]")
        fields = getattr(getattr(entry.factory, "Params", None), "model_fields", {})
        params = dict(ev.params)
        if "seeds" in fields:
            params["seeds"] = list(cmp.seeds)
        out.append(PluginRef(name=ev.name, params=params))
    return out


def init_from_path(cmp: CompareRecipe, method: CompareMethod, folder: Path | None) -> str | None:
    """The mask file ``method`` starts from; None when it starts dense, or when it is an earlier
    method's milestone and no comparison folder is given (validation, before that method ran)."""
    ref = method.init_from
    if ref is None or isinstance(ref, str):
        return ref
    if folder is None:
        return None
    source = next(m for m in cmp.methods if m.label == ref.method)
    run = f"runs/{slug(source.label)}" + (f"/{ref.milestone:.2f}" if is_oneshot(source) else "")
    return str(folder / run / "masks" / f"milestone_{ref.milestone:.2f}.safetensors")


def _method_protocol(cmp: CompareRecipe, method: CompareMethod) -> dict:
    """``mode: paper``'s record for one method's runs: the shared fields and that method's."""
    own = f"methods[{method.label}]"
    out = {}
    for part, entries in cmp.protocol().items():
        out[part] = {(k[len(own) + 1:] if k.startswith(own + ".") else k): v for k, v in entries.items()
                     if not k.startswith("methods[") or k.startswith(own + ".")}
    return out


def method_recipe(cmp: CompareRecipe, method: CompareMethod, registry, target: float | None = None,
                  folder: Path | None = None) -> Recipe:
    """The run recipe of ``method``; for a one-shot method, its run at ``target`` (default: the
    largest sparsity).  ``folder``: the comparison folder (to find an earlier method's mask)."""
    name = f"{cmp.name}-{slug(method.label)}"
    if is_oneshot(method):
        target = cmp.sparsities[-1] if target is None else target
        schedule_ref = PluginRef(name="oneshot", params={"target": target})
        name = f"{name}-{target:.2f}"
    else:
        schedule = {"target": cmp.sparsities[-1], "steps": cmp.steps, "milestones": list(cmp.sparsities),
                    "regenerate_fraction": 0.0}
        schedule.update({k: v for k, v in method.schedule.items() if k != "name"})
        if "step_size" in method.schedule:  # the authors' linspace spacing instead of equal steps
            schedule.pop("steps")
        schedule_ref = PluginRef(name="progressive", params=schedule)
    recipe = Recipe(
        name=name, seed=cmp.seed, mode=cmp.mode, init_from=init_from_path(cmp, method, folder),
        model=cmp.model, task=cmp.task,
        structures=cmp.structures, generator=cmp.generator, calibration=method.calibration or cmp.calibration,
        scorer=method.scorer, allocator=method.allocator or PluginRef(name="global"),
        schedule=schedule_ref,
        evaluation=EvaluationSection(evaluate_dense=False, evaluators=_evaluators_with_seeds(cmp, registry)),
        output=OutputSection(save_model=False, save_milestone_models=True),
    )
    recipe._protocol = _method_protocol(cmp, method) if cmp.mode == "paper" else {}
    return recipe


def dense_recipe(cmp: CompareRecipe, registry) -> Recipe:
    return Recipe(name=f"{cmp.name}-dense", seed=cmp.seed, model=cmp.model, task=cmp.task, structures=cmp.structures,
                  generator=cmp.generator, calibration=cmp.calibration, scorer=PluginRef(name="resp"),
                  schedule=PluginRef(name="oneshot", params={"target": 0.0}),
                  evaluation=EvaluationSection(evaluators=_evaluators_with_seeds(cmp, registry)))


def resolve_compare(cmp: CompareRecipe, source: str, portable: bool = False):
    """Build every method's recipe and resolve it (plugin names, params, paths) before running.
    ``portable``: skip the checks that depend on this machine (see :func:`resp_core.recipe.resolve`)."""
    from .registry import get_registry

    reg = get_registry()
    if not portable:
        check_model_path(cmp.model)
    resolved = []
    for i, m in enumerate(cmp.methods):
        r = method_recipe(cmp, m, reg)
        try:
            resolved.append((m, resolve(r, reg, portable=portable)))
        except RespError as exc:
            raise RespError(f"{source}: methods[{i}] ({m.label}): {exc}") from None
    return resolved


def _shared_view(cmp: CompareRecipe) -> dict:
    d = cmp.model_dump(mode="json")
    return {k: d[k] for k in SHARED_FIELDS}


def saved_compare(folder: Path) -> CompareRecipe:
    """The comparison recipe saved in ``folder``; one line when it cannot be read."""
    path = folder / "compare.yaml"
    try:
        return CompareRecipe.model_validate(yaml.safe_load(path.read_text()))
    except (OSError, UnicodeDecodeError, yaml.YAMLError, ValidationError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RespError(f"{path}: cannot read the saved comparison recipe ({first})") from None


def check_extension(folder: Path, cmp: CompareRecipe) -> None:
    saved_file = folder / "compare.yaml"
    if not saved_file.is_file():
        raise RespError(f"{folder} exists and is not a comparison folder (no compare.yaml); choose another --out")
    saved = saved_compare(folder)
    old, new = _shared_view(saved), _shared_view(cmp)
    for key in SHARED_FIELDS:
        if key == "evaluators":
            continue
        if old[key] != new[key]:
            raise RespError(f"{folder}: this comparison was made with a different {key}; "
                            f"extend it only with new methods or seeds (nothing was changed)")
    old_ev = [{"name": e["name"], "params": {k: v for k, v in e["params"].items() if k != "seeds"}} for e in old["evaluators"]]
    new_ev = [{"name": e["name"], "params": {k: v for k, v in e["params"].items() if k != "seeds"}} for e in new["evaluators"]]
    if old_ev != new_ev:
        raise RespError(f"{folder}: this comparison was made with different evaluators; extend it only with new "
                        "methods or seeds (nothing was changed)")
    def canonical(method: CompareMethod) -> str:  # YAML round trips turn float keys into strings
        return json.dumps(json.loads(json.dumps(method.model_dump(mode="json", exclude_none=True), default=str)),
                          sort_keys=True)

    for m_old in saved.methods:
        for m_new in cmp.methods:
            if m_old.label == m_new.label and canonical(m_old) != canonical(m_new):
                raise RespError(f"{folder}: method {m_old.label!r} is already in this comparison with other "
                                "settings; give the new one another label")


# --------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------

SEED_KEY = re.compile(r"^(?P<metric>.+)@seed(?P<seed>-?\d+)$")


def _per_seed(metrics: dict) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    for k, v in metrics.items():
        m = SEED_KEY.match(k)
        if m:
            out.setdefault(m.group("metric"), {})[int(m.group("seed"))] = float(v)
    if not out:
        for k, v in metrics.items():
            if k.endswith("/accuracy"):
                out[k] = {-1: float(v)}
    return out


def collect_results(folder: Path) -> dict:
    """Rows (method × sparsity) from the finished runs in a comparison folder."""
    cmp = saved_compare(folder)
    rows = []

    def add(method: str, row: dict, extra: dict[str, dict[int, float]]):
        seeds = _per_seed(row)
        for metric, more in extra.items():
            seeds.setdefault(metric, {}).update(more)
        for metric, per_seed in seeds.items():
            vals = [per_seed[s] for s in sorted(per_seed)]
            rows.append({
                "method": method, "target": row["target"], "sparsity": row["sparsity"],
                **{k: row.get(k) for k in ("sparsity_prunable_blocks", "sparsity_all_blocks")},
                "parameters": row["parameters"], "metric": metric, "mean": mean(vals),
                "ci95": ci95_halfwidth(vals), "n_seeds": len(vals),
                "per_seed": {str(s): per_seed[s] for s in sorted(per_seed)},
                # per-item bootstrap 95% CI [low, high] when the evaluator reports one (task_accuracy)
                "ci95_items": ([row[f"{metric}_items_ci95_low"], row[f"{metric}_items_ci95_high"]]
                               if f"{metric}_items_ci95_low" in row else None),
            })

    dense_file = folder / "dense" / "metrics.json"
    if dense_file.is_file():
        dense_rows = json.loads(dense_file.read_text())
        extra = json.loads((folder / "dense" / "extra_seeds.json").read_text()) if (folder / "dense" / "extra_seeds.json").is_file() else {}
        for r in dense_rows[:1]:
            add("dense", r, {k: {int(s): v for s, v in d.items()} for k, d in extra.get("0.00", {}).items()})
    for m in cmp.methods:
        for sub, _ in method_runs(cmp, m):
            run = folder / sub
            if not (run / "run.json").is_file() or json.loads((run / "run.json").read_text()).get("status") != "finished":
                continue
            extra_all = json.loads((run / "extra_seeds.json").read_text()) if (run / "extra_seeds.json").is_file() else {}
            for r in json.loads((run / "metrics.json").read_text()):
                extra = extra_all.get(f"{r['target']:.2f}", {})
                add(m.label, r, {k: {int(s): v for s, v in d.items()} for k, d in extra.items()})
    info = {
        "name": cmp.name, "model": cmp.model.path, "task": cmp.task.model_dump(), "seeds": cmp.seeds,
        "sparsities": cmp.sparsities, "structures": cmp.structures.model_dump(),
        "calibration": cmp.calibration.model_dump(),
        "methods": [m.model_dump(exclude_none=True) for m in cmp.methods],
    }
    for run_json in sorted(folder.glob("runs/*/run.json")) + sorted(folder.glob("runs/*/*/run.json")):
        meta = json.loads(run_json.read_text())
        info.setdefault("commit", meta.get("commit"))
        info.setdefault("model_fingerprint", meta.get("model_fingerprint"))
        info.setdefault("torch", meta.get("torch"))
    return {"info": info, "rows": rows}


def write_results(folder: Path, results: dict, ci: str = "seeds") -> None:
    """results.json, results.csv, report.md and the plot (PNG, PDF, SVG); ``ci``: which 95% CI
    the report and plot show (``seeds`` or ``items``, see :mod:`resp_core.report`)."""
    import csv

    write_json(folder / "results.json", json_safe(results))  # valid JSON: null, never NaN
    fh = io.StringIO(newline="")
    w = csv.writer(fh)
    w.writerow(["method", "target", "sparsity", "sparsity_prunable_blocks", "sparsity_all_blocks", "parameters",
                "metric", "mean", "ci95", "n_seeds", "per_seed"])
    for r in results["rows"]:
        w.writerow([r["method"], r["target"], r["sparsity"], r.get("sparsity_prunable_blocks"),
                    r.get("sparsity_all_blocks"), r["parameters"], r["metric"], f"{r['mean']:.6f}",
                    "" if r["ci95"] != r["ci95"] else f"{r['ci95']:.6f}", r["n_seeds"],
                    ";".join(f"{k}:{v:.4f}" for k, v in r["per_seed"].items())])
    atomic_write_text(folder / "results.csv", fh.getvalue())
    from .report import render_markdown, render_plot

    render_plot(results, folder / "accuracy.png", ci=ci)
    atomic_write_text(folder / "report.md", render_markdown(results, plot="accuracy.png", ci=ci))


def run_compare(cmp: CompareRecipe, source: str, folder: Path, progress, console=None, executor=None) -> dict:
    """Run (or extend) a comparison.  ``executor`` (resp_core/executors.py): where the pruning
    paths run; None runs them here, one after the other."""
    from .loading import load_model_and_tokenizer
    from .pipeline import build_context, evaluate_point, run_recipe
    from .registry import get_registry

    resolved_methods = resolve_compare(cmp, source)
    reg = get_registry()
    if folder.exists():
        check_extension(folder, cmp)
        saved = saved_compare(folder)
        known = {m.label for m in saved.methods}
        merged = saved.model_copy(update={
            "methods": saved.methods + [m for m in cmp.methods if m.label not in known],
            "seeds": saved.seeds + [s for s in cmp.seeds if s not in saved.seeds],
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

    jobs = []  # pruning paths left to run, when an executor runs them
    for method, res in resolved_methods:
        for sub, target in method_runs(merged, method):
            run = folder / sub
            info = run / "run.json"
            if info.is_file() and json.loads(info.read_text()).get("status") == "finished":
                _extend_seeds(merged, run, method, progress, reg, target)
                continue
            if run.exists() and executor is None and _continue_unfinished(run, method.label, say, progress):
                continue
            if run.exists():  # an unfinished run that cannot be continued: start it again
                import shutil

                shutil.rmtree(run)
            if target is None:
                say(f"[bold]{method.label}[/]: pruning to {', '.join(f'{s:.0%}' for s in merged.sparsities)}")
            else:
                say(f"[bold]{method.label}[/]: pruning to {target:.0%} in one shot from the dense model")
            if executor is not None:
                from .executors import PathJob

                jobs.append(PathJob(method.label, target, sub))
                continue
            res = resolve(method_recipe(merged, method, reg, target, folder), reg)
            run_recipe(res, run, progress)
    if jobs:
        executor.run(merged, folder, jobs, say, progress)
    results = collect_results(folder)
    write_results(folder, results)
    return results


def _continue_unfinished(run: Path, label: str, say, progress) -> bool:
    """Continue an interrupted, failed or stale run of this comparison from its last complete
    checkpoint (as ``respctl run --resume``); False when it cannot be (no complete checkpoint, a
    live process still holds it, a damaged folder): the caller starts it again."""
    from .pipeline import latest_checkpoint, resume_run

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
                  target: float | None = None) -> None:
    """Evaluate seeds not yet in a finished run, on its saved milestone models (or the dense model)."""
    from .loading import load_model_and_tokenizer
    from .model.compaction import load_pruned
    from .pipeline import build_context

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
        rec = dense_recipe(sub, reg) if method is None else method_recipe(sub, method, reg, target)
        res = resolve(rec, reg)
        model, tok = load_model_and_tokenizer(cmp.model)
        if method is not None:
            model = load_pruned(run / "models" / f"milestone_{row['target']:.2f}")
        ctx = build_context(res, model, tok, progress, prunable=method is None)
        for _, ev in res.evaluators:
            metrics = ev.evaluate(ctx).metrics
            for metric, per in _per_seed(metrics).items():
                extra.setdefault(key, {}).setdefault(metric, {}).update({str(s): v for s, v in per.items()})
        write_json(extra_file, extra)
