"""Scoring: aggregation of per-weight saliency onto structures, the first-order Taylor scorer
(decode loss, full loss) against plain autograd, and score normalization."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import tiny_qwen3
from resp_plugins.scorers.taylor import GISPScorer, TaylorScorer
from resp_core.interfaces import CalibrationSample, CalibrationSet, Progress, RunContext
from resp_core.model.adapter import adapter_for
from resp_core.model.structures import StructureSpec, build_structures, unit_costs
from resp_core.scoring import aggregate, normalize_scores

L, NQ, NKV, HD, HID, INTER = 2, 6, 3, 8, 32, 48
HPG = NQ // NKV


def _model(seed: int = 0):
    return tiny_qwen3(seed=seed, vocab=64, layers=L, heads=NQ, kv=NKV, head_dim=HD, hidden=HID, inter=INTER)


def _ctx(model) -> RunContext:
    adapter = adapter_for(model)
    return RunContext(model=model, tokenizer=None, adapter=adapter,
                      structures=build_structures(adapter, StructureSpec()), generator=None,
                      tasks=lambda n: None, progress=Progress())


SAMPLES = [
    CalibrationSample([5, 6, 7], [8, 9, 10, 11]),
    CalibrationSample([], [12, 13, 14, 15, 16]),  # generic text: the whole sequence is the target
    CalibrationSample([20, 21, 22, 23, 24, 25], [30]),
    CalibrationSample([3, 4], [40, 41, 42, 43, 44, 45, 46]),
    CalibrationSample([50], [51, 52]),
]


# --------------------------------------------------------------------------------------------------
# aggregate
# --------------------------------------------------------------------------------------------------

def _parts_shapes(adapter, i):
    a, m = adapter.attention_parts(i), adapter.mlp_parts(i)
    return {"q": a.q.weight.shape, "k": a.k.weight.shape, "v": a.v.weight.shape, "o": a.o.weight.shape,
            "gate": m.gate.weight.shape, "up": m.up.weight.shape, "down": m.down.weight.shape}


def test_aggregate_constant_saliency_by_hand():
    adapter = adapter_for(_model())
    const = {"q": 1, "k": 2, "v": 3, "o": 4, "gate": 5, "up": 6, "down": 7}

    def saliency(i):
        return {k: torch.full(shape, float(const[k] * (i + 1))) for k, shape in _parts_shapes(adapter, i).items()}

    out = aggregate(adapter, saliency)
    assert set(out) == {"q_head", "kv_group", "mlp_channel", "layer"}
    assert out["q_head"].shape == (L, NQ) and out["kv_group"].shape == (L, NKV)
    assert out["mlp_channel"].shape == (L, INTER) and out["layer"].shape == (L, 1)
    for i in range(L):
        f = i + 1
        q_head = f * (HD * HID * 1 + HID * HD * 4)  # q rows + o columns
        assert torch.all(out["q_head"][i] == q_head)
        kv = HPG * q_head + f * (HD * HID * 2 + HD * HID * 3)  # its query heads + k rows + v rows
        assert torch.all(out["kv_group"][i] == kv)
        assert torch.all(out["mlp_channel"][i] == f * HID * (5 + 6 + 7))  # gate row + up row + down column
        total = f * (NQ * HD * HID * (1 + 4) + NKV * HD * HID * (2 + 3) + INTER * HID * (5 + 6 + 7))
        assert float(out["layer"][i, 0]) == total


def test_aggregate_indexes_units_correctly():
    """Per-unit distinct saliency: head h owns q rows h*hd.. and o columns h*hd..; KV head k
    owns k/v rows k*hd..; channel c owns gate/up row c and down column c."""
    adapter = adapter_for(_model())

    def saliency(i):
        sh = _parts_shapes(adapter, i)
        head_of_row = (torch.arange(NQ * HD) // HD + 1).float()
        kv_of_row = (torch.arange(NKV * HD) // HD + 1).float()
        ch = (torch.arange(INTER) + 1).float()
        return {
            "q": head_of_row[:, None].expand(sh["q"]).clone(),
            "o": 10 * head_of_row[None, :].expand(sh["o"]).clone(),
            "k": 100 * kv_of_row[:, None].expand(sh["k"]).clone(),
            "v": 1000 * kv_of_row[:, None].expand(sh["v"]).clone(),
            "gate": ch[:, None].expand(sh["gate"]).clone(),
            "up": 2 * ch[:, None].expand(sh["up"]).clone(),
            "down": 3 * ch[None, :].expand(sh["down"]).clone(),
        }

    out = aggregate(adapter, saliency)
    q_exp = torch.tensor([HD * HID * 11.0 * (h + 1) for h in range(NQ)])
    kv_exp = torch.tensor([sum(float(q_exp[h]) for h in range(k * HPG, (k + 1) * HPG)) + HD * HID * 1100.0 * (k + 1)
                           for k in range(NKV)])
    mlp_exp = torch.tensor([HID * 6.0 * (c + 1) for c in range(INTER)])
    for i in range(L):
        torch.testing.assert_close(out["q_head"][i], q_exp)
        torch.testing.assert_close(out["kv_group"][i], kv_exp)
        torch.testing.assert_close(out["mlp_channel"][i], mlp_exp)
        torch.testing.assert_close(out["layer"][i, 0], q_exp.sum() + HD * HID * 1100.0 * 6 + mlp_exp.sum())


# --------------------------------------------------------------------------------------------------
# calibration batches
# --------------------------------------------------------------------------------------------------

def test_calibration_batches_and_token_counts():
    cal = CalibrationSet(SAMPLES, pad_id=0)
    # decode: target tokens only; a sample without prompt loses its first token to the shift
    assert cal.target_token_count("decode") == 4 + 4 + 1 + 7 + 2
    assert cal.target_token_count("full") == 6 + 4 + 6 + 8 + 2
    b = next(cal.batches(2, "decode"))
    assert b.input_ids.tolist() == [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14, 15, 16, 0, 0]]
    assert b.attention_mask.tolist() == [[1] * 7, [1] * 5 + [0, 0]]
    assert b.labels.tolist() == [[-100, -100, -100, 8, 9, 10, 11], [12, 13, 14, 15, 16, -100, -100]]
    b = next(cal.batches(1, "full"))
    assert b.labels.tolist() == [[5, 6, 7, 8, 9, 10, 11]]
    assert sum(len(x.input_ids) for x in cal.batches(2)) == 5
    # the counts agree with the labels the batches carry (after the causal shift)
    for loss in ("decode", "full"):
        n = sum(int((x.labels[:, 1:] != -100).sum()) for x in cal.batches(3, loss))
        assert n == cal.target_token_count(loss)
    short = CalibrationSet(SAMPLES, pad_id=0, max_length=4)
    assert short.target_token_count("decode") == 1 + 3 + 0 + 2 + 2
    assert all(x.input_ids.shape[1] <= 4 for x in short.batches(2))
    with pytest.raises(ValueError):
        next(cal.batches(2, "bogus"))


# --------------------------------------------------------------------------------------------------
# Taylor scorer vs plain autograd
# --------------------------------------------------------------------------------------------------

def _reference_grads(model, samples, loss: str, reduction: str = "sample_mean"):
    """Gradient of the calibration loss (prompt labels -100 for 'decode'), one sample at a time,
    no padding, plain autograd on full logits.  ``sample_mean``: mean over samples (with at least
    one target) of each sample's mean token NLL; ``token_mean``: the set-level mean token NLL."""
    ref = copy.deepcopy(model)
    ref.zero_grad(set_to_none=True)
    sums, counts = [], []
    for s in samples:
        ids = torch.tensor([s.prompt_ids + s.target_ids])
        labels = torch.tensor([([-100] * len(s.prompt_ids) if loss == "decode" else s.prompt_ids) + s.target_ids])
        logits = ref(input_ids=ids).logits
        tgt = labels[0, 1:]
        valid = tgt != -100
        if valid.any():
            logp = torch.log_softmax(logits[0, :-1].float(), dim=-1)
            sums.append(-logp[valid].gather(1, tgt[valid][:, None]).sum())
            counts.append(int(valid.sum()))
    if reduction == "token_mean":
        mean = torch.stack(sums).sum() / sum(counts)
    else:
        mean = torch.stack([t / n for t, n in zip(sums, counts)]).mean()
    mean.backward()
    return ref, float(mean.detach())


