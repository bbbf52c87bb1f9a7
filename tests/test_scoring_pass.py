"""The gradient pass behind the Taylor scorers: loss reductions (sample_mean / token_mean) against
hand-computed gradients, equality with the plain full-logits computation, bf16 weights with
float32 accumulation, gradient checkpointing, the KV-group block constant, and the non-finite /
degenerate / empty-calibration checks."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_qwen3
from resp_plugins.scorers.taylor import GISPScorer, TaylorScorer
from resp_core.errors import NumericalError, RunFailed
from resp_core.interfaces import CalibrationSample, CalibrationSet, Progress, RunContext
from resp_core.model.adapter import adapter_for
from resp_core.model.masks import MaskSet
from resp_core.model.structures import StructureSpec, build_structures, unit_costs
from resp_core.scoring import (accumulate_gradients, aggregate, block_constants, check_scores, gradient_pass,
                               normalize_scores, taylor_unit_scores)

NQ, NKV, HD, HID, INTER = 6, 3, 8, 32, 48
HPG = NQ // NKV
UNPROTECTED = StructureSpec(protect_first=0.0, protect_last=0)

SAMPLES = [
    CalibrationSample([5, 6, 7], [8, 9, 10, 11]),
    CalibrationSample([], [12, 13, 14, 15, 16]),
    CalibrationSample([20, 21, 22, 23, 24, 25], [30]),
    CalibrationSample([3, 4], [40, 41, 42, 43, 44, 45, 46]),
    CalibrationSample([50], [51, 52]),
]


def _model(seed: int = 0, layers: int = 2, dtype=torch.float32):
    m = tiny_qwen3(seed=seed, vocab=64, layers=layers, heads=NQ, kv=NKV, head_dim=HD, hidden=HID, inter=INTER)
    return m.to(dtype)


def _ctx(model, spec: StructureSpec = StructureSpec(), step: int = 0) -> RunContext:
    adapter = adapter_for(model)
    return RunContext(model=model, tokenizer=None, adapter=adapter, structures=build_structures(adapter, spec),
                      generator=None, tasks=lambda n: None, progress=Progress(), step=step)


def _weights(model):
    return [lin.weight for lin in adapter_for(model).prunable_linears().values()]


def _summed_nll_grads(model, sample: CalibrationSample):
    """(Σ_t ℓ_t, its gradient, |T|) for one sample under the decode loss, plain autograd, no padding."""
    ids = torch.tensor([sample.prompt_ids + sample.target_ids])
    labels = torch.tensor([[-100] * len(sample.prompt_ids) + sample.target_ids])
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, :-1]
    nll = torch.nn.functional.cross_entropy(logits, labels[0, 1:], ignore_index=-100, reduction="sum")
    grads = torch.autograd.grad(nll, _weights(model))
    return float(nll.detach()), grads, int((labels[0, 1:] != -100).sum())


# --------------------------------------------------------------------------------------------------
# sample_mean vs token_mean
# --------------------------------------------------------------------------------------------------

def test_reductions_on_two_sequences_of_different_length_by_hand():
    """A: 1 target token, B: 7.  token_mean = (S_A + S_B) / 8, gradient (G_A + G_B) / 8;
    sample_mean = (S_A / 1 + S_B / 7) / 2, gradient (G_A + G_B / 7) / 2 — not proportional."""
    model = _model(seed=11, dtype=torch.float64)
    a = CalibrationSample([5, 6], [7])
    b = CalibrationSample([9], [10, 11, 12, 13, 14, 15, 16])
    s_a, g_a, n_a = _summed_nll_grads(model, a)
    s_b, g_b, n_b = _summed_nll_grads(model, b)
    assert (n_a, n_b) == (1, 7)
    cal = CalibrationSet([a, b], pad_id=0)
    adapter = adapter_for(model)
    tok = gradient_pass(model, adapter, cal, loss="decode", reduction="token_mean", batch_size=2)
    tok_grads = [tok.grad(w).clone() for w in _weights(model)]
    for w in _weights(model):
        w.grad = None
    smp = gradient_pass(model, adapter, cal, loss="decode", reduction="sample_mean", batch_size=2)
    smp_grads = [smp.grad(w).clone() for w in _weights(model)]

    assert tok.loss == pytest.approx((s_a + s_b) / 8, rel=1e-9)
    assert smp.loss == pytest.approx((s_a / 1 + s_b / 7) / 2, rel=1e-9)
    assert (tok.samples, tok.tokens) == (2, 8)
    def close(got, want):  # 1e-6 of the tensor's scale (transformers' RMSNorm runs in float32 inside)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6 * float(want.abs().max()))

    for gt, gs, ga, gb in zip(tok_grads, smp_grads, g_a, g_b):
        close(gt, (ga + gb) / 8)
        close(gs, (ga / 1 + gb / 7) / 2)
        # the predicted difference: sample_mean weighs A 4x and B 4/7x relative to token_mean
        close(gs - gt, ga * (1 / 2 - 1 / 8) + gb * (1 / 14 - 1 / 8))
    flat_t = torch.cat([g.reshape(-1) for g in tok_grads])
    flat_s = torch.cat([g.reshape(-1) for g in smp_grads])
    cos = float(flat_t @ flat_s / (flat_t.norm() * flat_s.norm()))
    assert cos < 0.99  # not one constant multiple of the other


def test_reductions_can_rank_structures_differently():
    model = _model(seed=12)
    samples = [CalibrationSample([5, 6], [7]), CalibrationSample([8], list(range(10, 40))),
               CalibrationSample([3], [50, 51])]
    ctx = _ctx(model)
    cal = CalibrationSet(samples, pad_id=0)
    smp = TaylorScorer(TaylorScorer.Params(reduction="sample_mean", normalize="none")).score(ctx, cal).values
    tok = TaylorScorer(TaylorScorer.Params(reduction="token_mean", normalize="none")).score(ctx, cal).values
    assert not torch.equal(smp["mlp_channel"].argsort(dim=1), tok["mlp_channel"].argsort(dim=1))
    order = lambda v: v.reshape(-1).argsort()  # noqa: E731 - global order across layers
    assert not torch.equal(order(smp["q_head"]), order(tok["q_head"]))


def test_sample_mean_is_the_default_of_resp_and_gisp():
    assert TaylorScorer.Params().reduction == "sample_mean"
    assert GISPScorer.Params().reduction == "sample_mean"
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        TaylorScorer.Params(reduction="batch_mean")
    with pytest.raises(ValidationError):
        TaylorScorer.Params(batch_size=0)


# --------------------------------------------------------------------------------------------------
# The efficient pass equals the plain full-logits computation
# --------------------------------------------------------------------------------------------------

def _plain_full_logits(model, cal: CalibrationSet, loss: str, reduction: str, batch_size: int):
    """Full [B, T, V] logits from the model's own forward, loss over the shifted labels."""
    batches = list(cal.batches(batch_size, loss))
    counts = [(b.labels[:, 1:] != -100).sum(1) for b in batches]
    tokens = sum(int(c.sum()) for c in counts)
    samples = sum(int((c > 0).sum()) for c in counts)
    total = 0.0
    for b, c in zip(batches, counts):
        logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), b.labels[:, 1:],
                                                ignore_index=-100, reduction="none")
        total = total + (nll.sum() / tokens if reduction == "token_mean"
                         else (nll.sum(1) / c.clamp_min(1)).sum() / samples)
    return float(total.detach()), torch.autograd.grad(total, _weights(model))


