"""What ``respctl bench`` measures in each of its modes (the GPU check, a given model, the random
models), as table rows ``(measurement, value, goal)`` and the figures behind them."""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager

from ..errors import RespError
from .child import torch_pruning_comparison
from .gpu import gpu_check as run_gpu_check
from .overhead import QUICK_SCORING_MODEL, SCORING_MODEL, random_calibration, random_qwen3, scoring_overhead
from .speedup import SpeedupConfig, compaction_speedup

Row = tuple[str, str, str]


def _no_status(message: str) -> ContextManager:
    return contextlib.nullcontext()


def check_device(device: str) -> None:
    """Refuse a device this torch cannot use."""
    import torch

    if device != "cpu" and (not device.startswith("cuda") or not torch.cuda.is_available()):
        raise RespError(f"--device: {device!r} is not available here (this torch has no CUDA device); use cpu")


def speedup_rows(sp: dict, label: str, cfg: SpeedupConfig | None = None) -> list[Row]:
    """The rows of one compaction speedup measurement (:func:`compaction_speedup`'s figures)."""
    rows = [(f"dense / compacted parameters ({label}, {sp['sparsity_of_prunable_blocks']:.0%} of prunable blocks)",
             f"{sp['ideal_speedup']:.3f}  ({sp['dense_parameters'] / 1e6:.1f}M / "
             f"{sp['compacted_parameters'] / 1e6:.1f}M)", ""),
            (f"decode speedup, batch 1, {sp['decode_tokens']} tokens (dense / compacted time)",
             f"{sp['decode_speedup']:.3f}  = {sp['decode_fraction_of_ideal']:.2f} of ideal "
             f"({sp['decode_tokens_per_s']['dense']:.1f} -> {sp['decode_tokens_per_s']['compact']:.1f} tokens/s)",
             ">= 0.9 of ideal")]
    shape = f", batch {cfg.prefill_batch} x {cfg.prefill_len}" if cfg is not None else ""
    rows.append((f"prefill speedup{shape}",
                 f"{sp['prefill_speedup']:.3f}  = {sp['prefill_fraction_of_ideal']:.2f} of ideal", ">= 0.9 of ideal"))
    yard = sp.get("max_abs_logit_diff_low_precision_vs_fp32")
    rows.append(("max |logit diff| masked vs compacted", f"{sp['max_abs_logit_diff']:.1e}"
                 + (f"  ({sp['dtype']} rounding: masked {sp['dtype']} vs float32 {yard:.1e})" if yard is not None
                    else ""), ""))
    return rows


def gpu_check_rows(device: str, figures: dict, status: Callable[[str], ContextManager] = _no_status) -> list[Row]:
    """``--gpu-check``: a random Qwen3-8B-shaped bf16 model on a GPU (``figures["gpu_check"]``)."""
    with status("GPU check: Qwen3-8B-shaped bf16 model"):
        r = figures["gpu_check"] = run_gpu_check(device if device != "cpu" else "cuda")
    mfu = f"{r['mfu_projection']:.1%} (all parameters: {r['mfu_all_parameters']:.1%})" if r["peak_flops"] else "n/a"
    rows = [(f"scoring pass, {r['traces']} x {r['trace_len']} tokens, {r['device']}",
             f"{r['scoring_s']:.2f} s = {r['tokens_per_s']:,.0f} tokens/s", ""),
            ("model FLOPs utilization (6·N·tokens / time / peak)", mfu, ""),
            ("peak memory (planned by respctl plan)",
             f"{r['peak_memory_bytes'] / 2**30:.1f} GiB ({r['planned_peak_bytes'] / 2**30:.1f} GiB)", "")]
    return rows + speedup_rows(r["compaction"], "compacted Qwen3-8B shape")


def model_rows(model: str, quick: bool, sparsity: float, device: str, figures: dict,
               status: Callable[[str], ContextManager] = _no_status) -> list[Row]:
    """``--model``: dense vs compacted decode and prefill of a real model (``figures["compaction_speedup"]``)."""
    from ..loading import load_model_and_tokenizer, model_source
    from ..recipe import ModelSection

    src = model_source(model, field="--model")
    section = ModelSection(path=src.location, gguf_file=src.gguf_file) if src.gguf_file else ModelSection(path=model)
    m, _ = load_model_and_tokenizer(section, device="cpu")
    cfg = SpeedupConfig(sparsity=sparsity, decode_tokens=16 if quick else 48, prefill_len=64 if quick else 256)
    with status(f"Timing dense vs compacted decode and prefill of {model}"):
        sp = figures["compaction_speedup"] = compaction_speedup(cfg, repeats=2 if quick else 5, model=m, device=device)
    return speedup_rows(sp, model, cfg)


