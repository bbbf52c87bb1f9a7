"""The memory and time formulas of ``respctl plan``: arithmetic on a model's parameter counts and
a recipe's settings (nothing here loads a model).

**Scoring** with a gradient scorer (:data:`GRADIENT_SCORERS`: the gradient pass of
``resp_core/scoring.py``; the peak is at the start of backward of the last batch, when every
gradient buffer already exists); activation-statistics scorers run forward only
(:func:`forward_only_memory`, a coarser estimate):

* weights: every parameter in the model's dtype;
* projection gradients: float32 buffers of every projection weight (bf16 / fp16 gradients are
  summed in float32, fp32 ones are float32), plus one projection's gradient in the weights' dtype
  while it is being folded in;
* activations saved for backward, per decoder layer and token, in elements of the weights'
  dtype: ``a_h·hidden + a_i·intermediate + a_q·(heads·head_dim) + a_kv·(kv_heads·head_dim) +
  a_t·context`` (:data:`ACTIVATION_COEFFICIENTS`, measured with autograd's
  ``saved_tensors_hooks`` on transformers' Qwen3 decoder layer with only the projections
  requiring gradients; tests/test_plan.py re-measures them).  Low precision costs more elements
  per token because RMSNorm saves float32 copies.  With ``gradient_checkpointing`` only each
  layer's input is kept, plus one layer's activations while it is recomputed;
* the output head on labelled positions only: four float32 ``[labelled, vocab]`` tensors at the
  start of backward (log-probabilities kept, the loss's gradient, log-softmax's backward
  temporary and result) and, for bf16 / fp16, the logits' gradient in the weights' dtype;
* a layer's backward transients (gradients of its MLP intermediates and its input).

**Generation**: the ``hf`` backend's KV cache at its batch size and the trace length, plus the
logits of one step; the ``vllm`` backend takes ``gpu_memory_utilization`` of the GPU for its
weights and KV cache (how many sequences that cache holds is printed), and sleeps (level 1) while
scoring when ``enable_sleep_mode`` is on, so the two phases do not add up.

**Time** from a FLOP count: scoring ``6·P·tokens`` for the projections (forward, input and weight
gradients) plus attention (``12·heads·head_dim·context`` per token and layer, causal) and the head
on labelled tokens (``4·hidden·vocab``); generation per token ``2·N`` FLOPs or the bytes read per
decoding step (weights and the KV cache), whichever takes longer, at the device's peak.  Printed
times assume ``--mfu`` of peak compute (default 0.4) and 0.6 of peak memory bandwidth; they are
estimates, and say so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

GiB = 1 << 30

# elements of the weights' dtype saved per token per decoder layer (see module docstring)
ACTIVATION_COEFFICIENTS = {
    "float32": {"hidden": 4.0, "intermediate": 4.0, "q": 5.0, "kv": 1.0, "context": 1.1},
    "low": {"hidden": 6.0, "intermediate": 4.0, "q": 6.0, "kv": 2.0, "context": 1.0},
}

# peak dense bf16 tensor-core FLOP/s and memory bandwidth (vendor data sheets)
DEVICES = {
    "h200": {"flops": 989e12, "bandwidth": 4.8e12, "memory": 141 * 1e9},
    "h100": {"flops": 989e12, "bandwidth": 3.35e12, "memory": 80 * GiB},
    "a100": {"flops": 312e12, "bandwidth": 2.0e12, "memory": 80 * GiB},
    "l40s": {"flops": 362e12, "bandwidth": 0.864e12, "memory": 48 * GiB},
}

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass
class ModelCounts:
    parameters: int  # unique parameters (tied embeddings once)
    projection: int  # weights of q/k/v/o/gate/up/down (the ones scoring differentiates)
    largest_projection: int
    embedding: int
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int


# --------------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------------

def activation_elements_per_token_layer(c: ModelCounts, dtype: str, context: float) -> float:
    k = ACTIVATION_COEFFICIENTS["float32" if dtype == "float32" else "low"]
    return (k["hidden"] * c.hidden + k["intermediate"] * c.intermediate + k["q"] * c.heads * c.head_dim
            + k["kv"] * c.kv_heads * c.head_dim + k["context"] * context)


# scorers that backpropagate (the gradient pass); the others (wanda_sp, flap, sparsegpt, magnitude,
# random, shortgpt) only run forward passes under no_grad
GRADIENT_SCORERS = ("resp", "gisp", "llm_pruner")


def forward_only_memory(c: ModelCounts, dtype: str, batch_size: int, seq_len: int) -> dict[str, float]:
    """Activation-statistics scorers: weights, one layer's forward intermediates, the logits of a
    full forward, and per-layer statistics (an input-sized Hessian per projection input for
    SparseGPT at most: hidden² and intermediate² in float32)."""
    e = DTYPE_BYTES[dtype]
    tokens = batch_size * seq_len
    return {"weights": c.parameters * e, "projection_gradients": 0.0,
            "activations": tokens * e * (4 * c.hidden + 3 * c.intermediate + c.heads * c.head_dim),
            "output_head": tokens * c.vocab * max(e, 4),
            "backward_transients": 4.0 * (c.hidden ** 2 + c.intermediate ** 2)}


def scoring_memory(c: ModelCounts, dtype: str, batch_size: int, seq_len: int, labelled: int,
                   checkpointing: bool) -> dict[str, float]:
    """Bytes of each part of the scoring pass at its peak (see the module docstring).

    ``labelled``: positions per sequence that carry a loss (the trace's target tokens)."""
    e = DTYPE_BYTES[dtype]
    tokens = batch_size * seq_len
    per_layer = activation_elements_per_token_layer(c, dtype, seq_len) * e * tokens
    if checkpointing:
        activations = c.layers * tokens * c.hidden * e + per_layer
    else:
        activations = c.layers * per_layer
    n = batch_size * labelled
    # float32 log-probabilities (kept), the loss's gradient, log-softmax's backward temporary and
    # result; plus the low-precision logits' gradient
    head = n * c.vocab * (16 + (e if e < 4 else 0))
    transients = tokens * e * (2 * c.intermediate + 2 * c.hidden)
    return {
        "weights": c.parameters * e,
        "projection_gradients": c.projection * 4 + c.largest_projection * e,
        "activations": activations,
        "output_head": head,
        "backward_transients": transients,
    }


def kv_bytes_per_token(c: ModelCounts, dtype: str) -> int:
    return 2 * c.layers * c.kv_heads * c.head_dim * DTYPE_BYTES[dtype]


def hf_generation_memory(c: ModelCounts, dtype: str, batch_size: int, seq_len: int) -> dict[str, float]:
    return {"weights": c.parameters * DTYPE_BYTES[dtype],
            "kv_cache": batch_size * seq_len * kv_bytes_per_token(c, dtype),
            "step_logits": batch_size * c.vocab * 4 * 2}


# --------------------------------------------------------------------------------------------------
# Time
# --------------------------------------------------------------------------------------------------

def scoring_flops(c: ModelCounts, sequences: int, seq_len: int, labelled: int) -> float:
    tokens = sequences * seq_len
    attention = 12 * c.heads * c.head_dim * (seq_len / 2) * c.layers * tokens
    return 6 * c.projection * tokens + attention + 4 * c.hidden * c.vocab * sequences * labelled


def generation_time(c: ModelCounts, dtype: str, sequences: int, prompt: int, new: int, concurrency: int,
                    flops: float, bandwidth: float, mfu: float, bw_eff: float = 0.6) -> float:
    """Seconds to generate ``new`` tokens for each of ``sequences`` prompts, ``concurrency`` at a
    time: per decoding step, the longer of compute (2·N per token) and memory (weights + the KV
    cache read); prefill at compute speed."""
    concurrency = max(1, min(concurrency, sequences))
    rounds = math.ceil(sequences / concurrency)
    weights = c.parameters * DTYPE_BYTES[dtype]
    kv = kv_bytes_per_token(c, dtype)
    step_compute = 2 * c.parameters * concurrency / (flops * mfu)
    step_memory = (weights + concurrency * (prompt + new / 2) * kv) / (bandwidth * bw_eff)
    prefill = 2 * c.parameters * prompt * sequences / (flops * mfu)
    return rounds * new * max(step_compute, step_memory) + prefill