def _reference_scores(ref_model, granularity: str):
    a = adapter_for(ref_model)
    out = {k: torch.zeros(L, n, dtype=torch.float64) for k, n in
           (("q_head", NQ), ("kv_group", NKV), ("mlp_channel", INTER), ("layer", 1))}
    for i in range(L):
        at, m = a.attention_parts(i), a.mlp_parts(i)
        wg = {name: (lin.weight.detach().double() * lin.weight.grad.double()) for name, lin in
              (("q", at.q), ("k", at.k), ("v", at.v), ("o", at.o), ("gate", m.gate), ("up", m.up), ("down", m.down))}
        if granularity == "element":
            wg = {k: v.abs() for k, v in wg.items()}
        q_signed = []
        for h in range(NQ):
            r = slice(h * HD, (h + 1) * HD)
            q_signed.append(wg["q"][r].sum() + wg["o"][:, r].sum())
        for k in range(NKV):
            r = slice(k * HD, (k + 1) * HD)
            out["kv_group"][i, k] = sum(q_signed[k * HPG:(k + 1) * HPG]) + wg["k"][r].sum() + wg["v"][r].sum()
        out["q_head"][i] = torch.stack(q_signed)
        for c in range(INTER):
            out["mlp_channel"][i, c] = wg["gate"][c].sum() + wg["up"][c].sum() + wg["down"][:, c].sum()
        out["layer"][i, 0] = sum(v.sum() for v in wg.values())
    if granularity == "group":
        out = {k: v.abs() for k, v in out.items()}
    return out


