"""First-order Taylor importance: RESP (decode-only loss) and GISP (full-sequence loss).

Formula (RESP paper, arXiv 2512.02185, Eq. 3-5; GISP, arXiv 2510.18030)::

    I(w) = | w · ∂L/∂w |          gradients accumulated over the whole calibration set
    I(S) = Σ_{w ∈ S} I(w)          S = a query head / KV group / MLP channel (see resp_core.scoring)
    L    = L_dec (Eq. 4): mean NLL over generated tokens only (prompt labels = -100)   [resp]
           or the mean NLL over every token of the sequence                           [gisp]

then normalized per block type and ranked globally across layers by the allocator.

Where the authors' code (uncc-efficient-ai/RESP, ``grad_sp_global.py``) differs and what we do:

* Normalization: the authors divide every score of a block type by one constant (attention:
  4·head_dim·hidden, MLP: 3·intermediate) and shift scores to be non-negative.  That is our
  default ``normalize: block_constant``; scores are already non-negative, so no shift.
* Ranking: the authors threshold by *count* of structures (kthvalue over heads and channels);
  RESP's global allocator fills a *parameter* budget so that "40%" means 40% of the prunable
  blocks' parameters whichever mix of heads and channels is removed.
* GQA: the authors mask query heads one by one and never score or remove K/V projections; we
  offer both ``structures.attention: q_head`` (their setting; a KV head goes with its last query
  head) and ``kv_group`` (K/V rows scored with their query heads, removed together).
* ``head_dim``: taken from ``config.head_dim`` (the authors use hidden/heads, wrong on Qwen3).
* The authors divide the gradient by the sample count; we take the gradient of the set-level
  mean token loss.  Both are a positive constant per scoring pass and do not change rankings.
"""

from __future__ import annotations

from typing import Literal

import torch

from resp_core import hookimpl
from resp_core.interfaces import CalibrationSet, Params, RunContext, Scorer, Scores
from resp_core.scoring import accumulate_gradients, aggregate, normalize_scores, release_gradients, weight_map


class TaylorScorer(Scorer):
    """First-order Taylor |W·∂L/∂W| per structure; decode-only loss (RESP, Eq. 4-5)."""

    class Params(Params):
        loss: Literal["decode", "full"] = "decode"
        normalize: Literal["block_constant", "per_parameter", "mean", "none"] = "block_constant"
        granularity: Literal["element", "group"] = "element"  # |Σ_S w·g| when 'group'
        batch_size: int = 16

    def __init__(self, params: "TaylorScorer.Params | None" = None):
        self.params = params or self.Params()

    def score(self, ctx: RunContext, calibration: CalibrationSet) -> Scores:
        p = self.params
        adapter = ctx.adapter
        mean_loss = accumulate_gradients(ctx.model, adapter, calibration, p.loss, p.batch_size, ctx.progress,
                                         description=f"Scoring ({p.loss} loss)")

        def saliency(layer: int):
            if p.granularity == "element":
                return weight_map(adapter, layer, lambda lin: (lin.weight * lin.weight.grad).abs())
            return weight_map(adapter, layer, lambda lin: lin.weight * lin.weight.grad)

        raw = aggregate(adapter, saliency)
        if p.granularity == "group":
            raw = {k: v.abs() for k, v in raw.items()}
        release_gradients(adapter)
        values = normalize_scores(raw, p.normalize, adapter, ctx.structures.costs)
        return Scores(values, {"calibration_loss": torch.tensor([mean_loss])})


class GISPScorer(TaylorScorer):
    """GISP: first-order Taylor |W·∂L/∂W| with the full-sequence loss, block-wise normalization."""

    class Params(TaylorScorer.Params):
        loss: Literal["decode", "full"] = "full"


@hookimpl
def register_scorers(register):
    register("resp", TaylorScorer)
    register("gisp", GISPScorer)
