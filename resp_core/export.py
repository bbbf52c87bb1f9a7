"""Export formats: one pruned model, three folders for three kinds of consumer.

* ``masked`` — a standard Hugging Face folder of the **dense shape** with every pruned weight
  zeroed (the exact function of the pruned model, no speedup).  Its ``config.json`` is the base
  model's, so plain transformers, vLLM and ``lm_eval --model hf`` load it unchanged.  Output
  biases a weight-editing scorer added (FLAP's compensation) are kept by switching the family's
  bias flag on (``attention_bias`` / ``mlp_bias``, the other biases then zero); a family without
  such a flag (Qwen2, Mistral; Qwen3 and Gemma 3 for ``down_proj``) is refused with one line.
* ``compacted`` — the per-layer-width folder (:mod:`resp_core.model.compaction`): the real
  speedup and size reduction, ``model_type: resp_pruned_<base>``; loads with
  ``resp_core.load_pruned`` or, once RESP is installed, ``AutoModelForCausalLM.from_pretrained``.
* ``uniform`` — when every kept layer has the same number of query heads, KV heads (evenly
  grouped) and MLP channels (e.g. the ``uniform`` allocator on KV groups), a **standard** config
  with the smaller sizes: the speedup in any runtime.  Otherwise one line says why not.

``respctl export RUN [--milestone S | --mask FILE] --format F`` rebuilds the masked model from the
run's dense model and any saved mask (``masks/step_XX``, ``masks/milestone_S``), so a run whose
final save failed is still exportable.  For a scorer that edits weights (FLAP, SparseGPT) a mask
is not enough: the edited weights come from the run's saved checkpoint (``resume/``) or a saved
compacted model of the same mask (``model/``, ``models/milestone_S``); without either the export
is refused with one line.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .checkpoint import checkpoint_folder, load_weights, saved_checkpoints
from .errors import RespError
from .model.adapter import adapter_for, output_bias_flags
from .model.compaction import _head_rows, compacted_state
from .model.pruned_model import _base_classes, _tied_names, is_pruned_dir, load_pruned, validate_pruned_dir
from .model.record import _layer_plan
from .model.saving import config_json, save_compacted, write_model_folder
from .model.masks import MaskSet, apply_mask
from .rundir import CHECKPOINT_DIR

FORMATS = ("compacted", "masked", "uniform")
USE_INSTEAD = "export it as 'compacted' (RESP's loader) or 'masked' (dense shape, any runtime)"


# --------------------------------------------------------------------------------------------------
# standard folders (masked, uniform)
# --------------------------------------------------------------------------------------------------

def _standard_folder(base_config, family: str, state: dict[str, torch.Tensor], o_bias: bool, down_bias: bool,
                     overrides: dict, what: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """A standard config (``base_config`` + ``overrides`` + bias flags) and ``state`` checked
    against the model it describes: every tensor present with its shape, biases the flags add
    filled with zeros, the tied output head stored once."""
    from transformers import AutoModelForCausalLM

    cfg_cls, arch = _base_classes(family)
    d = config_json(base_config)
    for k in ("model_type", "architectures", "transformers_version", "resp_pruning", "dtype"):
        d.pop(k, None)
    d.update(overrides)
    d.update(output_bias_flags(family, o_bias, down_bias, base_config))
    try:
        cfg = cfg_cls(**d)
    except Exception as exc:  # transformers' strict config validation (e.g. Gemma 3's hidden % heads)
        raise RespError(f"{what}: transformers' {family} config refuses these sizes "
                        f"({str(exc).strip().splitlines()[-1]}); {USE_INSTEAD}") from None
    dtype = next(t.dtype for t in state.values() if t.is_floating_point())
    cfg.dtype = dtype
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(cfg)
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    tied = _tied_names(skeleton)
    extra = sorted(set(state) - set(expected))
    if extra:
        raise RuntimeError(f"{what}: tensor {extra[0]} has no place in a standard {family} model")
    out = {}
    for k, shape in expected.items():
        if k in state:
            if tuple(state[k].shape) != shape:
                raise RuntimeError(f"{what}: tensor {k} has shape {tuple(state[k].shape)}, the config needs {shape}")
            out[k] = state[k]
        elif k.endswith(".bias"):
            out[k] = torch.zeros(shape, dtype=dtype)
        elif k not in tied:
            raise RuntimeError(f"{what}: tensor {k} is missing")
    return config_json(cfg, arch), out


def _output_biases(adapter) -> tuple[bool, bool]:
    n = adapter.geometry.num_layers
    return (any(adapter.attention_parts(i).o.bias is not None for i in range(n)),
            any(adapter.mlp_parts(i).down.bias is not None for i in range(n)))


def write_masked(model, out: Path, tokenizer=None) -> None:
    """Save an already masked dense-shaped model as a standard folder (see the module docstring)."""
    adapter = adapter_for(model)
    o_bias, down_bias = _output_biases(adapter)
    cfg, state = _standard_folder(model.config, adapter.family, model.state_dict(), o_bias, down_bias, {},
                                  "masked")
    write_model_folder(out, cfg, state, tokenizer, getattr(model, "generation_config", None))


def uniform_shape(record: dict) -> tuple[int, int, int]:
    """(query heads, KV heads, channels) every kept layer has; a one-line :class:`RespError` why not."""
    layers = record["layers"]
    if not layers:
        raise RespError(f"uniform: every layer was removed; {USE_INSTEAD}")
    first = None
    for r in layers:
        src, nq, nkv, ch = r["source_layer"], r["num_heads"], r["num_kv_heads"], r["intermediate_size"]
        if nq == 0:
            raise RespError(f"uniform: layer {src} has no attention heads left, which a standard config cannot "
                            f"express; {USE_INSTEAD}")
        if ch == 0:
            raise RespError(f"uniform: layer {src} has no MLP channels left, which a standard config cannot "
                            f"express; {USE_INSTEAD}")
        if r["kv_index"] is not None:
            raise RespError(f"uniform: layer {src} keeps {nq} query heads spread unevenly over {nkv} KV heads "
                            f"(GQA groups of different sizes); {USE_INSTEAD}")
        if first is None:
            first = (src, nq, nkv, ch)
        elif (nq, nkv, ch) != first[1:]:
            a = first
            raise RespError(f"uniform: layers keep different widths (layer {a[0]}: {a[1]} query heads, {a[2]} KV "
                            f"heads, {a[3]} MLP channels; layer {src}: {nq}, {nkv}, {ch}); {USE_INSTEAD}")
    return first[1:]


def write_uniform(model, mask: MaskSet, out: Path, tokenizer=None) -> dict:
    """Save the masked ``model`` compacted to a standard config of smaller sizes (uniform widths only)."""
    adapter = adapter_for(model)
    state, record = compacted_state(model, mask, device="cpu")
    nq, nkv, ch = uniform_shape(record)
    kept = [r["source_layer"] for r in record["layers"]]
    overrides = {"num_attention_heads": nq, "num_key_value_heads": nkv, "intermediate_size": ch,
                 "head_dim": adapter.geometry.head_dim, "num_hidden_layers": len(kept)}
    layer_types = getattr(model.config, "layer_types", None)
    if layer_types:
        overrides["layer_types"] = [layer_types[i] for i in kept]
    o_bias = any(r["o_proj_bias"] for r in record["layers"])
    down_bias = any(r["down_proj_bias"] for r in record["layers"])
    cfg, state = _standard_folder(model.config, adapter.family, state, o_bias, down_bias, overrides, "uniform")
    write_model_folder(out, cfg, state, tokenizer, getattr(model, "generation_config", None))
    return record


def write_format(fmt: str, model, mask: MaskSet, out: Path, tokenizer=None) -> None:
    """Write the masked dense-shaped ``model`` (``mask`` applied) in export format ``fmt``."""
    if fmt == "compacted":
        save_compacted(model, mask, out, tokenizer)
    elif fmt == "masked":
        write_masked(model, out, tokenizer)
    elif fmt == "uniform":
        write_uniform(model, mask, out, tokenizer)
    else:
        raise RespError(f"--format: unknown export format {fmt!r}; one of {', '.join(FORMATS)}")


def check_uniform(model, mask: MaskSet) -> str | None:
    """Why ``mask`` cannot be exported as ``uniform`` (None when it can), without writing anything."""
    adapter = adapter_for(model)
    plan = _layer_plan(adapter, mask)
    from .model.record import _record

    try:
        uniform_shape(_record(adapter, plan))
    except RespError as exc:
        return str(exc)
    return None


# --------------------------------------------------------------------------------------------------
# a run's masked model at any saved mask
# --------------------------------------------------------------------------------------------------

def _select_mask(run: Path, milestone: float | None, mask_file: Path | None) -> Path:
    if milestone is not None and mask_file is not None:
        raise RespError("give --milestone or --mask, not both")
    masks = run / "masks"
    if mask_file is not None:
        p = Path(mask_file)
        if not p.is_file() and not p.is_absolute() and (run / p).is_file():
            p = run / p
        if not p.is_file():
            raise RespError(f"--mask: {mask_file} does not exist")
        return p
    if milestone is not None:
        p = masks / f"milestone_{milestone:.2f}.safetensors"
        if not p.is_file():
            have = sorted(f.stem.removeprefix("milestone_") for f in masks.glob("milestone_*.safetensors"))
            raise RespError(f"--milestone: {run} has no mask for milestone {milestone:.2f} (saved: "
                            f"{', '.join(have) or 'none'})")
        return p
    steps = sorted(masks.glob("step_*.safetensors"))
    if not steps:
        raise RespError(f"{run} has no saved mask (masks/step_XX.safetensors); nothing to export")
    return steps[-1]


def _scorer_edits_weights(recipe) -> bool:
    from .interfaces import Scorer
    from .registry import get_registry

    scorer = get_registry().create("scorer", recipe.scorer.name, recipe.scorer.params, "scorer")
    return type(scorer).before_removal is not Scorer.before_removal


def _same(a: MaskSet, b: MaskSet) -> bool:
    return a.effective() == b.effective()


def _from_checkpoint(run: Path, model, mask: MaskSet) -> str | None:
    """Load the edited weights of the run's checkpoint saved at ``mask`` into ``model``."""
    folder = checkpoint_folder(run)
    if not folder.is_dir():
        return None
    geometry = adapter_for(model).geometry
    for state in saved_checkpoints(folder):
        weights, mask_name = state.get("weights_file"), state.get("mask_file")
        if not weights or not mask_name or not (folder / weights).is_file() or not (folder / mask_name).is_file():
            continue
        if not _same(MaskSet.load(folder / mask_name, geometry), mask):
            continue
        load_weights(model, folder / weights)
        return f"{CHECKPOINT_DIR}/{weights}"
    return None


