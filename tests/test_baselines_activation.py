"""Activation-based baselines: Wanda-sp, FLAP (+ adaptive structure search), structured
SparseGPT/OBS and OWL.

Formulas are checked on hand-computable tensors; the weight edits (FLAP's bias compensation,
the OBS re-fit) against their defining property; and every method runs through ``respctl run``
on a tiny random model to 40%, the saved model reloading with the masked model's logits.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from conftest import tiny_qwen3
from resp_core.activations import InputStats, collect_input_stats
from resp_core.cli import app
from resp_core.errors import RespError
from resp_core.interfaces import CalibrationSample, CalibrationSet, RunContext, Scores
from resp_core.model.adapter import Geometry, adapter_for
from resp_core.model.masks import MaskSet, apply_mask
from resp_core.model.structures import StructureSpec, build_structures
from resp_plugins.allocators.flap_adaptive import FlapAdaptive, standardize, standardized_scores
from resp_plugins.allocators.owl import OWL, outlier_ratio, owl_ratios
from resp_plugins.scorers.activation_based import (
    FLAP,
    WandaSP,
    flap_channel_metric,
    head_columns,
    unit_scores,
    wanda_channel_metric,
)
from resp_plugins.scorers.sparsegpt import SparseGPTSP, damped_inverse, obs_group_error, obs_remove
from test_cli import assert_user_error, small_recipe, write

runner = CliRunner()
TOL = 1e-5


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------

def _calibration(seed: int = 0, n: int = 6) -> CalibrationSet:
    g = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(n):
        p = torch.randint(3, 500, (4,), generator=g).tolist()
        t = torch.randint(3, 500, (int(torch.randint(3, 10, (1,), generator=g)),), generator=g).tolist()
        samples.append(CalibrationSample(p, t))
    return CalibrationSet(samples, pad_id=0)


def _ctx(model, attention: str = "kv_group") -> RunContext:
    a = adapter_for(model)
    st = build_structures(a, StructureSpec(attention=attention))
    return RunContext(model=model, tokenizer=None, adapter=a, structures=st, generator=None, tasks=None,
                      mask=MaskSet.full(a.geometry))


def _capture_inputs(model, modules: dict, calib: CalibrationSet, loss: str = "full") -> dict:
    """Raw inputs of ``modules`` on real (attention_mask == 1) tokens: name -> [n_tokens, d]."""
    got = {k: [] for k in modules}
    state = {}
    hooks = [m.register_forward_hook(lambda mod, args, out, k=k: got[k].append(args[0][state["sel"]].detach()))
             for k, m in modules.items()]
    with torch.no_grad():
        for b in calib.batches(4, loss):
            state["sel"] = b.attention_mask.bool()
            model(input_ids=b.input_ids, attention_mask=b.attention_mask)
    for h in hooks:
        h.remove()
    return {k: torch.cat(v).double() for k, v in got.items()}


def _stats_of(x: torch.Tensor) -> InputStats:
    x = x.double()
    return InputStats(x.shape[0], x.sum(0), (x * x).sum(0), (x.t() @ x).float())


# --------------------------------------------------------------------------------------------------
# activation statistics
# --------------------------------------------------------------------------------------------------

def test_collect_input_stats_matches_manual_capture():
    model = tiny_qwen3()
    a = adapter_for(model)
    calib = _calibration()
    stats = collect_input_stats(model, a, calib, sites=("o", "down"), gram=True, batch_size=4)
    raw = _capture_inputs(model, {"o1": a.attention_input(1), "d2": a.mlp_input(2)}, calib)
    n_real = sum(len(s.prompt_ids) + len(s.target_ids) for s in calib.samples)
    for key, x in (((1, "o"), raw["o1"]), ((2, "down"), raw["d2"])):
        s = stats[key]
        assert s.count == x.shape[0] == n_real  # padding never counted
        torch.testing.assert_close(s.mean(), x.mean(0), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(s.variance(), x.var(0), atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(s.norm(), x.norm(dim=0), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(s.hessian(), x.t() @ x / x.shape[0], atol=1e-5, rtol=1e-4)
    # only the layers asked for, and the forward stops after the last of them
    part = collect_input_stats(model, a, calib, sites=("down",), layers=[0], batch_size=4)
    assert set(part) == {(0, "down")} and part[(0, "down")].gram is None
    torch.testing.assert_close(part[(0, "down")].sum, stats[(0, "down")].sum)


def test_collect_target_tokens_only():
    model = tiny_qwen3()
    a = adapter_for(model)
    calib = _calibration()
    stats = collect_input_stats(model, a, calib, sites=("o",), tokens="target", batch_size=3)
    # position t is counted when token t+1 is a generated (target) token
    expected = sum(len(s.target_ids) for s in calib.samples)
    assert stats[(0, "o")].count == expected


# --------------------------------------------------------------------------------------------------
# Wanda-sp and FLAP metrics by hand
# --------------------------------------------------------------------------------------------------

def test_wanda_channel_metric_by_hand():
    w = torch.tensor([[1.0, -2.0], [3.0, 4.0]])
    x = torch.tensor([[1.0, 0.0], [2.0, 2.0]])  # tokens x channels: ‖X_0‖ = √5, ‖X_1‖ = 2
    m = wanda_channel_metric(w, _stats_of(x).norm())
    torch.testing.assert_close(m, torch.tensor([4 * math.sqrt(5), 12.0], dtype=torch.float64))


def test_flap_channel_metric_by_hand():
    w = torch.tensor([[1.0, 2.0], [3.0, -4.0]])  # ‖W_:,0‖² = 10, ‖W_:,1‖² = 20
    x = torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 6.0]])  # Var = 1 and (4+4+16)/2 = 12
    s = _stats_of(x)
    torch.testing.assert_close(s.variance(), torch.tensor([1.0, 12.0], dtype=torch.float64))
    torch.testing.assert_close(flap_channel_metric(w, s), torch.tensor([10.0, 240.0], dtype=torch.float64))
    torch.testing.assert_close(flap_channel_metric(w, s, "IFV"), torch.tensor([1.0, 12.0], dtype=torch.float64))
    rms = torch.tensor([math.sqrt(14 / 3), math.sqrt(12.0)], dtype=torch.float64)
    torch.testing.assert_close(flap_channel_metric(w, s, "WIFN"), torch.tensor([2.0, 3.0], dtype=torch.float64) * rms)


def test_unit_scores_sum_heads_and_groups():
    g = Geometry(num_layers=1, hidden_size=8, num_heads=4, num_kv_heads=2, head_dim=2, intermediate_size=3)
    attn = torch.arange(8.0).reshape(1, 8)
    mlp = torch.tensor([[5.0, 6.0, 7.0]])
    u = unit_scores(g, attn, mlp)
    assert u["q_head"].tolist() == [[1.0, 5.0, 9.0, 13.0]]
    assert u["kv_group"].tolist() == [[6.0, 22.0]]
    assert u["mlp_channel"].tolist() == [[5.0, 6.0, 7.0]]


@pytest.mark.parametrize("cls", [WandaSP, FLAP])
def test_scorers_match_formula_on_a_model(cls):
    model = tiny_qwen3()
    ctx = _ctx(model)
    a, g = ctx.adapter, ctx.adapter.geometry
    calib = _calibration()
    scores = cls().score(ctx, calib)
    raw = _capture_inputs(model, {"o": a.attention_input(2), "d": a.mlp_input(2)}, calib)
    wo, wd = a.attention_input(2).weight.double(), a.mlp_input(2).weight.double()
    if cls is WandaSP:
        m_o = wo.abs().sum(0) * raw["o"].norm(dim=0)
        m_d = wd.abs().sum(0) * raw["d"].norm(dim=0)
    else:
        m_o = raw["o"].var(0) * wo.square().sum(0)
        m_d = raw["d"].var(0) * wd.square().sum(0)
    heads = m_o.reshape(g.num_heads, g.head_dim).sum(1)
    kv = heads.reshape(g.num_kv_heads, g.heads_per_group).sum(1)
    torch.testing.assert_close(scores.values["q_head"][2].double(), heads, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(scores.values["kv_group"][2].double(), kv, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(scores.values["mlp_channel"][2].double(), m_d, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# FLAP bias compensation
# --------------------------------------------------------------------------------------------------

def test_flap_bias_compensation_keeps_mean_output():
    model = tiny_qwen3()
    ctx = _ctx(model, attention="q_head")
    a = ctx.adapter
    calib = _calibration()
    o, d = a.attention_input(1), a.mlp_input(1)
    assert o.bias is None and d.bias is None
    with torch.no_grad():  # O(1) activations instead of the 0.02-std init, so tolerances mean something
        for lin in a.prunable_linears().values():
            lin.weight.mul_(10)
    x = _capture_inputs(model, {"o": o, "d": d}, calib)
    dense_mean = {k: (x[k] @ lin.weight.detach().double().t()).mean(0) for k, lin in (("o", o), ("d", d))}

    scorer = FLAP()
    scorer.score(ctx, calib)
    new = ctx.mask.clone()
    new.q_head[1, [0, 4]] = False
    new.mlp_channel[1, [3, 7, 8, 20]] = False
    scorer.before_removal(ctx, ctx.mask, new)
    apply_mask(a, new)
    assert o.bias is not None and d.bias is not None
    for k, lin in (("o", o), ("d", d)):
        pruned_mean = (x[k] @ lin.weight.detach().double().t() + lin.bias.double()).mean(0)
        torch.testing.assert_close(pruned_mean, dense_mean[k], atol=1e-5, rtol=1e-5)
        # without the bias the mean output moves
        assert float((x[k] @ lin.weight.detach().double().t()).mean(0).sub(dense_mean[k]).abs().max()) > 1e-2
    # layers where nothing was removed get no bias
    assert a.attention_input(2).bias is None


# --------------------------------------------------------------------------------------------------
# SparseGPT / OBS
# --------------------------------------------------------------------------------------------------

def test_obs_update_is_the_least_squares_optimum():
    g = torch.Generator().manual_seed(0)
    n, d_in, d_out = 200, 8, 5
    x = torch.randn(n, d_in, generator=g, dtype=torch.float64) @ torch.randn(d_in, d_in, generator=g, dtype=torch.float64)
    w = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    s = torch.tensor([1, 4, 5])
    k = torch.tensor([0, 2, 3, 6, 7])
    hinv = damped_inverse(x.t() @ x / n, percdamp=0.0)
    w_obs = obs_remove(w, hinv, s)
    assert bool((w_obs[:, s] == 0).all())
    # closed-form optimum: min over W'_K of ‖X Wᵀ − X_K W'_Kᵀ‖
    opt = torch.linalg.lstsq(x[:, k], x @ w.t()).solution.t()
    torch.testing.assert_close(w_obs[:, k], opt, atol=1e-8, rtol=1e-8)
    err = lambda w2: float((x @ w.t() - x @ w2.t()).square().sum())  # noqa: E731
    zeroed = w.clone()
    zeroed[:, s] = 0
    assert err(w_obs) < err(zeroed)
    # the OBS score is that optimal error (per token)
    assert obs_group_error(w, hinv, s) == pytest.approx(err(w_obs) / n, rel=1e-8)
    # one column: ‖W_:,j‖² / [H⁻¹]_jj
    j = torch.tensor([2])
    assert obs_group_error(w, hinv, j) == pytest.approx(float(w[:, 2].square().sum() / hinv[2, 2]), rel=1e-10)


def test_damped_inverse_follows_sparsegpt():
    h = torch.diag(torch.tensor([1.0, 3.0], dtype=torch.float64))
    inv = damped_inverse(h, 0.01)  # λ = 0.01 · mean(diag) = 0.02
    torch.testing.assert_close(inv, torch.diag(torch.tensor([1 / 1.02, 1 / 3.02], dtype=torch.float64)))
    # a singular Hessian (a channel that never fires) still inverts
    assert torch.isfinite(damped_inverse(torch.zeros(3, 3, dtype=torch.float64), 0.01)).all()


def test_sparsegpt_scores_are_block_obs_errors():
    model = tiny_qwen3()
    ctx = _ctx(model)
    a, g = ctx.adapter, ctx.adapter.geometry
    calib = _calibration()
    scores = SparseGPTSP().score(ctx, calib)
    stats = collect_input_stats(model, a, calib, sites=("o", "down"), layers=[2], gram=True)
    hinv_o = damped_inverse(stats[(2, "o")].hessian(), 0.01)
    wo = a.attention_input(2).weight.double()
    for h in range(g.num_heads):
        expected = obs_group_error(wo, hinv_o, head_columns(torch.tensor([h]), g.head_dim))
        assert float(scores.values["q_head"][2, h]) == pytest.approx(expected, rel=1e-3)
    group0 = head_columns(torch.arange(g.heads_per_group), g.head_dim)
    assert float(scores.values["kv_group"][2, 0]) == pytest.approx(obs_group_error(wo, hinv_o, group0), rel=1e-3)
    hinv_d = damped_inverse(stats[(2, "down")].hessian(), 0.01)
    wd = a.mlp_input(2).weight.double()
    expected = wd.square().sum(0) / torch.diagonal(hinv_d)
    torch.testing.assert_close(scores.values["mlp_channel"][2].double(), expected, rtol=1e-3, atol=1e-7)
    # protected layers (first 10% rounded up, last) are not scored
    assert float(scores.values["mlp_channel"][0].abs().sum()) == 0.0


def test_sparsegpt_update_reduces_layer_error_on_the_model():
    model = tiny_qwen3()
    ctx = _ctx(model, attention="q_head")
    a = ctx.adapter
    calib = _calibration()
    d = a.mlp_input(1)
    x = _capture_inputs(model, {"d": d}, calib)["d"]
    dense = x @ d.weight.detach().double().t()
    scorer = SparseGPTSP(SparseGPTSP.Params(percdamp=0.0))
    scorer.score(ctx, calib)
    new = ctx.mask.clone()
    new.mlp_channel[1, torch.arange(0, 48, 3)] = False
    zeroed = d.weight.detach().double().clone()
    zeroed[:, ~new.mlp_channel[1]] = 0
    scorer.before_removal(ctx, ctx.mask, new)
    apply_mask(a, new)
    err_obs = float((dense - x @ d.weight.detach().double().t()).square().sum())
    err_zero = float((dense - x @ zeroed.t()).square().sum())
    assert err_obs < 0.9 * err_zero
    keep = new.mlp_channel[1]
    opt = torch.linalg.lstsq(x[:, keep], dense).solution.t()
    torch.testing.assert_close(d.weight.detach().double()[:, keep], opt, atol=2e-4, rtol=1e-3)


@pytest.mark.parametrize("cls", [WandaSP, FLAP, SparseGPTSP])
def test_scorers_refuse_whole_layers(cls):
    from resp_core.recipe import Recipe

    recipe = Recipe.model_validate({"name": "x", "calibration": {"name": "task_data"}, "scorer": {"name": "x"},
                                    "schedule": {"name": "progressive"}, "structures": {"layers": True}})
    with pytest.raises(RespError, match=rf"^structures.layers: scorer '{cls.name}' cannot prune whole layers"):
        cls().check_recipe(recipe, "scorer")
    cls().check_recipe(Recipe.model_validate({**recipe.model_dump(), "structures": {}}), "scorer")


@pytest.mark.parametrize("cls", [OWL, FlapAdaptive])
def test_allocators_refuse_whole_layers(cls):
    from resp_core.recipe import Recipe

    recipe = Recipe.model_validate({"name": "x", "calibration": {"name": "task_data"}, "scorer": {"name": "x"},
                                    "schedule": {"name": "progressive"}, "structures": {"layers": True}})
    with pytest.raises(RespError, match=r"^structures.layers: allocator"):
        cls().check_recipe(recipe, "allocator")


# --------------------------------------------------------------------------------------------------
# OWL
# --------------------------------------------------------------------------------------------------

def test_outlier_ratio_by_hand():
    m = torch.tensor([1.0] * 9 + [11.0])  # mean 2: only 11 > 5·2
    assert outlier_ratio([m[:4], m[4:]], 5.0) == pytest.approx(10.0)


def test_owl_ratios_average_to_target_and_follow_outliers():
    lod = torch.tensor([9.0, 1.0, 3.0, 2.0, 9.0])
    prunable = torch.tensor([False, True, True, True, False])
    r = owl_ratios(lod, 0.3, 0.08, prunable)
    assert r[0] == 0 and r[4] == 0
    assert float(r[prunable].mean()) == pytest.approx(0.3)
    assert r[1] > r[3] > r[2]  # fewer outliers, more pruning
    assert float(r[1] - r[2]) == pytest.approx(2 * 0.08)  # LOD min-max scaled to [0, 2λ]
    # by hand: n = [0, 0.16, 0.08], mean 0.08
    torch.testing.assert_close(r[prunable], torch.tensor([0.38, 0.22, 0.30], dtype=torch.float64))
    assert torch.allclose(owl_ratios(torch.ones(3), 0.2, 0.08), torch.full((3,), 0.2, dtype=torch.float64))


def test_owl_allocator_uses_layer_outliers():
    model = tiny_qwen3(layers=5)
    ctx = _ctx(model)
    calib = _calibration()
    owl = OWL()
    owl.prepare(ctx, calib)
    assert owl.lod.shape == (5,) and bool((owl.lod[1:4] > 0).all()) and owl.lod[0] == 0
    scores = WandaSP().score(ctx, calib)
    mask = owl.allocate(scores, ctx.structures, ctx.mask, 0.4)
    r = owl.last_ratios
    assert float(r[ctx.structures.prunable_layers].mean()) == pytest.approx(0.4)
    kept = mask.effective().mlp_channel.sum(1)
    for i in (1, 2, 3):
        assert int(kept[i]) == round(48 * (1 - float(r[i])))


# --------------------------------------------------------------------------------------------------
# FLAP adaptive structure search
# --------------------------------------------------------------------------------------------------

def test_standardize_per_layer_and_across_layers():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [10.0, 20.0, 30.0, 40.0]])
    valid = torch.tensor([[True, True, True, False], [True, True, True, True]])
    z = standardize(x, valid, "per_layer")
    torch.testing.assert_close(z[0], torch.tensor([-1.0, 0.0, 1.0, 0.0], dtype=torch.float64))
    row = torch.tensor([10.0, 20.0, 30.0, 40.0], dtype=torch.float64)
    torch.testing.assert_close(z[1], (row - row.mean()) / row.std())
    z = standardize(x, valid, "across_layers")
    flat = x[valid].double()
    torch.testing.assert_close(z[valid], (flat - flat.mean()) / flat.std())
    assert z[0, 3] == 0


def test_flap_adaptive_standardizes_channels_like_flap():
    model = tiny_qwen3()
    ctx = _ctx(model)
    g, st = ctx.adapter.geometry, ctx.structures
    torch.manual_seed(0)
    attn = torch.rand(g.num_layers, g.num_heads * g.head_dim)
    mlp = torch.rand(g.num_layers, g.intermediate_size)
    scores = Scores(unit_scores(g, attn, mlp), {"flap_attn_channel": attn})
    z = standardized_scores(scores, st, ctx.mask, "per_layer")
    for i in (1, 2):  # prunable layers
        zc = (attn[i] - attn[i].mean()) / attn[i].std()
        zq = zc.reshape(g.num_heads, g.head_dim).mean(1)
        torch.testing.assert_close(z["kv_group"][i], zq.reshape(g.num_kv_heads, -1).mean(1), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(z["mlp_channel"][i], (mlp[i] - mlp[i].mean()) / mlp[i].std(), atol=1e-5, rtol=1e-5)
    assert float(z["mlp_channel"][0].abs().sum()) == 0  # protected layer
    # then one global threshold filling the parameter budget
    mask = FlapAdaptive().allocate(scores, st, ctx.mask, 0.3)
    from resp_core.model.masks import sparsity_of

    assert sparsity_of(mask, st) == pytest.approx(0.3, abs=0.03)
    removed = ~mask.mlp_channel & st.candidate("mlp_channel")
    kept = mask.mlp_channel & st.candidate("mlp_channel")
    assert bool(removed.any())
    assert float(z["mlp_channel"][removed].max()) <= float(z["mlp_channel"][kept].min())


# --------------------------------------------------------------------------------------------------
# end to end through respctl
# --------------------------------------------------------------------------------------------------

CASES = {
    "wanda_sp": ({"name": "wanda_sp"}, {"name": "global"}),
    "flap": ({"name": "flap"}, {"name": "flap_adaptive"}),
    "sparsegpt": ({"name": "sparsegpt"}, {"name": "global"}),
    "owl": ({"name": "wanda_sp"}, {"name": "owl"}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_respctl_run_and_reload(case, tmp_path, tiny_model_dir, monkeypatch):
    import resp_core.pipeline as pipeline
    from resp_core import load_pruned
    from transformers import AutoModelForCausalLM

    captured = {}
    real_compacted_copy = pipeline.compacted_copy

    def spy(model, mask):
        captured["masked"] = model
        return real_compacted_copy(model, mask)

    monkeypatch.setattr(pipeline, "compacted_copy", spy)
    scorer, allocator = CASES[case]
    recipe = small_recipe(tiny_model_dir, scorer=scorer, allocator=allocator)
    recipe["evaluation"] = {"evaluate_dense": False, "evaluators": []}
    out = tmp_path / "run"
    result = runner.invoke(app, ["run", str(write(tmp_path, recipe)), "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "metrics.json").read_text())
    assert rows[-1]["target"] == 0.4
    assert rows[-1]["sparsity"] == pytest.approx(0.4, abs=0.06)
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "finished" and info["compaction_max_abs_logit_diff"] <= TOL

    masked = captured["masked"]
    reloaded = load_pruned(out / "model")
    ids = torch.randint(3, 200, (2, 11), generator=torch.Generator().manual_seed(0))
    att = torch.ones_like(ids)
    att[1, 8:] = 0
    with torch.no_grad():
        a = masked(input_ids=ids, attention_mask=att).logits
        b = reloaded(input_ids=ids, attention_mask=att).logits
    assert float((a - b).abs()[att.bool()].max()) <= TOL

    dense = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ad, am = adapter_for(dense), adapter_for(masked)
    if case == "flap":  # the compensation biases exist, are non-zero and were saved
        biases = [am.mlp_input(i).bias for i in range(ad.geometry.num_layers)]
        assert any(b is not None and float(b.detach().abs().max()) > 0 for b in biases)
        saved = json.loads((out / "model" / "resp_pruning.json").read_text())
        assert any(rec["down_proj_bias"] for rec in saved["layers"])
    if case == "sparsegpt":  # kept columns were re-fitted, not just masked
        diffs = []
        for i in range(ad.geometry.num_layers):
            w0, w1 = ad.mlp_input(i).weight.detach(), am.mlp_input(i).weight.detach()
            kept = w1.abs().sum(0) > 0
            diffs.append(float((w0[:, kept] - w1[:, kept]).abs().max()) if bool(kept.any()) else 0.0)
        assert max(diffs) > 1e-4


def test_sparsegpt_with_whole_layers_is_refused(tmp_path, tiny_model_dir):
    recipe = small_recipe(tiny_model_dir, scorer={"name": "sparsegpt"}, **{"structures.layers": True})
    out = tmp_path / "run"
    for cmd in (["validate", str(write(tmp_path, recipe))], ["run", str(write(tmp_path, recipe)), "--out", str(out)]):
        result = runner.invoke(app, cmd)
        assert_user_error(result, "structures.layers", "scorer 'sparsegpt' cannot prune whole layers")
        assert len([ln for ln in result.output.strip().splitlines() if ln.strip()]) == 1
        assert not out.exists()
