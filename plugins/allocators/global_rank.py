"""Allocators that turn scores into the next nested mask.

* ``global``:  every candidate unit of every unprotected layer (heads and channels together) is
  ranked by its (normalized) score and the lowest are removed until a budget is met (RESP Eq. 5,
  GISP).  Two budgets (``params.budget``):

  - ``parameters`` (RESP's default): the removed parameters reach ``target`` times the
    denominator of the recipe's ``structures.sparsity_basis``.  Each unit costs its *marginal*
    parameters: a query head costs its q rows and o columns, plus the k/v rows of its KV head
    when it is the last live head of that group and the basis counts k/v removal (so a group
    emptied head by head costs exactly what removing it whole costs; on the authors' basis with
    ``q_head`` units k/v never count and a head costs its q/o only — the authors' accounting).
    A unit whose removal would overshoot the budget by more than it closes the gap is skipped
    in favour of the next (smaller) one, so mixed unit sizes land within half a unit of the target.
  - ``count`` (the authors'): a threshold on the number of units.  With N units of the pruned
    kinds in all layers (protected ones included), the ``N - int(N·(1 − r)) + 1`` lowest-scored
    units are removed in total, counting those already removed (``uncc-efficient-ai/RESP``
    ``resp/pruners/data_refresh_GISP.py`` and ``grad_sp_global.py``, ``prune_oneshot``: one
    ``torch.kthvalue`` over the concatenated head and channel scores, protected layers set to
    ``inf``, pruned units scoring 0).  The schedule's target is then a count ratio, not a
    sparsity (the authors' ``ratio: 0.7``); milestones are judged on the measured sparsity.

  Two thresholds (``params.threshold``), i.e. what happens at the unit that would overshoot:

  - ``skip_overshoot`` (RESP's default): the unit is skipped when it overshoots the budget by
    more than it closes the gap (above), and cheaper units further down the order fill the gap;
    a costly head can so be postponed behind channels that score higher.
  - ``kthvalue`` (the authors', set by ``mode: paper``): the removal is always a prefix of the
    ascending order, the shortest one that reaches the budget, so exactly the k lowest-scored
    units go whatever their size (``prune_oneshot``: every unit scoring at most the ``kthvalue``
    threshold is removed; ties here are broken by position, there all tied units go).  Under
    ``budget: count`` every unit costs 1 and nothing can overshoot: both thresholds remove the
    same k units.

  The ranking is vectorized: one stable sort of all candidates, a cumulative sum of their costs
  up to the first unit that does not fit, then a short exact walk over the remaining units for
  the last gap (where skipping, ``min_keep`` and the k/v cost of a group's last head can change
  from one unit to the next).  Results equal a unit-by-unit loop's (tests pin it).
* ``uniform``: every unprotected layer loses the same fraction of each unit kind, lowest scores
  first (the per-layer allocation of Wanda-sp and LLM-Pruner).

Both keep ``structures.min_keep`` units of each kind in each layer and never revive a unit.
"""

from __future__ import annotations

from typing import Literal

import torch

from resp_core import hookimpl
from resp_core.interfaces import Allocator, Params, Scores
from resp_core.model.masks import MaskSet, removed_parameters
from resp_core.model.structures import Structures, count_threshold


def _alive(mask: MaskSet, kind: str) -> torch.Tensor:
    return mask.effective()[kind].clone()


class GlobalRank(Allocator):
    """Global ranking across layers and block types, filling a parameter (or unit-count) budget."""

    class Params(Params):
        budget: Literal["parameters", "count"] = "parameters"
        threshold: Literal["skip_overshoot", "kthvalue"] = "skip_overshoot"

    def __init__(self, params=None):
        self.params = params or self.Params()

    def allocate(self, scores: Scores, structures: Structures, mask: MaskSet, target: float) -> MaskSet:
        return global_allocate(scores, structures, mask, target, self.params.budget, self.params.threshold)