@pytest.mark.parametrize("reduction", ["sample_mean", "token_mean"])
@pytest.mark.parametrize("loss", ["decode", "full"])
def test_pass_equals_full_logits_computation(loss, reduction):
    cal = CalibrationSet(SAMPLES, pad_id=0)
    for dtype, loss_tol, grad_tol in ((torch.float32, 1e-6, 1e-6), (torch.float64, 1e-12, 1e-8)):
        model = _model(seed=13, dtype=dtype)
        adapter = adapter_for(model)
        ref_loss, ref = _plain_full_logits(model, cal, loss, reduction, batch_size=2)
        for checkpointing in (False, True):
            gp = gradient_pass(model, adapter, cal, loss=loss, reduction=reduction, batch_size=2,
                               gradient_checkpointing=checkpointing)
            assert abs(gp.loss - ref_loss) <= loss_tol * max(1.0, abs(ref_loss))
            for w, r in zip(_weights(model), ref):
                got = gp.grad(w)
                if dtype == torch.float32:  # relative to the tensor's norm (fp32 summation order differs)
                    assert float((got - r).norm() / r.norm()) <= grad_tol
                else:
                    torch.testing.assert_close(got, r, rtol=grad_tol, atol=grad_tol * float(r.abs().max()))
                w.grad = None
        # checkpointing restored the layers' own forward
        assert all("forward" not in layer.__dict__ for layer in adapter.layers)