def _plan_matches(record: dict, plan: list[dict]) -> bool:
    if [r["source_layer"] for r in record["layers"]] != [p["source_layer"] for p in plan]:
        return False
    for r, p in zip(record["layers"], plan):
        if (r["num_heads"], r["num_kv_heads"], r["intermediate_size"]) != (
                len(p["q_heads"]), len(p["kv_heads"]), len(p["mlp_channels"])):
            return False
        if "q_heads" in r and (r["q_heads"] != p["q_heads"] or r["kv_heads"] != p["kv_heads"]):
            return False
    return True


def _expand_block(dense, small, block: str, layer: int, new_idx: int, inputs, output: str, cols) -> None:
    """One ``block`` (``attention`` or ``mlp``) of :func:`expand_into`: the rows ``inputs`` names
    (projection, rows) and the ``output`` projection's columns ``cols`` copied from the compacted
    layer ``new_idx``, then the output bias it has; ``cols`` None: compaction removed the block,
    whose added output bias (if any) stays on the compacted layer as ``<output>_bias``."""
    parts = getattr(dense, f"{block}_parts")(layer)
    if cols is not None:
        c = getattr(small, f"{block}_parts")(new_idx)
        for name, rows in inputs:
            dst, src = getattr(parts, name), getattr(c, name)
            dst.weight[rows] = src.weight
            if dst.bias is not None:
                dst.bias[rows] = src.bias
        getattr(parts, output).weight[:, cols] = getattr(c, output).weight
        bias = getattr(c, output).bias
    else:
        bias = getattr(getattr(small, block)(new_idx), f"{output}_bias", None)
    if bias is not None:
        type(dense).ensure_bias(getattr(parts, output)).copy_(bias)


