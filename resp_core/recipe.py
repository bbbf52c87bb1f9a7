"""Recipes: YAML validated up front into typed config objects.

A recipe names one implementation per role (task, generator, calibration source, scorer,
allocator, schedule, evaluators) with its ``params``; each implementation validates its own
``params`` with its pydantic ``Params`` model.  :func:`load_recipe` reads the file and checks the
schema; :func:`resp_core.resolve.resolve` then builds every plugin and checks paths, so that a bad
recipe fails before anything is loaded or written, with one line naming the field.
"""

from __future__ import annotations

import codecs
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from .errors import RespError
from .model.structures import StructureSpec
from .model_source import TESTBED_MODEL
from .paper import apply_to_recipe
from .validation import Seed, first_error, refuse_bool_for_number

RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
DEVICE = re.compile(r"^(cpu|mps|(cuda|xpu)(:\d+)?)$")

MAX_RECIPE_BYTES = 1 << 20  # 1 MiB: a recipe is a few kilobytes; a huge file is a mistake (or an attack)
MAX_DEPTH = 32  # nesting levels of a recipe document
MAX_NODES = 100_000  # YAML nodes, with aliases expanded


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")

    _no_bool_numbers = field_validator("*", mode="before")(classmethod(refuse_bool_for_number))


class PluginRef(_Strict):
    name: str
    params: dict[str, Any] = Field(default_factory=dict)


class ModelSection(_Strict):
    path: str = Field(TESTBED_MODEL, min_length=1)  # "testbed", a local folder, or a hub id (org/name)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "cpu"  # cpu, cuda, cuda:N, mps, xpu[:N]; availability is checked by resolve()
    revision: str | None = Field(None, min_length=1)
    gguf_file: str | None = Field(None, min_length=1)  # a GGUF file inside path (a folder or hub id)

    @field_validator("path")
    @classmethod
    def _path(cls, v):
        if not v.strip():
            raise ValueError("must name a model: 'testbed', a local folder or a hub id like 'Qwen/Qwen3-8B'")
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v):
        if not DEVICE.match(v):
            hint = " (did you mean 'cuda'?)" if v.lower() in ("gpu", "cuda0", "nvidia") else ""
            raise ValueError(f"unknown device {v!r}{hint}; use cpu, cuda, cuda:N, mps or xpu")
        return v


class StructuresSection(_Strict):
    attention: Literal["kv_group", "q_head", "none"] = "kv_group"
    mlp: Literal["channel", "none"] = "channel"
    layers: bool = False
    protect_first: float = 0.1
    protect_last: int = Field(1, ge=0)
    protected_layers: list[Annotated[int, Field(ge=0)]] | None = None  # upper bound checked against the model
    min_keep: int = Field(1, ge=0)
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


class RecoverySection(_Strict):
    """``recovery: {name, params, at}``: training after pruning (resp_core/recovery/); ``at: final``
    after the last step, ``milestones`` after every milestone, each before it is evaluated."""

    name: str
    params: dict[str, Any] = Field(default_factory=dict)
    at: Literal["final", "milestones"] = "final"


class SharedSections(_Strict):
    """What a run and a comparison of runs both name: one model, task, structures and data."""

    name: str = Field(max_length=120)
    seed: Seed = 0
    # paper: the authors' protocol for every setting the recipe leaves unset (resp_core/paper.py)
    mode: Literal["default", "paper"] = "default"
    _protocol: dict = PrivateAttr(default_factory=dict)  # what mode: paper filled in / kept

    @field_validator("name")
    @classmethod
    def _name(cls, v):
        if not RUN_NAME.match(v):
            raise ValueError(f"{v!r} is not a usable run name: letters, digits and . _ + - only, "
                             "starting with a letter or digit (it names the run folder)")
        return v
    model: ModelSection = Field(default_factory=ModelSection)
    task: PluginRef = Field(default_factory=lambda: PluginRef(name="testbed_arith"))
    structures: StructuresSection = Field(default_factory=StructuresSection)
    generator: PluginRef = Field(default_factory=lambda: PluginRef(name="hf"))
    calibration: PluginRef

    def protocol(self) -> dict:
        """``mode: paper``'s record: ``{"applied": {field: value}, "kept": {field: {recipe, paper}}}``."""
        return dict(self._protocol)


