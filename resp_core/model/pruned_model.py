"""The ``resp_pruned_<base>`` model types of compacted models: the attention function with a
per-layer query-head -> KV-head map, the config and model classes (registered with transformers'
Auto classes), and loading a compacted folder with its record checked against the tensors.

A compacted model's layers each have their own widths (query heads, KV heads, MLP channels).
When query heads were pruned one by one, a layer's surviving query heads may no longer be spread
evenly over its KV heads; such a layer keeps a ``kv_index`` (KV head of each query head) that the
``resp_sdpa`` attention function uses to gather K/V, instead of the fixed
``num_key_value_groups`` repetition.  Layers with even grouping run through transformers' own
SDPA path unchanged.

**The saved folder** (``save_pruned`` / ``save_compacted``): ``config.json``, ``model.safetensors``,
``generation_config.json``, the tokenizer, and ``resp_pruning.json`` (the per-layer record: source
layer, kept query and KV heads, ``kv_index``, widths, added output biases).  ``config.json`` is
*not* a standard one: its ``model_type`` is ``resp_pruned_<base>`` (e.g. ``resp_pruned_qwen3``),
its ``architectures`` ``RespPruned<Base>ForCausalLM``, and it carries the same record under
``resp_pruning``.  ``import resp_core`` registers these model types with transformers'
``AutoConfig`` and ``AutoModelForCausalLM`` (no remote code, nothing executed from the folder),
so ``AutoModelForCausalLM.from_pretrained(folder)`` works once RESP is installed; without RESP
transformers stops with its own "does not recognize this architecture" error instead of loading
dense shapes into pruned tensors.  :func:`load_pruned` validates the record against the tensors
first and fails with one line naming the file.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ..errors import RespError
from ..safetensors_io import read_header, tensor_entries
from .adapter import SUPPORTED_FAMILIES, adapter_for, check_supported, geometry_from_config
from .pruned_layers import _child_name, _shape_layer
from .record import FORMAT_VERSION, _check_record, _int

PRUNING_FILE = "resp_pruning.json"
WEIGHTS_FILE = "model.safetensors"
ATTN_IMPLEMENTATION = "resp_sdpa"
MODEL_TYPE_PREFIX = "resp_pruned_"


# --------------------------------------------------------------------------------------------------
# attention with an explicit query-head -> KV-head map
# --------------------------------------------------------------------------------------------------

def _kv_index_on(module, device) -> torch.Tensor | None:
    idx = getattr(module, "kv_index", None)
    if idx is None:
        return None
    if idx.device != device:  # kept on the host; one copy per device, made on first use
        cache = module.__dict__.setdefault("_kv_index_by_device", {})
        if device not in cache:
            cache[device] = idx.to(device)
        idx = cache[device]
    return idx


def _resp_sdpa(module, query, key, value, attention_mask, **kwargs):
    kv_index = _kv_index_on(module, key.device)
    if kv_index is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    key = key.index_select(1, kv_index)
    value = value.index_select(1, kv_index)
    shim = SimpleNamespace(num_key_value_groups=1, is_causal=getattr(module, "is_causal", True),
                           training=module.training)
    return sdpa_attention_forward(shim, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(ATTN_IMPLEMENTATION, _resp_sdpa)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)  # same masks as transformers' SDPA


# --------------------------------------------------------------------------------------------------
# the compacted model classes (registered with transformers' Auto classes)
# --------------------------------------------------------------------------------------------------

def _base_classes(family: str):
    import transformers

    names = {
        "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
        "llama": ("LlamaConfig", "LlamaForCausalLM"),
        "mistral": ("MistralConfig", "MistralForCausalLM"),
        "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM"),
    }[family]
    return getattr(transformers, names[0]), names[1]


def _camel(family: str) -> str:
    return {"qwen3": "Qwen3", "qwen2": "Qwen2", "llama": "Llama", "mistral": "Mistral",
            "gemma3_text": "Gemma3Text"}[family]


@lru_cache(maxsize=None)
def pruned_config_class(family: str):
    """``RespPruned<Base>Config``: the base config plus the per-layer record (``resp_pruning``)."""
    base_cfg, _ = _base_classes(family)
    return type(f"RespPruned{_camel(family)}Config", (base_cfg,), {
        "model_type": MODEL_TYPE_PREFIX + family,
        "resp_base_model_type": family,
        "__module__": __name__,
    })


@lru_cache(maxsize=None)
def pruned_model_class(family: str):
    """``RespPruned<Base>ForCausalLM``: the base model, each layer given its record's widths."""
    import transformers

    base_model = getattr(transformers, _base_classes(family)[1])
    cfg_cls = pruned_config_class(family)

    def __init__(self, config):
        base_model.__init__(self, config)
        record = config.resp_pruning
        adapter = adapter_for(self)
        hd, hidden = adapter.geometry.head_dim, config.hidden_size
        for new_idx, rec in enumerate(record["layers"]):
            layer = adapter.layers[new_idx]
            attn_name = _child_name(layer, adapter.attention(new_idx))
            mlp_name = _child_name(layer, adapter.mlp(new_idx))
            _shape_layer(layer, attn_name, mlp_name, rec, hidden, hd, new_idx)
        # per-layer kv_index needs the resp_sdpa attention function (SDPA for every other layer)
        self.config._attn_implementation_internal = ATTN_IMPLEMENTATION

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        path = Path(pretrained_model_name_or_path)
        if kwargs.pop("_resp_validated", False):
            pass
        elif path.is_dir():
            config = validate_pruned_dir(path)[0]
            kwargs["config"] = kwargs.get("config") or config
        want_info = kwargs.pop("output_loading_info", False)
        model, info = base_model.from_pretrained.__func__(cls, pretrained_model_name_or_path, *args,
                                                          output_loading_info=True, **kwargs)
        bad = [f"{k}: {', '.join(sorted(map(str, v))[:3])}" for k, v in info.items()
               if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v]
        if bad:
            raise RespError(f"{pretrained_model_name_or_path}: the weights do not fit the pruning record ({'; '.join(bad)})")
        model.config._attn_implementation_internal = ATTN_IMPLEMENTATION
        return (model, info) if want_info else model

    return type(f"RespPruned{_camel(family)}ForCausalLM", (base_model,), {
        "config_class": cfg_cls,
        "__init__": __init__,
        "from_pretrained": from_pretrained,
        "_can_set_attn_implementation_cached_value": True,
        "__module__": __name__,
    })


