"""The scoring pass against its floors (timed side by side on the same batches), and the random
models and calibration data every measurement of ``respctl bench`` uses."""

from __future__ import annotations

import statistics

import torch

from ..decode_timing import alternating_times, sync_device
from ..interfaces import CalibrationSample, CalibrationSet, Progress, RunContext
from ..model.adapter import adapter_for
from ..model.structures import StructureSpec, build_structures


def _alternating(fns: dict, repeats: int) -> dict[str, float]:
    return {k: statistics.median(v) for k, v in alternating_times(fns, repeats).items()}


def random_calibration(vocab: int, n: int, prompt_len: int, target_len: int, seed: int = 0) -> list[CalibrationSample]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(5, vocab, (prompt_len + target_len,), generator=g).tolist()
        out.append(CalibrationSample(ids[:prompt_len], ids[prompt_len:]))
    return out


SCORING_MODEL = dict(vocab_size=32000, hidden_size=640, intermediate_size=1792, num_hidden_layers=8,
                     num_attention_heads=10, num_key_value_heads=2, head_dim=64, max_position_embeddings=2048,
                     tie_word_embeddings=True)
QUICK_SCORING_MODEL = dict(vocab_size=4000, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
                           tie_word_embeddings=True)


def random_qwen3(config: dict, seed: int = 0, dtype=torch.float32, device: str = "cpu"):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    return Qwen3ForCausalLM(Qwen3Config(**config)).to(dtype=dtype, device=device).eval()


def _projection_weights(model):
    return [lin.weight for lin in adapter_for(model).prunable_linears().values()]


def scoring_contenders(model, samples: list[CalibrationSample], pad_id: int, batch_size: int) -> dict:
    """name -> a callable running one pass over the same batches: ``scoring`` (RESP), ``floor``
    (transformers' loss on the same labels, gradients on the projections only), ``plain`` (every
    parameter trainable), ``gradient_pass`` (RESP's own gradient pass alone, without reducing
    saliency onto structures: what the scorer adds on top of its backward)."""
    from resp_plugins.scorers.taylor import TaylorScorer

    from ..scoring import gradient_pass, release_gradients

    adapter = adapter_for(model)
    structures = build_structures(adapter, StructureSpec())
    calib = CalibrationSet(samples, pad_id)
    ctx = RunContext(model=model, tokenizer=None, adapter=adapter, structures=structures, generator=None,
                     tasks=lambda n: None, progress=Progress())
    scorer = TaylorScorer(TaylorScorer.Params(batch_size=batch_size))
    device = next(model.parameters()).device
    batches = [(b.input_ids.to(device), b.attention_mask.to(device), b.labels.to(device))
               for b in calib.batches(batch_size, "decode")]
    projections = _projection_weights(model)

    def hf_pass(trainable):
        def run():
            for p in model.parameters():
                p.requires_grad_(False)
            for p in trainable():
                p.requires_grad_(True)
            model.zero_grad(set_to_none=True)
            for ids, att, lab in batches:
                model(input_ids=ids, attention_mask=att, labels=lab).loss.backward()
            model.zero_grad(set_to_none=True)
        return run

    def own_gradient_pass():
        gp = gradient_pass(model, adapter, calib, loss=scorer.params.loss, reduction=scorer.params.reduction,
                           batch_size=batch_size)
        gp.release()
        release_gradients(adapter)

    return {"scoring": lambda: scorer.score(ctx, calib),
            "floor": hf_pass(lambda: projections),
            "plain": hf_pass(lambda: list(model.parameters())),
            "gradient_pass": own_gradient_pass}


def scoring_overhead(model, samples: list[CalibrationSample], pad_id: int, batch_size: int, repeats: int = 3) -> dict:
    """Scoring pass / fair floor / plain forward+backward / its own gradient pass on the same
    batches (medians)."""
    fns = scoring_contenders(model, samples, pad_id, batch_size)
    device = next(model.parameters()).device
    timed = {k: (lambda f=f: (f(), sync_device(device))) for k, f in fns.items()}
    for f in timed.values():
        f()  # warm-up
    t = _alternating(timed, repeats)
    tokens = sum(len(s.prompt_ids) + len(s.target_ids) for s in samples)
    return {"tokens": tokens, "scoring_s": t["scoring"], "floor_s": t["floor"], "plain_fwd_bwd_s": t["plain"],
            "gradient_pass_s": t["gradient_pass"], "ratio_gradient_pass": t["scoring"] / t["gradient_pass"],
            "ratio_floor": t["scoring"] / t["floor"], "ratio_plain": t["scoring"] / t["plain"],
            "ratio": t["scoring"] / t["plain"]}
