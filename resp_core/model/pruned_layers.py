"""The layers of a compacted model: attention and MLP blocks with every unit removed, and the
per-layer widths (heads, KV heads, channels, ``kv_index``) a freshly built layer is given."""

from __future__ import annotations

import torch
from torch import nn


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
