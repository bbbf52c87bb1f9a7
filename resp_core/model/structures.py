"""Prunable structures: which units a run removes, what each costs, which layers are protected.

Unit kinds (each a tensor axis of a :class:`~resp_core.model.masks.MaskSet`):

* ``kv_group``   one KV head with all its query heads; q/k/v rows and o columns are coupled.
* ``q_head``     one query head; q rows and o columns.  A KV head is removed with its last query head.
* ``mlp_channel`` one intermediate channel; gate and up rows and the down column are coupled.
* ``layer``      a whole decoder block (attention and MLP), for layer-removal methods (ShortGPT).

Sparsity is a fraction of projection parameters (q/k/v/o, gate/up/down, their biases; no
embeddings or norms) on one of two bases, ``StructureSpec.sparsity_basis``:

* ``prunable_blocks`` (RESP's default): parameters removed from the *unprotected* layers over
  the parameters of the unprotected layers.  A KV head that lost its last query head is removed
  with its k/v rows, and they count.
* ``all_blocks`` (the authors'): removed projection parameters over the projections of *all*
  decoder layers, protected ones included in the denominator.  With ``attention: q_head`` the
  k/v rows never count as removed, because the authors never remove them: their GQA pruning
  zeroes q rows and o columns and only records the dead heads in a per-head mask
  (``uncc-efficient-ai/RESP`` ``resp/pruners/data_refresh_GISP.py``, ``prune_oneshot``:
  ``gqa_mask_record[i].data[submask] = 0`` for k/v, weights zeroed for q and o).  Their measured
  sparsity (``resp/pruners/non_uniform_pruner.py``, ``check_sparsity(real_pruning=False)`` with
  ``check_unstr_sparsity``) is ``1 − nonzero Linear weights / all decoder-layer parameters``: it
  also counts the layer norms (never zero, not Linear) as removed, a constant offset equal to
  their share of the decoder layers (4.4e-5 on Qwen3-8B, 0.22% on the testbed); ``all_blocks``
  leaves that offset out, so that the dense model is at 0.

Protected layers: ``protect_first`` (a fraction of the layers) is rounded up
(``protect_rounding: ceil``, RESP's default) or down (``floor``: the authors' ``int(L * 0.1)``,
``data_refresh_GISP.py`` ``prune_oneshot``: layers outside ``range(int(len(layers) * 0.1),
len(layers) - 1)`` get an infinite score).  On the 6-layer testbed ``protect_first: 0.1``
protects layer 0 with ``ceil`` and none of the first layers with ``floor``; on Qwen3-8B (36
layers) 4 layers with ``ceil``, 3 with ``floor``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..errors import RespError
from .adapter import DecoderAdapter, Geometry, adapter_for

UNIT_KINDS = ("kv_group", "q_head", "mlp_channel", "layer")


@dataclass(frozen=True)
class StructureSpec:
    attention: str = "kv_group"  # "kv_group" | "q_head" | "none"
    mlp: str = "channel"  # "channel" | "none"
    layers: bool = False  # prune whole decoder blocks instead of heads/channels
    protect_first: float = 0.1  # fraction of the first layers never pruned (see protect_rounding)
    protect_last: int = 1  # number of last layers never pruned
    protected_layers: tuple[int, ...] | None = None  # explicit list; overrides the two above
    min_keep: int = 1  # keep at least this many units of each kind in each layer
    sparsity_basis: str = "prunable_blocks"  # "prunable_blocks" (RESP) | "all_blocks" (the authors')
    protect_rounding: str = "ceil"  # "ceil" (RESP) | "floor" (the authors' int(L * 0.1))

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
        """Projection parameters of the unprotected layers: the ``prunable_blocks`` denominator."""
        per_layer = self.costs["layer"][:, 0]
        return int(per_layer[self.prunable_layers].sum().item())

    def all_parameter_total(self) -> int:
        """Projection parameters of every decoder layer: the ``all_blocks`` denominator."""
        return int(self.costs["layer"][:, 0].sum().item())

    def basis_total(self, basis: str | None = None) -> int:
        basis = basis or self.spec.sparsity_basis
        return self.all_parameter_total() if basis == "all_blocks" else self.prunable_parameter_total()

    def counts_kv_removal(self, basis: str | None = None) -> bool:
        """Whether the k/v rows of a KV head left without query heads count as removed on ``basis``:
        always, except on the authors' basis with single query heads as units (they never remove
        k/v; see the module docstring)."""
        basis = basis or self.spec.sparsity_basis
        return not (basis == "all_blocks" and self.spec.attention == "q_head" and not self.spec.layers)

    @property
    def kv_only(self) -> torch.Tensor:
        """[L, num_kv_heads]: parameters of the k and v rows of one KV head (without its query heads)."""
        return self.costs["kv_group"] - self.geometry.heads_per_group * self.costs["q_head"][:, :1]

    def unit_count_total(self) -> int:
        """Units of the run's kinds in every layer, protected ones included: the ``N`` of the
        authors' count threshold."""
        return int(sum(self.costs[k].numel() for k in self.kinds))


