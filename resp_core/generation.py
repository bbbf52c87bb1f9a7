"""One sampling loop on transformers ``generate``: length-sorted batches, left padding by the
tokenizer itself, seeded per batch.

Every transformers-based generation in RESP goes through :func:`sample` (the ``hf`` generation
backend, and through it calibration traces, ``task_accuracy``, the ``lm_eval`` evaluator's
generative tasks and the LLM judge).  Prompts are sorted by length before batching (less padding)
and the completions come back in input order.  Batch ``b`` is seeded with ``sampling.seed + b``,
so a run is reproducible for the same prompts, batch size and model.

Padding is the tokenizer's own (``tokenizer.pad(..., padding_side="left")``); a tokenizer without
a pad token pads with its EOS token for the duration of the call.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from .interfaces import Completion, Progress, SamplingParams


def encode(tokenizer, texts: list[str], add_special_tokens: bool = False) -> list[list[int]]:
    """Token ids of each text (no padding, no truncation)."""
    return [tokenizer(t, add_special_tokens=add_special_tokens)["input_ids"] for t in texts]


def length_sorted_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of at most ``batch_size``, shortest first (stable order)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[s: s + batch_size] for s in range(0, len(order), batch_size)]


def pad_token_id(tokenizer) -> int | None:
    """The id generation pads with: the pad token, else EOS."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


@contextmanager
def _with_pad_token(tokenizer):
    if tokenizer.pad_token is not None or tokenizer.eos_token is None:
        yield
        return
    tokenizer.pad_token = tokenizer.eos_token
    try:
        yield
    finally:
        tokenizer.pad_token = None


def left_pad(tokenizer, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` of ``rows`` padded on the left to the longest row."""
    with _with_pad_token(tokenizer):
        enc = tokenizer.pad({"input_ids": [list(r) for r in rows]}, padding="longest", padding_side="left",
                            return_attention_mask=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def generate_kwargs(sampling: SamplingParams, tokenizer) -> dict:
    """transformers ``generate`` keyword arguments for ``sampling`` (greedy unsets the sampling
    knobs so that a model's generation_config cannot turn them back on)."""
    kw = dict(max_new_tokens=sampling.max_new_tokens, do_sample=sampling.do_sample,
              pad_token_id=pad_token_id(tokenizer), eos_token_id=tokenizer.eos_token_id, use_cache=True)
    if sampling.do_sample:
        kw.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k)
    else:
        kw.update(temperature=None, top_p=None, top_k=None)
    return kw


def _completion(tokenizer, prompt: list[int], new: list[int]) -> Completion:
    eos, pad = tokenizer.eos_token_id, pad_token_id(tokenizer)
    finished = eos is not None and eos in new
    seq = new[: new.index(eos) + 1] if finished else [t for t in new if t != pad]
    text = tokenizer.decode(seq, skip_special_tokens=False)
    for special in (tokenizer.eos_token, tokenizer.pad_token):
        if special:
            text = text.replace(special, "")
    return Completion(list(prompt), seq, text, finished)


@torch.no_grad()
def sample(model, tokenizer, prompts: list[list[int]], sampling: SamplingParams, batch_size: int,
           progress: Progress | None = None, description: str = "Generating") -> list[Completion]:
    """Completions of token-id ``prompts`` (in input order), generated in length-sorted,
    left-padded batches; batch ``b`` seeded with ``sampling.seed + b``."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    results: list[Completion | None] = [None] * len(prompts)
    progress = progress or Progress()
    kwargs = generate_kwargs(sampling, tokenizer)
    try:
        with progress.task(description, total=len(prompts)) as advance:
            for b, idx in enumerate(length_sorted_batches([len(p) for p in prompts], batch_size)):
                ids, att = left_pad(tokenizer, [prompts[i] for i in idx])
                torch.manual_seed(sampling.seed + b)
                out = model.generate(input_ids=ids.to(device), attention_mask=att.to(device), **kwargs)
                new = out[:, ids.shape[1]:].tolist()
                for r, i in enumerate(idx):
                    results[i] = _completion(tokenizer, prompts[i], new[r])
                advance(len(idx))
    finally:
        model.train(was_training)
    return results  # type: ignore[return-value]
