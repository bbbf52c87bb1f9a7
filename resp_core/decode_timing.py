"""Timing two models side by side, shared by ``respctl bench`` and a comparison's effective
speedup: calls timed in alternation, a fixed-length greedy decode, the device waited for, and the
parameter count a timed ratio is put against."""

from __future__ import annotations

import time

import torch


def alternating_times(fns: dict, repeats: int, swap: bool = False) -> dict[str, list[float]]:
    """Seconds of every call of each contender, the contenders called in turn ``repeats`` times;
    ``swap``: every other round in reverse order (A B, B A, A B, ...), so that a linear drift of
    the machine's speed hits both alike."""
    times = {k: [] for k in fns}
    for r in range(repeats):
        order = list(fns.items())
        for k, fn in (order[::-1] if swap and r % 2 else order):
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return times


def sync_device(device) -> None:
    """Wait for the device's queued work (CUDA); nothing on the CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def unique_parameter_count(model) -> int:
    """Parameters of ``model``, each tensor counted once (tied embeddings are one tensor)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def fixed_length_decoder(model, batches: list, new_tokens: int, pad_token_id: int, device: str):
    """A call that decodes exactly ``new_tokens`` tokens greedily (KV cache; end-of-sequence
    suppressed: ``min_new_tokens = max_new_tokens``) after each ``(input_ids, attention_mask or
    None)`` batch and waits for the device, so that two models' times differ only by speed."""

    @torch.no_grad()
    def run():
        for ids, att in batches:
            out = model.generate(input_ids=ids, attention_mask=att, max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, use_cache=True,
                                 pad_token_id=pad_token_id)
            if out.shape[1] - ids.shape[1] != new_tokens:
                raise RuntimeError(f"generated {out.shape[1] - ids.shape[1]} tokens, not {new_tokens}")
        sync_device(device)
    return run
