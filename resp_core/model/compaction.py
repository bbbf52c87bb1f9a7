"""Physical removal of masked units: a compacted state dict built from a masked model, a compacted
copy next to it, or removal in place.

After compaction every layer has its own widths: its own number of query heads, KV heads and MLP
channels; removed layers are gone.  A layer whose surviving query heads are no longer spread
evenly over its KV heads keeps a ``kv_index`` (see :mod:`resp_core.model.pruned_model`).

**Memory.** Nothing here deep-copies a model.  :func:`compacted_state` builds the compacted tensors
by ``index_select`` from the masked model's tensors (on the host by default); tensors that
compaction does not cut (embeddings, norms, the output head) are shared, not copied, when they
already live on that device.  :func:`~resp_core.model.saving.save_compacted` writes that state
straight to disk (one tensor at a time), so saving a milestone costs at most the compacted weights
in host memory and nothing on the accelerator.  :func:`compacted_copy` assembles a compacted model
from the same state around a skeleton built on the meta device: the extra memory is the kept part
of the decoder layers, never a second full model.  :func:`compact` removes units in place.
"""

from __future__ import annotations

import torch
from torch import nn

from .adapter import DecoderAdapter, adapter_for
from .masks import MaskSet
from .pruned_layers import EmptyAttention, EmptyMLP, _child_name, _set_attention_widths
from .pruned_model import ATTN_IMPLEMENTATION, _tied_names, pruned_config, pruned_model_class
from .record import _layer_plan, _record


def _head_rows(heads: torch.Tensor, hd: int) -> torch.Tensor:
    return (heads[:, None] * hd + torch.arange(hd)[None, :]).reshape(-1)


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
