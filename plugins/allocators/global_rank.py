"""Allocators that turn scores into the next nested mask.

* ``global``:  every candidate unit of every unprotected layer (heads and channels together) is
  ranked by its (normalized) score; the lowest are removed until the removed parameters reach
  the target fraction of the unprotected blocks' parameters (RESP Eq. 5, GISP).  A unit whose
  removal would overshoot the budget by more than it closes the gap is skipped in favour of the
  next (smaller) one, so mixed unit sizes (KV groups vs channels) land close to the target.
* ``uniform``: every unprotected layer loses the same fraction of each unit kind, lowest scores
  first (the per-layer allocation of Wanda-sp and LLM-Pruner).

Both keep ``structures.min_keep`` units of each kind in each layer and never revive a unit.
"""

from __future__ import annotations

import torch

from resp_core import hookimpl
from resp_core.interfaces import Allocator, Params, Scores
from resp_core.model.masks import MaskSet, sparsity_of
from resp_core.model.structures import Structures


def _alive(mask: MaskSet, kind: str) -> torch.Tensor:
    return mask.effective()[kind].clone()


def _removal_cost(structures: Structures, kind: str) -> torch.Tensor:
    return structures.costs[kind]


class GlobalRank(Allocator):
    """Global ranking across layers and block types, filling a parameter budget."""

    class Params(Params):
        pass

    def __init__(self, params=None):
        self.params = params

    def allocate(self, scores: Scores, structures: Structures, mask: MaskSet, target: float) -> MaskSet:
        new = mask.clone()
        total = structures.prunable_parameter_total()
        removed = sparsity_of(mask, structures) * total
        budget = target * total
        if removed >= budget:
            return new
        entries = []  # (score, kind, layer, unit)
        alive_count = {}
        for kind in structures.kinds:
            alive = _alive(mask, kind) & structures.candidate(kind)
            alive_count[kind] = _alive(mask, kind).sum(dim=1)
            s = scores.values[kind]
            idx = alive.nonzero()
            for (layer, unit), val in zip(idx.tolist(), s[alive].tolist()):
                entries.append((val, kind, layer, unit))
        entries.sort(key=lambda e: e[0])
        min_keep = structures.spec.min_keep
        for val, kind, layer, unit in entries:
            if removed >= budget:
                break
            if kind != "layer" and alive_count[kind][layer] <= min_keep:  # min_keep: units within a layer
                continue
            cost = float(_removal_cost(structures, kind)[layer, unit])
            if removed + cost > budget and (removed + cost - budget) >= (budget - removed):
                continue  # overshoots more than it helps: look for a smaller unit further down
            new[kind][layer, unit] = False
            alive_count[kind][layer] -= 1
            removed += cost
        return new


class UniformPerLayer(Allocator):
    """The same fraction of each unit kind removed in every unprotected layer."""

    class Params(Params):
        pass

    def __init__(self, params=None):
        self.params = params

    def allocate(self, scores: Scores, structures: Structures, mask: MaskSet, target: float) -> MaskSet:
        return allocate_per_layer(scores, structures, mask, torch.full((structures.geometry.num_layers,), target))


def allocate_per_layer(scores: Scores, structures: Structures, mask: MaskSet, ratios: torch.Tensor) -> MaskSet:
    """Remove, in each unprotected layer i, the lowest-scored units of each kind until a fraction
    ``ratios[i]`` of that kind's units is gone (used by ``uniform`` and by OWL-style allocators)."""
    new = mask.clone()
    for kind in structures.kinds:
        alive = _alive(mask, kind)
        n_units = alive.shape[1]
        for layer in range(alive.shape[0]):
            if not bool(structures.prunable_layers[layer]):
                continue
            keep_target = max(structures.spec.min_keep, int(round(n_units * (1 - float(ratios[layer])))))
            live = alive[layer].nonzero().flatten()
            excess = len(live) - keep_target
            if excess <= 0:
                continue
            order = scores.values[kind][layer, live].argsort()
            new[kind][layer, live[order[:excess]]] = False
    return new


@hookimpl
def register_allocators(register):
    register("global", GlobalRank)
    register("uniform", UniformPerLayer)
