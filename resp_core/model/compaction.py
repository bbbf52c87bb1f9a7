"""Physical removal of masked units, and saving/loading of the resulting heterogeneous model.

After compaction every layer has its own widths: its own number of query heads, KV heads and MLP
channels; removed layers are gone.  When query heads were pruned one by one, a layer's surviving
query heads may no longer be spread evenly over its KV heads; such a layer keeps a ``kv_index``
(KV head of each query head) that the ``resp_sdpa`` attention function uses to gather K/V,
instead of the fixed ``num_key_value_groups`` repetition.  Layers with even grouping run through
transformers' own SDPA path unchanged.

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

**Memory.** Nothing here deep-copies a model.  :func:`compacted_state` builds the compacted
tensors by ``index_select`` from the masked model's tensors (on the host by default); tensors that
compaction does not cut (embeddings, norms, the output head) are shared, not copied, when they
already live on that device.  :func:`save_compacted` writes that state straight to disk (one
tensor at a time), so saving a milestone costs at most the compacted weights in host memory and
nothing on the accelerator.  :func:`compacted_copy` assembles a compacted model from the same
state around a skeleton built on the meta device: the extra memory is the kept part of the
decoder layers, never a second full model.  :func:`compact` removes units in place.
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
from .adapter import SUPPORTED_FAMILIES, DecoderAdapter, adapter_for, check_supported, geometry_from_config
from .masks import MaskSet

PRUNING_FILE = "resp_pruning.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)  # 1: config.json of the base model type, record only in resp_pruning.json
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


class EmptyAttention(nn.Module):
    """Attention with every head removed: contributes its output bias (or zero) only.

    It still appends a one-head zero K/V to the cache so that cache lengths stay right (a zero-width
    tensor has numel 0, which transformers' DynamicLayer.get_seq_length reads as an empty cache)."""

    def __init__(self, layer_idx: int, hidden_size: int, head_dim: int, bias: torch.Tensor | None):
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = head_dim
        self.hidden_size = hidden_size
        self.o_bias = nn.Parameter(bias.detach().clone()) if bias is not None else None

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None,
                past_key_values=None, **kwargs):
        cache = cache if cache is not None else past_key_values
        b, t, _ = hidden_states.shape
        if cache is not None:
            empty = hidden_states.new_zeros(b, 1, t, self.head_dim)
            cache.update(empty, empty, self.layer_idx)
        out = hidden_states.new_zeros(b, t, self.hidden_size)
        if self.o_bias is not None:
            out = out + self.o_bias
        return out, None


class EmptyMLP(nn.Module):
    def __init__(self, hidden_size: int, bias: torch.Tensor | None):
        super().__init__()
        self.hidden_size = hidden_size
        self.down_bias = nn.Parameter(bias.detach().clone()) if bias is not None else None

    def forward(self, x):
        out = x.new_zeros(*x.shape[:-1], self.hidden_size)
        return out + self.down_bias if self.down_bias is not None else out


# --------------------------------------------------------------------------------------------------
# the plan: which units of which layers survive
# --------------------------------------------------------------------------------------------------

def _head_rows(heads: torch.Tensor, hd: int) -> torch.Tensor:
    return (heads[:, None] * hd + torch.arange(hd)[None, :]).reshape(-1)


def _layer_plan(adapter: DecoderAdapter, mask: MaskSet) -> list[dict]:
    """Per kept layer: source index, kept query heads, kept KV heads, kv_index, kept channels."""
    g = adapter.geometry
    e = mask.effective()
    group = g.kv_group_of_head()
    plan = []
    for i in range(g.num_layers):
        if not bool(e.layer[i, 0]):
            continue
        q = e.q_head[i].nonzero().flatten()
        kv = e.kv_group[i].nonzero().flatten()
        remap = {int(k): j for j, k in enumerate(kv.tolist())}
        kv_index = [remap[int(group[h])] for h in q.tolist()]
        plan.append({
            "source_layer": i,
            "q_heads": q.tolist(),
            "kv_heads": kv.tolist(),
            "kv_index": kv_index,
            "mlp_channels": e.mlp_channel[i].nonzero().flatten().tolist(),
        })
    return plan


