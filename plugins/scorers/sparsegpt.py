"""Structured SparseGPT / OBS baseline of the paper's study: units ranked by the layer-output error
of removing them, the kept input columns of o_proj / down_proj re-fitted (OBS group update).

Statistics (Gram matrices of the o_proj / down_proj inputs) come from
:func:`resp_core.activations.collect_input_stats` on the current masked model, every step; the
shared scorer base and the head-to-column map live in :mod:`resp_plugins.scorers.activation_based`.
"""

from __future__ import annotations

import torch
from pydantic import Field

from resp_core import hookimpl
from resp_core.activations import InputStats
from resp_core.errors import RespError
from resp_core.interfaces import CalibrationSet, RunContext, Scores
from resp_core.model.masks import MaskSet
from resp_core.scoring import check_scores, normalize_scores

from resp_plugins.scorers.activation_based import ActivationScorer, head_columns

# --------------------------------------------------------------------------------------------------
# OBS algebra (pure; tested on hand-checkable tensors)
# --------------------------------------------------------------------------------------------------


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
# Scorer
# --------------------------------------------------------------------------------------------------


class SparseGPTSP(ActivationScorer):
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

    class Params(ActivationScorer.Params):
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
    register("sparsegpt", SparseGPTSP)
