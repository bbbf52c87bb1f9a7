"""Activation-based baselines of the paper's study: Wanda-sp, FLAP and structured SparseGPT (OBS).

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


def damped_inverse(h: torch.Tensor, percdamp: float) -> torch.Tensor:
    """(H + λI)⁻¹ with λ = percdamp · mean(diag H), as SparseGPT dampens (float64).

    If H is still not positive definite (rank-deficient calibration), λ grows tenfold until it is."""
    h = h.double()
    d = h.shape[0]
    if d == 0:
        return h.clone()
    mean_diag = float(torch.diagonal(h).mean())
    damp = percdamp * mean_diag if mean_diag > 0 else 1.0
    eye = torch.eye(d, dtype=h.dtype, device=h.device)
    for _ in range(8):
        chol, info = torch.linalg.cholesky_ex(h + damp * eye)
        if int(info) == 0:
            return torch.cholesky_inverse(chol)
        damp = max(damp * 10, 1e-8)
    raise RuntimeError("Hessian is not positive definite even after dampening")


def obs_group_error(weight: torch.Tensor, hinv: torch.Tensor, cols: torch.Tensor) -> float:
    """OBS error of removing input columns S (others re-fitted): tr(W_S [(H⁻¹)_SS]⁻¹ W_Sᵀ)."""
    w = weight.detach().double()[:, cols]
    g = hinv.detach().double()[cols][:, cols]
    return float((w * torch.linalg.solve(g, w.t()).t()).sum())


def obs_remove(weight: torch.Tensor, hinv: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Exact OBS group update: remove columns S and re-fit the rest (float64 copy).

    W ← W − W_S [(H⁻¹)_SS]⁻¹ (H⁻¹)_{S,:}; the removed columns become exactly 0.  With
    H = XᵀX/n this is the least-squares optimum of ‖W X − W' X‖ over W' with W'_S = 0."""
    w = weight.detach().double().clone()
    g = hinv.detach().double()
    cols = cols.reshape(-1).long()
    if cols.numel() == 0:
        return w
    coef = torch.linalg.solve(g[cols][:, cols], g[cols])  # [(H⁻¹)_SS]⁻¹ (H⁻¹)_{S,:}
    w -= w[:, cols] @ coef
    w[:, cols] = 0.0
    return w


# --------------------------------------------------------------------------------------------------
# Scorers
# --------------------------------------------------------------------------------------------------


class _ActivationScorer(Scorer):
    name = "activation"

    class Params(Params):
        batch_size: int = Field(8, ge=1)
        tokens: Literal["all", "target"] = "all"  # all attended tokens, or only decode-loss positions
        normalize: Literal["none", "block_constant", "per_parameter", "mean"] = "none"

    def __init__(self, params=None):
        self.params = params or self.Params()

    def check_recipe(self, recipe, path: str) -> None:
        if recipe.structures.layers:
            raise RespError(f"structures.layers: scorer {self.name!r} cannot prune whole layers "
                            f"(it scores heads and MLP channels); set structures.layers: false")

    def _collect(self, ctx: RunContext, calibration: CalibrationSet, **kw) -> dict:
        p = self.params
        return collect_input_stats(ctx.model, ctx.adapter, calibration, tokens=p.tokens, batch_size=p.batch_size,
                                   progress=ctx.progress, description=f"Scoring ({self.name})", **kw)

    def _finish(self, ctx: RunContext, attn: torch.Tensor, mlp: torch.Tensor, stats: dict | None = None) -> Scores:
        raw = unit_scores(ctx.adapter.geometry, attn, mlp)
        values = normalize_scores(raw, self.params.normalize, ctx.adapter, ctx.structures.costs)
        check_scores(values, ctx.step, ctx.structures, ctx.mask, scorer=self.name)
        return Scores(values, stats or {})


class WandaSP(_ActivationScorer):
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

    class Params(_ActivationScorer.Params):
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


class FLAP(_ActivationScorer):
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

    class Params(_ActivationScorer.Params):
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


