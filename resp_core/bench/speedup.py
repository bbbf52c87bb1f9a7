"""Compaction speedup: dense vs compacted decode and prefill times of a model pruned by random
scores, against the ideal dense / compacted parameter count."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..interfaces import Scores
from ..model.adapter import adapter_for
from ..model.compaction import compacted_copy
from ..model.masks import MaskSet, apply_mask, sparsity_of
from ..model.structures import StructureSpec, build_structures
from ..decode_timing import fixed_length_decoder, sync_device, unique_parameter_count
from .overhead import _alternating, random_qwen3


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


@torch.no_grad()
def compaction_speedup(cfg: SpeedupConfig, repeats: int = 5, attention: str = "kv_group", model=None,
                       device: str = "cpu") -> dict:
    """Dense vs compacted decode and prefill times.  ``model``: a loaded model to prune (default:
    a random Qwen3 of ``cfg``'s shape)."""
    from resp_plugins.allocators.global_rank import GlobalRank

    if model is None:
        dense = random_qwen3(dict(vocab_size=cfg.vocab, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
                                  num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                                  num_key_value_heads=cfg.kv_heads, head_dim=cfg.head_dim, tie_word_embeddings=True,
                                  max_position_embeddings=4096), device=device)
    else:
        dense = model.to(device).eval()
    vocab = dense.config.vocab_size
    adapter = adapter_for(dense)
    structures = build_structures(adapter, StructureSpec(attention=attention))
    g = torch.Generator().manual_seed(1)
    scores = Scores({k: torch.rand(v.shape, generator=g) for k, v in structures.costs.items()})
    mask = GlobalRank().allocate(scores, structures, MaskSet.full(adapter.geometry), cfg.sparsity)
    apply_mask(adapter, mask)
    compact, _ = compacted_copy(dense, mask)
    compact.eval()
    n_dense, n_compact = unique_parameter_count(dense), unique_parameter_count(compact)

    prompt = torch.randint(5, vocab, (1, cfg.prompt_tokens), generator=g).to(device)
    prefill = torch.randint(5, vocab, (cfg.prefill_batch, cfg.prefill_len), generator=g).to(device)

    def decoder(m):
        return fixed_length_decoder(m, [(prompt, None)], cfg.decode_tokens, 0, device)

    def prefiller(m):
        def run():
            m(input_ids=prefill, use_cache=False)
            sync_device(device)
        return run

    # equal output check before timing
    a = dense(input_ids=prefill[:2, :64]).logits.float()
    b = compact(input_ids=prefill[:2, :64]).logits.float()
    max_diff = float((a - b).abs().max())
    rounding = None
    dtype = next(dense.parameters()).dtype
    if dtype in (torch.bfloat16, torch.float16):
        # the yardstick for a low-precision model: the same masked model computed in float32
        # (bf16 -> fp32 -> bf16 is exact, so the dense model is restored bit for bit)
        dense.float()
        ref = dense(input_ids=prefill[:2, :64]).logits.float()
        dense.to(dtype)
        rounding = float((a - ref).abs().max())
    for fn in (decoder(dense), decoder(compact), prefiller(dense), prefiller(compact)):
        fn()  # warm-up
    dec = _alternating({"dense": decoder(dense), "compact": decoder(compact)}, repeats)
    pre = _alternating({"dense": prefiller(dense), "compact": prefiller(compact)}, repeats)
    ideal = n_dense / n_compact
    return {
        "dense_parameters": n_dense, "compacted_parameters": n_compact,
        "sparsity_of_prunable_blocks": sparsity_of(mask, structures), "ideal_speedup": ideal,
        "decode_s": dec, "prefill_s": pre, "decode_tokens": cfg.decode_tokens,
        "decode_tokens_per_s": {k: cfg.decode_tokens / v for k, v in dec.items()},
        "prefill_tokens_per_s": {k: cfg.prefill_batch * cfg.prefill_len / v for k, v in pre.items()},
        "decode_speedup": dec["dense"] / dec["compact"], "prefill_speedup": pre["dense"] / pre["compact"],
        "decode_fraction_of_ideal": dec["dense"] / dec["compact"] / ideal,
        "prefill_fraction_of_ideal": pre["dense"] / pre["compact"] / ideal,
        "max_abs_logit_diff": max_diff, "dtype": str(dtype).replace("torch.", ""),
        "max_abs_logit_diff_low_precision_vs_fp32": rounding,
    }
