"""The losses of recovery, on decode tokens only: the student's logits at the positions whose next
token is a target (the scorer's loss mask: prompt labels -100, the causal shift), the
cross-entropy there, and divergences between the dense model's stored top-k distribution and the
student's.

**Top-k with a tail bucket** (``tail: bucket``, the default).  The teacher's distribution at
temperature τ is kept as the log-probabilities of its k most likely tokens plus one more outcome,
"any other token", whose log-probability is the log-sum-exp of the other V − k log-probabilities
(exact, computed from the full logits when the teacher is stored).  The student's distribution is
coarsened onto the same k + 1 outcomes (its own probabilities of the teacher's k tokens, and the
rest summed).  Both are proper distributions over k + 1 outcomes and the divergence is the exact
divergence between these coarsenings: with k = V − 1 it *is* the divergence between the full
distributions, and for smaller k it is a lower bound of it (the data-processing inequality).

**Top-k renormalized** (``tail: renormalize``).  The tail is dropped and both distributions are
renormalized over the teacher's k tokens (the student's mass elsewhere is not penalized).

Divergences over those outcomes (p: teacher, q: student, per token, then the mean over the
batch's decode tokens), multiplied by τ² so gradients keep their scale across temperatures
(Hinton et al. 2015, "Distilling the Knowledge in a Neural Network"):

* ``forward`` KL(p‖q) = Σ p (log p − log q)  (mean-seeking; the usual distillation loss);
* ``reverse`` KL(q‖p) = Σ q (log q − log p)  (mode-seeking; MiniLLM, Gu et al. 2024);
* ``js``  ½ KL(p‖m) + ½ KL(q‖m), m = ½ (p + q)  (bounded by log 2).
"""

from __future__ import annotations

import math

import torch

DIVERGENCES = ("forward", "reverse", "js")
TAILS = ("bucket", "renormalize")


def decode_positions(labels: torch.Tensor) -> torch.Tensor:
    """``[B, T-1]`` booleans: the positions whose next token carries a loss (labels after the
    causal shift), as the scorers' decode-only loss uses them."""
    return labels[:, 1:] != -100


def logits_at(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """The model's float32 logits ``[N, V]`` at the positions ``where`` (``[B, T-1]``) only: the
    output head never runs on the prompt."""
    body = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    hidden = body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    picked = hidden[:, :-1][where.to(hidden.device)]
    logits = model.get_output_embeddings()(picked)
    cap = getattr(model.config, "final_logit_softcapping", None)  # Gemma 3 (None in its configs)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits.float()


def coarsen(logp: torch.Tensor, indices: torch.Tensor, tail: str = "bucket") -> torch.Tensor:
    """Full log-probabilities ``[N, V]`` onto the teacher's outcomes: ``[N, k + 1]`` (the k tokens
    ``indices`` and the tail bucket) or, ``renormalize``, ``[N, k]`` renormalized."""
    top = logp.gather(-1, indices.long())
    if tail == "renormalize":
        return top - torch.logsumexp(top, -1, keepdim=True)
    rest = logp.scatter(-1, indices.long(), float("-inf"))
    return torch.cat([top, torch.logsumexp(rest, -1, keepdim=True)], -1)


def teacher_outcomes(teacher_logp: torch.Tensor, tail: str = "bucket") -> torch.Tensor:
    """The stored teacher log-probabilities ``[N, k + 1]`` (the tail last) as the outcomes of ``tail``."""
    if tail == "renormalize":
        top = teacher_logp[:, :-1]
        return top - torch.logsumexp(top, -1, keepdim=True)
    return teacher_logp


def divergence(t: torch.Tensor, s: torch.Tensor, kind: str = "forward") -> torch.Tensor:
    """Per-token divergence ``[N]`` between teacher log-probabilities ``t`` and student ``s`` over
    the same outcomes (every entry finite)."""
    if kind == "forward":
        return (t.exp() * (t - s)).sum(-1)
    if kind == "reverse":
        return (s.exp() * (s - t)).sum(-1)
    if kind == "js":
        m = torch.logaddexp(t, s) - math.log(2.0)
        return 0.5 * (t.exp() * (t - m)).sum(-1) + 0.5 * (s.exp() * (s - m)).sum(-1)
    raise ValueError(f"divergence must be one of {DIVERGENCES}, not {kind!r}")


def distill_loss(student_logits: torch.Tensor, teacher_indices: torch.Tensor, teacher_logp: torch.Tensor,
                 kind: str = "forward", tail: str = "bucket", temperature: float = 1.0) -> torch.Tensor:
    """τ² · the mean over tokens of the divergence between the stored teacher outcomes and the
    student's (``student_logits``: ``[N, V]`` raw logits at the same decode positions)."""
    s_logp = torch.log_softmax(student_logits.float() / temperature, -1)
    s = coarsen(s_logp, teacher_indices, tail)
    t = teacher_outcomes(teacher_logp.to(s.device, torch.float32), tail)
    return divergence(t, s, kind).mean() * temperature ** 2


def decode_cross_entropy(student_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The mean next-token cross-entropy over the decode tokens (``targets``: ``[N]``)."""
    return torch.nn.functional.cross_entropy(student_logits.float(), targets.to(student_logits.device))


__all__ = ["DIVERGENCES", "TAILS", "coarsen", "decode_cross_entropy", "decode_positions", "distill_loss",
           "divergence", "logits_at", "teacher_outcomes"]