def _score(model, samples, **params):
    scorer = TaylorScorer(TaylorScorer.Params(**params))
    return scorer.score(_ctx(model), CalibrationSet(samples, pad_id=0))


def _assert_scores_close(got: dict, exp: dict, rtol=2e-4):
    for kind in ("q_head", "kv_group", "mlp_channel", "layer"):
        g, e = got[kind].double(), exp[kind]
        assert g.shape == e.shape, kind
        torch.testing.assert_close(g, e, rtol=rtol, atol=rtol * float(e.abs().max()), msg=kind)


@pytest.mark.parametrize("reduction", ["sample_mean", "token_mean"])
@pytest.mark.parametrize("loss", ["decode", "full"])
def test_taylor_matches_autograd_for_every_batch_size(loss, reduction):
    model = _model(seed=1)
    ref, mean = _reference_grads(model, SAMPLES, loss, reduction)
    expected = _reference_scores(ref, "element")
    assert float(expected["q_head"].min()) > 0
    for bs in (1, 2, 5, 16):
        s = _score(model, SAMPLES, loss=loss, reduction=reduction, normalize="none", granularity="element",
                   batch_size=bs)
        _assert_scores_close(s.values, expected)
        assert float(s.layer_stats["calibration_loss"][0]) == pytest.approx(mean, rel=1e-5)


def test_taylor_group_granularity_matches_autograd():
    model = _model(seed=2)
    ref, _ = _reference_grads(model, SAMPLES, "decode")
    expected = _reference_scores(ref, "group")
    s = _score(model, SAMPLES, loss="decode", normalize="none", granularity="group", batch_size=2)
    _assert_scores_close(s.values, expected, rtol=1e-3)
    # |sum| <= sum |.|: the group score never exceeds the element score
    elem = _score(model, SAMPLES, loss="decode", normalize="none", granularity="element", batch_size=2)
    for kind in s.values:
        assert bool((s.values[kind] <= elem.values[kind] * (1 + 1e-5)).all())
        assert not torch.allclose(s.values[kind], elem.values[kind])


