"""LLM-Pruner's Taylor importance (Ma et al., 2023, arXiv 2305.11627; ``horseee/LLM-Pruner``).

Per weight, with g = ∂L/∂w of the set-level mean token loss and the Hessian diagonal
approximated by the empirical Fisher ``F = (1/B) Σ_b g_b²`` (g_b: gradient of the mean token loss
of calibration batch b alone; ``fisher_batch_size: 1`` = per sample, as LLM-Pruner's ``acc_grad``)::

    vectorize, param_first:  s(w) = w · g
    param_second:            s(w) = ½ · w² · F
    param_mix:               s(w) = w · g − ½ · w² · F

A unit (head, KV group, MLP channel) is a *group* of coupled weight vectors: for an MLP channel
c the vectors are row c of gate_proj, row c of up_proj and column c of down_proj; for a query
head, for each of its head_dim rows r, row r of q_proj and column r of o_proj (plus, for a KV
group, row r of k_proj and of v_proj and the rows of all its query heads).  Each vector v is
scored, then the group's vectors are reduced (LLM-Pruner's ``group_reduction``)::

    vectorize:  I(v) = | Σ_{w ∈ v} s(w) |          param_*:  I(v) = Σ_{w ∈ v} | s(w) |
    I(unit)  = Σ_{r < head_dim} reduce_{v at r} I(v)      (heads; LLM-Pruner's consecutive groups)
    I(channel) = reduce(I(gate row), I(up row), I(down column))
    reduce ∈ {sum, mean, max, prod}

With ``taylor: param_first`` and ``reduction: sum`` this is exactly Σ_{w∈S} |w·g|, the RESP/GISP
score with a full-sequence loss and ``reduction: token_mean`` (their default ``sample_mean``
weights each sample's gradient by 1/its token count).  A layer's score (``structures.layers``) is the sum of its KV
groups' and channels' scores.

LLM-Pruner's defaults (``hf_prune.py`` and its README): the gradient of the full-sequence loss
(``labels = input_ids``) on 10 generic-text samples (bookcorpus, 64 tokens); ``--taylor
param_mix`` by default in ``hf_prune.py`` (``param_first`` in its ``llama3.py``; ours:
``param_first``), ``--grouping_strategy sum``; block-wise pruning of the layers
4..29 of 32 with the same *channel* ratio in every pruned layer (local pruning, no normalization);
one step.  In RESP: ``loss: full`` with a generic text calibration source (``c4``/``wikitext``),
``allocator: uniform`` and ``structures.protected_layers`` reproduce that setting.

Where we differ from the authors' code:

* ``param_second`` carries the ½ of the Taylor expansion; LLM-Pruner's code uses w²·acc_grad
  (same ranking, and param_mix does use ½ there too).
* LLM-Pruner's ``acc_grad`` divides squared per-sample gradients of per-sample mean losses by
  the number of examples; ours is the same with ``fisher_batch_size: 1``; larger batches give a
  cheaper, coarser Fisher.
* With GQA, LLM-Pruner roots the attention group at k_proj and aligns q_proj's longer importance
  vector by summing strided chunks; we group q/o rows with the k/v rows of their own KV head
  (``structures.attention: kv_group``) or score query heads alone (``q_head``: q rows and o
  columns; a KV head goes with its last query head).
* Ratios: LLM-Pruner's ratio counts channels/heads per layer; RESP's ``sparsity`` is the fraction
  of the unprotected blocks' parameters (with ``uniform`` every layer loses the same fraction of
  each unit kind, which for a fixed geometry is the same thing).
* Biases and RMSNorm weights are not scored (LLM-Pruner's block-wise mode does not prune norms).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from resp_core import hookimpl
from resp_core.interfaces import CalibrationSet, Params, RunContext, Scorer, Scores
from resp_core.model.adapter import DecoderAdapter
from resp_core.scoring import accumulate_gradients, check_scores, normalize_scores, release_gradients

PARTS = ("q", "k", "v", "o", "gate", "up", "down")


def _linears(adapter: DecoderAdapter, layer: int) -> dict[str, torch.nn.Linear]:
    a, m = adapter.attention_parts(layer), adapter.mlp_parts(layer)
    return {"q": a.q, "k": a.k, "v": a.v, "o": a.o, "gate": m.gate, "up": m.up, "down": m.down}


def fisher_diagonal(model, adapter: DecoderAdapter, calibration: CalibrationSet, loss: str, batch_size: int,
                    progress=None) -> dict[tuple[int, str], torch.Tensor]:
    """Empirical Fisher diagonal ``(1/B) Σ_b (∂L_b/∂w)²`` per prunable weight, where L_b is the mean
    token loss of batch b alone (LLM-Pruner's ``acc_grad`` when ``batch_size`` is 1).

    Keys are ``(layer, part)``; ``.grad`` of the weights is left untouched."""
    from resp_core.interfaces import Progress

    g = adapter.geometry
    keys = [(i, name) for i in range(g.num_layers) for name in PARTS]
    weights = [_linears(adapter, i)[name].weight for i, name in keys]
    saved = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for w in weights:
        w.requires_grad_(True)
    acc = [torch.zeros_like(w, dtype=torch.float32) for w in weights]
    was_training = model.training
    model.eval()
    device = weights[0].device
    used = 0
    progress = progress or Progress()
    n_batches = (len(calibration) + batch_size - 1) // batch_size
    try:
        with progress.task("Fisher (per-batch gradients)", total=n_batches) as advance:
            for batch in calibration.batches(batch_size, loss):
                labels = batch.labels.to(device)[:, 1:]
                count = int((labels != -100).sum())
                if count == 0:
                    advance(1)
                    continue
                logits = model(input_ids=batch.input_ids.to(device),
                               attention_mask=batch.attention_mask.to(device)).logits
                nll = torch.nn.functional.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                    ignore_index=-100, reduction="sum") / count
                grads = torch.autograd.grad(nll, weights)
                for a, gr in zip(acc, grads):
                    a.add_(gr.float() ** 2)
                used += 1
                advance(1)
    finally:
        for p in model.parameters():
            p.requires_grad_(saved[id(p)])
        model.train(was_training)
    return {k: a / max(1, used) for k, a in zip(keys, acc)}


def _reduce(stack: torch.Tensor, how: str) -> torch.Tensor:
    if how == "sum":
        return stack.sum(0)
    if how == "mean":
        return stack.mean(0)
    if how == "max":
        return stack.max(0).values
    if how == "prod":
        return stack.prod(0)
    raise ValueError(f"unknown reduction {how!r}")


def group_scores(adapter: DecoderAdapter, salience: dict[str, torch.Tensor], taylor: str,
                 reduction: str) -> dict[str, torch.Tensor]:
    """Scores of one layer's units from its per-weight salience ``s(w)`` (keys of :data:`PARTS`)."""
    g = adapter.geometry
    nq, nkv, hd, hpg = g.num_heads, g.num_kv_heads, g.head_dim, g.heads_per_group

    def vec(part: str, dim: int) -> torch.Tensor:  # one importance per weight vector (row/column)
        s = salience[part].float()
        return s.sum(dim).abs() if taylor == "vectorize" else s.abs().sum(dim)

    q, o = vec("q", 1), vec("o", 0)  # [nq*hd]: row r of q_proj <-> column r of o_proj
    k, v = vec("k", 1), vec("v", 1)  # [nkv*hd]
    mlp = _reduce(torch.stack([vec("gate", 1), vec("up", 1), vec("down", 0)]), reduction)
    q_head = _reduce(torch.stack([q, o]), reduction).reshape(nq, hd).sum(1)
    qg, og = q.reshape(nkv, hpg, hd), o.reshape(nkv, hpg, hd)
    vectors = [qg[:, j] for j in range(hpg)] + [og[:, j] for j in range(hpg)]
    vectors += [k.reshape(nkv, hd), v.reshape(nkv, hd)]
    kv_group = _reduce(torch.stack(vectors), reduction).sum(1)
    layer = kv_group.sum().reshape(1) + mlp.sum().reshape(1)
    return {"q_head": q_head, "kv_group": kv_group, "mlp_channel": mlp, "layer": layer}


class LLMPrunerScorer(Scorer):
    """LLM-Pruner Taylor importance (vectorize / param_first / param_second / param_mix) per group."""

    class Params(Params):
        taylor: Literal["vectorize", "param_first", "param_second", "param_mix"] = "param_first"
        reduction: Literal["sum", "mean", "max", "prod"] = "sum"
        loss: Literal["full", "decode"] = "full"
        batch_size: int = Field(8, ge=1)  # batches of the first-order gradient pass (no effect on scores)
        fisher_batch_size: int = Field(1, ge=1)  # batches whose squared gradients make F (1 = per sample)
        normalize: Literal["block_constant", "per_parameter", "mean", "none"] = "none"

    def __init__(self, params: "LLMPrunerScorer.Params | None" = None):
        self.params = params or self.Params()

    def score(self, ctx: RunContext, calibration: CalibrationSet) -> Scores:
        p = self.params
        adapter = ctx.adapter
        fisher = None
        if p.taylor in ("param_second", "param_mix"):
            fisher = fisher_diagonal(ctx.model, adapter, calibration, p.loss, p.fisher_batch_size, ctx.progress)
        mean_loss = None
        if p.taylor != "param_second":
            mean_loss = accumulate_gradients(ctx.model, adapter, calibration, p.loss, p.batch_size, ctx.progress,
                                             description=f"Scoring (llm_pruner, {p.loss} loss)", step=ctx.step)
        g = adapter.geometry
        out = {"q_head": [], "kv_group": [], "mlp_channel": [], "layer": []}
        with torch.no_grad():
            for i in range(g.num_layers):
                sal = {}
                for name, lin in _linears(adapter, i).items():
                    w = lin.weight.float()
                    first = w * lin.weight.grad.float() if p.taylor != "param_second" else None
                    second = 0.5 * w * w * fisher[(i, name)] if fisher is not None else None
                    if p.taylor in ("vectorize", "param_first"):
                        sal[name] = first
                    elif p.taylor == "param_second":
                        sal[name] = second
                    else:
                        sal[name] = first - second
                for kind, val in group_scores(adapter, sal, p.taylor, p.reduction).items():
                    out[kind].append(val.cpu())
        release_gradients(adapter)
        raw = {kind: torch.stack(v) for kind, v in out.items()}
        values = normalize_scores(raw, p.normalize, adapter, ctx.structures.costs)
        check_scores(values, ctx.step, ctx.structures, ctx.mask, scorer="llm_pruner")
        stats = {"calibration_loss": torch.tensor([mean_loss])} if mean_loss is not None else {}
        return Scores(values, stats)


@hookimpl
def register_scorers(register):
    register("llm_pruner", LLMPrunerScorer)