def _auto_entry(family: str):
    """A light stand-in registered with AutoModelForCausalLM: the modeling code of a family is
    imported only when a model of that family is loaded, not at ``import resp_core``."""
    cfg_cls = pruned_config_class(family)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        return pruned_model_class(family).from_pretrained(*args, **kwargs)

    @classmethod
    def _from_config(cls, config, **kwargs):
        return pruned_model_class(family)._from_config(config, **kwargs)

    @classmethod
    def from_config(cls, config, **kwargs):
        return pruned_model_class(family)._from_config(config, **kwargs)

    return type(f"RespPruned{_camel(family)}ForCausalLM", (), {
        "config_class": cfg_cls, "from_pretrained": from_pretrained, "_from_config": _from_config,
        "from_config": from_config, "__module__": __name__})


_REGISTERED = False


def register_auto_classes() -> None:
    """Register every ``resp_pruned_<base>`` type with AutoConfig and AutoModelForCausalLM (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AutoConfig, AutoModelForCausalLM

    for family in SUPPORTED_FAMILIES:
        cfg_cls = pruned_config_class(family)
        AutoConfig.register(cfg_cls.model_type, cfg_cls, exist_ok=True)
        AutoModelForCausalLM.register(cfg_cls, _auto_entry(family), exist_ok=True)
    _REGISTERED = True


register_auto_classes()


def pruned_config(base_config, record: dict):
    """The ``resp_pruned_<base>`` config of a model compacted from ``base_config`` by ``record``."""
    family = getattr(base_config, "resp_base_model_type", None) or base_config.model_type
    check_supported(family)
    d = base_config.to_dict()
    for k in ("model_type", "architectures", "resp_pruning", "transformers_version",
              "_attn_implementation_autoset", "_name_or_path", "quantization_config"):  # GGUF: dequantized
        d.pop(k, None)
    kept = [r["source_layer"] for r in record["layers"]]
    d["num_hidden_layers"] = len(kept)
    layer_types = d.get("layer_types")
    if layer_types:
        if getattr(base_config, "resp_pruning", None) is not None:  # already compacted: types renumbered
            d["layer_types"] = list(layer_types)
        else:
            d["layer_types"] = [layer_types[i] for i in kept]
    cls = pruned_config_class(family)
    d["resp_pruning"] = record
    d["architectures"] = [f"RespPruned{_camel(family)}ForCausalLM"]
    cfg = cls(**d)
    return cfg


def _tied_names(model: nn.Module) -> set[str]:
    tied = getattr(model, "_tied_weights_keys", None) or {}
    if not getattr(model.config, "tie_word_embeddings", False):
        return set()
    return set(tied) if isinstance(tied, dict) else set(tied)


# --------------------------------------------------------------------------------------------------
# loading, with the record checked against the tensors
# --------------------------------------------------------------------------------------------------

def is_pruned_dir(path: Path) -> bool:
    return (Path(path) / PRUNING_FILE).is_file()


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise RespError(f"{path}: cannot read ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    if not isinstance(data, dict):
        raise RespError(f"{path}: not a JSON object")
    return data


def validate_pruned_dir(path: str | Path):
    """Check a compacted folder without loading weights: config, record, and every tensor's name
    and shape against what the record implies.  Returns ``(config, record)``; raises a one-line
    :class:`RespError` naming the offending file."""
    path = Path(path)
    rec_file, cfg_file, weights = path / PRUNING_FILE, path / "config.json", path / WEIGHTS_FILE
    if not rec_file.is_file():
        raise RespError(f"{path} is not a pruned RESP model (no {PRUNING_FILE})")
    if not cfg_file.is_file():
        raise RespError(f"{path}: config.json is missing")
    record = _read_json(rec_file)
    cfg_dict = _read_json(cfg_file)
    model_type = cfg_dict.get("model_type")
    if isinstance(model_type, str) and model_type.startswith(MODEL_TYPE_PREFIX):
        family = model_type[len(MODEL_TYPE_PREFIX):]
        if cfg_dict.get("resp_pruning") != record:
            raise RespError(f"{cfg_file}: its resp_pruning record differs from {rec_file.name}")
    else:
        family = model_type  # format 1: the base config, the record beside it
        if record.get("format") == FORMAT_VERSION:
            raise RespError(f"{cfg_file}: model_type {model_type!r} is not a {MODEL_TYPE_PREFIX}* type")
    try:
        check_supported(family, str(cfg_file))
    except RespError:
        raise
    n_layers = cfg_dict.get("num_hidden_layers")
    if not _int(n_layers):
        raise RespError(f"{cfg_file}: num_hidden_layers is missing")
    _check_record(record, rec_file, n_layers)
    base_cls, _ = _base_classes(family)
    try:
        if model_type == family:
            base = base_cls.from_dict({k: v for k, v in cfg_dict.items() if k != "model_type"})
            base.resp_pruning = record  # saved after compaction: layer count and types already renumbered
            config = pruned_config(base, record)
        else:
            cfg_cls = pruned_config_class(family)
            config = cfg_cls.from_dict({k: v for k, v in cfg_dict.items() if k != "model_type"})
    except Exception as exc:  # transformers' strict config validation
        raise RespError(f"{cfg_file}: not a valid {family} config ({str(exc).strip().splitlines()[-1]})") from None
    geo = geometry_from_config(config)
    dg = record["dense_geometry"]
    if (geo.hidden_size, geo.num_heads, geo.num_kv_heads, geo.head_dim, geo.intermediate_size) != (
            dg["hidden_size"], dg["num_heads"], dg["num_kv_heads"], dg["head_dim"], dg["intermediate_size"]):
        raise RespError(f"{rec_file}: dense_geometry does not match config.json's sizes")
    # tensors: names and shapes from the file header against a model built on the meta device
    if not weights.is_file():
        raise RespError(f"{path}: {WEIGHTS_FILE} is missing")
    found = _safetensors_shapes(weights)
    with torch.device("meta"):
        skeleton = pruned_model_class(family)(config)
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    optional = _tied_names(skeleton)
    missing = sorted(set(expected) - set(found) - optional)
    extra = sorted(set(found) - set(expected))
    if missing:
        raise RespError(f"{weights}: tensor {missing[0]} is missing ({len(missing)} missing): the record and the "
                        f"weights disagree")
    if extra:
        raise RespError(f"{weights}: unexpected tensor {extra[0]} ({len(extra)} unexpected): the record and the "
                        f"weights disagree")
    for k, shape in found.items():
        if expected[k] != shape:
            raise RespError(f"{weights}: tensor {k} has shape {list(shape)}, the record implies {list(expected[k])}")
    return config, record


def _safetensors_shapes(path: Path) -> dict[str, tuple]:
    """Names and shapes from a safetensors header, with the file's size checked against it."""
    try:
        header, n, size = read_header(path)
        end = 0
        out = {}
        for name, info in tensor_entries(header):
            out[name] = tuple(info["shape"])
            end = max(end, info["data_offsets"][1])
        if 8 + n + end > size:
            raise ValueError(f"truncated ({size} bytes, the header needs {8 + n + end})")
        return out
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise RespError(f"{path}: not a readable safetensors file ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None


def load_pruned(path: str | Path, dtype: torch.dtype | None = None, device: str | None = None) -> nn.Module:
    """Load a model saved by :func:`save_pruned`: one call, no recipe, no code execution.

    The record is validated against config.json and the tensors first (layer count, widths,
    kv_index, every tensor's name and shape); any disagreement is one :class:`RespError` line
    naming the file."""
    path = Path(path)
    config, record = validate_pruned_dir(path)
    cls = pruned_model_class(config.resp_base_model_type)
    kwargs = {"config": config, "_resp_validated": True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    try:
        model = cls.from_pretrained(str(path), **kwargs)
    except RespError:
        raise
    except Exception as exc:  # noqa: BLE001 - a file that passed the checks but still does not load
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RespError(f"{path / WEIGHTS_FILE}: cannot load ({type(exc).__name__}: {first})") from None
    if device is not None:
        model.to(device=device)
    model.eval()
    return model
