"""Control scorers that need no calibration data: weight magnitude and random.

``magnitude``::

    l1:  I(S) = Σ_{w ∈ S} |w|
    l2:  I(S) = sqrt( Σ_{w ∈ S} w² )          (the L2 norm of all of S's weights)

where S is a query head (its q_proj rows and o_proj columns), a KV group (its query heads plus
the k_proj and v_proj rows of its KV head), an MLP channel (gate_proj and up_proj rows, down_proj
column) or a whole layer (every projection of the block); see :mod:`resp_core.scoring`.  Biases
are not counted.  Scores are then normalized per block type (``normalize``, default
``per_parameter``: each unit's score divided by its parameter count, so heads and channels are
comparable under a global allocator).

LLM-Pruner's ``l1``/``l2`` importance (``MagnitudeImportance``) differs: it scores each coupled
weight *vector* by Σ|w|^p (no root, so its ``l2`` is the squared norm), reduces over the vectors
of a group with ``mean``, and allocates per layer.  Within one unit kind the rankings of ``l1``
agree with ours (up to that mean, which is a constant per kind); ``l2`` ranks heads by the norm
of the whole head rather than by the mean of per-vector squared norms.

``random``: every unit of every kind gets an independent uniform U(0, 1) score drawn from a
generator seeded by ``seed``.  The scores are the same at every step of a schedule (one random
ranking), so the nested masks follow one random removal order; the same seed gives the same
masks.
"""

from __future__ import annotations

from typing import Literal

import torch

from resp_core import hookimpl
from resp_core.interfaces import CalibrationSet, Params, RunContext, Scorer, Scores
from resp_core.validation import Seed
from resp_core.model.structures import UNIT_KINDS
from resp_core.scoring import aggregate, check_scores, normalize_scores, weight_map


class MagnitudeScorer(Scorer):
    """Weight magnitude per structure: Σ|w| (l1) or sqrt(Σw²) (l2); needs no calibration."""

    class Params(Params):
        norm: Literal["l1", "l2"] = "l1"
        normalize: Literal["block_constant", "per_parameter", "mean", "none"] = "per_parameter"

    def __init__(self, params: "MagnitudeScorer.Params | None" = None):
        self.params = params or self.Params()

    @torch.no_grad()
    def score(self, ctx: RunContext, calibration: CalibrationSet) -> Scores:
        adapter = ctx.adapter
        if self.params.norm == "l1":
            raw = aggregate(adapter, lambda i: weight_map(adapter, i, lambda lin: lin.weight.abs()))
        else:
            raw = aggregate(adapter, lambda i: weight_map(adapter, i, lambda lin: lin.weight.float() ** 2))
            raw = {k: v.sqrt() for k, v in raw.items()}
        values = normalize_scores(raw, self.params.normalize, adapter, ctx.structures.costs)
        check_scores(values, ctx.step, ctx.structures, ctx.mask, scorer="magnitude")
        return Scores(values)


class RandomScorer(Scorer):
    """Uniform random scores U(0, 1) per unit, seeded (a control: one random removal order)."""

    class Params(Params):
        seed: Seed = 0

    def __init__(self, params: "RandomScorer.Params | None" = None):
        self.params = params or self.Params()

    def score(self, ctx: RunContext, calibration: CalibrationSet) -> Scores:
        gen = torch.Generator().manual_seed(self.params.seed)
        costs = ctx.structures.costs
        values = {kind: torch.rand(costs[kind].shape, generator=gen) for kind in UNIT_KINDS}
        return Scores(values)


@hookimpl
def register_scorers(register):
    register("magnitude", MagnitudeScorer)
    register("random", RandomScorer)