@torch.no_grad()
def expand_into(model, compacted, record: dict, mask: MaskSet) -> None:
    """Make the dense-shaped ``model`` the masked model whose kept weights are ``compacted``'s:
    removed units zero, kept rows/columns (and any added output bias) copied from ``compacted``."""
    dense = adapter_for(model)
    small = adapter_for(compacted)
    hd = dense.geometry.head_dim
    apply_mask(dense, mask)
    plan = _layer_plan(dense, mask)
    for new_idx, (rec, p) in enumerate(zip(record["layers"], plan)):
        i = p["source_layer"]
        q = torch.tensor(p["q_heads"], dtype=torch.long)
        kv = torch.tensor(p["kv_heads"], dtype=torch.long)
        ch = torch.tensor(p["mlp_channels"], dtype=torch.long)
        qr, kr = (_head_rows(q, hd), _head_rows(kv, hd)) if len(q) else (None, None)
        _expand_block(dense, small, "attention", i, new_idx, (("q", qr), ("k", kr), ("v", kr)), "o", qr)
        _expand_block(dense, small, "mlp", i, new_idx, (("gate", ch), ("up", ch)), "down", ch if len(ch) else None)


def _from_compacted(run: Path, model, mask: MaskSet) -> str | None:
    plan = _layer_plan(adapter_for(model), mask)
    candidates = [run / "model"] + sorted((run / "models").glob("*")) if (run / "models").is_dir() else [run / "model"]
    for folder in candidates:
        if not is_pruned_dir(folder):
            continue
        _, record = validate_pruned_dir(folder)
        if not _plan_matches(record, plan):
            continue
        expand_into(model, load_pruned(folder), record, mask)
        return str(folder.relative_to(run))
    return None


