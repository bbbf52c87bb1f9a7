"""OWL's outlier-weighted layer-wise sparsity as an allocator (composable with any scorer)."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from resp_core import hookimpl
from resp_core.activations import collect_input_stats
from resp_core.interfaces import Allocator, CalibrationSet, Params, RunContext, Scores
from resp_core.model.masks import MaskSet
from resp_core.model.structures import Structures
from resp_plugins.allocators.global_rank import allocate_per_layer
from resp_plugins.structure_checks import HeadsAndChannelsOnly


def _head_rows(heads: torch.Tensor, hd: int) -> torch.Tensor:
    heads = heads.reshape(-1).long().cpu()
    return (heads[:, None] * hd + torch.arange(hd)[None, :]).reshape(-1)


def outlier_ratio(metrics: list[torch.Tensor], m: float) -> float:
    """Percentage of entries of all ``metrics`` above ``m`` × their common mean (OWL's LOD)."""
    total = sum(x.numel() for x in metrics)
    if total == 0:
        return 0.0
    mean = sum(float(x.double().sum()) for x in metrics) / total
    count = sum(int((x > m * mean).sum()) for x in metrics)
    return 100.0 * count / total


def owl_ratios(lod: torch.Tensor, target: float, lamda: float, prunable: torch.Tensor | None = None) -> torch.Tensor:
    """Per-layer sparsity from layer outlier ratios (OWL):

        n_i = (LOD_i − min LOD) / (max LOD − min LOD) · 2λ        (over the prunable layers)
        ratio_i = target − (n_i − mean n)                            (mean ratio = target)

    so layers with more outliers are pruned less.  Clamped to [0, 1] (OWL's code replaces a
    non-positive sparsity by 0.01); protected layers get 0."""
    lod = lod.double()
    prunable = torch.ones_like(lod, dtype=torch.bool) if prunable is None else prunable.bool()
    out = torch.zeros_like(lod)
    x = lod[prunable]
    if x.numel() == 0:
        return out
    spread = x.max() - x.min()
    n = (x - x.min()) / spread * 2 * lamda if bool(spread > 0) else torch.zeros_like(x)
    out[prunable] = (target - (n - n.mean())).clamp(0.0, 1.0)
    return out


@torch.no_grad()
def layer_outlier_ratios(ctx: RunContext, calibration: CalibrationSet, m: float, batch_size: int = 8,
                         tokens: str = "all", layers: list[int] | None = None) -> torch.Tensor:
    """OWL's Layerwise Outlier Distribution of each layer of the current masked model: the
    percentage of the Wanda scores |W_ij|·‖X_j‖₂ of all the layer's live q/k/v/o/gate/up/down
    weights that exceed ``m`` times their mean (weights of removed units are left out)."""
    a = ctx.adapter
    g = a.geometry
    layers = list(range(g.num_layers)) if layers is None else layers
    stats = collect_input_stats(ctx.model, a, calibration, sites=("qkv", "o", "gate_up", "down"), layers=layers,
                                tokens=tokens, batch_size=batch_size, progress=ctx.progress,
                                description="OWL outlier ratios")
    e = (ctx.mask or MaskSet.full(g)).effective()
    lod = torch.zeros(g.num_layers, dtype=torch.float64)
    for i in layers:
        if not bool(e.layer[i, 0]):
            continue
        at, ml = a.attention_parts(i), a.mlp_parts(i)
        q_rows = _head_rows(e.q_head[i].nonzero().flatten(), g.head_dim)
        kv_rows = _head_rows(e.kv_group[i].nonzero().flatten(), g.head_dim)
        ch = e.mlp_channel[i].nonzero().flatten()
        x_attn, x_o = stats[(i, "qkv")].norm(), stats[(i, "o")].norm()
        x_mlp, x_down = stats[(i, "gate_up")].norm(), stats[(i, "down")].norm()

        def wanda(lin, norm, rows=None, cols=None):
            w = lin.weight.detach()
            if rows is not None:
                w = w[rows.to(w.device)]
            if cols is not None:
                w = w[:, cols.to(w.device)]
                norm = norm[cols.to(norm.device)]
            return w.float().abs() * norm.to(w.device).float()[None, :]

        metrics = [wanda(at.q, x_attn, rows=q_rows), wanda(at.k, x_attn, rows=kv_rows),
                   wanda(at.v, x_attn, rows=kv_rows), wanda(at.o, x_o, cols=q_rows),
                   wanda(ml.gate, x_mlp, rows=ch), wanda(ml.up, x_mlp, rows=ch), wanda(ml.down, x_down, cols=ch)]
        lod[i] = outlier_ratio(metrics, m)
    return lod


class OWL(HeadsAndChannelsOnly, Allocator):
    """OWL: outlier-weighted layer-wise sparsity, then per-layer removal by the scorer's ranking.

    OWL (Yin et al., ICML 2024, arXiv 2310.05175, "Layerwise Outlier Distribution"): for each
    layer, LOD = share of the Wanda scores |W_ij|·‖X_j‖₂ of all its weights larger than M × the
    layer's mean score (M = ``hyper_m``, 5); LOD is min-max scaled to [0, 2λ] (λ = ``lamda``,
    0.08) and the layer's sparsity is target − (scaled LOD − its mean), so the ratios average to
    the target and layers rich in outliers keep more.  Within each layer the scorer's ranking
    removes that fraction of each unit kind (``allocate_per_layer``, as ``uniform``).

    Authors' code (luuyin/OWL ``prune_wanda_outlier``; RESP's ``owl_sp.py``): the same formula,
    computed once on the dense model (one shot) and applied to unstructured Wanda (OWL) or to
    heads (RESP).  RESP's ``owl_sp.py`` applies the per-layer ratio to attention heads only and
    prunes MLP channels at the uniform target (an apparent slip); we apply it to every kind, as
    OWL does for all weights.  OWL replaces a non-positive layer sparsity by 0.01; we clamp to
    [0, 1].  Here the LOD is recomputed on the current masked model at every step (``prepare``),
    over the live weights only (removed units' zeros would otherwise inflate the outlier share),
    and only unprotected layers enter the min-max scaling and the mean (as RESP's ``prune_skip``).
    The ratios count units per kind, not parameters: with both heads and channels pruned the
    parameter sparsity reached is close to, not exactly, the target.
    """

    family = "allocator"  # wording of the whole-layer refusal (HeadsAndChannelsOnly)
    name = "owl"

    class Params(Params):
        hyper_m: float = Field(5.0, gt=0)
        lamda: float = Field(0.08, ge=0, lt=0.5)
        batch_size: int = Field(8, ge=1)
        tokens: Literal["all", "target"] = "all"

    def __init__(self, params=None):
        self.params = params or self.Params()
        self.lod: torch.Tensor | None = None

    def prepare(self, ctx: RunContext, calibration: CalibrationSet) -> None:
        p = self.params
        layers = [i for i in range(ctx.adapter.geometry.num_layers) if bool(ctx.structures.prunable_layers[i])]
        self.lod = layer_outlier_ratios(ctx, calibration, p.hyper_m, p.batch_size, p.tokens, layers)

    def allocate(self, scores: Scores, structures: Structures, mask: MaskSet, target: float) -> MaskSet:
        if self.lod is None:
            raise RuntimeError("OWL.allocate called before prepare()")
        ratios = owl_ratios(self.lod, target, self.params.lamda, structures.prunable_layers)
        self.last_ratios = ratios
        return allocate_per_layer(scores, structures, mask, ratios)


@hookimpl
def register_allocators(register):
    register("owl", OWL)
