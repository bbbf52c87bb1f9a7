"""A comparison recipe: its schema, the run recipe of each method (and of the dense model), and the
checks that a comparison folder may be extended with it."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from ..errors import RespError
from ..paper import apply_to_compare
from ..recipe import (EvaluationSection, ModelSection, OutputSection, PluginRef, Recipe, RecoverySection,
                      SharedSections, StructuresSection, _parse, _Strict)
from ..resolve import check_model_path, resolve
from ..validation import Seed
from .speedup import SpeedupSection

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
    # training after pruning (a run recipe's `recovery:`); `at` defaults to milestones here, so every
    # sparsity of the method is its recovered model ("RESP + self_distill" beside "RESP")
    recovery: RecoverySection | None = None
    # the method this one's paired differences are taken against (default: the comparison's reference)
    reference: str | None = None


class CompareRecipe(SharedSections):
    sparsities: list[float]
    steps: int = Field(8, ge=1)  # equal pruning steps up to the largest sparsity (plus every milestone)
    seeds: list[Seed] = Field(default_factory=lambda: [0])  # evaluation seeds (sampling), nested in every path
    # path seeds: one pruning path per seed and method (the run's `seed`: calibration draw, traces,
    # regeneration); unset: one path per method with the recipe's `seed`, in runs/<method>/
    path_seeds: list[Seed] | None = None
    evaluators: list[PluginRef]
    methods: list[CompareMethod]
    reference: str | None = None  # the method every other is paired against (default: the first)
    # time every milestone model against the dense model: per-token and effective speedup (off: None)
    speedup: SpeedupSection | None = None
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
        if self.path_seeds is not None:
            if not self.path_seeds:
                raise ValueError("path_seeds: give at least one path seed (or leave path_seeds out: one path per "
                                 "method with the recipe's seed)")
            if len(set(self.path_seeds)) != len(self.path_seeds):
                raise ValueError(f"path_seeds must be unique, got {self.path_seeds}")
        if self.reference is not None and self.path_seeds is None:
            raise ValueError("reference: paired differences are taken over path seeds; give path_seeds too")
        if self.reference is not None and self.reference not in labels:
            raise ValueError(f"reference: {self.reference!r} is not a method label (one of {', '.join(labels)})")
        for i, m in enumerate(self.methods):
            if m.reference is None:
                continue
            if self.path_seeds is None:
                raise ValueError(f"methods[{i}].reference: paired differences are taken over path seeds; "
                                 "give path_seeds too")
            if m.reference == m.label:
                raise ValueError(f"methods[{i}].reference: a method is not paired with itself ({m.label!r})")
            if m.reference not in labels:
                raise ValueError(f"methods[{i}].reference: {m.reference!r} is not a method label (one of "
                                 f"{', '.join(labels)})")
        if self.speedup is not None and self.path_seeds is None:
            raise ValueError("speedup: the length ratio and the effective speedup are taken over path seeds; "
                             "give path_seeds too (one is enough for the point estimates)")
        return self

    def reference_label(self) -> str:
        """The method the paired differences are taken against."""
        return self.reference if self.reference is not None else self.methods[0].label

    def references(self) -> dict[str, str]:
        """Each method's reference: its own ``reference``, else the comparison's."""
        default = self.reference_label()
        return {m.label: m.reference or default for m in self.methods}


SCHEDULES = ("progressive", "oneshot")


def is_oneshot(method: CompareMethod) -> bool:
    return method.schedule.get("name") == "oneshot"


def run_folder(label: str, target: float | None = None, path_seed: int | None = None) -> str:
    """A run folder, relative to the comparison folder: ``runs/<slug>[/path<s>][/<target>]``."""
    sub = f"runs/{slug(label)}"
    if path_seed is not None:
        sub += f"/path{path_seed}"
    return sub if target is None else f"{sub}/{target:.2f}"


def path_seed_list(cmp: "CompareRecipe") -> list[int | None]:
    """The path seeds of a comparison; ``[None]``: one path per method with the recipe's seed."""
    return [None] if cmp.path_seeds is None else list(cmp.path_seeds)


def method_runs(cmp: "CompareRecipe", method: CompareMethod) -> list[tuple[str, float | None, int | None]]:
    """(run folder relative to the comparison folder, one-shot target or None, path seed or None)
    of every run of a method, path by path."""
    targets = list(cmp.sparsities) if is_oneshot(method) else [None]
    return [(run_folder(method.label, t, p), t, p) for p in path_seed_list(cmp) for t in targets]