def test_output_head_sees_only_labelled_positions():
    model = _model(seed=14)
    rows = []
    hook = model.lm_head.register_forward_hook(lambda mod, inp, out: rows.append(tuple(inp[0].shape)))
    try:
        cal = CalibrationSet(SAMPLES, pad_id=0)
        gradient_pass(model, adapter_for(model), cal, loss="decode", batch_size=2)
    finally:
        hook.remove()
    per_batch = [int((b.labels[:, 1:] != -100).sum()) for b in cal.batches(2, "decode")]
    assert rows == [(n, HID) for n in per_batch]  # [N labelled, hidden], never [B, T, hidden]
    assert sum(per_batch) < sum(len(s.prompt_ids) + len(s.target_ids) for s in SAMPLES)


def test_bf16_weights_accumulate_gradients_and_scores_in_fp32():
    ref_model = _model(seed=15).to(torch.bfloat16).to(torch.float32)  # the same, bf16-representable weights
    model = _model(seed=15, dtype=torch.bfloat16)
    cal = CalibrationSet(SAMPLES, pad_id=0)
    gp = gradient_pass(model, adapter_for(model), cal, loss="decode", reduction="sample_mean", batch_size=1)
    for w in _weights(model):
        assert w.grad is None and gp.grad(w).dtype == torch.float32
    got = taylor_unit_scores(adapter_for(model), gp)
    ref_gp = gradient_pass(ref_model, adapter_for(ref_model), cal, loss="decode", reduction="sample_mean", batch_size=1)
    want = taylor_unit_scores(adapter_for(ref_model), ref_gp)
    for kind in ("q_head", "kv_group", "mlp_channel"):
        assert got[kind].dtype == torch.float32
        rel = float((got[kind] - want[kind]).norm() / want[kind].norm())
        assert rel < 0.05, kind  # bf16 forward/backward rounding only
    # the compatibility wrapper hands the float32 sums back in the weights' own dtype
    accumulate_gradients(model, adapter_for(model), cal, "decode", 2)
    assert all(w.grad is not None and w.grad.dtype == torch.bfloat16 for w in _weights(model))


def test_gradient_checkpointing_gives_the_same_scores():
    model = _model(seed=16)
    ctx = _ctx(model)
    cal = CalibrationSet(SAMPLES, pad_id=0)
    plain = TaylorScorer(TaylorScorer.Params(batch_size=2)).score(ctx, cal).values
    ckpt = TaylorScorer(TaylorScorer.Params(batch_size=2, gradient_checkpointing=True)).score(ctx, cal).values
    for kind in plain:
        torch.testing.assert_close(ckpt[kind], plain[kind], rtol=1e-6, atol=0)


# --------------------------------------------------------------------------------------------------
# Block constants consistent with the unit's size
# --------------------------------------------------------------------------------------------------