def global_allocate(scores: Scores, structures: Structures, mask: MaskSet, target: float,
                    budget: str = "parameters", threshold: str = "skip_overshoot") -> MaskSet:
    """The ``global`` allocator's removal (see the module docstring)."""
    new = mask.clone()
    e = mask.effective()
    g = structures.geometry
    kinds = structures.kinds
    count = budget == "count"
    if count:
        limit = float(count_threshold(structures.unit_count_total(), target))
        removed = float(sum(int((~e[k]).sum()) for k in kinds))
    else:
        limit = target * structures.basis_total()
        removed = float(removed_parameters(mask, structures).sum())
    if removed >= limit:
        return new

    # --- every live candidate, in the order a unit-by-unit loop would build them --------------
    vals, costs, kind_ix, layer_ix, unit_ix = [], [], [], [], []
    for ki, kind in enumerate(kinds):
        alive = e[kind] & structures.candidate(kind)
        idx = alive.nonzero()
        vals.append(scores.values[kind][alive].double())
        costs.append(torch.ones(len(idx), dtype=torch.float64) if count else structures.costs[kind][alive].double())
        kind_ix.append(torch.full((len(idx),), ki, dtype=torch.long))
        layer_ix.append(idx[:, 0])
        unit_ix.append(idx[:, 1])
    vals, base, kind_ix = torch.cat(vals), torch.cat(costs), torch.cat(kind_ix)
    layer_ix, unit_ix = torch.cat(layer_ix), torch.cat(unit_ix)
    n = len(vals)
    if n == 0:
        return new
    order = torch.sort(vals, stable=True).indices
    base, kind_ix, layer_ix, unit_ix = base[order], kind_ix[order], layer_ix[order], unit_ix[order]
    L = g.num_layers

    # min_keep, per (kind, layer) group; whole layers are exempt
    grp = kind_ix * L + layer_ix
    alive_per_grp = torch.zeros(len(kinds) * L, dtype=torch.long)
    for ki, kind in enumerate(kinds):
        alive_per_grp[ki * L:(ki + 1) * L] = e[kind].sum(dim=1)
    exempt = torch.tensor([k == "layer" for k in kinds])[kind_ix]
    min_keep = structures.spec.min_keep

    # the k/v rows of a KV head go with its last query head, when the basis counts them
    kv_bonus = torch.zeros(n, dtype=torch.float64)
    kvg = torch.full((n,), -1, dtype=torch.long)
    kv_alive = torch.zeros(0, dtype=torch.long)
    if "q_head" in kinds and not count and structures.counts_kv_removal():
        is_q = torch.tensor([k == "q_head" for k in kinds])[kind_ix]
        group_of = g.kv_group_of_head()
        qg = group_of[unit_ix[is_q]]
        kvg[is_q] = layer_ix[is_q] * g.num_kv_heads + qg
        kv_bonus[is_q] = structures.kv_only.double()[layer_ix[is_q], qg]
        kv_alive = torch.zeros(L, g.num_kv_heads, dtype=torch.long).index_put_(
            (torch.arange(L)[:, None].expand(L, g.num_heads), group_of[None, :].expand(L, g.num_heads)),
            e.q_head.long(), accumulate=True).reshape(-1)

    # --- prefix: every eligible unit is removed until the first one that does not fit ----------
    pos = torch.arange(n)
    by_grp = torch.sort(grp, stable=True).indices  # within a group: ascending score order
    counts_g = torch.bincount(grp, minlength=len(alive_per_grp))
    first_pos_in_grp = torch.cumsum(counts_g, 0) - counts_g
    rank = torch.empty(n, dtype=torch.long)
    rank[by_grp] = torch.arange(n) - first_pos_in_grp[grp[by_grp]]
    eligible = exempt | (rank < alive_per_grp[grp] - min_keep)
    cost = base.clone()
    has_kv = kvg >= 0
    if bool(has_kv.any()):
        last = torch.full((L * g.num_kv_heads,), -1, dtype=torch.long)
        last = last.scatter_reduce(0, kvg[has_kv], pos[has_kv], "amax")
        is_last = has_kv & (pos == last[kvg.clamp_min(0)])
        # a head is its group's last only if every other live head of the group is a candidate
        # removed before it; all live heads of an unprotected layer are candidates
        cost = torch.where(is_last, cost + kv_bonus, cost)
    paid = torch.where(eligible, cost, torch.zeros_like(cost))
    cum = removed + torch.cumsum(paid, 0)
    if threshold == "kthvalue":  # the shortest prefix of the order that reaches the budget
        reach = eligible & (cum >= limit)
        p = int(reach.nonzero()[0]) + 1 if bool(reach.any()) else n
        take = torch.zeros(n, dtype=torch.bool)
        take[:p] = eligible[:p]
        return _apply_take(new, kinds, take, kind_ix, layer_ix, unit_ix)
    over = eligible & (cum > limit)
    p = int(over.nonzero()[0]) if bool(over.any()) else n
    take = torch.zeros(n, dtype=torch.bool)
    take[:p] = eligible[:p]
    if p > 0:
        removed = float(cum[p - 1])

    # --- tail: the last gap, walked unit by unit with the live state --------------------------
    if p < n and removed < limit:
        left = alive_per_grp - torch.bincount(grp[take], minlength=len(alive_per_grp))
        if kv_alive.numel():
            kv_alive = kv_alive - torch.bincount(kvg[take & has_kv], minlength=kv_alive.numel())
        cand = torch.arange(p, n)
        # a unit that cannot be taken now never can later (the gap only shrinks, costs only grow)
        c0 = base[cand]
        cand = cand[~((removed + c0 > limit) & ((removed + c0 - limit) >= (limit - removed)))]
        ptr, window = 0, 256
        while ptr < len(cand) and removed < limit:
            idx = cand[ptr:ptr + window]
            c = base[idx]
            if kv_alive.numel():
                k = kvg[idx]
                c = torch.where((k >= 0) & (kv_alive[k.clamp_min(0)] == 1), c + kv_bonus[idx], c)
            ok = (exempt[idx] | (left[grp[idx]] > min_keep)) & \
                ~((removed + c > limit) & ((removed + c - limit) >= (limit - removed)))
            if not bool(ok.any()):
                ptr += window
                window *= 2
                continue
            j = int(ok.nonzero()[0])
            u = int(idx[j])
            take[u] = True
            removed += float(c[j])
            left[grp[u]] -= 1
            if kv_alive.numel() and int(kvg[u]) >= 0:
                kv_alive[kvg[u]] -= 1
            ptr += j + 1
            window = 256

    return _apply_take(new, kinds, take, kind_ix, layer_ix, unit_ix)


