"""Allocators (global ranking over a parameter budget, uniform per layer) and schedules
(progressive with milestones and regeneration, one-shot), on hand-made scores."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from conftest import tiny_qwen3
from plugins.allocators.global_rank import GlobalRank, UniformPerLayer, allocate_per_layer
from plugins.schedules.progressive import OneShot, Progressive
from resp_core.interfaces import Scores
from resp_core.model.adapter import adapter_for
from resp_core.model.masks import MaskSet, sparsity_of
from resp_core.model.structures import StructureSpec, build_structures, protected_layer_indices

# tiny_qwen3(layers=4, heads=6, kv=3, head_dim=8, hidden=32, inter=48), no biases:
PER_Q = 2 * 32 * 8  # q rows + o columns of one query head
KV = 2 * PER_Q + 2 * 32 * 8  # a KV group: its 2 query heads + k and v rows
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
    new = GlobalRank().allocate(Scores(v), s, full, 3 * PER_Q / s.prunable_parameter_total())
    assert _removed(new, full, "q_head") == [(1, 0), (1, 1), (2, 3)]
    assert bool(new.mlp_channel.all()) and bool(new.kv_group.all())
    assert new.effective().kv_group[1].tolist() == [False, True, True]  # group 0 lost both heads


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