def test_kv_group_block_constant_scales_with_the_units_size():
    """Uniform per-weight saliency c: a query head (q rows + o columns, 2·hd·hidden weights) scores
    c·2·hd·hidden / (4·hd·hidden) = c/2 under the authors' constant; a KV group is n_rep + 1 such
    blocks and its constant is n_rep + 1 times larger, so it scores c/2 as well.  Divided by one
    head's constant it would score (n_rep + 1)·c/2."""
    model = _model(seed=17)
    adapter = adapter_for(model)
    c = 3.0
    raw = aggregate(adapter, lambda i: {k: torch.full_like(v, c) for k, v in _shapes(adapter, i).items()})
    norm = normalize_scores(raw, "block_constant", adapter, unit_costs(adapter))
    torch.testing.assert_close(norm["q_head"], torch.full_like(norm["q_head"], c / 2))
    torch.testing.assert_close(norm["kv_group"], torch.full_like(norm["kv_group"], c / 2))
    torch.testing.assert_close(norm["mlp_channel"], torch.full_like(norm["mlp_channel"], c * HID / INTER))  # theirs
    consts = block_constants(adapter)
    assert consts["q_head"] == 4 * HD * HID  # the authors' per-head constant, exact
    assert consts["mlp_channel"] == 3 * INTER
    assert consts["kv_group"] == (HPG + 1) * 4 * HD * HID
    one_head = raw["kv_group"] / (4 * HD * HID)
    torch.testing.assert_close(one_head, torch.full_like(one_head, (HPG + 1) * c / 2))


def _shapes(adapter, i):
    a, m = adapter.attention_parts(i), adapter.mlp_parts(i)
    return {"q": a.q.weight, "k": a.k.weight, "v": a.v.weight, "o": a.o.weight,
            "gate": m.gate.weight, "up": m.up.weight, "down": m.down.weight}


def test_kv_group_scores_on_the_scale_of_query_heads_on_a_tiny_model():
    model = _model(seed=18)
    ctx = _ctx(model)
    cal = CalibrationSet(SAMPLES, pad_id=0)
    raw = TaylorScorer(TaylorScorer.Params(normalize="none")).score(ctx, cal).values
    blk = TaylorScorer(TaylorScorer.Params(normalize="block_constant")).score(ctx, cal).values
    torch.testing.assert_close(blk["q_head"], raw["q_head"] / (4 * HD * HID))
    torch.testing.assert_close(blk["kv_group"], raw["kv_group"] / ((HPG + 1) * 4 * HD * HID))


# --------------------------------------------------------------------------------------------------
# Non-finite, degenerate and empty calibration
# --------------------------------------------------------------------------------------------------

def test_one_nan_weight_stops_with_one_line_naming_step_layer_and_kind():
    model = _model(seed=19)
    with torch.no_grad():
        adapter_for(model).mlp_parts(1).up.weight[3, 4] = float("nan")
    with pytest.raises(NumericalError) as e:
        TaylorScorer().score(_ctx(model, step=3), CalibrationSet(SAMPLES, pad_id=0))
    msg = str(e.value)
    assert "\n" not in msg and "step 3" in msg and "layer 1" in msg and "mlp_channel" in msg and "nan" in msg


def test_norm_weight_times_1e36_stops():
    model = _model(seed=20)
    with torch.no_grad():
        model.model.layers[1].post_attention_layernorm.weight.mul_(1e36)  # loss overflows to nan
    with pytest.raises(NumericalError, match=r"step 2: .*layer 1"):
        GISPScorer().score(_ctx(model, step=2), CalibrationSet(SAMPLES, pad_id=0))


def test_vanishing_gradients_are_degenerate_scores():
    """An input norm x 1e36 leaves the loss finite but every later RMSNorm's gradient underflows:
    every score is exactly 0, which would prune in index order."""
    model = _model(seed=21, layers=4)
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight.mul_(1e36)
    with pytest.raises(NumericalError, match=r"step 5: degenerate scores .*kv_group.* exactly 0\.0"):
        TaylorScorer().score(_ctx(model, UNPROTECTED, step=5), CalibrationSet(SAMPLES, pad_id=0))


