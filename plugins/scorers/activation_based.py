"""Activation-based baselines of the paper's study: Wanda-sp and FLAP, and the base class they share
with structured SparseGPT / OBS (:mod:`resp_plugins.scorers.sparsegpt`).

All three look at the inputs of the two projections whose *input channels* are the prunable units:
o_proj (input channel = one dimension of one head's output; head h owns columns
``h*head_dim:(h+1)*head_dim``) and down_proj (input channel c = MLP channel c).  Statistics come
from :func:`resp_core.activations.collect_input_stats` on the current masked model, every step.

Unit scores from per-channel metrics m_j (see :func:`unit_scores`)::

    q_head h      Σ_{j ∈ columns of h} m_j          (o_proj)
    kv_group g    Σ_{h ∈ query heads of g} score(h)   (K/V projections are not scored)
    mlp_channel c m_c                                 (down_proj)

None of them can score whole decoder blocks: ``structures.layers: true`` is refused up front.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from resp_core import hookimpl
from resp_core.activations import InputStats, collect_input_stats
from resp_core.errors import RespError
from resp_core.interfaces import CalibrationSet, Params, RunContext, Scorer, Scores
from resp_core.model.adapter import DecoderAdapter, Geometry
from resp_core.model.masks import MaskSet
from resp_core.scoring import check_scores, normalize_scores

from resp_plugins.structure_checks import HeadsAndChannelsOnly

# --------------------------------------------------------------------------------------------------
# Metric functions (pure; tested on hand-checkable tensors)
# --------------------------------------------------------------------------------------------------


def wanda_channel_metric(weight: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """Wanda-sp per input channel j: Σ_i |W_ij| · ‖X_j‖₂  ([d_out, d_in], [d_in] -> [d_in], float64)."""
    return weight.detach().double().abs().sum(0) * norm.to(weight.device).double()


def flap_channel_metric(weight: torch.Tensor, stats: InputStats, metric: str = "WIFV") -> torch.Tensor:
    """FLAP per input channel j.

    ``WIFV`` (default, FLAP's fluctuation): Var(X_j) · ‖W_:,j‖₂²;  ``IFV``: Var(X_j);
    ``WIFN``: mean_i |W_ij| · sqrt(E[X_j²]).  Var is the unbiased sample variance over tokens."""
    w = weight.detach().double()
    if metric == "WIFV":
        return stats.variance().to(w.device) * w.square().sum(0)
    if metric == "IFV":
        return stats.variance().to(w.device)
    if metric == "WIFN":
        return w.abs().mean(0) * (stats.sum_sq.to(w.device) / max(stats.count, 1)).sqrt()
    raise ValueError(f"unknown FLAP metric {metric!r}")


def head_columns(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """o_proj input columns (= q_proj rows) of the query heads ``heads``."""
    heads = heads.reshape(-1).long().cpu()
    return (heads[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)


def unit_scores(g: Geometry, attn_channel: torch.Tensor, mlp_channel: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-channel metrics ([L, num_heads*head_dim], [L, intermediate]) -> unit scores by kind."""
    L = attn_channel.shape[0]
    q = attn_channel.reshape(L, g.num_heads, g.head_dim).sum(-1)
    kv = torch.zeros(L, g.num_kv_heads, dtype=q.dtype).index_add_(1, g.kv_group_of_head(), q)
    layer = q.sum(1, keepdim=True) + mlp_channel.sum(1, keepdim=True)
    return {"q_head": q.float(), "kv_group": kv.float(), "mlp_channel": mlp_channel.float(), "layer": layer.float()}


# --------------------------------------------------------------------------------------------------
# Scorers
# --------------------------------------------------------------------------------------------------


class ActivationScorer(HeadsAndChannelsOnly, Scorer):
    """Base of the scorers on o_proj / down_proj input statistics (here and in ``sparsegpt``):
    shared params, statistics collection, unit scores, and the refusal of whole layers."""

    name = "activation"

    class Params(Params):
        batch_size: int = Field(8, ge=1)
        tokens: Literal["all", "target"] = "all"  # all attended tokens, or only decode-loss positions
        normalize: Literal["none", "block_constant", "per_parameter", "mean"] = "none"

    def __init__(self, params=None):
        self.params = params or self.Params()

    def _collect(self, ctx: RunContext, calibration: CalibrationSet, **kw) -> dict:
        p = self.params
        return collect_input_stats(ctx.model, ctx.adapter, calibration, tokens=p.tokens, batch_size=p.batch_size,
                                   progress=ctx.progress, description=f"Scoring ({self.name})", **kw)

    def _finish(self, ctx: RunContext, attn: torch.Tensor, mlp: torch.Tensor, stats: dict | None = None) -> Scores:
        raw = unit_scores(ctx.adapter.geometry, attn, mlp)
        values = normalize_scores(raw, self.params.normalize, ctx.adapter, ctx.structures.costs)
        check_scores(values, ctx.step, ctx.structures, ctx.mask, scorer=self.name)
        return Scores(values, stats or {})


class WandaSP(ActivationScorer):
    """Wanda-sp: structured Wanda, |W|·‖X‖ summed over each head's / channel's input columns.

    Formula (Wanda, Sun et al., ICLR 2024, arXiv 2306.11695, Eq. 1: S_ij = |W_ij| · ‖X_j‖₂; its
    structured form "Wanda-sp" is the baseline of FLAP, An et al., AAAI 2024, arXiv 2312.11983)::

        m_j = Σ_i |W_ij| · ‖X_j‖₂        W = o_proj / down_proj weight, X_j = input channel j
        head h: Σ_{j ∈ h} m_j;   MLP channel c: m_c;   KV group: Σ of its query heads

    Authors' code (CASIA-IVA-Lab/FLAP ``prune_wanda_sp``; uncc-efficient-ai/RESP ``wanda_sp.py``):
    mean over output rows instead of the sum, and ‖X_j‖₂² divided by the number of calibration
    *samples* — both are one positive constant for every o_proj and down_proj (same output width,
    same data), so rankings are unchanged; we use the plain sum and norm.  Their allocation is
    uniform per layer (the same ratio of heads and of channels in every layer): use
    ``allocator: uniform`` for that setting; under ``global`` heads and channels are ranked on one
    scale, which this metric does not calibrate (consider ``normalize``).  On GQA models (Qwen3)
    the RESP code masks *query* heads one by one (K/V of the surviving heads are shared) and never
    scores or removes K/V projections: that is ``structures.attention: q_head`` here; with
    ``kv_group`` a group's score is the sum of its query heads (K/V weights unscored) and the K/V
    rows go with it.  ``head_dim`` comes from the config (RESP's code uses hidden/heads, wrong on
    Qwen3).

    Statistics: by default one pass over the current (masked) model, and pruning progressive
    over the schedule's steps.  The authors' protocol (uncc-efficient-ai/RESP
    ``resp/pruners/wanda_sp.py`` ``baseline_uniform_wanda``, ``act_type: sparse``; Wanda's own
    ``prune_wanda`` in locuslab/wanda ``lib/prune.py``) is one shot from the dense model per
    target sparsity (``schedule: oneshot``; ``respctl compare`` runs such a method once per
    sparsity, each from dense), statistics taken layer by layer through the already-pruned
    earlier layers (``sequential: true``), on the gold-thinking text cut into 256-token windows
    (``calibration: task_data`` with ``pack: 256``).  ``sequential`` asks the run's allocator,
    which must allocate layer by layer (``allocator: uniform``), what it removes in each layer
    before the next layer's statistics are taken (:func:`resp_core.activations.collect_input_stats`).
    That decision is asked with the later layers still unscored, so it is the final one when a
    layer's removal depends on its own scores only: ``uniform`` with ``target_on: units``, or
    ``target_on: sparsity`` on the ``all_blocks`` basis with query heads (the authors' setting;
    on ``prunable_blocks`` a KV head's k/v count once its last head goes, which other layers'
    scores can shift).
    """

    name = "wanda_sp"

    class Params(ActivationScorer.Params):
        sequential: bool = False

    def check_recipe(self, recipe, path: str) -> None:
        super().check_recipe(recipe, path)
        if self.params.sequential:
            from resp_core.registry import get_registry

            name = recipe.allocator.name
            factory = get_registry().get("allocator", name, "allocator").factory
            if not getattr(factory, "per_layer", name == "uniform"):
                raise RespError(f"{path}.params.sequential: needs an allocator that decides layer by layer "
                                f"(allocator: uniform), not {name!r}")

    def score(self, ctx: RunContext, calibration: CalibrationSet) -> Scores:
        if self.params.sequential:
            return self._score_sequential(ctx, calibration)
        a = ctx.adapter
        stats = self._collect(ctx, calibration, sites=("o", "down"))
        attn, mlp = [], []
        for i in range(a.geometry.num_layers):
            attn.append(wanda_channel_metric(a.attention_input(i).weight, stats[(i, "o")].norm()).cpu())
            mlp.append(wanda_channel_metric(a.mlp_input(i).weight, stats[(i, "down")].norm()).cpu())
        return self._finish(ctx, torch.stack(attn), torch.stack(mlp))

    def _score_sequential(self, ctx: RunContext, calibration: CalibrationSet) -> Scores:
        a, g = ctx.adapter, ctx.adapter.geometry
        if ctx.allocator is None or ctx.target is None:
            raise ValueError("sequential Wanda-sp needs the run's allocator and target (ctx.allocator, ctx.target)")
        attn = torch.zeros(g.num_layers, g.num_heads * g.head_dim, dtype=torch.float64)
        mlp = torch.zeros(g.num_layers, g.intermediate_size, dtype=torch.float64)
        mask = ctx.mask or MaskSet.full(g)
        alive = mask.effective().layer[:, 0]
        layers = [i for i in range(g.num_layers) if bool(ctx.structures.prunable_layers[i]) and bool(alive[i])]

        def decide(i: int, stats: dict) -> dict[str, torch.Tensor]:
            attn[i] = wanda_channel_metric(a.attention_input(i).weight, stats["o"].norm()).cpu()
            mlp[i] = wanda_channel_metric(a.mlp_input(i).weight, stats["down"].norm()).cpu()
            # a per-layer allocator's decision for layer i depends on layer i's scores only
            e = ctx.allocator.allocate(self._finish(ctx, attn, mlp), ctx.structures, mask, ctx.target).effective()
            return {"o": e.q_head[i].repeat_interleave(g.head_dim), "down": e.mlp_channel[i]}

        self._collect(ctx, calibration, sites=("o", "down"), layers=layers, sequential=True, decide=decide)
        return self._finish(ctx, attn, mlp)


class FLAP(ActivationScorer):
    """FLAP: fluctuation metric Var(X_j)·‖W_:,j‖₂² with baseline bias compensation.

    Formula (FLAP, An et al., AAAI 2024, arXiv 2312.11983, Sec. 3 "fluctuation metric" and
    "bias compensation")::

        m_j = Var(X_j) · ‖W_:,j‖₂²      Var = unbiased sample variance over calibration tokens
        head h: Σ_{j ∈ h} m_j;   MLP channel c: m_c;   KV group: Σ of its query heads
        removing columns S:  b ← b + W_:,S · E[X_S]     (o_proj / down_proj bias, created if absent)

    so that the layer output keeps its mean over the calibration tokens.  The compensation is done
    in :meth:`before_removal` for the units removed at this step, with the means gathered when this
    step was scored.  Pair with ``allocator: flap_adaptive`` for FLAP's adaptive structure search
    (standardized scores, one global threshold); the per-channel attention metric is passed on in
    ``layer_stats['flap_attn_channel']`` so that it can standardize channels as FLAP does.

    Authors' code: CASIA-IVA-Lab/FLAP computes the variance with a running update that drops the
    first sample and normalizes by the sample count (≈ the token variance times the sequence
    length, a constant); we compute the exact unbiased token variance.  CASIA's code squares the
    attention metric before standardizing (``** 2`` on o_proj only, not in the paper); we follow
    the paper and RESP's copy (``square_attention: true`` reproduces CASIA).  FLAP sets the bias
    to W·(mean ⊙ removed) once (one shot, original bias zero); we *add* it at every step.  RESP's
    ``baseline_prune_flap_patched`` (the one it runs on Qwen3) passes ``bias=False``, i.e. no
    compensation: ``bias_compensation: false`` reproduces it.  GQA, head_dim and the
    progressive schedule: as for ``wanda_sp``.
    """

    name = "flap"

    class Params(ActivationScorer.Params):
        metric: Literal["WIFV", "IFV", "WIFN"] = "WIFV"
        bias_compensation: bool = True
        square_attention: bool = False

    def __init__(self, params=None):
        super().__init__(params)
        self._means: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def score(self, ctx: RunContext, calibration: CalibrationSet) -> Scores:
        a, p = ctx.adapter, self.params
        stats = self._collect(ctx, calibration, sites=("o", "down"))
        attn, mlp = [], []
        self._means = {}
        for i in range(a.geometry.num_layers):
            so, sd = stats[(i, "o")], stats[(i, "down")]
            m_o = flap_channel_metric(a.attention_input(i).weight, so, p.metric)
            if p.square_attention:
                m_o = m_o.square()
            attn.append(m_o.cpu())
            mlp.append(flap_channel_metric(a.mlp_input(i).weight, sd, p.metric).cpu())
            self._means[i] = (so.mean(), sd.mean())
        attn_t, mlp_t = torch.stack(attn), torch.stack(mlp)
        return self._finish(ctx, attn_t, mlp_t, {"flap_attn_channel": attn_t.float(),
                                                  "flap_mlp_channel": mlp_t.float()})

    @torch.no_grad()
    def before_removal(self, ctx: RunContext, old: MaskSet, new: MaskSet) -> None:
        if not self.params.bias_compensation or not self._means:
            return
        a = ctx.adapter
        hd = a.geometry.head_dim
        oe, ne = old.effective(), new.effective()
        for i, (mean_o, mean_d) in self._means.items():
            if not bool(ne.layer[i, 0]):
                continue  # a removed block is the identity; apply_mask drops its biases
            gone_q = (oe.q_head[i] & ~ne.q_head[i]).nonzero().flatten()
            if gone_q.numel():
                compensate_bias(a.attention_input(i), head_columns(gone_q, hd), mean_o)
            gone_c = (oe.mlp_channel[i] & ~ne.mlp_channel[i]).nonzero().flatten()
            if gone_c.numel():
                compensate_bias(a.mlp_input(i), gone_c, mean_d)
        self._means = {}


@torch.no_grad()
def compensate_bias(linear: torch.nn.Linear, cols: torch.Tensor, mean: torch.Tensor) -> None:
    """b ← b + W_:,cols · mean[cols] (FLAP's baseline bias), creating the bias if needed."""
    w = linear.weight
    cols = cols.to(w.device)
    delta = w[:, cols].double() @ mean.to(w.device).double()[cols]
    bias = DecoderAdapter.ensure_bias(linear)
    bias.add_(delta.to(bias.dtype))


@hookimpl
def register_scorers(register):
    register("wanda_sp", WandaSP)
    register("flap", FLAP)
