"""Recipes: YAML validated up front into typed config objects.

A recipe names one implementation per role (task, generator, calibration source, scorer,
allocator, schedule, evaluators) with its ``params``; each implementation validates its own
``params`` with its pydantic ``Params`` model.  :func:`load_recipe` parses and checks the schema;
:func:`resolve` then builds every plugin and checks paths, so that a bad recipe fails before
anything is loaded or written, with one line naming the field.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import RespError
from .model.structures import StructureSpec
from .registry import Registry, get_registry

TESTBED_MODEL = "testbed"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PluginRef(_Strict):
    name: str
    params: dict[str, Any] = Field(default_factory=dict)


class ModelSection(_Strict):
    path: str = TESTBED_MODEL  # "testbed", a local folder, or a hub id (org/name)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "cpu"
    revision: str | None = None
    gguf_file: str | None = Field(None, min_length=1)  # a GGUF file inside path (a folder or hub id)


class StructuresSection(_Strict):
    attention: Literal["kv_group", "q_head", "none"] = "kv_group"
    mlp: Literal["channel", "none"] = "channel"
    layers: bool = False
    protect_first: float = 0.1
    protect_last: int = 1
    protected_layers: list[int] | None = None
    min_keep: int = 1
    # what "sparsity" means: "prunable_blocks" (RESP) or "all_blocks" (the authors'); see
    # resp_core/model/structures.py.  protect_first rounded "ceil" (RESP) or "floor" (the authors')
    sparsity_basis: Literal["prunable_blocks", "all_blocks"] = "prunable_blocks"
    protect_rounding: Literal["ceil", "floor"] = "ceil"

    @field_validator("protect_first")
    @classmethod
    def _pf(cls, v):
        if not 0.0 <= v < 1.0:
            raise ValueError(f"must be in [0, 1), got {v}")
        return v

    @model_validator(mode="after")
    def _some_kind(self):
        if not self.layers and self.attention == "none" and self.mlp == "none":
            raise ValueError("nothing to prune: attention and mlp are 'none' and layers is false")
        return self

    def spec(self) -> StructureSpec:
        d = self.model_dump()
        d["protected_layers"] = tuple(d["protected_layers"]) if d["protected_layers"] is not None else None
        return StructureSpec(**d)


class EvaluationSection(_Strict):
    evaluate_dense: bool = True
    evaluators: list[PluginRef] = Field(default_factory=list)


class OutputSection(_Strict):
    dir: str | None = None  # default: runs/<name>-<timestamp>
    save_model: bool = True
    save_milestone_models: bool = False  # also save the compacted model of every milestone (models/)
    # what the end of the run writes: compacted -> model/, masked / uniform -> export/final-<format>/
    formats: list[Literal["compacted", "masked", "uniform"]] = Field(default_factory=lambda: ["compacted"])

    @field_validator("formats")
    @classmethod
    def _formats(cls, v):
        if len(set(v)) != len(v):
            raise ValueError("each format may be listed once")
        return v


class SharedSections(_Strict):
    """What a run and a comparison of runs both name: one model, task, structures and data."""

    name: str
    seed: int = 0
    model: ModelSection = Field(default_factory=ModelSection)
    task: PluginRef = Field(default_factory=lambda: PluginRef(name="testbed_arith"))
    structures: StructuresSection = Field(default_factory=StructuresSection)
    generator: PluginRef = Field(default_factory=lambda: PluginRef(name="hf"))
    calibration: PluginRef


class Recipe(SharedSections):
    scorer: PluginRef
    allocator: PluginRef = Field(default_factory=lambda: PluginRef(name="global"))
    schedule: PluginRef
    evaluation: EvaluationSection = Field(default_factory=EvaluationSection)
    output: OutputSection = Field(default_factory=OutputSection)


def _first_error(exc: ValidationError, prefix: str = "") -> str:
    err = exc.errors()[0]
    loc = ".".join(str(x) for x in err["loc"])
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        msg = "unknown field"
    return f"{prefix}{loc}: {msg}" if loc else f"{prefix}{msg}"


def parse_recipe(text: str, source: str = "recipe") -> Recipe:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RespError(f"{source}: not valid YAML{where}: {problem}") from None
    if not isinstance(data, dict):
        raise RespError(f"{source}: a recipe must be a YAML mapping, got {type(data).__name__}")
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise RespError(f"{source}: {_first_error(exc)}") from None


def load_recipe(path: str | Path) -> Recipe:
    p = Path(path)
    if not p.is_file():
        raise RespError(f"recipe {path} does not exist")
    return parse_recipe(p.read_text(), source=str(path))


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


def check_model_path(path: str) -> None:
    if path == TESTBED_MODEL or Path(path).expanduser().exists():
        return
    if HUB_ID.match(path) and not path.startswith((".", "/", "~")):
        return  # a hub id; loading it needs a network or a local hub cache
    raise RespError(f"model.path: {path} does not exist (not a local folder, nor a hub id like 'Qwen/Qwen3-8B')")


def resolve(recipe: Recipe, registry: Registry | None = None) -> ResolvedRecipe:
    reg = registry or get_registry()
    check_model_path(recipe.model.path)
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
    for obj, path in ((calibration, "calibration"), (scorer, "scorer"), (allocator, "allocator")):
        check = getattr(obj, "check_recipe", None)
        if check is not None:
            check(recipe, path)
    for (name, ev), i in zip(evaluators, range(len(evaluators))):
        check = getattr(ev, "check_recipe", None)
        if check is not None:
            check(recipe, f"evaluation.evaluators[{i}]")
    return ResolvedRecipe(recipe, task, generator, calibration, scorer, allocator, schedule, evaluators, reg)


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
