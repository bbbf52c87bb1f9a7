"""A complete third-party scorer: empirical-Fisher importance Σ_{w∈S} (∂L/∂w)² · w².

It reuses RESP's shared machinery: ``accumulate_gradients`` backpropagates the calibration loss
into the prunable weights, and ``aggregate`` sums any per-weight map onto heads, KV groups,
MLP channels and layers through the model adapter, so the plugin never touches module names.
"""

from __future__ import annotations

from typing import Literal

from resp_core import hookimpl
from resp_core.interfaces import Params, Scorer, Scores
from resp_core.scoring import accumulate_gradients, aggregate, normalize_scores, release_gradients, weight_map


class FisherScorer(Scorer):
    """Example plugin: squared first-order term (w·∂L/∂w)² summed per structure."""

    class Params(Params):
        loss: Literal["decode", "full"] = "decode"
        batch_size: int = 8

    def __init__(self, params: "FisherScorer.Params | None" = None):
        self.params = params or self.Params()

    def score(self, ctx, calibration):
        accumulate_gradients(ctx.model, ctx.adapter, calibration, self.params.loss, self.params.batch_size,
                             ctx.progress, description="Scoring (example fisher)")
        raw = aggregate(ctx.adapter, lambda layer: weight_map(
            ctx.adapter, layer, lambda lin: (lin.weight * lin.weight.grad) ** 2))
        release_gradients(ctx.adapter)
        return Scores(normalize_scores(raw, "mean", ctx.adapter, ctx.structures.costs))


@hookimpl
def register_scorers(register):
    register("example_fisher", FisherScorer)
