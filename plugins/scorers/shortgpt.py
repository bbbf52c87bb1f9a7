"""ShortGPT's Block Influence (Men et al., 2024, arXiv 2403.03853): remove whole decoder layers.

For layer i with input hidden state x_{i,t} and output hidden state x_{i+1,t} at token t::

    BI_i = 1 − E_{X, t} [ cos(x_{i,t}, x_{i+1,t}) ]        cos(a, b) = aᵀb / (‖a‖·‖b‖)

the expectation over every token of every calibration sequence (padding excluded; with
``tokens: target`` only the tokens that carry the decode loss).  A layer that barely changes
the residual stream has a low BI and is removed first: the score of unit kind ``layer`` is BI.

Runs with ``structures.layers: true`` only (the unit is the whole block) and the ``global``
allocator, which removes the lowest-BI unprotected layers until the removed blocks' parameters
reach the target; compaction then deletes those layers.  With a multi-step schedule BI is
recomputed on the current (layer-pruned) model at every step; a one-step schedule
(``progressive`` with ``steps: 1``) is ShortGPT's one-shot ranking.

Where we differ from the authors' code (GISP's ``pruners/shortGPT_sp.py``, which follows
ShortGPT): they compute BI once, sum 1 − cos over all tokens including right padding (we average
over real tokens: same ranking for equal-length unpadded sequences), replace NaN cosines by
0.5 (torch's cosine has an epsilon, so ours are never NaN), and stop when the *model's* sparsity
reaches the ratio (ours: the fraction of the unprotected blocks' parameters, and the allocator
skips a layer whose removal would overshoot the target by more than it closes the gap).
The hidden states are taken with forward hooks on each decoder layer (its input and output),
not from ``output_hidden_states`` whose last entry is after the final norm.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from resp_core import hookimpl
from resp_core.errors import RespError
from resp_core.interfaces import CalibrationSet, Params, RunContext, Scorer, Scores


def block_influence(model, adapter, calibration: CalibrationSet, batch_size: int, tokens: str = "all",
                    progress=None) -> torch.Tensor:
    """BI per layer, shape [L]: 1 − mean cosine similarity of each layer's input and output."""
    from resp_core.interfaces import Progress

    n_layers = adapter.geometry.num_layers
    sums = torch.zeros(n_layers, dtype=torch.float64)
    counts = torch.zeros(n_layers, dtype=torch.float64)
    state: dict = {}

    def hook(index):
        def fn(module, args, kwargs, output):
            x_in = args[0] if args else kwargs["hidden_states"]
            x_out = output[0] if isinstance(output, (tuple, list)) else output
            cos = torch.nn.functional.cosine_similarity(x_in.float(), x_out.float(), dim=-1)  # [B, T]
            keep = state["keep"]
            sums[index] += float(cos[keep].double().sum())
            counts[index] += float(keep.sum())
        return fn

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(adapter.layers)]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    progress = progress or Progress()
    n_batches = (len(calibration) + batch_size - 1) // batch_size
    try:
        with torch.no_grad(), progress.task("Block influence", total=n_batches) as advance:
            for batch in calibration.batches(batch_size, "decode"):
                keep = batch.attention_mask.bool() if tokens == "all" else batch.labels != -100
                state["keep"] = keep.to(device)
                model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device))
                advance(1)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return (1.0 - sums / counts.clamp_min(1)).float()


class ShortGPTScorer(Scorer):
    """ShortGPT Block Influence BI = 1 − E[cos(x_in, x_out)] per layer; removes whole layers."""

    class Params(Params):
        batch_size: int = Field(8, ge=1)
        tokens: Literal["all", "target"] = "all"  # which tokens the expectation runs over

    def __init__(self, params: "ShortGPTScorer.Params | None" = None):
        self.params = params or self.Params()

    def check_recipe(self, recipe, path: str) -> None:
        if not recipe.structures.layers:
            raise RespError(f"{path}: shortgpt removes whole layers; set structures.layers: true "
                            f"(heads and channels are not scored)")
        if recipe.allocator.name == "uniform":
            raise RespError("allocator: 'uniform' removes the same fraction of each layer's units and cannot "
                            "remove whole layers; use allocator 'global' with shortgpt")

    def score(self, ctx: RunContext, calibration: CalibrationSet) -> Scores:
        bi = block_influence(ctx.model, ctx.adapter, calibration, self.params.batch_size, self.params.tokens,
                             ctx.progress)
        return Scores({"layer": bi.reshape(-1, 1)}, {"block_influence": bi})


@hookimpl
def register_scorers(register):
    register("shortgpt", ShortGPTScorer)