def _grouping(kv_index: list[int], n_kv: int) -> tuple[int, list[int] | None]:
    """(num_key_value_groups, kv_index or None when heads are spread evenly and in order)."""
    if n_kv == 0 or len(kv_index) % n_kv:
        return 1, kv_index
    rep = len(kv_index) // n_kv
    even = [h // rep for h in range(len(kv_index))]
    return (rep, None) if kv_index == even else (1, kv_index)


def _record(adapter: DecoderAdapter, plan: list[dict]) -> dict:
    records = []
    for p in plan:
        i = p["source_layer"]
        a, m = adapter.attention_parts(i), adapter.mlp_parts(i)
        nq, nkv = len(p["q_heads"]), len(p["kv_heads"])
        records.append({
            "source_layer": i, "num_heads": nq, "num_kv_heads": nkv,
            "q_heads": p["q_heads"], "kv_heads": p["kv_heads"],
            "kv_index": _grouping(p["kv_index"], nkv)[1] if nq else None,
            "intermediate_size": len(p["mlp_channels"]),
            "o_proj_bias": a.o.bias is not None, "down_proj_bias": m.down.bias is not None,
        })
    return {"format": FORMAT_VERSION, "base_model_type": adapter.family,
            "dense_geometry": adapter.geometry.to_json(), "layers": records}


def plan_summary(record: dict) -> dict:
    """Per kept layer (num_heads, num_kv_heads, intermediate_size): what export formats compare."""
    return {r["source_layer"]: (r["num_heads"], r["num_kv_heads"], r["intermediate_size"]) for r in record["layers"]}


# --------------------------------------------------------------------------------------------------
# the compacted model classes (registered with transformers' Auto classes)
# --------------------------------------------------------------------------------------------------

def _set_attention_widths(attn: nn.Module, kv_index: list[int] | None, groups: int) -> None:
    attn.num_key_value_groups = groups
    attn.__dict__.pop("_kv_index_by_device", None)
    if "kv_index" in attn._buffers:
        del attn._buffers["kv_index"]
    # a plain attribute on the host (not a buffer): it is derived from the record, never saved, and
    # survives meta-device construction; _resp_sdpa moves it to the activations' device once.
    attn.kv_index = None if kv_index is None else torch.tensor(kv_index, dtype=torch.long, device="cpu")


def _shape_layer(layer: nn.Module, attn_name: str, mlp_name: str, rec: dict, hidden: int, hd: int,
                 new_idx: int) -> None:
    """Give a freshly built (dense) decoder layer the widths of record ``rec``."""
    attn, mlp = getattr(layer, attn_name), getattr(layer, mlp_name)
    dtype = attn.q_proj.weight.dtype
    if rec["num_heads"] == 0:
        bias = torch.zeros(hidden, dtype=dtype) if rec["o_proj_bias"] else None
        setattr(layer, attn_name, EmptyAttention(new_idx, hidden, hd, bias))
    else:
        qb, kb, vb = (attn.q_proj.bias is not None, attn.k_proj.bias is not None, attn.v_proj.bias is not None)
        nq, nkv = rec["num_heads"], rec["num_kv_heads"]
        attn.q_proj = nn.Linear(hidden, nq * hd, bias=qb, dtype=dtype)
        attn.k_proj = nn.Linear(hidden, nkv * hd, bias=kb, dtype=dtype)
        attn.v_proj = nn.Linear(hidden, nkv * hd, bias=vb, dtype=dtype)
        attn.o_proj = nn.Linear(nq * hd, hidden, bias=rec["o_proj_bias"], dtype=dtype)
        groups = 1 if rec["kv_index"] is not None else nq // nkv
        _set_attention_widths(attn, rec["kv_index"], groups)
    if rec["intermediate_size"] == 0:
        bias = torch.zeros(hidden, dtype=dtype) if rec["down_proj_bias"] else None
        setattr(layer, mlp_name, EmptyMLP(hidden, bias))
    else:
        n = rec["intermediate_size"]
        gb, ub = mlp.gate_proj.bias is not None, mlp.up_proj.bias is not None
        mlp.gate_proj = nn.Linear(hidden, n, bias=gb, dtype=dtype)
        mlp.up_proj = nn.Linear(hidden, n, bias=ub, dtype=dtype)
        mlp.down_proj = nn.Linear(n, hidden, bias=rec["down_proj_bias"], dtype=dtype)
        mlp.intermediate_size = n


def _child_name(parent: nn.Module, child: nn.Module) -> str:
    for name, mod in parent.named_children():
        if mod is child:
            return name
    raise RuntimeError("module not found in its layer")


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


# --------------------------------------------------------------------------------------------------
# compaction
# --------------------------------------------------------------------------------------------------

@torch.no_grad()
def compacted_state(model: nn.Module, mask: MaskSet, device: str | torch.device | None = "cpu",
                    ) -> tuple[dict[str, torch.Tensor], dict]:
    """The compacted model's state dict and record, built from ``model``'s tensors.

    Sliced projections are new tensors (``index_select`` on ``device``, the host by default);
    every other tensor is ``model``'s own when it already lives on ``device`` (no copy).  Keys are
    the compacted model's (layers renumbered; an attention without heads keeps only
    ``<attn>.o_bias``, an MLP without channels ``<mlp>.down_bias``)."""
    adapter = adapter_for(model)
    g = adapter.geometry
    hd = g.head_dim
    plan = _layer_plan(adapter, mask)
    record = _record(adapter, plan)
    layers_prefix = _layers_prefix(model, adapter)

    def put(t: torch.Tensor) -> torch.Tensor:
        return t.detach() if device is None else t.detach().to(device)

    def sel(t: torch.Tensor, dim: int, idx: torch.Tensor) -> torch.Tensor:
        out = t.detach().index_select(dim, idx.to(t.device))  # only the kept part, then to the host
        return out if device is None else out.to(device)

    state: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if not name.startswith(layers_prefix):
            state[name] = put(t)
    for new_idx, p in enumerate(plan):
        i = p["source_layer"]
        layer = adapter.layers[i]
        src, dst = f"{layers_prefix}{i}.", f"{layers_prefix}{new_idx}."
        attn_mod, mlp_mod = adapter.attention(i), adapter.mlp(i)
        attn_name, mlp_name = _child_name(layer, attn_mod), _child_name(layer, mlp_mod)
        a, m = adapter.attention_parts(i), adapter.mlp_parts(i)
        q = torch.tensor(p["q_heads"], dtype=torch.long)
        kv = torch.tensor(p["kv_heads"], dtype=torch.long)
        ch = torch.tensor(p["mlp_channels"], dtype=torch.long)
        qr, kr = _head_rows(q, hd), _head_rows(kv, hd)
        cut: dict[int, tuple[int, torch.Tensor] | None] = {}  # id(tensor) -> (dim, index) or None: drop
        if len(q) == 0:
            for t in attn_mod.state_dict(keep_vars=True).values():
                cut[id(t)] = None
        else:
            for lin, dim, idx in ((a.q, 0, qr), (a.k, 0, kr), (a.v, 0, kr), (a.o, 1, qr)):
                cut[id(lin.weight)] = (dim, idx)
                if lin.bias is not None and lin is not a.o:
                    cut[id(lin.bias)] = (0, idx)
        if len(ch) == 0:
            for t in mlp_mod.state_dict(keep_vars=True).values():
                cut[id(t)] = None
        else:
            for lin, dim in ((m.gate, 0), (m.up, 0), (m.down, 1)):
                cut[id(lin.weight)] = (dim, ch)
                if lin.bias is not None and lin is not m.down:
                    cut[id(lin.bias)] = (0, ch)
        for name, t in layer.state_dict(keep_vars=True).items():
            how = cut.get(id(t), "keep")
            if how is None:
                continue
            state[dst + name] = put(t) if how == "keep" else sel(t, *how)
        if len(q) == 0 and a.o.bias is not None:
            state[f"{dst}{attn_name}.o_bias"] = put(a.o.bias)
        if len(ch) == 0 and m.down.bias is not None:
            state[f"{dst}{mlp_name}.down_bias"] = put(m.down.bias)
    return state, record


def _layers_prefix(model: nn.Module, adapter: DecoderAdapter) -> str:
    for name, mod in model.named_modules():
        if mod is adapter.layers:
            return name + "."
    raise RuntimeError("decoder layers not found")


def _dedup_tied(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop later names of tensors that share storage (a tied output head), as transformers saves them."""
    seen, out = set(), {}
    for name, t in state.items():
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)) if t.numel() else None
        if key is not None and key in seen:
            continue
        if key is not None:
            seen.add(key)
        out[name] = t
    return out


@torch.no_grad()
def compact(model: nn.Module, mask: MaskSet) -> dict:
    """Remove masked units from ``model`` in place (no copy of any tensor that stays). Returns the
    record saved with it.  ``model`` keeps its class and config object (layer count and layer
    types updated); :func:`save_pruned` writes it with the ``resp_pruned_<base>`` config."""
    adapter = adapter_for(model)
    g = adapter.geometry
    hd = g.head_dim
    plan = _layer_plan(adapter, mask)
    record = _record(adapter, plan)
    new_layers = []
    for p, rec in zip(plan, record["layers"]):
        i = p["source_layer"]
        layer = adapter.layers[i]
        attn_name, mlp_name = _child_name(layer, adapter.attention(i)), _child_name(layer, adapter.mlp(i))
        a, m = adapter.attention_parts(i), adapter.mlp_parts(i)
        q = torch.tensor(p["q_heads"], dtype=torch.long)
        kv = torch.tensor(p["kv_heads"], dtype=torch.long)
        if len(q) == 0:
            setattr(layer, attn_name, EmptyAttention(i, g.hidden_size, hd, a.o.bias))
        else:
            attn = getattr(layer, attn_name)
            qr, kr = _head_rows(q, hd), _head_rows(kv, hd)
            attn.q_proj = _sliced_linear(a.q, rows=qr)
            attn.k_proj = _sliced_linear(a.k, rows=kr)
            attn.v_proj = _sliced_linear(a.v, rows=kr)
            attn.o_proj = _sliced_linear(a.o, cols=qr)
            _set_attention_widths(attn, rec["kv_index"], 1 if rec["kv_index"] is not None else len(q) // len(kv))
        ch = torch.tensor(p["mlp_channels"], dtype=torch.long)
        if len(ch) == 0:
            setattr(layer, mlp_name, EmptyMLP(g.hidden_size, m.down.bias))
        else:
            mlp = getattr(layer, mlp_name)
            mlp.gate_proj = _sliced_linear(m.gate, rows=ch)
            mlp.up_proj = _sliced_linear(m.up, rows=ch)
            mlp.down_proj = _sliced_linear(m.down, cols=ch)
            mlp.intermediate_size = len(ch)
        new_layers.append(layer)
    layers = adapter.layers
    del layers[:]
    layers.extend(new_layers)
    _renumber(model, adapter, [p["source_layer"] for p in plan])
    model.config.resp_pruning = record  # the live config now describes the compacted model
    model.config._attn_implementation_internal = ATTN_IMPLEMENTATION
    return record


def _sliced_linear(lin: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    w = lin.weight.detach()
    b = lin.bias.detach() if lin.bias is not None else None
    if rows is not None:
        w = w.index_select(0, rows.to(w.device))
        b = b.index_select(0, rows.to(b.device)) if b is not None else None
    if cols is not None:
        w = w.index_select(1, cols.to(w.device))
    new = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device="meta", dtype=w.dtype)
    new.weight = nn.Parameter(w, requires_grad=lin.weight.requires_grad)
    if b is not None:
        new.bias = nn.Parameter(b, requires_grad=lin.bias.requires_grad)
    return new


def _renumber(model: nn.Module, adapter: DecoderAdapter, kept: list[int]) -> None:
    cfg = model.config
    cfg.num_hidden_layers = len(kept)
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = [cfg.layer_types[i] for i in kept]
    for new_idx, layer in enumerate(adapter.layers):
        adapter.attention(new_idx).layer_idx = new_idx
        if hasattr(layer, "attention_type") and getattr(cfg, "layer_types", None):
            layer.attention_type = cfg.layer_types[new_idx]


@torch.no_grad()
def compacted_copy(model: nn.Module, mask: MaskSet, device: str | torch.device | None = None) -> tuple[nn.Module, dict]:
    """A compacted model next to ``model`` (which stays as it is), on ``device`` (default: ``model``'s).

    No deep copy: the compacted tensors are built by :func:`compacted_state` on ``device`` and
    placed into a ``RespPruned<Base>ForCausalLM`` skeleton built on the meta device; tensors that
    compaction does not cut are shared with ``model``."""
    if device is None:
        device = next(model.parameters()).device
    state, record = compacted_state(model, mask, device=device)
    cfg = pruned_config(model.config, record)
    cls = pruned_model_class(cfg.resp_base_model_type)
    with torch.device("meta"):
        new = cls(cfg)
    missing = set(new.state_dict()) - set(state)
    tied = _tied_names(new)
    if missing - tied:
        raise RuntimeError(f"compaction left tensors unset: {sorted(missing - tied)[:3]}")
    new.load_state_dict(state, strict=False, assign=True)
    new.tie_weights()
    # non-persistent buffers (rotary frequencies, embedding scales) are built from the config on the
    # meta device; take the source model's (same names outside the decoder layers)
    src_buffers = dict(model.named_buffers())
    for name, buf in list(new.named_buffers()):
        if buf.is_meta:
            if name not in src_buffers:
                raise RuntimeError(f"buffer {name} has no source")
            owner, _, leaf = name.rpartition(".")
            new.get_submodule(owner)._buffers[leaf] = src_buffers[name].to(device)
    leftover = [n for n, t in list(new.named_parameters()) + list(new.named_buffers()) if t.is_meta]
    if leftover:
        raise RuntimeError(f"compaction left tensors on the meta device: {leftover[:3]}")
    new.generation_config = model.generation_config
    new.train(model.training)
    return new, record


def _tied_names(model: nn.Module) -> set[str]:
    tied = getattr(model, "_tied_weights_keys", None) or {}
    if not getattr(model.config, "tie_word_embeddings", False):
        return set()
    return set(tied) if isinstance(tied, dict) else set(tied)


# --------------------------------------------------------------------------------------------------
# saving
# --------------------------------------------------------------------------------------------------

_ST_DTYPES = {torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.int32: "I32",
              torch.int64: "I64", torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32",
              torch.float64: "F64"}


def write_safetensors_streaming(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    """safetensors with a canonical header (names sorted, metadata sorted), written one tensor at a
    time: host memory is one tensor's bytes at most, and equal tensors give equal bytes."""
    header: dict = {"__metadata__": {str(k): str(v) for k, v in sorted((metadata or {"format": "pt"}).items())}}
    offset = 0
    names = sorted(tensors)
    for name in names:
        t = tensors[name]
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as fh:
        fh.write(len(head).to_bytes(8, "little"))
        fh.write(head)
        for name in names:
            t = tensors[name].detach()
            if t.numel() == 0:
                continue
            t = t.to("cpu").contiguous().reshape(-1)
            fh.write(memoryview(t.view(torch.uint8).numpy()))


def write_model_folder(out_dir: Path, config_dict: dict, state: dict[str, torch.Tensor], tokenizer=None,
                       generation_config=None, extra_json: dict[str, dict] | None = None) -> None:
    """A Hugging Face model folder from a config dict and a state dict, written atomically (the
    folder appears whole or not at all); tied tensors are stored once, as transformers does."""
    from ..rundir import atomic_dir

    with atomic_dir(Path(out_dir)) as tmp:
        (tmp / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True, default=str) + "\n")
        for name, obj in (extra_json or {}).items():
            (tmp / name).write_text(json.dumps(obj, indent=2) + "\n")
        write_safetensors_streaming(tmp / WEIGHTS_FILE, _dedup_tied(state), {"format": "pt"})
        if generation_config is not None:
            generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)


def config_json(cfg, architecture: str | None = None) -> dict:
    """``cfg`` as config.json content: no load-time fields (path, attention choice, GGUF quantizer)."""
    d = cfg.to_dict()
    for k in ("_attn_implementation_autoset", "_name_or_path", "_attn_implementation", "quantization_config"):
        d.pop(k, None)
    if architecture:
        d["architectures"] = [architecture]
    return d


def save_state(out_dir: Path, base_config, record: dict, state: dict[str, torch.Tensor], tokenizer=None,
               generation_config=None) -> None:
    """Write a compacted state dict (from :func:`compacted_state`) as a ``resp_pruned_*`` folder."""
    cfg = pruned_config(base_config, record)
    write_model_folder(out_dir, config_json(cfg), state, tokenizer, generation_config, {PRUNING_FILE: record})


def save_pruned(model: nn.Module, record: dict, out_dir: Path, tokenizer=None) -> None:
    """Save a compacted model (from :func:`compact` or :func:`compacted_copy`) with its record."""
    save_state(out_dir, model.config, record, model.state_dict(), tokenizer, getattr(model, "generation_config", None))


def save_compacted(model: nn.Module, mask: MaskSet, out_dir: Path, tokenizer=None) -> dict:
    """Compact the masked ``model`` on the host and write it to ``out_dir``; ``model`` is untouched
    and no compacted model is built.  Returns the record."""
    state, record = compacted_state(model, mask, device="cpu")
    save_state(out_dir, model.config, record, state, tokenizer, getattr(model, "generation_config", None))
    return record


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


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_record(record: dict, where: Path, n_layers: int) -> None:
    """Every rule a record written by RESP satisfies; one line naming ``where`` on the first breach."""
    def bad(msg: str):
        raise RespError(f"{where}: {msg}")

    if record.get("format") not in READABLE_FORMATS:
        bad(f"unsupported format {record.get('format')!r} (this RESP reads {', '.join(map(str, READABLE_FORMATS))})")
    dg = record.get("dense_geometry")
    keys = ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim", "intermediate_size")
    if not isinstance(dg, dict) or not all(_int(dg.get(k)) and dg[k] > 0 for k in keys):
        bad("dense_geometry is missing or not positive integers")
    if dg["num_heads"] % dg["num_kv_heads"]:
        bad("dense_geometry: num_heads is not a multiple of num_kv_heads")
    hpg = dg["num_heads"] // dg["num_kv_heads"]
    layers = record.get("layers")
    if not isinstance(layers, list):
        bad("layers is missing")
    if len(layers) != n_layers:
        bad(f"{len(layers)} layer records for num_hidden_layers {n_layers} in config.json")
    if len(layers) > dg["num_layers"]:
        bad(f"{len(layers)} layer records but the dense model had {dg['num_layers']} layers")
    prev = -1
    for j, rec in enumerate(layers):
        at = f"layers[{j}]"
        if not isinstance(rec, dict):
            bad(f"{at} is not an object")
        for k in ("source_layer", "num_heads", "num_kv_heads", "intermediate_size"):
            if not _int(rec.get(k)) or rec[k] < 0:
                bad(f"{at}.{k} is missing or not a non-negative integer")
        for k in ("o_proj_bias", "down_proj_bias"):
            if not isinstance(rec.get(k), bool):
                bad(f"{at}.{k} is missing or not true/false")
        src, nq, nkv = rec["source_layer"], rec["num_heads"], rec["num_kv_heads"]
        if not prev < src < dg["num_layers"]:
            bad(f"{at}.source_layer {src} is out of order or outside [0, {dg['num_layers']})")
        prev = src
        if nq > dg["num_heads"] or nkv > dg["num_kv_heads"] or rec["intermediate_size"] > dg["intermediate_size"]:
            bad(f"{at}: widths ({nq} heads, {nkv} KV heads, {rec['intermediate_size']} channels) exceed the dense "
                f"model's ({dg['num_heads']}, {dg['num_kv_heads']}, {dg['intermediate_size']})")
        if (nq == 0) != (nkv == 0):
            bad(f"{at}: {nq} query heads with {nkv} KV heads")
        kvi = rec.get("kv_index")
        if nq == 0 and kvi is not None:
            bad(f"{at}.kv_index must be null for a layer without heads")
        if nq and kvi is None and nq % nkv:
            bad(f"{at}: {nq} query heads do not spread evenly over {nkv} KV heads and there is no kv_index")
        if kvi is not None:
            if not isinstance(kvi, list) or len(kvi) != nq or not all(_int(x) for x in kvi):
                bad(f"{at}.kv_index must list one KV head per query head ({nq})")
            if any(not 0 <= x < nkv for x in kvi):
                bad(f"{at}.kv_index has entries outside [0, {nkv})")
            # kept heads are in their original order and GQA groups are consecutive: the map is
            # non-decreasing, uses every KV head, and no KV head serves more than its dense group
            if kvi[0] != 0 or any(b - a not in (0, 1) for a, b in zip(kvi, kvi[1:])) or kvi[-1] != nkv - 1:
                bad(f"{at}.kv_index is not a non-decreasing map onto every KV head")
            if max(kvi.count(k) for k in range(nkv)) > hpg:
                bad(f"{at}.kv_index gives a KV head more than its {hpg} query heads")
        if "q_heads" in rec or "kv_heads" in rec:
            qh, kh = rec.get("q_heads"), rec.get("kv_heads")
            for name, lst, n, top in (("q_heads", qh, nq, dg["num_heads"]), ("kv_heads", kh, nkv, dg["num_kv_heads"])):
                if (not isinstance(lst, list) or len(lst) != n or not all(_int(x) and 0 <= x < top for x in lst)
                        or lst != sorted(set(lst))):
                    bad(f"{at}.{name} must be {n} increasing indices in [0, {top})")
            groups = [h // hpg for h in qh]
            if sorted(set(groups)) != kh:
                bad(f"{at}: kv_heads {kh} are not the groups of q_heads {qh}")
            derived = _grouping([kh.index(gr) for gr in groups], nkv)[1] if nq else None
            if derived != kvi:
                bad(f"{at}.kv_index {kvi} does not match q_heads/kv_heads (expected {derived})")
        elif record["format"] >= 2:
            bad(f"{at}: q_heads/kv_heads are missing")


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
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise ValueError("shorter than a header")
            n = int.from_bytes(head, "little")
            if n > min(size - 8, 100 << 20):
                raise ValueError("header length beyond the file")
            header = json.loads(fh.read(n))
        if not isinstance(header, dict):
            raise ValueError("header is not an object")
        end = 0
        out = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
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