def test_decode_and_full_loss_differ():
    model = _model(seed=3)
    dec = _score(model, SAMPLES, loss="decode", normalize="none", batch_size=2)
    full = _score(model, SAMPLES, loss="full", normalize="none", batch_size=2)
    gisp = GISPScorer(GISPScorer.Params(loss="full")).score(_ctx(model), CalibrationSet(SAMPLES, pad_id=0))
    assert GISPScorer.Params().loss == "decode" and TaylorScorer.Params().loss == "decode"  # they differ in data
    for kind in ("q_head", "kv_group", "mlp_channel"):
        assert not torch.allclose(dec.values[kind], full.values[kind], rtol=1e-2)
    assert float(dec.layer_stats["calibration_loss"][0]) != pytest.approx(float(full.layer_stats["calibration_loss"][0]))
    # GISP = full loss with block_constant normalization
    g = adapter_for(model).geometry
    torch.testing.assert_close(gisp.values["mlp_channel"], full.values["mlp_channel"] / (3 * g.intermediate_size))


def test_empty_target_contributes_nothing_with_decode_loss():
    model = _model(seed=4)
    extra = CalibrationSample([33, 34, 35, 36, 37, 38, 39, 40, 41], [])  # prompt only
    with_extra = SAMPLES[:2] + [extra] + SAMPLES[2:]
    assert CalibrationSet(with_extra, 0).target_token_count("decode") == CalibrationSet(SAMPLES, 0).target_token_count("decode")
    for bs in (1, 3):
        base = _score(model, SAMPLES, loss="decode", normalize="none", batch_size=bs)
        more = _score(model, with_extra, loss="decode", normalize="none", batch_size=bs)
        _assert_scores_close(more.values, {k: v.double() for k, v in base.values.items()}, rtol=1e-4)
        assert float(more.layer_stats["calibration_loss"][0]) == pytest.approx(float(base.layer_stats["calibration_loss"][0]), rel=1e-5)
    # ... but it does count under the full-sequence loss
    base = _score(model, SAMPLES, loss="full", normalize="none", batch_size=3)
    more = _score(model, with_extra, loss="full", normalize="none", batch_size=3)
    assert not torch.allclose(more.values["mlp_channel"], base.values["mlp_channel"], rtol=1e-3)


def test_decode_scores_ignore_which_tokens_the_prompt_ends_with_as_labels():
    """Under the decode loss only target tokens are predicted: moving the prompt/target boundary
    changes the scores, and the scores equal the reference with the prompt labels masked."""
    model = _model(seed=5)
    moved = [CalibrationSample(s.prompt_ids + s.target_ids[:1], s.target_ids[1:]) if s.prompt_ids else s
             for s in SAMPLES]
    a = _score(model, SAMPLES, loss="decode", normalize="none", batch_size=2)
    b = _score(model, moved, loss="decode", normalize="none", batch_size=2)
    assert not torch.allclose(a.values["mlp_channel"], b.values["mlp_channel"], rtol=1e-3)
    ref, _ = _reference_grads(model, moved, "decode")
    _assert_scores_close(b.values, _reference_scores(ref, "element"))


def test_scoring_restores_requires_grad_training_mode_and_clears_grads():
    model = _model(seed=6)
    adapter = adapter_for(model)
    model.model.embed_tokens.weight.requires_grad_(False)
    adapter.attention_parts(0).q.weight.requires_grad_(False)  # a prunable weight frozen by the caller
    model.model.norm.weight.requires_grad_(True)
    model.train()
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    weights_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _score(model, SAMPLES, loss="decode", normalize="block_constant", batch_size=2)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    assert not adapter.attention_parts(0).q.weight.requires_grad
    assert model.training
    for name, lin in adapter.prunable_linears().items():
        assert lin.weight.grad is None, name
    for n, p in model.named_parameters():
        assert p.grad is None, n  # non-prunable parameters were frozen during the pass
        assert torch.equal(p.detach(), weights_before[n]), n  # scoring does not change weights