class Recipe(SharedSections):
    init_from: str | None = Field(None, min_length=1)  # a saved run's mask to start from (resp_core/init_from.py)
    scorer: PluginRef
    allocator: PluginRef = Field(default_factory=lambda: PluginRef(name="global"))
    schedule: PluginRef
    evaluation: EvaluationSection = Field(default_factory=EvaluationSection)
    output: OutputSection = Field(default_factory=OutputSection)
    recovery: RecoverySection | None = None  # none: no training after pruning (the recipe's outputs unchanged)


def _first_error(exc: ValidationError, prefix: str = "") -> str:
    return first_error(exc, prefix)


# --------------------------------------------------------------------------------------------------
# Reading a recipe file: bounded size, UTF-8, one YAML parse, duplicate keys refused
# --------------------------------------------------------------------------------------------------

_OTHER_BOMS = ((codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"),
               (codecs.BOM_UTF16_LE, "UTF-16"), (codecs.BOM_UTF16_BE, "UTF-16"))


def decode_recipe_bytes(data: bytes, source: str) -> str:
    """The recipe text: UTF-8 (an optional BOM is dropped); anything else is one clear error."""
    if len(data) > MAX_RECIPE_BYTES:
        raise RespError(f"{source}: the file is {len(data):,} bytes; a recipe may be at most "
                        f"{MAX_RECIPE_BYTES:,} bytes")
    for bom, name in _OTHER_BOMS:
        if data.startswith(bom):
            raise RespError(f"{source}: the file is {name} text; save the recipe as UTF-8")
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise RespError(f"{source}: not UTF-8 text (byte 0x{data[exc.start]:02x} on line {line}); "
                        "save the recipe as UTF-8") from None


def read_recipe_file(path: str | Path) -> str:
    """Read a recipe file (at most :data:`MAX_RECIPE_BYTES`) as UTF-8 text."""
    p = Path(path)
    if not p.exists():
        raise RespError(f"recipe {path} does not exist")
    if not p.is_file():
        raise RespError(f"recipe {path} is not a file")
    try:
        with open(p, "rb") as fh:
            data = fh.read(MAX_RECIPE_BYTES + 1)
    except OSError as exc:
        raise RespError(f"recipe {path}: cannot read it ({exc.strerror or exc})") from None
    if len(data) > MAX_RECIPE_BYTES:
        raise RespError(f"{path}: the file is larger than {MAX_RECIPE_BYTES:,} bytes; a recipe is a few "
                        "kilobytes of YAML")
    return decode_recipe_bytes(data, str(path))


class _DuplicateKey(Exception):
    pass


class _RecipeLoader(yaml.CSafeLoader if getattr(yaml, "__with_libyaml__", False) else yaml.SafeLoader):
    """Safe YAML that refuses a key given twice in one mapping (YAML's last-one-wins would
    silently drop the first ``scorer:``)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    if key in seen:
                        raise _DuplicateKey(f"{key!r}: given twice in one mapping (lines "
                                            f"{seen[key].start_mark.line + 1} and {key_node.start_mark.line + 1}); "
                                            "give each field once")
                    seen[key] = key_node
                except TypeError:  # unhashable key: the base constructor reports it
                    pass
        return super().construct_mapping(node, deep=deep)


_LEADING_INDICATORS = re.compile(r"(?:[-?](?:\s+|$))*")
_FLOW_BRACKETS = re.compile(r"[\[\]{}]")


def _textual_depth_bound(text: str) -> int:
    """An upper bound of the document's nesting depth from brackets, indentation and block
    indicators, cheap enough to run before the parser (libyaml is quadratic, and its composer
    recursive, on very deep documents).  It runs first so that a deep document is refused by this
    project's own check whatever the YAML library's version (PyYAML 6.0.4's scanner stops flow
    nesting deeper than 1000 with its own message): brackets are counted where they open, inside a
    line too, so ``[[[...]]]`` on one line counts as deep as it is."""
    depth = best = 0
    for line in text.splitlines():
        stripped = line.lstrip(" ")
        indent = len(line) - len(stripped)
        lead = _LEADING_INDICATORS.match(stripped).group(0)  # "- - - x": one block level per "- "
        block = indent + lead.count("-") + lead.count("?")
        best = max(best, depth + block)
        for bracket in _FLOW_BRACKETS.findall(stripped):  # the deepest point inside the line counts
            depth = depth + 1 if bracket in "[{" else max(0, depth - 1)
            best = max(best, depth + block)
    return best


def _check_shape(node, source: str) -> None:
    """Refuse documents nested deeper than :data:`MAX_DEPTH` or larger than :data:`MAX_NODES`
    nodes with aliases expanded (a "billion laughs" recipe)."""
    sizes: dict[int, int] = {}
    stack = [(node, 1, False)]
    while stack:
        n, depth, done = stack.pop()
        if depth > MAX_DEPTH:
            mark = n.start_mark
            raise RespError(f"{source}: nested more than {MAX_DEPTH} levels deep (line {mark.line + 1})")
        children = []
        if isinstance(n, yaml.SequenceNode):
            children = n.value
        elif isinstance(n, yaml.MappingNode):
            children = [x for kv in n.value for x in kv]
        if done:
            sizes[id(n)] = 1 + sum(sizes[id(c)] for c in children)
            if sizes[id(n)] > MAX_NODES:
                raise RespError(f"{source}: the document has more than {MAX_NODES:,} elements (aliases "
                                "expanded); a recipe is a few kilobytes of YAML")
            continue
        if id(n) in sizes:
            continue
        stack.append((n, depth, True))
        stack.extend((c, depth + 1, False) for c in children if id(c) not in sizes)


def load_yaml_document(text: str, source: str) -> Any:
    """Parse ``text`` once, safely: bounded depth and size, no duplicate keys."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_RECIPE_BYTES:
        raise RespError(f"{source}: larger than {MAX_RECIPE_BYTES:,} bytes; a recipe is a few kilobytes of YAML")
    if _textual_depth_bound(text) > 8 * MAX_DEPTH + 256:
        raise RespError(f"{source}: nested more than {MAX_DEPTH} levels deep")
    loader = _RecipeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_shape(node, source)
        return loader.construct_document(node)
    except _DuplicateKey as exc:
        raise RespError(f"{source}: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RespError(f"{source}: not valid YAML{where}: {problem}") from None
    except RecursionError:
        raise RespError(f"{source}: nested more than {MAX_DEPTH} levels deep") from None
    finally:
        loader.dispose()


def is_comparison(data: Any) -> bool:
    return isinstance(data, dict) and "methods" in data


def _parse(text: str | dict, source: str, schema: type[BaseModel], not_mapping: str, apply_paper):
    """The steps a run recipe and a comparison recipe share: YAML text (or an already parsed
    mapping) that must be a mapping, ``mode: paper`` filled in by ``apply_paper``, the schema
    validated.  ``not_mapping``: the message (``{got}``: what the document is instead).  Returns
    the validated object and the paper protocol's report (None without ``mode: paper``)."""
    data = load_yaml_document(text, source) if isinstance(text, str) else text
    if not isinstance(data, dict):
        got = "nothing" if data is None else type(data).__name__
        raise RespError(f"{source}: {not_mapping.format(got=got)}")
    report = None
    if data.get("mode") == "paper":
        data, report = apply_paper(data)
    try:
        parsed = schema.model_validate(data)
    except ValidationError as exc:
        raise RespError(f"{source}: {_first_error(exc)}") from None
    return parsed, report


def parse_recipe(text: str | dict, source: str = "recipe") -> Recipe:
    """A run recipe from YAML text (or an already parsed mapping)."""
    recipe, report = _parse(text, source, Recipe, "a recipe must be a YAML mapping, got {got}", apply_to_recipe)
    if report is not None:
        recipe._protocol = report.to_json()
    return recipe


def load_recipe(path: str | Path) -> Recipe:
    return parse_recipe(read_recipe_file(path), source=str(path))


def dump_recipe(recipe: Recipe) -> str:
    data = recipe.model_dump(mode="json")
    if data.get("recovery") is None:  # a recipe without recovery is written as before
        data.pop("recovery", None)
    return yaml.safe_dump(data, sort_keys=False)
