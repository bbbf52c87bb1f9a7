"""A parsed recipe turned into a checked run plan: every plugin built, the model, device, task
splits, structures and schedule checked before any weight is loaded."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import RespError
from .model.structures import check_plan, structures_from_config
from .preflight import check_model, transformers_config
from .recipe import ModelSection, Recipe
from .registry import Registry, get_registry


@dataclass
class ResolvedRecipe:
    """A recipe with every plugin built and every path checked."""

    recipe: Recipe
    task: Any
    generator: Any
    calibration: Any
    scorer: Any
    allocator: Any
    schedule: Any
    evaluators: list[tuple[str, Any]]
    registry: Registry
    recovery: Any = None  # the recoverer (``recovery:``), or None

    def components(self) -> list[tuple[str, str]]:
        """``(kind, name)`` of every implementation the run uses, the tasks that calibration
        sources and evaluators name in their params included."""
        r = self.recipe
        out = [("task", r.task.name), ("generator", r.generator.name), ("calibration", r.calibration.name),
               ("scorer", r.scorer.name), ("allocator", r.allocator.name), ("schedule", r.schedule.name)]
        out += [("evaluator", name) for name, _ in self.evaluators]
        out += [("recovery", r.recovery.name)] if r.recovery is not None else []
        for obj in [self.calibration] + [ev for _, ev in self.evaluators]:
            task = getattr(getattr(obj, "params", None), "task", None)
            if isinstance(task, str):
                out.append(("task", task))
        return out

    def plugin_versions(self) -> list[dict]:
        """Which distribution (name and version) supplied each component: recorded in run.json."""
        return self.registry.provenance(self.components())


def check_model_path(model: "str | ModelSection") -> None:
    """The model (a ``model:`` section, or a path) exists and holds a supported model, on an
    available device (see :mod:`resp_core.preflight`)."""
    check_model(ModelSection(path=model) if isinstance(model, str) else model)


def check_against_model(resolved: "ResolvedRecipe", info) -> None:
    """Structure fields and the schedule against the model's config: layer indices in range,
    something left to prune, the target reachable, no more steps than prunable units."""
    config = transformers_config(info)
    if config is None:
        return
    recipe = resolved.recipe
    structures = structures_from_config(config, recipe.structures.spec())
    units = int(sum(int(structures.candidate(k).sum()) for k in structures.kinds))
    n_steps = getattr(getattr(resolved.schedule, "params", None), "steps", None)
    if isinstance(n_steps, int) and units and n_steps > units:
        raise RespError(f"schedule.params.steps: {n_steps:,} steps for {units:,} prunable units; every step must "
                        "be able to remove a unit")
    budget = getattr(getattr(resolved.allocator, "params", None), "budget", "parameters")
    check_plan(structures, resolved.schedule.steps(), budget)


def resolve(recipe: Recipe, registry: Registry | None = None, source: str | None = None,
            portable: bool = False) -> ResolvedRecipe:
    """Build every plugin and check the model, device, structures and schedule without loading
    weights.  ``source`` (the recipe file) prefixes every error message.  ``portable``: skip the
    checks that depend on this machine (device; hub models not in the local cache)."""
    try:
        return _resolve(recipe, registry, portable)
    except RespError as exc:
        if source and not str(exc).startswith(source):
            raise type(exc)(f"{source}: {exc}") from None
        raise


def _resolve(recipe: Recipe, registry: Registry | None = None, portable: bool = False) -> ResolvedRecipe:
    reg = registry or get_registry()
    info = check_model(recipe.model, portable=portable)
    if recipe.init_from:
        from .init_from import check_init_from

        check_init_from(recipe.init_from)
    build = lambda kind, ref, path: reg.create(kind, ref.name, ref.params, path)  # noqa: E731
    task = build("task", recipe.task, "task")
    generator = build("generator", recipe.generator, "generator")
    calibration = build("calibration", recipe.calibration, "calibration")
    scorer = build("scorer", recipe.scorer, "scorer")
    allocator = build("allocator", recipe.allocator, "allocator")
    schedule = build("schedule", recipe.schedule, "schedule")
    evaluators = [
        (ref.name, build("evaluator", ref, f"evaluation.evaluators[{i}]"))
        for i, ref in enumerate(recipe.evaluation.evaluators)
    ]
    checked = ((calibration, "calibration"), (scorer, "scorer"), (allocator, "allocator"))
    if not portable:  # a generator checks what this machine has installed
        checked = ((generator, "generator"), *checked)
    for obj, path in checked:
        check = getattr(obj, "check_recipe", None)
        if check is not None:
            check(recipe, path)
    for (name, ev), i in zip(evaluators, range(len(evaluators))):
        check = getattr(ev, "check_recipe", None)
        if check is not None:
            check(recipe, f"evaluation.evaluators[{i}]")
    recovery = build("recovery", recipe.recovery, "recovery") if recipe.recovery is not None else None
    if recovery is not None and getattr(recovery, "check_recipe", None) is not None:
        recovery.check_recipe(recipe, "recovery")
    resolved = ResolvedRecipe(recipe, task, generator, calibration, scorer, allocator, schedule, evaluators, reg,
                              recovery)
    check_task_splits(resolved)
    check_against_model(resolved, info)
    return resolved


COUNT_FIELDS = ("num_samples", "num_items")


def check_task_splits(resolved: "ResolvedRecipe") -> None:
    """Every component whose params name a ``split`` (calibration sources and evaluators that
    draw task items: ``split``, optional ``task``/``task_params``, ``num_samples``/``num_items``)
    asks for a split its task has, and no more items than the split holds when that is known.
    Components whose ``split`` belongs to their own data set (``uses_task_split = False``: generic
    text, perplexity text) are not checked against the task."""
    recipe, reg = resolved.recipe, resolved.registry
    parts = [("calibration", resolved.calibration)] + [
        (f"evaluation.evaluators[{i}]", ev) for i, (_, ev) in enumerate(resolved.evaluators)]
    for path, obj in parts:
        p = getattr(obj, "params", None)
        split = getattr(p, "split", None)
        if not isinstance(split, str) or not getattr(obj, "uses_task_split", True):
            continue
        name = getattr(p, "task", None) or recipe.task.name
        task_params = getattr(p, "task_params", None)
        if name == recipe.task.name and not task_params:
            task = resolved.task
        else:
            task = reg.create("task", name, task_params or (recipe.task.params if name == recipe.task.name else {}),
                              f"{path}.params.task")
        splits = tuple(getattr(task, "splits", ()) or ())
        if splits and split not in splits:
            raise RespError(f"{path}.params.split: task {name!r} has no split {split!r}; it has "
                            f"{', '.join(repr(s) for s in splits)}")
        size_of = getattr(task, "split_size", None)
        size = size_of(split) if size_of is not None else None
        for field in COUNT_FIELDS:
            count = getattr(p, field, None)
            if isinstance(count, int) and size is not None and count > size:
                raise RespError(f"{path}.params.{field}: {count:,} is more than the {size:,} items of task "
                                f"{name!r}'s {split!r} split")