def protected_first_count(spec: StructureSpec, num_layers: int) -> int:
    """How many first layers ``protect_first`` protects: ``ceil`` or ``floor`` of
    ``protect_first * num_layers`` (rounded to 9 decimals first, so that 0.3 * 10 is 3)."""
    x = round(spec.protect_first * num_layers, 9)
    return math.floor(x) if spec.protect_rounding == "floor" else math.ceil(x)


def protected_layer_indices(spec: StructureSpec, num_layers: int) -> list[int]:
    if spec.protected_layers is not None:
        return sorted(set(spec.protected_layers))
    first = protected_first_count(spec, num_layers)
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


# --------------------------------------------------------------------------------------------------
# Reachability: a target the structures cannot reach is a user error, found before the run
# --------------------------------------------------------------------------------------------------

BASIS_WORDS = {"prunable_blocks": "unprotected layers' projection parameters",
               "all_blocks": "projection parameters of all layers"}
KIND_WORDS = {"kv_group": "KV groups", "q_head": "query heads", "mlp_channel": "MLP channels", "layer": "layers"}


def count_threshold(n_units: int, ratio: float) -> int:
    """Units removed in total at count ratio ``ratio`` by the authors' threshold: with ``N``
    units in all layers, ``k = N - int(N * (1 - r)) + 1`` and every unit scoring at most the
    ``k``-th smallest score goes (``data_refresh_GISP.py`` ``prune_oneshot``, ``torch.kthvalue``;
    ``r`` is a float32 tensor from ``torch.linspace``, so the product is taken in float32 as
    there).  It is one unit more than ``ceil(N * r)`` (at ``r = 0`` one unit goes); capped at N."""
    keep = int(n_units * (1 - torch.tensor(ratio, dtype=torch.float32)))
    return min(n_units, n_units - keep + 1)


