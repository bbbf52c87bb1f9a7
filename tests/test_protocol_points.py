"""Three points of the authors' protocol, each a named option that ``mode: paper`` sets:

* the schedule's fixed count-ratio grid (``progressive`` ``grid_end``, with ``budget: count``),
  the run ending where the measured sparsity reaches the target;
* the global allocator's ``threshold: kthvalue`` (exactly the k lowest-scored units) against
  RESP's ``skip_overshoot``;
* the scoring batches of ``reduction: batch_token_mean`` (batch size from the padded length,
  token mean inside a batch times its size, divided by the sample count), pinned against the
  authors' batch-by-batch computation on a tiny model."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_qwen3
from resp_core.interfaces import CalibrationSample, CalibrationSet, Scores
from resp_core.model.adapter import adapter_for
from resp_core.model.masks import MaskSet
from resp_core.model.structures import StructureSpec, build_structures
from resp_core.scoring import authors_batch_size, batch_token_weights, gradient_pass
from resp_plugins.allocators.global_rank import GlobalRank, global_allocate
from resp_plugins.schedules.progressive import Progressive

# --------------------------------------------------------------------------------------------------
# (g) the authors' scoring batches
# --------------------------------------------------------------------------------------------------


def test_authors_batch_size_by_padded_length():
    # non_uniform_pruner.py fill_information: >512: 1, >256: 4, 129-256: 8, 65-128: 16, 32-64: 32, else 64
    cases = {2048: 1, 513: 1, 512: 4, 257: 4, 256: 8, 129: 8, 128: 16, 65: 16, 64: 32, 32: 32, 31: 64, 1: 64}
    assert {n: authors_batch_size(n) for n in cases} == cases


def test_batch_token_weights_by_hand():
    # padded length 9 (< 32): one batch of 64 holds the whole set -> every token weighs 1 / tokens
    short = CalibrationSet([CalibrationSample([1, 2], [3, 4, 5]), CalibrationSample([1], [3] * 8)], pad_id=0)
    assert batch_token_weights(short, "decode") == [2 / (11 * 2)] * 2
    # one sample past 512 tokens: batches of one sample -> each its own mean, / N (= sample_mean)
    long = CalibrationSet([CalibrationSample([1] * 500, [3] * 13), CalibrationSample([1], [3] * 4),
                           CalibrationSample([1, 2], [3])], pad_id=0)
    assert batch_token_weights(long, "decode") == [1 / (13 * 3), 1 / (4 * 3), 1 / (1 * 3)]
    # 40 samples padded to 40 tokens: batches of 32 and 8, each token-weighted inside, scaled by size
    samples = [CalibrationSample([1] * 5, [3] * (1 + i % 7)) for i in range(39)] + [CalibrationSample([1], [3] * 39)]
    w = batch_token_weights(CalibrationSet(samples, pad_id=0), "decode")
    t1, t2 = sum(1 + i % 7 for i in range(32)), sum(1 + i % 7 for i in range(32, 39)) + 39
    assert w == [32 / (t1 * 40)] * 32 + [8 / (t2 * 40)] * 8


def _weights(model):
    return [lin.weight for lin in adapter_for(model).prunable_linears().values()]


def _authors_gradient(model, samples: list[CalibrationSample], pad: int = 0):
    """Their ``fill_information`` (one device, downstream data): every sample right-padded to the
    longest with labels -100, batches of ``authors_batch_size`` in order, ``model(batch,
    labels=...).loss * len(batch)`` backpropagated and summed, then ``grad / n_samples``."""
    width = max(len(s.prompt_ids) + len(s.target_ids) for s in samples)
    ids = torch.full((len(samples), width), pad)
    labels = torch.full((len(samples), width), -100)
    for i, s in enumerate(samples):
        row = s.prompt_ids + s.target_ids
        ids[i, :len(row)] = torch.tensor(row)
        labels[i, len(s.prompt_ids):len(row)] = torch.tensor(s.target_ids)
    size = authors_batch_size(width)
    total = 0.0
    for j in range(0, len(samples), size):
        logits = model(input_ids=ids[j:j + size]).logits[:, :-1]  # no attention mask, as theirs
        mean = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels[j:j + size, 1:], ignore_index=-100)
        total = total + mean * len(ids[j:j + size])
    return [g / len(samples) for g in torch.autograd.grad(total, _weights(model))]


def test_batch_token_mean_gradient_equals_the_authors_batches():
    gen = torch.Generator().manual_seed(0)
    samples = []
    for i in range(37):  # padded length 40: batches of 32 and 5; lengths differ inside each batch
        p = torch.randint(3, 60, (int(torch.randint(1, 8, (1,), generator=gen)),), generator=gen).tolist()
        t = torch.randint(3, 60, (int(torch.randint(1, 33, (1,), generator=gen)),), generator=gen).tolist()
        samples.append(CalibrationSample(p, t))
    samples.append(CalibrationSample([5], list(range(3, 42))))  # the longest: 40 tokens
    cal = CalibrationSet(samples, pad_id=0)
    model = tiny_qwen3(seed=3, vocab=64, layers=2).to(torch.float64)
    want = _authors_gradient(model, samples)
    results = {}
    for reduction in ("batch_token_mean", "sample_mean", "token_mean"):
        for batch_size in (3, 16):  # memory batches: no effect on the weighting
            gp = gradient_pass(model, adapter_for(model), cal, reduction=reduction, batch_size=batch_size)
            got = [gp.grad(w).clone() for w in _weights(model)]
            for w in _weights(model):
                w.grad = None
            results[(reduction, batch_size)] = got
    # (Qwen3's RMSNorm computes in float32 whatever the model's dtype: agreement to ~1e-7 of the norm)
    for got in (results[("batch_token_mean", 3)], results[("batch_token_mean", 16)]):
        assert max(float((g - r).norm() / r.norm()) for g, r in zip(got, want)) < 1e-6
    for other in ("sample_mean", "token_mean"):  # neither of RESP's reductions is theirs here
        assert max(float((g - r).norm() / r.norm()) for g, r in zip(results[(other, 16)], want)) > 1e-3


def test_paper_mode_sets_the_authors_batches():
    from resp_core.recipe import parse_recipe

    base = {"name": "x", "calibration": {"name": "task_data"},
            "schedule": {"name": "progressive", "params": {"target": 0.4}}}
    for scorer in ("resp", "gisp"):
        r = parse_recipe(dict(base, mode="paper", scorer={"name": scorer}))
        assert r.scorer.params["reduction"] == "batch_token_mean"
        assert parse_recipe(dict(base, scorer={"name": scorer})).scorer.params == {}


# --------------------------------------------------------------------------------------------------
# (d) threshold: kthvalue vs skip_overshoot
# --------------------------------------------------------------------------------------------------

PER_Q, CH = 2 * 32 * 8, 3 * 32  # a query head's q/o parameters, an MLP channel's (tiny_qwen3 defaults)


@pytest.fixture(scope="module")
def adapter():
    return adapter_for(tiny_qwen3(seed=0, layers=4, heads=6, kv=3, head_dim=8, hidden=32, inter=48))


def _hand_scores(L=4):
    v = {"kv_group": torch.full((L, 3), 9.0), "q_head": torch.full((L, 6), 9.0),
         "mlp_channel": torch.full((L, 48), 9.0), "layer": torch.full((L, 1), 9.0)}
    v["q_head"][1, 2] = 0.5  # the lowest unit: a head (512 parameters)
    v["mlp_channel"][2, :4] = torch.tensor([1.0, 1.1, 1.2, 1.3])  # then four channels (96 each)
    return Scores(v)


def test_threshold_kthvalue_takes_the_costly_head_skip_overshoot_postpones_it(adapter):
    s = build_structures(adapter, StructureSpec(attention="q_head", sparsity_basis="all_blocks", min_keep=0,
                                                protected_layers=(0, 3)))
    full = MaskSet.full(adapter.geometry)
    target = 200 / s.basis_total()  # a 200-parameter budget: less than the head, two channels and a bit
    skip = GlobalRank(GlobalRank.Params(threshold="skip_overshoot")).allocate(_hand_scores(), s, full, target)
    kth = GlobalRank(GlobalRank.Params(threshold="kthvalue")).allocate(_hand_scores(), s, full, target)
    removed = lambda m, k: [tuple(x) for x in (~m[k]).nonzero().tolist()]  # noqa: E731
    # skip_overshoot: the head (512) overshoots by more than it closes the gap: skipped, channels fill in
    assert removed(skip, "q_head") == [] and removed(skip, "mlp_channel") == [(2, 0), (2, 1)]
    # kthvalue: the lowest-scored unit goes whatever its size, and it alone reaches the budget
    assert removed(kth, "q_head") == [(1, 2)] and removed(kth, "mlp_channel") == []
    # a budget the head does not reach: the head, then channels in order up to the first that reaches it
    kth2 = global_allocate(_hand_scores(), s, full, (PER_Q + 150) / s.basis_total(), threshold="kthvalue")
    assert removed(kth2, "q_head") == [(1, 2)] and removed(kth2, "mlp_channel") == [(2, 0), (2, 1)]


def test_threshold_is_no_op_under_the_count_budget(adapter):
    """Every unit counts 1: nothing can overshoot, both thresholds remove the same k units."""
    s = build_structures(adapter, StructureSpec(attention="q_head", sparsity_basis="all_blocks", min_keep=0,
                                                protect_rounding="floor"))
    gen = torch.Generator().manual_seed(5)
    g = adapter.geometry
    for trial in range(6):
        v = {k: torch.rand(MaskSet.full(g)[k].shape, generator=gen) for k in ("kv_group", "q_head", "mlp_channel",
                                                                              "layer")}
        for r in (0.0, 0.1, 0.37, 0.6):
            a = global_allocate(Scores(v), s, MaskSet.full(g), r, "count", "skip_overshoot")
            b = global_allocate(Scores(v), s, MaskSet.full(g), r, "count", "kthvalue")
            assert a == b


def test_bad_threshold_is_one_line():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="threshold"):
        GlobalRank.Params(threshold="kth")


# --------------------------------------------------------------------------------------------------
# (a) the authors' fixed count-ratio grid
# --------------------------------------------------------------------------------------------------

def test_grid_end_is_the_authors_fixed_linspace_whatever_the_target():
    for target in (0.3, 0.4, 0.5):
        p = Progressive(Progressive.Params(target=target, step_size=0.0063, grid_end=0.7, milestones_on="reached",
                                           milestones=[0.1, 0.2, 0.3]))
        steps = p.steps()
        assert len(steps) == 112
        assert [s.sparsity for s in steps[:-1]] == [float(x) for x in torch.linspace(0, 0.7, 112)[:-1]]
        assert steps[-1].sparsity == 0.7 and p.stop_at == target
        assert sorted(steps[0].measured_milestones) == sorted({0.1, 0.2, 0.3, target})
    # without grid_end: the grid runs to the target, no early end
    p = Progressive(Progressive.Params(target=0.4, step_size=0.0063, milestones_on="reached"))
    assert len(p.steps()) == 64 and p.stop_at is None


@pytest.mark.parametrize("params, message", [
    (dict(target=0.4, grid_end=0.7, milestones_on="reached"), "grid_end needs step_size"),
    (dict(target=0.4, grid_end=0.7, step_size=0.0063), "grid_end needs step_size"),
    (dict(target=0.4, grid_end=0.7, step_size=0.0063, milestones_on="reached", milestones=[0.5]), "beyond"),
    (dict(target=0.4, grid_end=1.2, step_size=0.0063, milestones_on="reached"), "grid_end"),
    (dict(target=0.4, grid_end=0.0, step_size=0.0063, milestones_on="reached"), "grid_end"),
])
def test_grid_end_errors(params, message):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=message):
        Progressive.Params(**params)


def test_run_on_the_fixed_grid_ends_where_the_target_is_reached(tmp_path, tiny_model_dir):
    from safetensors import safe_open
    from test_allocation_schedule import _run, _tiny_recipe

    recipe = _tiny_recipe(tiny_model_dir,
                          {"target": 0.2, "step_size": 0.05, "grid_end": 0.7, "milestones_on": "reached",
                           "milestones": [0.1], "regenerate_fraction": 1.0},
                          {"attention": "q_head", "mlp": "channel", "protect_first": 0.1, "protect_last": 1,
                           "protect_rounding": "floor", "sparsity_basis": "all_blocks", "min_keep": 0},
                          {"name": "global", "params": {"budget": "count"}})
    out = tmp_path / "run"
    _run(recipe, out)
    steps = sorted((out / "masks").glob("step_*.safetensors"))
    reached = []
    for path in steps:
        with safe_open(str(path), "pt") as f:
            reached.append(float(f.metadata()["sparsity"]))
    assert 1 < len(steps) < 15  # linspace(0, 0.7, 15): the run stopped before the grid's end
    assert reached[-1] >= 0.2 > reached[-2]  # the last step run is the one that reached the target
    rows = json.loads((out / "metrics.json").read_text())
    assert [r["target"] for r in rows[1:]] == [0.1, 0.2] and rows[-1]["step"] == len(steps)
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "finished" and "milestones_not_reached" not in info
    # regenerated at 0.1 only: nothing follows the last milestone
    assert sorted(p.name for p in (out / "calibration").glob("generation_*.jsonl")) == \
        ["generation_00.jsonl", "generation_01.jsonl"]


def test_paper_mode_fills_the_grid_and_the_count_budget_together():
    from resp_core.compare import parse_compare
    from resp_core.recipe import parse_recipe

    run = parse_recipe({"name": "x", "mode": "paper", "calibration": {"name": "task_data"}, "scorer": {"name": "resp"},
                        "schedule": {"name": "progressive", "params": {"target": 0.4, "milestones": [0.2]}}})
    assert run.schedule.params["grid_end"] == 0.7 and run.schedule.params["step_size"] == 0.0063
    assert run.allocator.params == {"threshold": "kthvalue", "budget": "count"}
    # a spacing of the recipe's own: no fixed grid, so the parameter budget stays
    own = parse_recipe({"name": "x", "mode": "paper", "calibration": {"name": "task_data"}, "scorer": {"name": "resp"},
                        "schedule": {"name": "progressive", "params": {"target": 0.4, "steps": 4}}})
    assert "grid_end" not in own.schedule.params and own.allocator.params == {"threshold": "kthvalue"}
    oneshot = parse_recipe({"name": "x", "mode": "paper", "calibration": {"name": "task_data"},
                            "scorer": {"name": "resp"}, "schedule": {"name": "oneshot", "params": {"target": 0.4}}})
    assert oneshot.allocator.params == {"threshold": "kthvalue"}
    cmp = parse_compare({"name": "c", "mode": "paper", "calibration": {"name": "task_data"}, "sparsities": [0.2, 0.3],
                         "evaluators": [{"name": "task_accuracy"}],
                         "methods": [{"label": "RESP", "scorer": {"name": "resp"}},
                                     {"label": "grid", "scorer": {"name": "resp"}, "schedule": {"step_size": 0.0063}},
                                     {"label": "params", "scorer": {"name": "resp"},
                                      "allocator": {"name": "global", "params": {"budget": "parameters"}}}]}, "c")
    resp, grid, params = cmp.methods
    assert resp.schedule["grid_end"] == 0.7 and resp.allocator.params == {"threshold": "kthvalue", "budget": "count"}
    assert "grid_end" not in grid.schedule and grid.allocator.params == {"threshold": "kthvalue"}
    assert params.allocator.params["budget"] == "parameters"
    assert cmp.protocol()["kept"]["methods[params].allocator.params.budget"] == {"recipe": "parameters",
                                                                                 "paper": "count"}