def random_model_rows(quick: bool, sparsity: float, device: str, tp_timeout: float, figures: dict,
                      status: Callable[[str], ContextManager] = _no_status) -> list[Row]:
    """The default: scoring pass vs its floors (and, on CPU, peak RSS and Torch-Pruning) on a random
    Qwen3, then the compaction speedup of another one (``figures``' ``scoring_overhead``,
    ``torch_pruning`` and ``compaction_speedup``)."""
    rows: list[Row] = []
    shape = QUICK_SCORING_MODEL if quick else SCORING_MODEL
    n, prompt, target, bs = (4, 16, 16, 2) if quick else (16, 64, 64, 16)
    m = random_qwen3(shape, device=device)
    samples = random_calibration(shape["vocab_size"], n, prompt, target)
    label = f"random {sum(p.numel() for p in m.parameters()) / 1e6:.0f}M Qwen3, {n} x {prompt + target} tokens"
    with status("Timing scoring pass vs fair floor vs plain fwd+bwd"):
        so = figures["scoring_overhead"] = scoring_overhead(m, samples, 0, bs, repeats=2 if quick else 5)
    del m
    rows.append((f"scoring pass / fair floor ({label}; floor: fwd+bwd, projection gradients, same labels)",
                 f"{so['ratio_floor']:.3f}  ({so['scoring_s']:.3f}s / {so['floor_s']:.3f}s)", "<= 1.02"))
    rows.append(("scoring pass / its own gradient pass (reduction onto structures excluded)",
                 f"{so['ratio_gradient_pass']:.3f}  ({so['scoring_s']:.3f}s / {so['gradient_pass_s']:.3f}s)", ""))
    rows.append(("scoring pass / plain fwd+bwd (every parameter trainable)",
                 f"{so['ratio_plain']:.3f}  ({so['scoring_s']:.3f}s / {so['plain_fwd_bwd_s']:.3f}s)", ""))
    if device == "cpu":
        with status("Peak RSS and Torch-Pruning's GroupTaylor pass, in child processes"):
            tp = figures["torch_pruning"] = torch_pruning_comparison(shape, n, prompt, target, bs,
                                                                     2 if quick else 3, tp_timeout)
        rs, rf = tp["peak_rss"]["scoring"], tp["peak_rss"]["floor"]
        if "error" not in rs and "error" not in rf:
            rows.append(("peak RSS added: scoring pass / fair floor",
                         f"{rs['peak_rss_added'] / rf['peak_rss_added']:.3f}  ({rs['peak_rss_added'] / 2**20:.0f} / "
                         f"{rf['peak_rss_added'] / 2**20:.0f} MiB)", ""))
        t = tp["torch_pruning"]
        if t is None:
            rows.append(("scoring pass / Torch-Pruning GroupTaylor", "torch-pruning not installed", "<= 0.75"))
        elif "error" in t:
            rows.append(("scoring pass / Torch-Pruning GroupTaylor",
                         f"not measured: Torch-Pruning {t['error']} (graph building, rotary bypassed)", "<= 0.75"))
        else:
            rows.append(("scoring pass / Torch-Pruning GroupTaylor (rotary bypassed for graph building only)",
                         f"{t['ratio']:.3f}  ({t['scoring_s']:.3f}s / {t['torch_pruning_s']:.3f}s)", "<= 0.75"))
            if "error" not in rs:
                rows.append(("peak RSS added: scoring pass / Torch-Pruning",
                             f"{rs['peak_rss_added'] / t['peak_rss_added']:.3f}", "<= 0.8"))
    cfg = SpeedupConfig(layers=4, hidden=256, intermediate=768, heads=4, kv_heads=2, vocab=8000,
                        decode_tokens=16, prefill_len=64, sparsity=sparsity) if quick \
        else SpeedupConfig(sparsity=sparsity)
    with status("Timing dense vs compacted decode and prefill"):
        sp = figures["compaction_speedup"] = compaction_speedup(cfg, repeats=2 if quick else 5, device=device)
    return rows + speedup_rows(sp, "random Qwen3", cfg)


def bench_rows(quick: bool, model: str | None, sparsity: float, device: str, gpu_check: bool, tp_timeout: float,
               status: Callable[[str], ContextManager] = _no_status) -> tuple[list[Row], dict]:
    """The rows of ``respctl bench``'s table and the figures behind them, in the mode the options
    choose: ``gpu_check``, else ``model``, else the random models.  ``status(message)`` is a
    context manager around each measurement (a spinner)."""
    figures: dict = {}
    if gpu_check:
        rows = gpu_check_rows(device, figures, status)
    elif model is not None:
        rows = model_rows(model, quick, sparsity, device, figures, status)
    else:
        rows = random_model_rows(quick, sparsity, device, tp_timeout, figures, status)
    return rows, figures