def _removable_per_layer(structures: Structures, basis: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per layer: the most parameters (on ``basis``) and units that can be removed from the dense
    model with the protected layers and ``min_keep`` respected."""
    s, spec, g = structures, structures.spec, structures.geometry
    c = s.costs
    params = torch.zeros(g.num_layers, dtype=torch.float64)
    units = torch.zeros(g.num_layers, dtype=torch.long)
    mk = spec.min_keep
    for i in range(g.num_layers):
        if not bool(s.prunable_layers[i]):
            continue
        for kind in s.kinds:
            n = c[kind].shape[1]
            gone = n if kind == "layer" else n - min(mk, n)
            units[i] += gone
            params[i] += gone * float(c[kind][i, 0])
            if kind == "q_head" and s.counts_kv_removal(basis):
                live_groups = math.ceil((n - gone) / g.heads_per_group)
                params[i] += (g.num_kv_heads - live_groups) * float(s.kv_only[i, 0])
    return params, units


def max_reachable_sparsity(structures: Structures, basis: str | None = None) -> float:
    """The highest sparsity on ``basis`` that any allocator respecting the protected layers and
    ``min_keep`` can reach from the dense model."""
    total = structures.basis_total(basis)
    return float(_removable_per_layer(structures, basis)[0].sum()) / total if total else 0.0


def check_layer_fields(spec: StructureSpec, num_layers: int) -> None:
    """The layer-index fields against the model's layer count (``RespError`` naming the field)."""
    L = num_layers
    if spec.protected_layers is not None:
        bad = [i for i in spec.protected_layers if not 0 <= i < L]
        if bad:
            raise RespError(f"structures.protected_layers: layer {bad[0]} does not exist "
                            f"(the model has {L} layers, 0..{L - 1})")
    elif spec.protect_last >= L:
        raise RespError(f"structures.protect_last: {spec.protect_last} protects every one of the model's {L} layers")


def check_reachable(structures: Structures, target: float, budget: str = "parameters",
                    milestones=(), field: str = "schedule.params.target") -> None:
    """Refuse, with one line naming the field, structures that cannot reach ``target``.

    ``budget='parameters'``: ``target`` is a sparsity on the recipe's basis; ``'count'``: it is
    the authors' count ratio (:func:`count_threshold`).  ``milestones`` are sparsities on the
    basis that the run must reach (milestones judged on the reached sparsity).  Checks: layer
    indices in range, not every layer protected, ``min_keep`` leaving something to prune, and
    the target within what the unprotected layers can give."""
    spec, L = structures.spec, structures.geometry.num_layers
    check_layer_fields(spec, L)
    if target <= 0 and not milestones:
        return
    if not bool(structures.prunable_layers.any()):
        if spec.protected_layers is not None:
            raise RespError(f"structures.protected_layers: every one of the model's {L} layers is protected; "
                            f"nothing can be pruned")
        first = protected_first_count(spec, L)
        raise RespError(f"structures.protect_first: {spec.protect_first} ({spec.protect_rounding}: {first} layers) "
                        f"with protect_last {spec.protect_last} protects every one of the model's {L} layers; "
                        f"nothing can be pruned")
    params, units = _removable_per_layer(structures)
    if int(units.sum()) == 0:
        sizes = ", ".join(f"{structures.costs[k].shape[1]} {KIND_WORDS[k]}" for k in structures.kinds)
        raise RespError(f"structures.min_keep: {spec.min_keep} keeps every unit of every layer ({sizes} per layer); "
                        f"nothing can be pruned")
    basis = spec.sparsity_basis
    best = float(params.sum()) / structures.basis_total()
    protected = [i for i in range(L) if not bool(structures.prunable_layers[i])]
    limits = f"protected layers {protected}, structures.min_keep {spec.min_keep}"
    if budget == "count":
        n = structures.unit_count_total()
        need, most = count_threshold(n, target), int(units.sum())
        if need > most:
            raise RespError(f"{field}: {target} cannot be reached: the count threshold removes {need} of the "
                            f"{n} units, but at most {most} can go ({limits})")
    elif target > best * (1 + 1e-9):
        raise RespError(f"{field}: {target} cannot be reached: at most {best:.4f} of the {BASIS_WORDS[basis]} "
                        f"can be removed ({limits})")
    for m in milestones:
        if budget == "parameters" and m > target + 1e-9:
            raise RespError(f"schedule.params.milestones: {m} is beyond the target {target}: the run never reaches it")
        if m > best * (1 + 1e-9):
            raise RespError(f"schedule.params.milestones: {m} cannot be reached: at most {best:.4f} of the "
                            f"{BASIS_WORDS[basis]} can be removed ({limits})")


def check_plan(structures: Structures, steps, budget: str = "parameters") -> None:
    """:func:`check_reachable` for a schedule's steps: the last step's target and every
    milestone judged on the reached sparsity (``Step.measured_milestones``)."""
    if not steps:
        return
    target = max(s.sparsity for s in steps)
    measured = sorted({m for s in steps for m in getattr(s, "measured_milestones", {})})
    check_reachable(structures, target, budget, measured)


def structures_from_config(config, spec: StructureSpec) -> Structures:
    """The structures of a model built from its config alone, on the meta device (no weights
    are loaded or allocated): for checks at validate time."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return build_structures(adapter_for(model), spec)