class SparseGPTSP(_ActivationScorer):
    """Structured SparseGPT / OBS: units ranked by layer-output error, the kept columns re-fitted.

    Removes the heads and channels whose removal costs the least layer-output error after an
    optimal re-fit of the remaining input columns, and does that re-fit.

    Formula (RESP Eq. 1, ‖W X − (M ⊙ Ŵ) X‖²; OBS, Hassibi & Stork 1993; group form from Optimal
    Brain Compression, Frantar et al., NeurIPS 2022; dampening from SparseGPT, Frantar & Alistarh,
    ICML 2023, arXiv 2301.00774).  Per o_proj / down_proj, over the columns A still alive::

        H   = X_Aᵀ X_A / n + λ I,   λ = percdamp · mean(diag(X_Aᵀ X_A / n)),   G = H⁻¹
        error of unit S (its columns) = tr( W_S (G_SS)⁻¹ W_Sᵀ )       (one column: ‖W_:,j‖² / G_jj)
        removal at this step (all units S leaving together, K = A \\ S):
            W_K ← W_K − W_S (G_SS)⁻¹ G_SK,   W_S ← 0                         (exact OBS group update)

    Scores are the block (trace) form per unit: a head's hd columns are one block; a KV group's
    block is all its live query heads' columns; an MLP channel is one column.  The error is the
    mean squared output change per token; units are scored independently (interactions between
    units removed at the same step are only accounted for by the joint update).

    Where this differs from SparseGPT's code (IST-DASLab/sparsegpt): SparseGPT is unstructured
    (or N:M): it walks columns left to right in blocks with the Cholesky factor of H⁻¹, scoring
    w²/[chol(H⁻¹)]_jj² and updating only later columns; the structured form here uses the full
    inverse and the exact group update.  SparseGPT's H carries a factor 2 (2XᵀX/n), which changes
    neither ranking nor update.  SparseGPT prunes layer by layer on inputs produced by the already
    pruned earlier layers; here all layers' statistics come from one pass over the current masked
    model, and pruning proceeds over the schedule's steps (more steps = closer to sequential).
    The RESP authors' repository has no SparseGPT pruner; their ranking setting would be the
    per-layer ``allocator: uniform`` (OBS-family methods are layer-wise).  GQA: with ``q_head``,
    query heads are removed one by one (K/V stay with their last query head); with ``kv_group`` the
    group's o_proj columns are one block and its K/V rows go with it (not scored: they do not
    feed o_proj's input linearly).

    Memory: one d×d Gram matrix per layer and projection (float32) during collection
    (``layers_per_pass`` limits how many layers are collected at once), and the inverses G of the
    prunable layers kept (float32, on the CPU) between scoring and :meth:`before_removal`.
    """

    name = "sparsegpt"

    class Params(_ActivationScorer.Params):
        percdamp: float = Field(0.01, ge=0.0)
        layers_per_pass: int | None = Field(None, ge=1)  # None: all prunable layers in one pass
        update: bool = True  # do the OBS re-fit of the remaining columns at removal

    def __init__(self, params=None):
        super().__init__(params)
        self._inverse: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}

    def score(self, ctx: RunContext, calibration: CalibrationSet) -> Scores:
        a, p = ctx.adapter, self.params
        g = a.geometry
        kinds = set(ctx.structures.kinds)
        want_attn = bool(kinds & {"q_head", "kv_group"})
        want_mlp = "mlp_channel" in kinds
        e = (ctx.mask or MaskSet.full(g)).effective()
        layers = [i for i in range(g.num_layers) if bool(ctx.structures.prunable_layers[i]) and bool(e.layer[i, 0])]
        sites = tuple(s for s, w in (("o", want_attn), ("down", want_mlp)) if w)
        q_s = torch.zeros(g.num_layers, g.num_heads, dtype=torch.float64)
        kv_s = torch.zeros(g.num_layers, g.num_kv_heads, dtype=torch.float64)
        mlp_s = torch.zeros(g.num_layers, g.intermediate_size, dtype=torch.float64)
        self._inverse = {}
        step = p.layers_per_pass or max(1, len(layers))
        for start in range(0, len(layers), step):
            chunk = layers[start : start + step]
            stats = self._collect(ctx, calibration, sites=sites, layers=chunk, gram=True)
            for i in chunk:
                if "o" in sites:
                    self._score_attention(ctx, i, stats.pop((i, "o")), e, q_s, kv_s)
                if "down" in sites:
                    self._score_mlp(ctx, i, stats.pop((i, "down")), e, mlp_s)
            del stats
        values = {"q_head": q_s.float(), "kv_group": kv_s.float(), "mlp_channel": mlp_s.float()}
        values = normalize_scores(values, p.normalize, a, ctx.structures.costs)
        check_scores(values, ctx.step, ctx.structures, ctx.mask, scorer=self.name)
        return Scores(values)

    def _inverse_on(self, stats: InputStats, cols: torch.Tensor) -> torch.Tensor:
        if stats.count == 0:
            raise RespError("calibration: no tokens reached the model (empty calibration set?)")
        h = stats.gram[cols.to(stats.gram.device)][:, cols.to(stats.gram.device)].double() / stats.count
        return damped_inverse(h, self.params.percdamp)

    def _score_attention(self, ctx, i, stats, e, q_s, kv_s):
        a = ctx.adapter
        g = a.geometry
        hd = g.head_dim
        alive = e.q_head[i].nonzero().flatten()
        if alive.numel() == 0:
            return
        cols = head_columns(alive, hd)
        ginv = self._inverse_on(stats, cols)
        w = a.attention_input(i).weight.detach()[:, cols.to(a.attention_input(i).weight.device)].double()
        w = w.to(ginv.device)
        nh = alive.numel()
        blocks = ginv.reshape(nh, hd, nh, hd)[torch.arange(nh), :, torch.arange(nh), :]  # [nh, hd, hd]
        wb = w.reshape(w.shape[0], nh, hd).permute(1, 2, 0)  # [nh, hd, out]
        sol = torch.linalg.solve(blocks, wb)  # (G_hh)⁻¹ W_hᵀ
        q_s[i, alive] = (wb * sol).sum((1, 2)).cpu()
        if "kv_group" in ctx.structures.kinds:
            group = g.kv_group_of_head()[alive]
            for k in group.unique().tolist():
                pos = (group == k).nonzero().flatten()
                sub = head_columns(pos, hd).to(ginv.device)  # positions inside the alive block
                kv_s[i, k] = obs_group_error(w, ginv, sub)
        self._inverse[(i, "o")] = (cols, ginv.float().cpu())

    def _score_mlp(self, ctx, i, stats, e, mlp_s):
        a = ctx.adapter
        alive = e.mlp_channel[i].nonzero().flatten()
        if alive.numel() == 0:
            return
        ginv = self._inverse_on(stats, alive)
        lin = a.mlp_input(i)
        w = lin.weight.detach()[:, alive.to(lin.weight.device)].double().to(ginv.device)
        mlp_s[i, alive] = (w.square().sum(0) / torch.diagonal(ginv)).cpu()
        self._inverse[(i, "down")] = (alive.clone(), ginv.float().cpu())

    @torch.no_grad()
    def before_removal(self, ctx: RunContext, old: MaskSet, new: MaskSet) -> None:
        if not self.params.update:
            self._inverse = {}
            return
        a = ctx.adapter
        hd = a.geometry.head_dim
        ne = new.effective()
        for (i, site), (cols, ginv) in self._inverse.items():
            if not bool(ne.layer[i, 0]):
                continue
            if site == "o":
                lin = a.attention_input(i)
                keep_cols = head_columns(ne.q_head[i].nonzero().flatten(), hd)
            else:
                lin = a.mlp_input(i)
                keep_cols = ne.mlp_channel[i].nonzero().flatten()
            kept = torch.isin(cols, keep_cols)
            if bool(kept.all()):
                continue
            removed_pos = (~kept).nonzero().flatten()
            w = lin.weight
            idx = cols.to(w.device)
            new_sub = obs_remove(w[:, idx], ginv.to(w.device), removed_pos.to(w.device))
            w[:, idx] = new_sub.to(w.dtype)
        self._inverse = {}


@hookimpl
def register_scorers(register):
    register("wanda_sp", WandaSP)
    register("flap", FLAP)
    register("sparsegpt", SparseGPTSP)