def _apply_take(new: MaskSet, kinds, take, kind_ix, layer_ix, unit_ix) -> MaskSet:
    for ki, kind in enumerate(kinds):
        sel = take & (kind_ix == ki)
        new[kind][layer_ix[sel], unit_ix[sel]] = False
    return new


class UniformPerLayer(Allocator):
    """The same fraction of each unit kind removed in every unprotected layer.

    ``target_on: units`` (default): ``target`` is that fraction (the authors' per-layer ``ratio``
    of ``baseline_uniform_wanda``).  ``target_on: sparsity``: the fraction is the smallest whose
    mask reaches ``target`` on the recipe's sparsity basis (bisection), so that a uniform
    method's 20% is the same sparsity as the other methods' 20%: what the authors set by hand for
    Wanda-sp on Qwen3-8B (uncc-efficient-ai/RESP ``configs/section5/main/wanda_gsm8k_{20,30,40}.yaml``:
    ``ratio`` 0.24 / 0.36 / 0.47 for 20 / 30 / 40% of all blocks).  The decision in a layer
    depends on that layer's scores only (``per_layer``)."""

    per_layer = True

    class Params(Params):
        target_on: Literal["units", "sparsity"] = "units"

    def __init__(self, params=None):
        self.params = params or self.Params()

    def allocate(self, scores: Scores, structures: Structures, mask: MaskSet, target: float) -> MaskSet:
        L = structures.geometry.num_layers
        if self.params.target_on == "units":
            return allocate_per_layer(scores, structures, mask, torch.full((L,), target))
        from resp_core.model.masks import sparsity_of

        def at(ratio: float) -> MaskSet:
            return allocate_per_layer(scores, structures, mask, torch.full((L,), ratio))

        if sparsity_of(mask, structures) >= target - 1e-9:
            return mask.clone()
        lo, hi = 0.0, 1.0
        for _ in range(40):  # unit fractions are multiples of 1/n: 40 halvings resolve them
            mid = (lo + hi) / 2
            if sparsity_of(at(mid), structures) >= target - 1e-9:
                hi = mid
            else:
                lo = mid
        return at(hi)


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