def _recovered(run: Path, recipe, mask: MaskSet) -> bool:
    """Whether ``mask`` is a point the run's recovery trained: the last step's mask, and with
    ``at: milestones`` every milestone's."""
    rec = getattr(recipe, "recovery", None)
    if rec is None:
        return False
    steps = sorted((run / "masks").glob("step_*.safetensors"))
    points = steps[-1:] + (sorted((run / "masks").glob("milestone_*.safetensors")) if rec.at == "milestones" else [])
    return any(_same(MaskSet.load(f, mask.geometry), mask) for f in points)


def masked_model_of_run(run: Path, recipe, model, mask: MaskSet, mask_path: Path) -> str:
    """Turn the dense ``model`` into the run's masked model at ``mask``; returns where the weights came from.
    A run with ``recovery`` trained its final (or every milestone's) model: its weights come from
    the saved model of that mask, as a weight-editing scorer's do."""
    if not _scorer_edits_weights(recipe) and not _recovered(run, recipe, mask):
        apply_mask(adapter_for(model), mask)
        return f"the dense model with {mask_path.relative_to(run) if mask_path.is_relative_to(run) else mask_path}"
    source = _from_checkpoint(run, model, mask)
    if source is not None:
        apply_mask(adapter_for(model), mask)
        return source
    source = _from_compacted(run, model, mask)
    if source is not None:
        return source
    what = (f"recovery {recipe.recovery.name!r} trained" if getattr(recipe, "recovery", None) is not None
            else f"scorer {recipe.scorer.name!r} edits")
    raise RespError(f"{what} the weights it keeps, so {mask_path.name} alone does not "
                    f"reproduce them, and {run} holds no checkpoint (resume/) or compacted model (model/, models/) "
                    f"of that mask; export the milestones a run saved with output.save_milestone_models")


def export_run(run: Path, fmt: str, milestone: float | None = None, mask_file: Path | None = None,
               out: Path | None = None) -> dict:
    """Write the run's pruned model at a saved mask in format ``fmt``; returns what was written."""
    from .fingerprint import model_fingerprint
    from .loading import load_model_and_tokenizer
    from .recipe import load_recipe

    run = Path(run)
    if fmt not in FORMATS:
        raise RespError(f"--format: unknown export format {fmt!r}; one of {', '.join(FORMATS)}")
    if not run.is_dir():
        raise RespError(f"{run} does not exist")
    if not (run / "recipe.yaml").is_file():
        raise RespError(f"{run} is not a RESP run folder (no recipe.yaml)")
    mask_path = _select_mask(run, milestone, mask_file)
    out = Path(out) if out is not None else run / "export" / f"{mask_path.stem}-{fmt}"
    if out.exists():
        raise RespError(f"{out} already exists; choose another folder with --out (nothing was written)")
    recipe = load_recipe(run / "recipe.yaml")
    model, tokenizer = load_model_and_tokenizer(recipe.model, device="cpu")
    warnings = []
    info_file = run / "run.json"
    if info_file.is_file():
        try:
            recorded = json.loads(info_file.read_text()).get("model_fingerprint")
        except (OSError, ValueError, AttributeError):
            recorded = None
        if recorded and recorded != model_fingerprint(model):
            warnings.append(f"the model at {recipe.model.path} does not have the fingerprint {run}/run.json "
                            f"recorded ({recorded}); it may not be the model this run pruned")
    mask = MaskSet.load(mask_path, adapter_for(model).geometry)
    if fmt == "uniform":
        why = check_uniform(model, mask)
        if why:
            raise RespError(why)
    source = masked_model_of_run(run, recipe, model, mask, mask_path)
    write_format(fmt, model, mask, out, tokenizer)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    return {"out": str(out), "format": fmt, "mask": str(mask_path), "weights_from": source, "bytes": size,
            "warnings": warnings}


def export_at_end(formats: list[str], model, mask: MaskSet, run: Path, tokenizer=None, log=None) -> dict:
    """The end of a run: the formats of ``output.formats`` other than ``compacted`` (which the
    pipeline writes to ``model/`` itself), from the masked ``model``, to ``export/final-<format>``.

    A format this model cannot take (``uniform`` with uneven widths, ``masked`` with output biases
    the family's config cannot hold) is skipped with one logged line: the run itself is done."""
    done = {}
    for fmt in formats:
        if fmt == "compacted":
            continue
        out = Path(run) / "export" / f"final-{fmt}"
        try:
            why = check_uniform(model, mask) if fmt == "uniform" else None
            if why:
                raise RespError(why)
            write_format(fmt, model, mask, out, tokenizer)
            done[fmt] = str(out.relative_to(run))
        except RespError as exc:
            if exc.__class__ is not RespError:  # RunFailed (disk) and the like stop the run
                raise
            done[fmt] = f"not written: {exc}"
            if log is not None:
                log(f"export {fmt}: not written: {exc}")
    return done