def test_non_finite_gradient_is_named():
    model = _model(seed=22)
    adapter = adapter_for(model)
    handle = adapter.attention_parts(1).k.weight.register_hook(lambda g: g * float("inf"))
    try:
        with pytest.raises(NumericalError, match=r"step 4: non-finite gradient in layer 1, unit kind kv_group \(k "):
            TaylorScorer().score(_ctx(model, step=4), CalibrationSet(SAMPLES, pad_id=0))
    finally:
        handle.remove()


def test_empty_calibration_is_run_failed():
    model = _model(seed=23)
    prompts_only = [CalibrationSample([5, 6, 7], []), CalibrationSample([8, 9], [])]
    with pytest.raises(RunFailed, match="step 1: calibration has no target tokens") as e:
        TaylorScorer().score(_ctx(model, step=1), CalibrationSet(prompts_only, pad_id=0))
    assert not isinstance(e.value, NumericalError)
    with pytest.raises(RunFailed):
        TaylorScorer().score(_ctx(model), CalibrationSet([], pad_id=0))
    # the full-sequence loss has targets in the same samples
    GISPScorer(GISPScorer.Params(loss="full")).score(_ctx(model), CalibrationSet(prompts_only, pad_id=0))


def test_check_scores_by_hand():
    model = _model(seed=24, layers=3)
    adapter = adapter_for(model)
    spec = StructureSpec(protect_first=0.0, protect_last=1)  # layer 2 protected
    structures = build_structures(adapter, spec)
    torch.manual_seed(0)
    ok = {"kv_group": torch.rand(3, NKV) + 0.1, "mlp_channel": torch.rand(3, INTER) + 0.1}
    check_scores(ok, 1, structures)
    bad = dict(ok, mlp_channel=ok["mlp_channel"].clone())
    bad["mlp_channel"][1, 7] = float("inf")
    with pytest.raises(NumericalError, match=r"^step 1: non-finite scores \(inf\) from scorer 'x' in layer 1, "
                                             r"unit kind mlp_channel$"):
        check_scores(bad, 1, structures, scorer="x")
    zeros = dict(ok, kv_group=torch.zeros(3, NKV))
    with pytest.raises(NumericalError, match=r"all 6 units of kind kv_group in layers 0-1 score exactly 0\.0"):
        check_scores(zeros, 7, structures)
    # equal scores in protected layers only, or in a kind the run does not prune: fine
    protected_equal = dict(ok, kv_group=ok["kv_group"].clone())
    protected_equal["kv_group"][2] = 1.0
    check_scores(protected_equal, 1, structures)
    check_scores(dict(ok, q_head=torch.zeros(3, NQ)), 1, structures)
    # units already removed do not count: two live units with different scores are fine
    mask = MaskSet.full(adapter.geometry)
    mask.kv_group[:, :] = False
    mask.kv_group[0, 0] = mask.kv_group[1, 2] = True
    live_differ = dict(ok, kv_group=torch.zeros(3, NKV))
    live_differ["kv_group"][0, 0], live_differ["kv_group"][1, 2] = 1.0, 2.0
    check_scores(live_differ, 1, structures, mask)
    live_differ["kv_group"][1, 2] = 1.0
    with pytest.raises(NumericalError, match="degenerate"):
        check_scores(live_differ, 1, structures, mask)


def test_activation_scorer_runs_the_same_check():
    from resp_core.registry import get_registry

    model = _model(seed=25)
    with torch.no_grad():
        adapter_for(model).attention_input(0).weight[0, 0] = float("nan")
    with pytest.raises(NumericalError, match=r"step 6: .*wanda_sp.* layer 0"):
        get_registry().create("scorer", "wanda_sp", {}, "scorer").score(_ctx(model, UNPROTECTED, step=6), CalibrationSet(SAMPLES, pad_id=0))
