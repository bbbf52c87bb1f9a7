"""Physical removal of masked units, and saving/loading of the resulting heterogeneous model.

After :func:`compact`, every layer has its own widths: its own number of query heads, KV heads
and MLP channels; removed layers are gone.  When query heads were pruned one by one, a layer's
surviving query heads may no longer be spread evenly over its KV heads; such a layer keeps a
``kv_index`` buffer (KV head of each query head) that the ``resp_sdpa`` attention function uses
to gather K/V, instead of the fixed ``num_key_value_groups`` repetition.  Layers with even
grouping run through transformers' own SDPA path unchanged.

A compacted model is saved as ``config.json`` (the base config with the new layer count),
``model.safetensors`` and ``resp_pruning.json`` (per-layer widths, KV mapping and biases; no
pickle, no code), and loads back with :func:`load_pruned` without the recipe.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import load_model, save_model
from torch import nn
from transformers import AttentionInterface, AutoConfig, AutoModelForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ..errors import RespError
from .adapter import DecoderAdapter, adapter_for
from .masks import MaskSet

PRUNING_FILE = "resp_pruning.json"
FORMAT_VERSION = 1
ATTN_IMPLEMENTATION = "resp_sdpa"


def _resp_sdpa(module, query, key, value, attention_mask, **kwargs):
    kv_index = getattr(module, "kv_index", None)
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


def _sliced_linear(lin: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    w = lin.weight.detach()
    b = lin.bias.detach() if lin.bias is not None else None
    if rows is not None:
        w = w[rows]
        b = b[rows] if b is not None else None
    if cols is not None:
        w = w[:, cols]
    new = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if b is not None:
            new.bias.copy_(b)
    return new


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


def _set_attention_widths(attn: nn.Module, n_kv: int, kv_index: list[int] | None, groups: int) -> None:
    attn.num_key_value_groups = groups
    if kv_index is None:
        attn.kv_index = None
    else:
        attn.register_buffer("kv_index", torch.tensor(kv_index, dtype=torch.long, device=attn.q_proj.weight.device),
                             persistent=False)


def _renumber(model: nn.Module, kept: list[int]) -> None:
    cfg = model.config
    cfg.num_hidden_layers = len(kept)
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = [cfg.layer_types[i] for i in kept]
    for new_idx, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        attn.layer_idx = new_idx
        if hasattr(layer, "attention_type") and getattr(cfg, "layer_types", None):
            layer.attention_type = cfg.layer_types[new_idx]


@torch.no_grad()
def compact(model: nn.Module, mask: MaskSet) -> dict:
    """Remove masked units from ``model`` in place. Returns the per-layer record saved with it."""
    adapter = adapter_for(model)
    g = adapter.geometry
    hd = g.head_dim
    plan = _layer_plan(adapter, mask)
    new_layers, records = [], []
    for p in plan:
        i = p["source_layer"]
        layer = adapter.layers[i]
        a, m = adapter.attention_parts(i), adapter.mlp_parts(i)
        q = torch.tensor(p["q_heads"], dtype=torch.long)
        kv = torch.tensor(p["kv_heads"], dtype=torch.long)
        rec = {"source_layer": i, "num_heads": len(q), "num_kv_heads": len(kv),
               "kv_index": None, "intermediate_size": len(p["mlp_channels"]),
               "o_proj_bias": a.o.bias is not None, "down_proj_bias": m.down.bias is not None}
        if len(q) == 0:
            layer.self_attn = EmptyAttention(i, g.hidden_size, hd, a.o.bias)
        else:
            attn = layer.self_attn
            qr, kr = _head_rows(q, hd), _head_rows(kv, hd)
            attn.q_proj = _sliced_linear(a.q, rows=qr)
            attn.k_proj = _sliced_linear(a.k, rows=kr)
            attn.v_proj = _sliced_linear(a.v, rows=kr)
            attn.o_proj = _sliced_linear(a.o, cols=qr)
            groups, kv_index = _grouping(p["kv_index"], len(kv))
            _set_attention_widths(attn, len(kv), kv_index, groups)
            rec["kv_index"] = kv_index
        ch = torch.tensor(p["mlp_channels"], dtype=torch.long)
        if len(ch) == 0:
            layer.mlp = EmptyMLP(g.hidden_size, m.down.bias)
        else:
            mlp = layer.mlp
            mlp.gate_proj = _sliced_linear(m.gate, rows=ch)
            mlp.up_proj = _sliced_linear(m.up, rows=ch)
            mlp.down_proj = _sliced_linear(m.down, cols=ch)
            mlp.intermediate_size = len(ch)
        new_layers.append(layer)
        records.append(rec)
    model.model.layers = nn.ModuleList(new_layers)
    _renumber(model, [p["source_layer"] for p in plan])
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    return {"format": FORMAT_VERSION, "dense_geometry": g.to_json(), "layers": records}


def compacted_copy(model: nn.Module, mask: MaskSet) -> tuple[nn.Module, dict]:
    clone = copy.deepcopy(model)
    record = compact(clone, mask)
    return clone, record


def save_pruned(model: nn.Module, record: dict, out_dir: Path, tokenizer=None) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = model.config.to_dict()
    cfg.pop("_attn_implementation_autoset", None)
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
    (out_dir / PRUNING_FILE).write_text(json.dumps(record, indent=2))
    save_model(model, str(out_dir / "model.safetensors"))
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)


def _shape_layer(layer: nn.Module, rec: dict, hidden: int, hd: int, new_idx: int) -> None:
    dtype = layer.input_layernorm.weight.dtype
    if rec["num_heads"] == 0:
        bias = torch.zeros(hidden, dtype=dtype) if rec["o_proj_bias"] else None
        layer.self_attn = EmptyAttention(new_idx, hidden, hd, bias)
    else:
        attn = layer.self_attn
        qb = attn.q_proj.bias is not None
        nq, nkv = rec["num_heads"], rec["num_kv_heads"]
        attn.q_proj = nn.Linear(hidden, nq * hd, bias=qb, dtype=dtype)
        attn.k_proj = nn.Linear(hidden, nkv * hd, bias=qb, dtype=dtype)
        attn.v_proj = nn.Linear(hidden, nkv * hd, bias=qb, dtype=dtype)
        attn.o_proj = nn.Linear(nq * hd, hidden, bias=rec["o_proj_bias"], dtype=dtype)
        groups = 1 if rec["kv_index"] is not None else nq // nkv
        _set_attention_widths(attn, nkv, rec["kv_index"], groups)
    if rec["intermediate_size"] == 0:
        bias = torch.zeros(hidden, dtype=dtype) if rec["down_proj_bias"] else None
        layer.mlp = EmptyMLP(hidden, bias)
    else:
        mlp, n = layer.mlp, rec["intermediate_size"]
        gb = mlp.gate_proj.bias is not None
        mlp.gate_proj = nn.Linear(hidden, n, bias=gb, dtype=dtype)
        mlp.up_proj = nn.Linear(hidden, n, bias=gb, dtype=dtype)
        mlp.down_proj = nn.Linear(n, hidden, bias=rec["down_proj_bias"], dtype=dtype)
        mlp.intermediate_size = n


def is_pruned_dir(path: Path) -> bool:
    return (Path(path) / PRUNING_FILE).is_file()


def load_pruned(path: str | Path, dtype: torch.dtype | None = None, device: str | None = None) -> nn.Module:
    """Load a model saved by :func:`save_pruned`: one call, no recipe, no code execution."""
    path = Path(path)
    if not is_pruned_dir(path):
        raise RespError(f"{path} is not a pruned RESP model (no {PRUNING_FILE})")
    record = json.loads((path / PRUNING_FILE).read_text())
    if record.get("format") != FORMAT_VERSION:
        raise RespError(f"{path / PRUNING_FILE}: unsupported format {record.get('format')!r}")
    config = AutoConfig.from_pretrained(path)
    model = AutoModelForCausalLM.from_config(config)
    adapter = adapter_for(model)
    hd, hidden = adapter.geometry.head_dim, config.hidden_size
    for new_idx, rec in enumerate(record["layers"]):
        _shape_layer(model.model.layers[new_idx], rec, hidden, hd, new_idx)
    load_model(model, str(path / "model.safetensors"), strict=True)
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    if dtype is not None or device is not None:
        model.to(device=device, dtype=dtype)
    model.eval()
    return model
