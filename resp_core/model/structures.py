"""Prunable structures: which units a run removes, what each costs, which layers are protected.

Unit kinds (each a tensor axis of a :class:`~resp_core.model.masks.MaskSet`):

* ``kv_group``   one KV head with all its query heads; q/k/v rows and o columns are coupled.
* ``q_head``     one query head; q rows and o columns.  A KV head is removed with its last query head.
* ``mlp_channel`` one intermediate channel; gate and up rows and the down column are coupled.
* ``layer``      a whole decoder block (attention and MLP), for layer-removal methods (ShortGPT).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .adapter import DecoderAdapter, Geometry

UNIT_KINDS = ("kv_group", "q_head", "mlp_channel", "layer")


@dataclass(frozen=True)
class StructureSpec:
    attention: str = "kv_group"  # "kv_group" | "q_head" | "none"
    mlp: str = "channel"  # "channel" | "none"
    layers: bool = False  # prune whole decoder blocks instead of heads/channels
    protect_first: float = 0.1  # fraction of the first layers never pruned (rounded up)
    protect_last: int = 1  # number of last layers never pruned
    protected_layers: tuple[int, ...] | None = None  # explicit list; overrides the two above
    min_keep: int = 1  # keep at least this many units of each kind in each layer

    def kinds(self) -> list[str]:
        if self.layers:
            return ["layer"]
        out = []
        if self.attention != "none":
            out.append(self.attention)
        if self.mlp != "none":
            out.append("mlp_channel")
        return out


@dataclass
class Structures:
    """The prunable units of one model under one :class:`StructureSpec`."""

    geometry: Geometry
    spec: StructureSpec
    prunable_layers: torch.Tensor  # bool [L]
    costs: dict[str, torch.Tensor] = field(default_factory=dict)  # kind -> params per unit [L, n]

    @property
    def kinds(self) -> list[str]:
        return self.spec.kinds()

    def candidate(self, kind: str) -> torch.Tensor:
        """bool [L, n]: units of ``kind`` that may be pruned at all (unprotected layers)."""
        shape = self.costs[kind].shape
        return self.prunable_layers[:, None].expand(shape).clone()

    def prunable_parameter_total(self) -> int:
        """Parameters in the blocks of unprotected layers: the denominator of 'sparsity'."""
        per_layer = self.costs["layer"][:, 0]
        return int(per_layer[self.prunable_layers].sum().item())


def protected_layer_indices(spec: StructureSpec, num_layers: int) -> list[int]:
    if spec.protected_layers is not None:
        return sorted(set(spec.protected_layers))
    first = math.ceil(spec.protect_first * num_layers)
    last = range(max(0, num_layers - spec.protect_last), num_layers)
    return sorted(set(range(first)) | set(last))


def build_structures(adapter: DecoderAdapter, spec: StructureSpec) -> Structures:
    g = adapter.geometry
    prunable = torch.ones(g.num_layers, dtype=torch.bool)
    for i in protected_layer_indices(spec, g.num_layers):
        if 0 <= i < g.num_layers:
            prunable[i] = False
    costs = unit_costs(adapter)
    return Structures(g, spec, prunable, costs)


def _numel(lin) -> int:
    return lin.weight.numel() + (lin.bias.numel() if lin.bias is not None else 0)


def unit_costs(adapter: DecoderAdapter) -> dict[str, torch.Tensor]:
    """Parameters removed with each unit, per layer (dense model; biases counted)."""
    g = adapter.geometry
    L, H, hd = g.num_layers, g.hidden_size, g.head_dim
    q_cost = torch.zeros(L, g.num_heads)
    kv_cost = torch.zeros(L, g.num_kv_heads)
    mlp_cost = torch.zeros(L, g.intermediate_size)
    layer_cost = torch.zeros(L, 1)
    for i in range(L):
        a, m = adapter.attention_parts(i), adapter.mlp_parts(i)
        q_bias = hd if a.q.bias is not None else 0
        kv_bias = 2 * hd if a.k.bias is not None else 0
        per_q = 2 * H * hd + q_bias
        q_cost[i] = per_q
        kv_cost[i] = g.heads_per_group * per_q + 2 * H * hd + kv_bias
        mlp_cost[i] = 3 * H + (2 if m.gate.bias is not None else 0)
        layer_cost[i] = sum(_numel(x) for x in (a.q, a.k, a.v, a.o, m.gate, m.up, m.down))
    return {"q_head": q_cost, "kv_group": kv_cost, "mlp_channel": mlp_cost, "layer": layer_cost}