def test_taylor_normalization_applied():
    model = _model(seed=7)
    raw = _score(model, SAMPLES, normalize="none", batch_size=5).values
    blk = _score(model, SAMPLES, normalize="block_constant", batch_size=5).values
    per = _score(model, SAMPLES, normalize="per_parameter", batch_size=5).values
    c = unit_costs(adapter_for(model))
    torch.testing.assert_close(blk["q_head"], raw["q_head"] / (4 * HD * HID))
    torch.testing.assert_close(blk["kv_group"], raw["kv_group"] / (4 * HD * HID * (HPG + 1)))  # unit's size
    torch.testing.assert_close(blk["mlp_channel"], raw["mlp_channel"] / (3 * INTER))
    torch.testing.assert_close(per["kv_group"], raw["kv_group"] / c["kv_group"])


# --------------------------------------------------------------------------------------------------
# normalize_scores
# --------------------------------------------------------------------------------------------------

def test_normalize_scores_by_hand():
    adapter = adapter_for(_model())
    values = {
        "q_head": torch.tensor([[1024.0, 2048.0, 0.0, 512.0, 1.0, 3.0]]),
        "kv_group": torch.tensor([[4096.0, 7.0, 1024.0]]),
        "mlp_channel": torch.tensor([[144.0, 288.0, 0.0]]),
        "layer": torch.tensor([[5.0]]),
    }
    costs = {"q_head": torch.full((1, 6), 512.0), "kv_group": torch.tensor([[1536.0, 0.0, 1024.0]]),
             "mlp_channel": torch.full((1, 3), 96.0), "layer": torch.tensor([[9216.0]])}

    out = normalize_scores(values, "none", adapter, costs)
    assert all(torch.equal(out[k], values[k]) for k in values)

    out = normalize_scores(values, "block_constant", adapter, costs)
    attn = 4 * HD * HID  # 1024
    assert out["q_head"].tolist() == [[1.0, 2.0, 0.0, 0.5, 1 / 1024, 3 / 1024]]
    kv_attn = attn * (HPG + 1)  # a KV group is HPG query heads + K + V: (HPG + 1) head-sized blocks
    torch.testing.assert_close(out["kv_group"], torch.tensor([[4096 / kv_attn, 7 / kv_attn, 1024 / kv_attn]]))
    torch.testing.assert_close(out["mlp_channel"], torch.tensor([[1.0, 2.0, 0.0]]))  # 3 * intermediate = 144
    assert out["layer"].tolist() == [[5.0]]

    out = normalize_scores(values, "per_parameter", adapter, costs)
    assert out["q_head"].tolist() == [[2.0, 4.0, 0.0, 1.0, 1 / 512, 3 / 512]]
    torch.testing.assert_close(out["kv_group"], torch.tensor([[4096 / 1536, 7.0, 1.0]]))  # a zero cost is clamped to 1
    assert out["mlp_channel"].tolist() == [[1.5, 3.0, 0.0]]
    torch.testing.assert_close(out["layer"], torch.tensor([[5 / 9216]]))

    out = normalize_scores(values, "mean", adapter, costs)
    m = (4096 + 7 + 1024) / 3  # mean of the positive entries
    torch.testing.assert_close(out["kv_group"], torch.tensor([[4096 / m, 7 / m, 1024 / m]]))
    torch.testing.assert_close(out["mlp_channel"], torch.tensor([[144 / 216, 288 / 216, 0.0]]))
    assert out["layer"].tolist() == [[1.0]]
    zeros = normalize_scores({"q_head": torch.zeros(1, 6)}, "mean", adapter, costs)
    assert torch.equal(zeros["q_head"], torch.zeros(1, 6))  # no division by zero

    with pytest.raises(ValueError):
        normalize_scores(values, "bogus", adapter, costs)


def test_taylor_params_validation():
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        TaylorScorer.Params(loss="prompt")
    with pytest.raises(ValidationError):
        TaylorScorer.Params(normalize="zscore")
    with pytest.raises(ValidationError):
        TaylorScorer.Params(unknown=1)