def slug(label: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-") or "method"


def parse_compare(text: str | dict, source: str) -> CompareRecipe:
    """A comparison recipe from YAML text (or an already parsed mapping)."""
    cmp, report = _parse(text, source, CompareRecipe, "a comparison recipe must be a YAML mapping", apply_to_compare)
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


def init_from_path(cmp: CompareRecipe, method: CompareMethod, folder: Path | None,
                   path_seed: int | None = None) -> str | None:
    """The mask file ``method`` starts from; None when it starts dense, or when it is an earlier
    method's milestone and no comparison folder is given (validation, before that method ran).
    An earlier method's milestone is taken from that method's path with the same path seed."""
    ref = method.init_from
    if ref is None or isinstance(ref, str):
        return ref
    if folder is None:
        return None
    source = next(m for m in cmp.methods if m.label == ref.method)
    run = run_folder(source.label, ref.milestone if is_oneshot(source) else None, path_seed)
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
                  folder: Path | None = None, path_seed: int | None = None) -> Recipe:
    """The run recipe of ``method``; for a one-shot method, its run at ``target`` (default: the
    largest sparsity).  ``folder``: the comparison folder (to find an earlier method's mask).
    ``path_seed``: the run's seed (calibration draw, traces, regeneration); default: the recipe's."""
    name = f"{cmp.name}-{slug(method.label)}" + ("" if path_seed is None else f"-path{path_seed}")
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
        name=name, seed=cmp.seed if path_seed is None else path_seed, mode=cmp.mode,
        init_from=init_from_path(cmp, method, folder, path_seed),
        model=cmp.model, task=cmp.task,
        structures=cmp.structures, generator=cmp.generator, calibration=method.calibration or cmp.calibration,
        scorer=method.scorer, allocator=method.allocator or PluginRef(name="global"),
        schedule=schedule_ref,
        evaluation=EvaluationSection(evaluate_dense=False, evaluators=_evaluators_with_seeds(cmp, registry)),
        output=OutputSection(save_model=False, save_milestone_models=True),
        recovery=_method_recovery(method),
    )
    recipe._protocol = _method_protocol(cmp, method) if cmp.mode == "paper" else {}
    return recipe


def _method_recovery(method: CompareMethod) -> RecoverySection | None:
    """The method's ``recovery`` for its run recipe: ``at: milestones`` unless it says otherwise."""
    rec = method.recovery
    if rec is None or "at" in rec.model_fields_set:
        return rec
    return rec.model_copy(update={"at": "milestones"})


def dense_recipe(cmp: CompareRecipe, registry) -> Recipe:
    return Recipe(name=f"{cmp.name}-dense", seed=cmp.seed, model=cmp.model, task=cmp.task, structures=cmp.structures,
                  generator=cmp.generator, calibration=cmp.calibration, scorer=PluginRef(name="resp"),
                  schedule=PluginRef(name="oneshot", params={"target": 0.0}),
                  evaluation=EvaluationSection(evaluators=_evaluators_with_seeds(cmp, registry)))


def resolve_compare(cmp: CompareRecipe, source: str, portable: bool = False):
    """Build every method's recipe and resolve it (plugin names, params, paths) before running.
    ``portable``: skip the checks that depend on this machine (see :func:`resp_core.resolve.resolve`)."""
    from ..registry import get_registry

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
        # its reference only pairs its results: it may change on an extension
        return json.dumps(json.loads(json.dumps(method.model_dump(mode="json", exclude_none=True,
                                                                  exclude={"reference"}), default=str)),
                          sort_keys=True)

    for m_old in saved.methods:
        for m_new in cmp.methods:
            if m_old.label == m_new.label and canonical(m_old) != canonical(m_new):
                raise RespError(f"{folder}: method {m_old.label!r} is already in this comparison with other "
                                "settings; give the new one another label")
    if (saved.path_seeds is None) != (cmp.path_seeds is None):
        raise RespError(f"{folder}: this comparison was made {'without' if saved.path_seeds is None else 'with'} "
                        "path_seeds (its runs are laid out "
                        f"{'one path per method' if saved.path_seeds is None else 'one folder per path seed'}); "
                        "extend it only with new methods, evaluation seeds or path seeds in the same layout "
                        "(nothing was changed)")
