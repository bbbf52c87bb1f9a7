"""First-order Taylor importance: RESP and GISP (decode-only loss; ``loss: full`` for every token).

Formula (RESP paper, arXiv 2512.02185, Eq. 3-5; GISP, arXiv 2510.18030)::

    I(w) = | w · ∂L/∂w |          gradients accumulated over the whole calibration set
    I(S) = Σ_{w ∈ S} I(w)          S = a query head / KV group / MLP channel (see resp_core.scoring)
    L    = L_dec (Eq. 4): NLL over target tokens only (prompt labels = -100)   [resp, gisp]
           or the NLL over every token of the sequence                   [loss: full]

then normalized per block type and ranked globally across layers by the allocator.

The authors' code is the reference (uncc-efficient-ai/RESP ``resp/pruners/grad_sp_global.py``
and ``data_refresh_GISP.py``, ``obtain_info_iterative``; ``non_uniform_pruner.py``
``fill_information``; uncc-efficient-ai/GISP ``pruners/grad_sp_global.py``).  What is theirs and
what is ours:

* Loss weighting (``reduction``): ``sample_mean`` (default, theirs) is the mean over calibration
  samples of each sample's mean token loss — they backpropagate ``loss * batch_size`` per batch,
  one long trace per batch, and divide the gradient by the sample count.  ``token_mean`` (ours)
  is one token-weighted mean over the whole set.  The two are **not** equivalent: with traces of
  different lengths each sample's gradient is weighted 1/|T_s| in one and 1 in the other, so the
  gradients are not proportional and rankings can differ (tests/test_scoring_pass.py pins both).
  ``batch_token_mean`` (set by ``mode: paper``) is the authors' batching exactly
  (``non_uniform_pruner.py`` ``fill_information``, single-device ``downstream`` branch): every
  trace is right-padded to the set's longest, the set is cut in order into batches whose size
  follows that padded length (over 512 tokens 1, 257-512: 4, 129-256: 8, 65-128: 16, 32-64: 32,
  under 32: 64), each batch's loss is the token mean over its target tokens (transformers' loss)
  times its size, and the gradient is divided by the sample count.  A token of a sample in batch
  b weighs B_b / (T_b · N): on sets padded past 512 tokens (their 2048-token traces) that is
  ``sample_mean``; on shorter sets (the testbed's) traces are token-weighted inside each batch.
  ``batch_size`` sets only the memory batches (tests/test_protocol_points.py pins the gradient
  against their batch-by-batch computation).
* Normalization (``normalize: block_constant``, default): the authors divide every score of a
  block type by one constant — a query head by 4·head_dim·hidden, an MLP channel by
  3·intermediate (``structural_size``) — and shift scores to be non-negative (ours already are).
  For ``structures.attention: kv_group`` (ours: the authors never score K/V) the divisor scales
  with the unit's size, (n_rep + 1)·4·head_dim·hidden, see
  :func:`resp_core.scoring.block_constants`.
* Ranking: the authors threshold by *count* of structures (kthvalue over heads and channels);
  RESP's global allocator fills a parameter budget (see the allocator and structures docs).
* GQA: the authors mask query heads one by one and never score or remove K/V projections
  (``structures.attention: q_head``).
* ``head_dim``: taken from ``config.head_dim`` (the authors use hidden/heads, wrong on Qwen3).
* Efficiency (no effect on the numbers beyond float rounding): logits only at labelled
  positions, gradients of bf16/fp16 weights summed in float32, per-unit reduction on the
  device, optional ``gradient_checkpointing``.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from resp_core import hookimpl
from resp_core.interfaces import CalibrationSet, Params, RunContext, Scorer, Scores
from resp_core.scoring import check_scores, gradient_pass, normalize_scores, release_gradients, taylor_unit_scores


class TaylorScorer(Scorer):
    """First-order Taylor |W·∂L/∂W| per structure; decode-only loss (RESP, Eq. 4-5)."""

    name = "resp"

    class Params(Params):
        loss: Literal["decode", "full"] = "decode"
        reduction: Literal["sample_mean", "token_mean", "batch_token_mean"] = "sample_mean"
        normalize: Literal["block_constant", "per_parameter", "mean", "none"] = "block_constant"
        granularity: Literal["element", "group"] = "element"  # |Σ_S w·g| when 'group'
        batch_size: int = Field(16, ge=1)  # no effect on the scores, only on memory and speed
        gradient_checkpointing: bool = False  # recompute layer activations in backward (less memory)

    def __init__(self, params: "TaylorScorer.Params | None" = None):
        self.params = params or self.Params()

    def score(self, ctx: RunContext, calibration: CalibrationSet) -> Scores:
        p = self.params
        adapter = ctx.adapter
        gp = gradient_pass(ctx.model, adapter, calibration, loss=p.loss, reduction=p.reduction,
                           batch_size=p.batch_size, gradient_checkpointing=p.gradient_checkpointing,
                           progress=ctx.progress, description=f"Scoring ({p.loss} loss)", step=ctx.step)
        try:
            raw = taylor_unit_scores(adapter, gp, signed=p.granularity == "group", step=ctx.step)
        finally:
            gp.release()
            release_gradients(adapter)
        if p.granularity == "group":
            raw = {k: v.abs() for k, v in raw.items()}
        values = normalize_scores(raw, p.normalize, adapter, ctx.structures.costs)
        check_scores(values, ctx.step, ctx.structures, ctx.mask, scorer=self.name)
        return Scores(values, {"calibration_loss": torch.tensor([gp.loss])})


class GISPScorer(TaylorScorer):
    """GISP as the RESP authors run it: first-order Taylor |W·∂L/∂W|, block-wise normalization,
    the loss on the target tokens only (prompt masked).

    The authors' GISP baseline (uncc-efficient-ai/RESP ``configs/section5/main/gisp_gsm8k.yaml``,
    ``prune_metric: grad_sp_global`` with ``used_config: gold-thinking``) trains on the gold
    solution plus EOS after the thinking-mode prompt, prompt labels -100
    (``modules/data/data_prune_ds.py`` ``get_gsm8k_model_output_sample``): the same scorer as
    RESP, on other data (``calibration: task_data``, whose default is that gold-thinking data).
    ``loss: full`` is the full-sequence variant (every token, prompt included) that RESP shipped
    as GISP before; the authors' code does so on generic text (uncc-efficient-ai/RESP
    ``resp/pruners/non_uniform_pruner.py`` ``fill_information``: ``labels=batch_input``)."""

    name = "gisp"

    class Params(TaylorScorer.Params):
        loss: Literal["decode", "full"] = "decode"


@hookimpl
def register_scorers(register):
    register("resp", TaylorScorer)
    register("gisp", GISPScorer)
