"""The GPU check: one scoring pass of a random Qwen3-8B-shaped bf16 model (tokens/s, model FLOPs
utilization, peak memory against ``respctl plan``), then its compaction speedup."""

from __future__ import annotations

import statistics

import torch

from ..decode_timing import sync_device
from .overhead import random_calibration, scoring_contenders
from .speedup import SpeedupConfig, compaction_speedup

QWEN3_8B = dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                tie_word_embeddings=False, rope_theta=1000000.0)
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12}


def gpu_check(device: str = "cuda", traces: int = 8, trace_len: int = 2048, prompt_len: int = 128,
              batch_size: int = 1, config: dict | None = None, repeats: int = 3, sparsity: float = 0.4) -> dict:
    """One scoring pass of a random Qwen3-8B-shaped bf16 model on ``traces`` x ``trace_len`` tokens:
    tokens/s, model FLOPs utilization (6·N·tokens / time / peak, N = projection parameters, and
    with every parameter), peak memory against ``respctl plan``'s prediction; then decode and
    prefill speedups of the ``sparsity``-compacted model."""
    import time as _time

    from transformers import Qwen3Config, Qwen3ForCausalLM

    from ..plan import count_parameters, scoring_memory

    config = config or QWEN3_8B
    cfg = Qwen3Config(**config)
    name = torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else "cpu"
    peak_flops = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name.upper()), None)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = Qwen3ForCausalLM(cfg)
    model = model.to_empty(device=device).to(torch.bfloat16)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    rot = type(model.model.rotary_emb)(cfg)  # its inv_freq buffers (non-persistent) built on the host
    model.model.rotary_emb = rot.to(device)
    model.eval()
    samples = random_calibration(cfg.vocab_size, traces, prompt_len, trace_len - prompt_len)
    fns = scoring_contenders(model, samples, 0, batch_size)
    counts = count_parameters(cfg)
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    fns["scoring"]()  # warm-up, and the peak
    sync_device(device)
    peak = torch.cuda.max_memory_allocated(device) if torch.device(device).type == "cuda" else None
    times = []
    for _ in range(repeats):
        t0 = _time.perf_counter()
        fns["scoring"]()
        sync_device(device)
        times.append(_time.perf_counter() - t0)
    t = statistics.median(times)
    tokens = traces * trace_len
    pred = scoring_memory(counts, "bfloat16", batch_size, trace_len, trace_len - prompt_len, False)
    out = {"device": name, "traces": traces, "trace_len": trace_len, "batch_size": batch_size,
           "parameters": counts.parameters, "projection_parameters": counts.projection,
           "scoring_s": t, "tokens_per_s": tokens / t,
           "mfu_projection": 6 * counts.projection * tokens / t / peak_flops if peak_flops else None,
           "mfu_all_parameters": 6 * counts.parameters * tokens / t / peak_flops if peak_flops else None,
           "peak_flops": peak_flops, "peak_memory_bytes": peak,
           "memory_before_pass_bytes": base if peak is not None else None,
           "planned_peak_bytes": sum(pred.values()), "planned": pred}
    del fns
    model.zero_grad(set_to_none=True)
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    sp = SpeedupConfig(sparsity=sparsity, decode_tokens=64, prompt_tokens=128, prefill_batch=8, prefill_len=2048)
    out["compaction"] = compaction_speedup(sp, repeats=repeats, model=model, device=device)
    return out
