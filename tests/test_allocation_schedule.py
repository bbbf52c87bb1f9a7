"""Allocators (global ranking over a parameter budget, uniform per layer) and schedules
(progressive with milestones and regeneration, one-shot), on hand-made scores."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from conftest import tiny_qwen3
from resp_plugins.allocators.global_rank import GlobalRank, UniformPerLayer, allocate_per_layer, global_allocate
from resp_plugins.schedules.progressive import OneShot, Progressive
from resp_core.errors import RespError
from resp_core.interfaces import Scores, Step
from resp_core.model.adapter import Geometry, adapter_for
from resp_core.model.masks import MaskSet, removed_parameters, sparsity_of, sparsity_report
from resp_core.model.structures import (StructureSpec, Structures, build_structures, check_plan, check_reachable,
                                        count_threshold, max_reachable_sparsity, protected_first_count,
                                        protected_layer_indices)

# tiny_qwen3(layers=4, heads=6, kv=3, head_dim=8, hidden=32, inter=48), no biases:
PER_Q = 2 * 32 * 8  # q rows + o columns of one query head
KV_ONLY = 2 * 32 * 8  # k and v rows of one KV head
KV = 2 * PER_Q + KV_ONLY  # a KV group: its 2 query heads + k and v rows
CH = 3 * 32  # an MLP channel: gate row, up row, down column
LAYER = 6 * PER_Q + 3 * 2 * 32 * 8 + 48 * CH  # 9216


@pytest.fixture(scope="module")
def adapter():
    return adapter_for(tiny_qwen3(seed=0, layers=4, heads=6, kv=3, head_dim=8, hidden=32, inter=48))


def _structures(adapter, **spec):
    return build_structures(adapter, StructureSpec(**spec))


def _scores(fill: float = 10.0, L: int = 4) -> dict[str, torch.Tensor]:
    return {"kv_group": torch.full((L, 3), fill), "q_head": torch.full((L, 6), fill),
            "mlp_channel": torch.full((L, 48), fill), "layer": torch.full((L, 1), fill)}


def _removed(new: MaskSet, old: MaskSet, kind: str) -> list[tuple[int, int]]:
    return [tuple(x) for x in (old[kind] & ~new[kind]).nonzero().tolist()]


def test_costs_used_here(adapter):
    s = _structures(adapter, protected_layers=(0, 3))
    assert torch.all(s.costs["kv_group"] == KV) and torch.all(s.costs["mlp_channel"] == CH)
    assert torch.all(s.costs["layer"] == LAYER)
    assert s.prunable_parameter_total() == 2 * LAYER
    assert s.prunable_layers.tolist() == [False, True, True, False]


# --------------------------------------------------------------------------------------------------
# GlobalRank
# --------------------------------------------------------------------------------------------------

def test_global_removes_lowest_across_layers_and_kinds(adapter):
    s = _structures(adapter, protected_layers=(0, 3))
    v = _scores()
    v["kv_group"][2, 1] = 0.001  # the lowest unit overall: a whole KV group of layer 2
    v["mlp_channel"][1, :] = 1.0 + 0.01 * torch.arange(48)  # then the channels of layer 1, in order
    v["mlp_channel"][2, :] = 5.0
    v["kv_group"][0, :] = -5.0  # protected layers: lowest of all, never touched
    v["mlp_channel"][3, :] = -5.0
    full = MaskSet.full(adapter.geometry)
    budget = 1536 + 3 * CH + 76  # 1900: the 4th channel overshoots by 20 < the 76 still missing
    new = GlobalRank().allocate(Scores(v), s, full, budget / s.prunable_parameter_total())
    assert _removed(new, full, "kv_group") == [(2, 1)]
    assert _removed(new, full, "mlp_channel") == [(1, 0), (1, 1), (1, 2), (1, 3)]
    assert _removed(new, full, "q_head") == [] and bool(new.layer.all())
    assert sparsity_of(new, s) * s.prunable_parameter_total() == pytest.approx(KV + 4 * CH)
    assert new.is_subset_of(full) and full.q_head.all()  # the input mask is not modified


def test_global_budget_is_met_within_half_a_unit(adapter):
    s = _structures(adapter, protect_first=0.25, protect_last=1)
    gen = torch.Generator().manual_seed(0)
    full = MaskSet.full(adapter.geometry)
    v = {k: torch.rand(t.shape, generator=gen) for k, t in _scores().items()}
    v["kv_group"] *= 0.05  # KV groups compete with channels
    for target in (0.05, 0.13, 0.3, 0.42):
        new = GlobalRank().allocate(Scores(v), s, full, target)
        got = sparsity_of(new, s) * s.prunable_parameter_total()
        assert abs(got - target * s.prunable_parameter_total()) <= KV / 2
        # within a kind (equal unit sizes) every removed unit scores below every kept candidate
        for kind in ("kv_group", "mlp_channel"):
            cand = s.candidate(kind)
            gone = cand & ~new[kind]
            kept = cand & new[kind]
            if gone.any() and kept.any():
                assert float(v[kind][gone].max()) <= float(v[kind][kept].min())
        assert bool(new.kv_group[[0, 3]].all()) and bool(new.mlp_channel[[0, 3]].all())


def test_protected_layers(adapter):
    assert protected_layer_indices(StructureSpec(protect_first=0.25, protect_last=1), 4) == [0, 3]
    assert protected_layer_indices(StructureSpec(protect_first=0.3, protect_last=1), 4) == [0, 1, 3]  # rounded up
    assert protected_layer_indices(StructureSpec(protect_first=0.0, protect_last=0), 4) == []
    assert protected_layer_indices(StructureSpec(protect_first=0.5, protect_last=2, protected_layers=(2,)), 4) == [2]
    full = MaskSet.full(adapter.geometry)
    for spec, protected in ((dict(protect_first=0.3, protect_last=1), [0, 1, 3]),
                            (dict(protected_layers=(1, 2)), [1, 2]),
                            (dict(protect_first=0.0, protect_last=2), [2, 3])):
        s = _structures(adapter, **spec)
        v = {k: torch.rand(t.shape) + 1 for k, t in _scores().items()}
        for i in protected:  # make the protected layers the most attractive
            v["kv_group"][i] = -1.0
            v["mlp_channel"][i] = -1.0
        new = GlobalRank().allocate(Scores(v), s, full, 0.5)
        assert sparsity_of(new, s) > 0.3
        for i in range(4):
            untouched = bool(new.kv_group[i].all()) and bool(new.mlp_channel[i].all())
            assert untouched == (i in protected), (spec, i)


def test_min_keep(adapter):
    full = MaskSet.full(adapter.geometry)
    for min_keep in (1, 2, 5):
        s = _structures(adapter, protected_layers=(0, 3), min_keep=min_keep)
        v = {k: torch.rand(t.shape) for k, t in _scores().items()}
        new = GlobalRank().allocate(Scores(v), s, full, 0.95)  # unreachable: stops at min_keep
        for i in (1, 2):
            assert int(new.kv_group[i].sum()) == min(min_keep, 3)
            assert int(new.mlp_channel[i].sum()) == min_keep
        # the survivors of a kind in a layer are its best units
        for i in (1, 2):
            kept = new.mlp_channel[i]
            assert float(v["mlp_channel"][i][kept].min()) >= float(v["mlp_channel"][i][~kept].max())


def test_global_never_revives_and_is_nested(adapter):
    s = _structures(adapter, protected_layers=(0,))
    start = MaskSet.full(adapter.geometry)
    start.kv_group[1, 0] = False
    start.mlp_channel[2, :5] = False
    gen = torch.Generator().manual_seed(1)
    prev = start
    last = sparsity_of(start, s)
    for target in (0.2, 0.3, 0.45, 0.6):
        v = {k: torch.rand(t.shape, generator=gen) for k, t in _scores().items()}
        v["kv_group"][1, 0] = 100.0  # removed units scoring best stay removed
        v["mlp_channel"][2, :5] = 100.0
        new = GlobalRank().allocate(Scores(v), s, prev, target)
        assert new.is_subset_of(prev)
        assert not bool(new.kv_group[1, 0]) and not bool(new.mlp_channel[2, :5].any())
        for kind in ("kv_group", "q_head", "mlp_channel", "layer"):
            assert not bool((new[kind] & ~prev[kind]).any()), kind
        now = sparsity_of(new, s)
        assert now > last
        prev, last = new, now


def test_global_at_or_above_target_changes_nothing(adapter):
    s = _structures(adapter, protected_layers=(0,))
    m = MaskSet.full(adapter.geometry)
    m.mlp_channel[1, :30] = False
    sp = sparsity_of(m, s)
    v = {k: torch.rand(t.shape) for k, t in _scores().items()}
    assert GlobalRank().allocate(Scores(v), s, m, sp) == m
    assert GlobalRank().allocate(Scores(v), s, m, sp / 2) == m
    assert GlobalRank().allocate(Scores(v), s, MaskSet.full(adapter.geometry), 0.0) == MaskSet.full(adapter.geometry)


def test_global_q_head_structures(adapter):
    s = _structures(adapter, attention="q_head", mlp="none", protected_layers=(0, 3))
    assert s.kinds == ["q_head"]
    v = _scores()
    v["q_head"][1] = torch.tensor([0.1, 0.2, 9.0, 9.0, 9.0, 9.0])
    v["q_head"][2] = torch.tensor([9.0, 9.0, 9.0, 0.3, 9.0, 9.0])
    full = MaskSet.full(adapter.geometry)
    # heads (1, 0) and (1, 1) empty KV group 0 of layer 1: the second one also frees its k/v rows,
    # so the two cost 2 * PER_Q + KV_ONLY = 3 * PER_Q, the whole budget (marginal cost)
    new = GlobalRank().allocate(Scores(v), s, full, 3 * PER_Q / s.prunable_parameter_total())
    assert _removed(new, full, "q_head") == [(1, 0), (1, 1)]
    assert bool(new.mlp_channel.all()) and bool(new.kv_group.all())
    assert new.effective().kv_group[1].tolist() == [False, True, True]  # group 0 lost both heads
    assert sparsity_of(new, s) * s.prunable_parameter_total() == 3 * PER_Q


def test_global_removes_whole_layers(adapter):
    s = _structures(adapter, layers=True, protected_layers=(0,))
    assert s.kinds == ["layer"]
    v = {"layer": torch.tensor([[-1.0], [0.5], [0.1], [0.9]])}
    full = MaskSet.full(adapter.geometry)
    one = GlobalRank().allocate(Scores(v), s, full, 0.3)  # 1 of 3 prunable layers is closest to 30%
    assert one.layer[:, 0].tolist() == [True, True, False, True]
    two = GlobalRank().allocate(Scores(v), s, one, 0.6)
    assert two.layer[:, 0].tolist() == [True, False, False, True]
    assert sparsity_of(two, s) == pytest.approx(2 / 3)
    assert bool(two.q_head.all()) and bool(two.mlp_channel.all())  # only the layer axis is used


# --------------------------------------------------------------------------------------------------
# UniformPerLayer / allocate_per_layer
# --------------------------------------------------------------------------------------------------

def test_uniform_removes_same_count_per_prunable_layer(adapter):
    s = _structures(adapter, protected_layers=(0, 3))
    gen = torch.Generator().manual_seed(2)
    v = {k: torch.rand(t.shape, generator=gen) for k, t in _scores().items()}
    full = MaskSet.full(adapter.geometry)
    new = UniformPerLayer().allocate(Scores(v), s, full, 0.25)
    for i in (1, 2):
        assert int((~new.kv_group[i]).sum()) == 1  # 3 * 0.75 = 2.25 -> keep 2
        assert int((~new.mlp_channel[i]).sum()) == 12  # 48 * 0.75 = 36 kept
        assert int(v["kv_group"][i].argmin()) == int((~new.kv_group[i]).nonzero())
        gone = set((~new.mlp_channel[i]).nonzero().flatten().tolist())
        assert gone == set(v["mlp_channel"][i].argsort()[:12].tolist())
    for i in (0, 3):
        assert bool(new.kv_group[i].all()) and bool(new.mlp_channel[i].all())
    assert bool(new.q_head.all())


def test_uniform_tops_up_partially_pruned_layers_and_never_revives(adapter):
    s = _structures(adapter, protected_layers=(0, 3))
    start = MaskSet.full(adapter.geometry)
    start.mlp_channel[1, :5] = False
    v = {k: torch.rand(t.shape) for k, t in _scores().items()}
    v["mlp_channel"][1, :5] = 100.0
    new = UniformPerLayer().allocate(Scores(v), s, start, 0.25)
    assert int(new.mlp_channel[1].sum()) == int(new.mlp_channel[2].sum()) == 36
    assert not bool(new.mlp_channel[1, :5].any())
    assert new.is_subset_of(start)


def test_allocate_per_layer_ratios_and_min_keep(adapter):
    s = _structures(adapter, protected_layers=(0,), min_keep=2)
    v = {k: torch.rand(t.shape) for k, t in _scores().items()}
    full = MaskSet.full(adapter.geometry)
    new = allocate_per_layer(Scores(v), s, full, torch.tensor([0.9, 0.5, 0.25, 0.99]))
    assert new.mlp_channel.sum(1).tolist() == [48, 24, 36, 2]  # layer 0 protected, min_keep 2
    assert new.kv_group.sum(1).tolist() == [3, 2, 2, 2]  # round(1.5) = 2, round(2.25) = 2, min_keep


# --------------------------------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------------------------------

def _steps(**params):
    return Progressive(Progressive.Params(**params)).steps()


def test_progressive_steps_milestones_and_regeneration():
    steps = _steps(target=0.5, steps=4, milestones=[0.2, 0.25], regenerate_fraction=0.5)
    assert [s.sparsity for s in steps] == [0.125, 0.2, 0.25, 0.375, 0.5]
    assert [s.milestone for s in steps] == [False, True, True, False, True]
    assert [s.regenerate_fraction for s in steps] == [0.0, 0.5, 0.5, 0.0, 0.0]  # never at the target


def test_progressive_target_is_last_and_always_a_milestone():
    for params in (dict(target=0.3), dict(target=0.3, steps=1), dict(target=0.7, steps=7, milestones=[0.1, 0.7]),
                   dict(target=0.4, steps=3, milestones=[0.1])):
        steps = _steps(**params)
        assert steps[-1].sparsity == pytest.approx(params["target"])
        assert steps[-1].milestone and steps[-1].regenerate_fraction == 0.0
        sp = [s.sparsity for s in steps]
        assert sp == sorted(sp) and len(set(sp)) == len(sp)
        for m in params.get("milestones", []):
            assert any(s.sparsity == pytest.approx(m) and s.milestone for s in steps)
    steps = _steps(target=0.3)  # default: 8 equal steps, only the target is a milestone
    assert len(steps) == 8 and [s.milestone for s in steps] == [False] * 7 + [True]
    assert [s.sparsity for s in steps] == pytest.approx([0.3 * (k + 1) / 8 for k in range(8)])
    # a milestone equal to an equal step is not duplicated; default rho is 1
    steps = _steps(target=0.4, steps=4, milestones=[0.2])
    assert [s.sparsity for s in steps] == [0.1, 0.2, 0.3, 0.4]
    assert [s.regenerate_fraction for s in steps] == [0.0, 1.0, 0.0, 0.0]
    # rho = 0: RESP without regeneration
    assert all(s.regenerate_fraction == 0 for s in _steps(target=0.4, milestones=[0.1, 0.2], regenerate_fraction=0))


@pytest.mark.parametrize("params", [
    dict(target=1.0),
    dict(target=1.5),
    dict(target=-0.1),
    dict(target=0.5, milestones=[0.3, 0.2]),
    dict(target=0.5, milestones=[0.2, 0.2]),
    dict(target=0.5, milestones=[0.2, 0.6]),
    dict(target=0.5, milestones=[-0.1]),
    dict(target=0.5, regenerate_fraction=1.5),
    dict(target=0.5, regenerate_fraction=-0.1),
    dict(target=0.5, steps=0),
    dict(target=0.5, bogus=1),
    dict(steps=4),
])
def test_progressive_validation_errors(params):
    with pytest.raises(ValidationError):
        Progressive.Params(**params)


def test_progressive_valid_edges():
    Progressive.Params(target=0.0)
    Progressive.Params(target=0.5, milestones=[0.5], regenerate_fraction=0.0)
    Progressive.Params(target=0.5, regenerate_fraction=1.0)


def test_oneshot():
    steps = OneShot(OneShot.Params(target=0.35)).steps()
    assert len(steps) == 1
    assert steps[0].sparsity == 0.35 and steps[0].milestone and steps[0].regenerate_fraction == 0.0
    for bad in (1.0, -0.2):
        with pytest.raises(ValidationError):
            OneShot.Params(target=bad)
    with pytest.raises(ValidationError):
        OneShot.Params(target=0.3, steps=2)


def test_progressive_regenerate_overrides():
    steps = _steps(target=0.5, steps=5, milestones=[0.2, 0.3], regenerate_fraction=0.8,
                   regenerate_overrides={0.3: 0.0})
    assert {s.sparsity: s.regenerate_fraction for s in steps if s.milestone} == {0.2: 0.8, 0.3: 0.0, 0.5: 0.0}
    with pytest.raises(ValidationError):  # not a milestone
        Progressive.Params(target=0.5, milestones=[0.2], regenerate_overrides={0.25: 0.5})
    with pytest.raises(ValidationError):
        Progressive.Params(target=0.5, milestones=[0.2], regenerate_overrides={0.2: 1.5})


# --------------------------------------------------------------------------------------------------
# Sparsity bases, protect rounding, exact q_head accounting
# --------------------------------------------------------------------------------------------------

def test_all_blocks_counts_protected_layers_in_the_denominator(adapter):
    s = _structures(adapter, protected_layers=(0, 3))
    a = _structures(adapter, protected_layers=(0, 3), sparsity_basis="all_blocks")
    assert a.basis_total() == 4 * LAYER and s.basis_total() == 2 * LAYER
    m = MaskSet.full(adapter.geometry)
    m.mlp_channel[1, :10] = False
    m.kv_group[2, 0] = False
    removed = 10 * CH + KV
    rep = sparsity_report(m, s)
    assert rep["sparsity_prunable_blocks"] == pytest.approx(removed / (2 * LAYER), rel=1e-12)
    assert rep["sparsity_all_blocks"] == pytest.approx(removed / (4 * LAYER), rel=1e-12)
    assert rep["sparsity"] == rep["sparsity_prunable_blocks"]
    assert sparsity_report(m, a)["sparsity"] == rep["sparsity_all_blocks"] == sparsity_of(m, a)


def test_removals_in_protected_layers_count_only_on_all_blocks(adapter):
    """A mask that removed units of a protected layer (e.g. loaded with ``init_from``): the
    prunable_blocks figure is about the unprotected layers only."""
    s = _structures(adapter, protected_layers=(0, 3))
    m = MaskSet.full(adapter.geometry)
    m.mlp_channel[0, :5] = False  # protected layer 0
    m.mlp_channel[1, :2] = False
    rep = sparsity_report(m, s)
    assert rep["sparsity_prunable_blocks"] == pytest.approx(2 * CH / (2 * LAYER), rel=1e-12)
    assert rep["sparsity_all_blocks"] == pytest.approx(7 * CH / (4 * LAYER), rel=1e-12)


def test_kv_rows_never_count_on_all_blocks_with_q_heads(adapter):
    s = _structures(adapter, attention="q_head", protected_layers=(0, 3))
    a = _structures(adapter, attention="q_head", protected_layers=(0, 3), sparsity_basis="all_blocks")
    m = MaskSet.full(adapter.geometry)
    m.q_head[1, [0, 1]] = False  # KV group 0 of layer 1 has no query head left
    m.q_head[2, 2] = False
    assert sparsity_of(m, s) * 2 * LAYER == 3 * PER_Q + KV_ONLY  # ours: its k/v rows are gone too
    assert sparsity_of(m, a) * 4 * LAYER == 3 * PER_Q  # the authors': q rows and o columns only
    # with KV groups as units, k/v rows are removed by the unit itself and count on both bases
    g = _structures(adapter, protected_layers=(0, 3), sparsity_basis="all_blocks")
    m = MaskSet.full(adapter.geometry)
    m.kv_group[1, 0] = False
    assert sparsity_of(m, g) * 4 * LAYER == KV


def test_q_head_allocation_leaves_kv_axis_and_counts_authors_cost(adapter):
    """On the authors' basis a query head costs its q/o parameters only, even the last of its
    group: the allocator never touches the KV axis and the budget is met in q/o parameters."""
    a = _structures(adapter, attention="q_head", mlp="none", protected_layers=(0, 3), sparsity_basis="all_blocks")
    v = _scores()
    v["q_head"][1] = torch.tensor([0.1, 0.2, 9.0, 9.0, 9.0, 9.0])
    v["q_head"][2] = torch.tensor([9.0, 9.0, 9.0, 0.3, 9.0, 9.0])
    full = MaskSet.full(adapter.geometry)
    new = GlobalRank().allocate(Scores(v), a, full, 3 * PER_Q / (4 * LAYER))
    assert _removed(new, full, "q_head") == [(1, 0), (1, 1), (2, 3)]  # three heads: 3 * PER_Q
    assert bool(new.kv_group.all()) and bool(new.mlp_channel.all())
    assert sparsity_of(new, a) * 4 * LAYER == 3 * PER_Q


def test_q_head_marginal_cost_of_a_groups_last_head(adapter):
    """Budget of one head plus one KV head's k/v rows: the lowest head alone leaves a gap of
    KV_ONLY = PER_Q, so the second head of the same group (which empties it) would cost
    2 * PER_Q and overshoot by PER_Q >= the gap: skipped; the next head of another group fits."""
    s = _structures(adapter, attention="q_head", mlp="channel", protected_layers=(0, 3))
    v = _scores()
    v["q_head"][1] = torch.tensor([0.1, 0.2, 0.3, 9.0, 9.0, 9.0])
    full = MaskSet.full(adapter.geometry)
    new = GlobalRank().allocate(Scores(v), s, full, (PER_Q + KV_ONLY) / (2 * LAYER))
    assert _removed(new, full, "q_head") == [(1, 0), (1, 2)]
    assert sparsity_of(new, s) * 2 * LAYER == 2 * PER_Q  # no k/v freed: both groups keep a head
    # a budget of the whole group: both heads of group 0 go and cost exactly 2 * PER_Q + KV_ONLY
    new = GlobalRank().allocate(Scores(v), s, full, (2 * PER_Q + KV_ONLY) / (2 * LAYER))
    assert _removed(new, full, "q_head") == [(1, 0), (1, 1)]
    assert sparsity_of(new, s) * 2 * LAYER == 2 * PER_Q + KV_ONLY


def test_protect_rounding_floor_is_the_authors_int():
    for L in range(1, 201):
        assert protected_first_count(StructureSpec(protect_rounding="floor"), L) == int(L * 0.1)
        assert protected_first_count(StructureSpec(), L) == math.ceil(L / 10)
    # the 6-layer testbed: ceil protects layer 0, floor none of the first layers
    assert protected_layer_indices(StructureSpec(), 6) == [0, 5]
    assert protected_layer_indices(StructureSpec(protect_rounding="floor"), 6) == [5]
    # Qwen3-8B, 36 layers: 4 first layers with ceil, 3 (the authors' range(3, 35)) with floor
    assert protected_layer_indices(StructureSpec(), 36) == [0, 1, 2, 3, 35]
    assert protected_layer_indices(StructureSpec(protect_rounding="floor"), 36) == [0, 1, 2, 35]
    assert protected_first_count(StructureSpec(protect_first=0.3), 10) == 3  # not 4 from 3.0000000000000004


# --------------------------------------------------------------------------------------------------
# The vectorized global allocator against a unit-by-unit loop
# --------------------------------------------------------------------------------------------------

def _reference_allocate(scores, structures, mask, target, budget="parameters", threshold="skip_overshoot"):
    """The allocator written as a plain loop over units in score order (the specification);
    ``kthvalue``: no unit is skipped for overshooting, the loop stops once the budget is reached."""
    new, e, g = mask.clone(), mask.effective(), structures.geometry
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
    entries, alive_count = [], {}
    for kind in kinds:
        alive = e[kind] & structures.candidate(kind)
        alive_count[kind] = e[kind].sum(dim=1).tolist()
        for (layer, unit), val in zip(alive.nonzero().tolist(), scores.values[kind][alive].tolist()):
            entries.append((val, kind, layer, unit))
    entries.sort(key=lambda x: x[0])
    group = g.kv_group_of_head().tolist()
    heads_left = {(i, k): sum(bool(e.q_head[i, h]) for h in range(g.num_heads) if group[h] == k)
                  for i in range(g.num_layers) for k in range(g.num_kv_heads)}
    kv_counts = "q_head" in kinds and not count and structures.counts_kv_removal()
    for val, kind, layer, unit in entries:
        if removed >= limit:
            break
        if kind != "layer" and alive_count[kind][layer] <= structures.spec.min_keep:
            continue
        cost = 1.0 if count else float(structures.costs[kind][layer, unit])
        if kind == "q_head" and kv_counts and heads_left[(layer, group[unit])] == 1:
            cost += float(structures.kv_only[layer, group[unit]])
        if threshold == "skip_overshoot" and removed + cost > limit and (removed + cost - limit) >= (limit - removed):
            continue
        new[kind][layer, unit] = False
        alive_count[kind][layer] -= 1
        if kind == "q_head":
            heads_left[(layer, group[unit])] -= 1
        removed += cost
    return new


@pytest.fixture(scope="module")
def gqa4():
    """4 query heads per KV head (8 heads, 2 KV heads), 6 layers, 24 channels: heads cost 512,
    the k/v of a KV head 512, a channel 96; a 64-channel-wide sibling makes heads rarer."""
    return adapter_for(tiny_qwen3(seed=1, layers=6, heads=8, kv=2, head_dim=8, hidden=32, inter=24))


@pytest.mark.parametrize("spec", [
    dict(),
    dict(attention="q_head"),
    dict(attention="q_head", sparsity_basis="all_blocks"),
    dict(attention="q_head", mlp="none", min_keep=0),
    dict(attention="kv_group", sparsity_basis="all_blocks", min_keep=2),
    dict(attention="q_head", min_keep=3, protect_rounding="floor"),
    dict(attention="none", min_keep=5),
    dict(layers=True),
])
@pytest.mark.parametrize("budget", ["parameters", "count"])
@pytest.mark.parametrize("threshold", ["skip_overshoot", "kthvalue"])
def test_vectorized_equals_reference(gqa4, spec, budget, threshold):
    s = build_structures(gqa4, StructureSpec(**spec))
    g = gqa4.geometry
    gen = torch.Generator().manual_seed(hash((tuple(sorted(spec.items())), budget)) % 2**31)
    shapes = {k: MaskSet.full(g)[k].shape for k in ("kv_group", "q_head", "mlp_channel", "layer")}
    for trial in range(12):
        v = {k: torch.rand(sh, generator=gen) for k, sh in shapes.items()}
        if trial % 3 == 0:  # many ties
            v = {k: (t * 4).floor() for k, t in v.items()}
        v["q_head"] *= float(torch.rand(1, generator=gen)) * 0.5
        start = MaskSet.full(g)
        if trial % 2:
            for k, sh in shapes.items():
                if k != "layer":
                    start[k][torch.rand(sh, generator=gen) < 0.15] = False
        for target in (0.0, 0.07, 0.23, 0.41, 0.66, 0.9):
            got = global_allocate(Scores(v), s, start, target, budget, threshold)
            want = _reference_allocate(Scores(v), s, start, target, budget, threshold)
            assert got == want, (trial, target)


def test_count_budget_by_hand(adapter):
    """N = 4 layers x (6 heads + 48 channels) = 216 units; at r = 0.1 the authors' threshold keeps
    int(216 * 0.9) = 194 and removes k = 216 - 194 + 1 = 23 units, the lowest-scored of the
    unprotected layers (protected ones score inf there)."""
    s = _structures(adapter, attention="q_head", protected_layers=(0, 3))
    assert s.unit_count_total() == 216 and count_threshold(216, 0.1) == 23
    assert count_threshold(216, 0.0) == 1 and count_threshold(216, 1.0) == 216
    gen = torch.Generator().manual_seed(5)
    v = {k: torch.rand(t.shape, generator=gen) for k, t in _scores().items()}
    full = MaskSet.full(adapter.geometry)
    new = GlobalRank(GlobalRank.Params(budget="count")).allocate(Scores(v), s, full, 0.1)
    gone = [(v[k][i, u].item(), k) for k in ("q_head", "mlp_channel") for i, u in _removed(new, full, k)]
    assert len(gone) == 23
    cand = sorted(v[k][i, u].item() for k in ("q_head", "mlp_channel")
                  for i, u in s.candidate(k).nonzero().tolist())
    assert sorted(x for x, _ in gone) == cand[:23]
    # cumulative: 23 already removed, the next ratio's threshold counts them
    more = GlobalRank(GlobalRank.Params(budget="count")).allocate(Scores(v), s, new, 0.15)
    assert sum(int((~more[k]).sum()) for k in ("q_head", "mlp_channel")) == count_threshold(216, 0.15) == 34
    assert more.is_subset_of(new)


def test_global_on_qwen3_8b_shape_runs():
    """~380k candidate units (Qwen3-8B geometry, 31 unprotected layers): the budget is met
    within half a unit, min_keep holds, the KV axis is untouched (q_head units)."""
    g = Geometry(num_layers=36, hidden_size=4096, num_heads=32, num_kv_heads=8, head_dim=128, intermediate_size=12288)
    H, hd, L = 4096, 128, 36
    costs = {"q_head": torch.full((L, 32), float(2 * H * hd)), "kv_group": torch.full((L, 8), float(6 * H * hd)),
             "mlp_channel": torch.full((L, 12288), float(3 * H)),
             "layer": torch.full((L, 1), float(32 * 2 * H * hd + 8 * 2 * H * hd + 12288 * 3 * H))}
    spec = StructureSpec(attention="q_head")
    prunable = torch.ones(L, dtype=torch.bool)
    prunable[protected_layer_indices(spec, L)] = False
    s = Structures(g, spec, prunable, costs)
    assert int(s.candidate("q_head").sum() + s.candidate("mlp_channel").sum()) == 381920
    gen = torch.Generator().manual_seed(0)
    v = {k: torch.rand(t.shape, generator=gen) for k, t in costs.items()}
    v["q_head"] *= 0.2
    full = MaskSet.full(g)
    new = GlobalRank().allocate(Scores(v), s, full, 0.4)
    got = float(removed_parameters(new, s).sum())
    assert abs(got - 0.4 * s.prunable_parameter_total()) <= (2 * H * hd + 2 * H * hd) / 2
    assert int(new.q_head[prunable].sum(1).min()) >= 1 and int(new.mlp_channel[prunable].sum(1).min()) >= 1
    assert bool(new.kv_group.all()) and bool(new.q_head[~prunable].all())


# --------------------------------------------------------------------------------------------------
# The authors' schedule: linspace steps, milestones crossed on the measured sparsity
# --------------------------------------------------------------------------------------------------

def test_step_size_is_the_authors_linspace():
    # their Qwen3-8B configs: ratio 0.7, iteration 112 -> torch.linspace(0, 0.7, 112)
    steps = _steps(target=0.7, step_size=0.7 / 111, milestones_on="reached", milestones=[0.1, 0.2, 0.3, 0.4, 0.5])
    want = torch.linspace(0, 0.7, 112)
    assert len(steps) == 112
    assert [s.sparsity for s in steps[:-1]] == [float(x) for x in want[:-1]]  # float32 values, first 0
    assert steps[-1].sparsity == 0.7 and steps[-1].milestone
    assert not any(s.milestone for s in steps[:-1]) and all(s.regenerate_fraction == 0 for s in steps)
    assert all(s.measured_milestones == {0.1: 1.0, 0.2: 1.0, 0.3: 1.0, 0.4: 1.0, 0.5: 1.0} for s in steps)
    # half-point steps to 40%: 81 points 0, 0.005, ..., 0.4
    steps = _steps(target=0.4, step_size=0.005)
    assert len(steps) == 81 and steps[0].sparsity == 0.0 and steps[1].sparsity == pytest.approx(0.005)
    assert [s.sparsity for s in steps if s.milestone] == [0.4]
    # milestones_on: steps puts milestones in as steps, as with equal steps
    steps = _steps(target=0.4, step_size=0.1, milestones=[0.15, 0.3], regenerate_fraction=0.5)
    assert [s.sparsity for s in steps] == [0.0, 0.1, 0.15, 0.2, 0.3, 0.4]
    assert [s.regenerate_fraction for s in steps] == [0, 0, 0.5, 0, 0.5, 0]


def test_milestones_crossed_on_measured_sparsity():
    steps = _steps(target=0.7, step_size=0.1, milestones_on="reached", milestones=[0.1, 0.2, 0.3],
                   regenerate_fraction=0.8, regenerate_overrides={0.2: 0.0})
    # a run whose measured sparsity lags the count targets: 0 -> .04 -> .09 -> .12 -> .25 -> .31 ...
    measured = [0.0, 0.04, 0.09, 0.12, 0.25, 0.31, 0.36, 0.4]
    crossed = [steps[k].milestones_crossed(measured[k], measured[k + 1]) for k in range(7)]
    assert crossed == [[], [], [(0.1, 0.8)], [(0.2, 0.0)], [(0.3, 0.8)], [], []]
    # two milestones in one step come in order; a step that removes nothing crosses none;
    # a milestone at the previous measurement was crossed before (previous < m <= reached)
    assert steps[0].milestones_crossed(0.05, 0.21) == [(0.1, 0.8), (0.2, 0.0)]
    assert steps[0].milestones_crossed(0.2, 0.2) == [] and steps[0].milestones_crossed(0.1, 0.15) == []
    assert Step(0.3, True).milestones_crossed(0.0, 0.5) == []  # planned milestones: nothing measured


@pytest.mark.parametrize("params", [
    dict(target=0.4, step_size=0.0),
    dict(target=0.4, step_size=1.5),
    dict(target=0.4, step_size=0.01, steps=8),
    dict(target=0.4, milestones_on="sometimes"),
])
def test_schedule_paper_parameter_errors(params):
    with pytest.raises(ValidationError):
        Progressive.Params(**params)


def test_reached_milestones_may_exceed_a_count_target():
    # with budget: count the target is a unit ratio, milestones stay sparsities
    Progressive.Params(target=0.3, step_size=0.01, milestones_on="reached", milestones=[0.2, 0.4])
    with pytest.raises(ValidationError):
        Progressive.Params(target=0.3, milestones=[0.2, 0.4])


# --------------------------------------------------------------------------------------------------
# Targets the structures cannot reach
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec, target, field", [
    (dict(protect_first=0.75, protect_last=1), 0.2, "structures.protect_first"),
    (dict(protected_layers=(0, 1, 2, 3)), 0.2, "structures.protected_layers"),
    (dict(protect_last=100), 0.2, "structures.protect_last"),
    (dict(protect_last=4), 0.0, "structures.protect_last"),
    (dict(protected_layers=(-1, 99)), 0.2, "structures.protected_layers"),
    (dict(protected_layers=(0, 4)), 0.0, "structures.protected_layers"),
    (dict(min_keep=1000000), 0.2, "structures.min_keep"),
    (dict(min_keep=48, attention="none"), 0.2, "structures.min_keep"),
    (dict(protected_layers=(0, 3)), 0.85, "schedule.params.target"),
    (dict(protected_layers=(0, 3), sparsity_basis="all_blocks"), 0.45, "schedule.params.target"),
])
def test_unreachable_targets_are_refused(adapter, spec, target, field):
    s = _structures(adapter, **spec)
    with pytest.raises(RespError) as exc:
        check_reachable(s, target)
    msg = str(exc.value)
    assert msg.startswith(field + ":") and "\n" not in msg, msg


def test_reachable_limits_by_hand(adapter):
    # protected 0 and 3, min_keep 1, KV groups + channels: each prunable layer can lose 2 of 3
    # groups and 47 of 48 channels
    s = _structures(adapter, protected_layers=(0, 3))
    best = (2 * KV + 47 * CH) / LAYER
    assert max_reachable_sparsity(s) == pytest.approx(best)
    assert max_reachable_sparsity(s, "all_blocks") == pytest.approx(best / 2)
    check_reachable(s, best - 1e-6)
    with pytest.raises(RespError):
        check_reachable(s, best + 1e-3)
    # q_head units, min_keep 3: 3 heads left fill 2 of the 3 groups (2 heads per group), so one
    # group's k/v rows go on prunable_blocks but not on the authors' basis
    q = _structures(adapter, attention="q_head", protected_layers=(0, 3), min_keep=3)
    assert max_reachable_sparsity(q) == pytest.approx((3 * PER_Q + KV_ONLY + 45 * CH) / LAYER)
    assert max_reachable_sparsity(q, "all_blocks") == pytest.approx((3 * PER_Q + 45 * CH) / (2 * LAYER))
    # the count budget: 2 layers x (3 + 45) removable units of N = 216; a milestone too far
    check_reachable(q, 0.43, budget="count")  # k = 216 - int(216 * 0.57) + 1 = 216 - 123 + 1 = 94
    with pytest.raises(RespError, match="count threshold removes 97 of the 216 units, but at most 96"):
        check_reachable(q, 0.44, budget="count")  # k = 216 - int(120.96) + 1 = 97
    with pytest.raises(RespError, match=r"^schedule\.params\.milestones: 0\.9"):
        check_reachable(q, 0.3, budget="count", milestones=[0.2, 0.9])


def test_check_plan_reads_the_schedule(adapter):
    s = _structures(adapter, protected_layers=(0, 3))
    check_plan(s, _steps(target=0.4, steps=4, milestones=[0.2]))
    with pytest.raises(RespError, match="schedule.params.target"):
        check_plan(s, _steps(target=0.9, steps=4))
    with pytest.raises(RespError, match="schedule.params.milestones"):
        check_plan(s, _steps(target=0.4, step_size=0.1, milestones_on="reached", milestones=[0.2, 0.95]),
                   budget="count")
    with pytest.raises(RespError, match="beyond the target 0.3"):  # parameters: the run stops at 0.3
        check_plan(s, _steps(target=0.3, step_size=0.1, milestones_on="reached", milestones=[0.2, 0.35]))
    check_plan(s, _steps(target=0.3, step_size=0.1, milestones_on="reached", milestones=[0.2, 0.35]), budget="count")


# --------------------------------------------------------------------------------------------------
# In a run: both sparsity figures in every row; milestones crossed on the measured sparsity
# --------------------------------------------------------------------------------------------------

def _tiny_recipe(model_dir, schedule: dict, structures: dict | None = None, allocator: dict | None = None) -> dict:
    import yaml
    from pathlib import Path

    recipe = yaml.safe_load((Path(__file__).parents[1] / "recipes" / "testbed-resp.yaml").read_text())
    recipe["model"]["path"] = str(model_dir)
    recipe["generator"]["params"] = {"batch_size": 8}
    recipe["calibration"]["params"].update(num_samples=4, sampling={"temperature": 0.6, "max_new_tokens": 8})
    recipe["evaluation"]["evaluators"][0]["params"] = {"num_items": 2, "sampling": {"max_new_tokens": 8}}
    recipe["schedule"]["params"] = schedule
    recipe["structures"] = structures or {"attention": "q_head", "mlp": "channel", "protect_first": 0.1,
                                          "protect_last": 1}
    recipe["allocator"] = allocator or {"name": "global"}
    recipe["output"] = {"save_model": False}
    return recipe


def _run(recipe: dict, out):
    import yaml

    from resp_core.pipeline import run_recipe
    from resp_core.recipe import parse_recipe
    from resp_core.resolve import resolve

    return run_recipe(resolve(parse_recipe(yaml.safe_dump(recipe), "tiny.yaml")), out)


def test_run_crosses_milestones_on_measured_sparsity(tmp_path, tiny_model_dir):
    """The authors' schedule in a run: count-ratio steps (linspace 0 .. 0.3), milestones 0.1 and
    0.2 judged on the measured sparsity of the authors' basis, traces regenerated at each."""
    import json

    from safetensors import safe_open

    recipe = _tiny_recipe(tiny_model_dir,
                          {"target": 0.45, "step_size": 0.05, "milestones_on": "reached", "milestones": [0.1, 0.2]},
                          {"attention": "q_head", "mlp": "channel", "protect_first": 0.1, "protect_last": 1,
                           "protect_rounding": "floor", "sparsity_basis": "all_blocks", "min_keep": 0},
                          {"name": "global", "params": {"budget": "count"}})
    out = tmp_path / "run"
    _run(recipe, out)
    rows = json.loads((out / "metrics.json").read_text())
    for r in rows:
        assert {"sparsity", "sparsity_prunable_blocks", "sparsity_all_blocks"} <= set(r)
        assert r["sparsity"] == r["sparsity_all_blocks"]
    assert rows[0]["target"] == 0.0 and rows[0]["sparsity_prunable_blocks"] == 0.0
    assert [r["target"] for r in rows[1:]] == [0.1, 0.2, 0.45]
    reached = []
    for k in range(1, 11):  # linspace(0, 0.45, 10): 10 steps
        with safe_open(str(out / "masks" / f"step_{k:02d}.safetensors"), "pt") as f:
            reached.append(float(f.metadata()["sparsity"]))
    assert not (out / "masks" / "step_11.safetensors").exists()
    assert reached[0] > 0  # the count threshold removes one unit at ratio 0, as the authors' kthvalue
    for r in rows[1:3]:  # each milestone row is at the first step whose measured sparsity passed it
        k = r["step"]
        assert reached[k - 1] >= r["target"] and (k == 1 or reached[k - 2] < r["target"])
        assert r["sparsity_all_blocks"] == round(reached[k - 1], 4)
        assert (out / "masks" / f"milestone_{r['target']:.2f}.safetensors").is_file()
    assert rows[-1]["step"] == 10 and "milestones_not_reached" not in json.loads((out / "run.json").read_text())
    # one regeneration per crossed milestone (rho 1), none after the last step
    assert sorted(p.name for p in (out / "calibration").glob("generation_*.jsonl")) == \
        ["generation_00.jsonl", "generation_01.jsonl", "generation_02.jsonl"]


