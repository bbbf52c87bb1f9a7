"""``respctl bench``: side-by-side measurements, printed as ratios from one run (never asserted).

1. Scoring overhead: time of RESP's scoring pass (decode-only loss, gradients into the prunable
   projections, aggregation onto structures) divided by a plain forward+backward of the same
   model on the same tokens (all parameters trainable, mean loss).  Goal <= 1.10.
2. Compaction speedup: a random-init ~100M-parameter Qwen3-shaped model (32k vocabulary, GQA)
   pruned to 40% of its prunable blocks' parameters and compacted; dense time / compacted time
   for batch-1 greedy decoding with KV cache and for batched prefill, against the ideal
   dense / compacted parameter count (embeddings included).  Goal >= 0.9 of ideal.

Timings alternate dense and compacted runs and report medians, so drift hits both alike.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from .interfaces import CalibrationSample, CalibrationSet, Progress, RunContext, Scores
from .model.adapter import adapter_for
from .model.compaction import compacted_copy
from .model.masks import MaskSet, apply_mask, sparsity_of
from .model.structures import StructureSpec, build_structures


def _alternating(fns: dict, repeats: int) -> dict[str, float]:
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def random_calibration(vocab: int, n: int, prompt_len: int, target_len: int, seed: int = 0) -> list[CalibrationSample]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(5, vocab, (prompt_len + target_len,), generator=g).tolist()
        out.append(CalibrationSample(ids[:prompt_len], ids[prompt_len:]))
    return out


def scoring_overhead(model, samples: list[CalibrationSample], pad_id: int, batch_size: int, repeats: int = 3) -> dict:
    """Scoring pass / plain forward+backward on the same batches."""
    from resp_plugins.scorers.taylor import TaylorScorer

    adapter = adapter_for(model)
    structures = build_structures(adapter, StructureSpec())
    calib = CalibrationSet(samples, pad_id)
    ctx = RunContext(model=model, tokenizer=None, adapter=adapter, structures=structures, generator=None,
                     tasks=lambda n: None, progress=Progress())
    scorer = TaylorScorer(TaylorScorer.Params(batch_size=batch_size))
    batches = list(calib.batches(batch_size, "decode"))

    def plain():
        model.zero_grad(set_to_none=True)
        for b in batches:
            out = model(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=b.labels)
            out.loss.backward()
        model.zero_grad(set_to_none=True)

    def scoring():
        scorer.score(ctx, calib)

    for p in model.parameters():
        p.requires_grad_(True)
    plain()
    scoring()  # warm-up
    t = _alternating({"plain": plain, "scoring": scoring}, repeats)
    tokens = sum(len(s.prompt_ids) + len(s.target_ids) for s in samples)
    return {"tokens": tokens, "plain_fwd_bwd_s": t["plain"], "scoring_s": t["scoring"],
            "ratio": t["scoring"] / t["plain"]}


@dataclass
class SpeedupConfig:
    vocab: int = 32000
    hidden: int = 768
    layers: int = 12
    heads: int = 12
    kv_heads: int = 4
    head_dim: int = 64
    intermediate: int = 2048
    sparsity: float = 0.4
    decode_tokens: int = 48
    prompt_tokens: int = 32
    prefill_batch: int = 8
    prefill_len: int = 256


def _unique_params(model) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


@torch.no_grad()
def compaction_speedup(cfg: SpeedupConfig, repeats: int = 5, attention: str = "kv_group") -> dict:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from resp_plugins.allocators.global_rank import GlobalRank

    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=cfg.vocab, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
                         num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                         num_key_value_heads=cfg.kv_heads, head_dim=cfg.head_dim, tie_word_embeddings=True,
                         max_position_embeddings=4096)
    dense = Qwen3ForCausalLM(config).eval()
    adapter = adapter_for(dense)
    structures = build_structures(adapter, StructureSpec(attention=attention))
    g = torch.Generator().manual_seed(1)
    scores = Scores({k: torch.rand(v.shape, generator=g) for k, v in structures.costs.items()})
    mask = GlobalRank().allocate(scores, structures, MaskSet.full(adapter.geometry), cfg.sparsity)
    apply_mask(adapter, mask)
    compact, _ = compacted_copy(dense, mask)
    compact.eval()
    n_dense, n_compact = _unique_params(dense), _unique_params(compact)

    prompt = torch.randint(5, cfg.vocab, (1, cfg.prompt_tokens), generator=g)
    prefill = torch.randint(5, cfg.vocab, (cfg.prefill_batch, cfg.prefill_len), generator=g)

    def decoder(model):
        return lambda: model.generate(prompt, max_new_tokens=cfg.decode_tokens, min_new_tokens=cfg.decode_tokens,
                                      do_sample=False, use_cache=True, pad_token_id=0)

    def prefiller(model):
        return lambda: model(input_ids=prefill, use_cache=False)

    # equal output check before timing
    a = dense(input_ids=prefill[:2, :64]).logits
    b = compact(input_ids=prefill[:2, :64]).logits
    max_diff = float((a - b).abs().max())
    for fn in (decoder(dense), decoder(compact), prefiller(dense), prefiller(compact)):
        fn()  # warm-up
    dec = _alternating({"dense": decoder(dense), "compact": decoder(compact)}, repeats)
    pre = _alternating({"dense": prefiller(dense), "compact": prefiller(compact)}, repeats)
    ideal = n_dense / n_compact
    return {
        "dense_parameters": n_dense, "compacted_parameters": n_compact,
        "sparsity_of_prunable_blocks": sparsity_of(mask, structures), "ideal_speedup": ideal,
        "decode_s": dec, "prefill_s": pre,
        "decode_speedup": dec["dense"] / dec["compact"], "prefill_speedup": pre["dense"] / pre["compact"],
        "decode_fraction_of_ideal": dec["dense"] / dec["compact"] / ideal,
        "prefill_fraction_of_ideal": pre["dense"] / pre["compact"] / ideal,
        "max_abs_logit_diff": max_diff,
    }