def test_run_records_milestones_not_reached(tmp_path, tiny_model_dir):
    """A count target too low for the measured milestones: the run finishes, says which were missed."""
    import json

    recipe = _tiny_recipe(tiny_model_dir,
                          {"target": 0.1, "step_size": 0.05, "milestones_on": "reached", "milestones": [0.02, 0.3]},
                          allocator={"name": "global", "params": {"budget": "count"}})
    recipe["evaluation"]["evaluators"] = []
    out = tmp_path / "run"
    _run(recipe, out)
    assert json.loads((out / "run.json").read_text())["milestones_not_reached"] == [0.3]
    assert (out / "masks" / "milestone_0.02.safetensors").is_file()


def test_run_refuses_an_unreachable_target(tmp_path, tiny_model_dir):
    recipe = _tiny_recipe(tiny_model_dir, {"target": 0.5, "steps": 1},
                          {"attention": "kv_group", "mlp": "channel", "min_keep": 1000000})
    out = tmp_path / "run"
    with pytest.raises(RespError, match=r"^structures\.min_keep: 1000000 keeps every unit"):
        _run(recipe, out)
    assert not out.exists()


def test_structures_from_config_alone(tiny_model_dir):
    """Validation before any weight loads: the structures built from config.json on the meta
    device equal the loaded model's, and an unreachable plan is refused from them."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from resp_core.model.structures import structures_from_config

    spec = StructureSpec(attention="q_head", protect_rounding="floor", sparsity_basis="all_blocks")
    meta = structures_from_config(AutoConfig.from_pretrained(tiny_model_dir), spec)
    real = build_structures(adapter_for(AutoModelForCausalLM.from_pretrained(tiny_model_dir)), spec)
    assert meta.geometry == real.geometry and torch.equal(meta.prunable_layers, real.prunable_layers)
    assert all(torch.equal(meta.costs[k], real.costs[k]) for k in real.costs)
    with pytest.raises(RespError, match="^schedule.params.target"):
        check_plan(meta, _steps(target=0.9, steps=2))
