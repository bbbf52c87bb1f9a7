"""FLAP's adaptive structure search as an allocator: standardize, then one global threshold."""

from __future__ import annotations

from typing import Literal

import torch

from resp_core import hookimpl
from resp_core.interfaces import Allocator, Params, Scores
from resp_core.model.masks import MaskSet
from resp_core.model.structures import Structures

from resp_plugins.allocators.global_rank import GlobalRank
from resp_plugins.structure_checks import HeadsAndChannelsOnly


def standardize(values: torch.Tensor, valid: torch.Tensor, mode: str) -> torch.Tensor:
    """(s − mean) / std over the ``valid`` entries of each row (``per_layer``) or of the whole
    tensor (``across_layers``); std is the unbiased one (``torch.std``).  Entries outside ``valid``
    are 0; a group with fewer than 2 valid entries or no spread standardizes to 0."""
    x = values.double()
    out = torch.zeros_like(x)
    groups = [(r, valid[r]) for r in range(x.shape[0])] if mode == "per_layer" else [(slice(None), valid)]
    if mode not in ("per_layer", "across_layers"):
        raise ValueError(f"unknown standardization {mode!r}")
    for rows, ok in groups:
        sel = x[rows][ok]
        if sel.numel() < 2:
            continue
        std = sel.std()
        if not bool(std > 0):
            continue
        z = torch.zeros_like(x[rows])
        z[ok] = (sel - sel.mean()) / std
        out[rows] = z
    return out


def standardized_scores(scores: Scores, structures: Structures, mask: MaskSet, mode: str) -> dict[str, torch.Tensor]:
    """FLAP's standardization of every pruned kind, over the live candidate units.

    When the scorer passed FLAP's per-channel attention metric (``layer_stats['flap_attn_channel']``,
    [L, num_heads*head_dim]) the *channels* are standardized and a head's score is the mean of its
    channels' standardized scores, exactly as FLAP's code; a KV group's score is then the mean of
    its live query heads'.  Otherwise the unit scores themselves are standardized."""
    g = structures.geometry
    e = mask.effective()
    out = {}
    channel = scores.layer_stats.get("flap_attn_channel")
    for kind in structures.kinds:
        alive = e[kind] & structures.candidate(kind)
        if kind in ("q_head", "kv_group") and channel is not None:
            live_q = e.q_head & structures.prunable_layers[:, None]
            z = standardize(channel, live_q.repeat_interleave(g.head_dim, dim=1), mode)
            zq = z.reshape(z.shape[0], g.num_heads, g.head_dim).mean(-1)
            if kind == "q_head":
                out[kind] = zq.float()
            else:
                group = g.kv_group_of_head()
                summed = torch.zeros(zq.shape[0], g.num_kv_heads, dtype=zq.dtype).index_add_(1, group, zq * live_q)
                count = torch.zeros(zq.shape[0], g.num_kv_heads, dtype=zq.dtype).index_add_(1, group, live_q.double())
                out[kind] = (summed / count.clamp_min(1)).float()
        else:
            out[kind] = standardize(scores.values[kind], alive, mode).float()
    return out


class FlapAdaptive(HeadsAndChannelsOnly, Allocator):
    """FLAP's adaptive structure search: standardized scores, one global threshold on parameters.

    FLAP (An et al., AAAI 2024, arXiv 2312.11983, Sec. 3 "adaptive structure search"): the metric
    of each block type is standardized, (s − mean)/std, so that attention and MLP scores of all
    layers share one scale; then one threshold over all of them removes the lowest until the
    compression ratio is met, counting a head as the parameters it holds (FLAP's 512/3 channels
    for a LLaMA head).  The budget logic is RESP's ``global`` allocator (parameter budget of the
    unprotected blocks, ``min_keep``), applied to the standardized scores.

    Authors' code (CASIA-IVA-Lab/FLAP ``prune_flap``, structure AL-AM; copied in RESP's
    ``flap_sp.py``): standardization is per layer (mean/std over each layer's channels, ``axis=1``),
    over *channels* for attention, then a head's score is the mean of its channels' standardized
    scores — our default ``standardize: per_layer`` does exactly that when the ``flap`` scorer
    provides its per-channel metric; ``across_layers`` standardizes over all live units of all
    prunable layers at once (the wording of the FLAP paper).  Their threshold is the score where
    the cumulative cost is nearest the budget (argmin |cumsum − budget|); ours is the global
    allocator's greedy fill.  They prune every layer in one shot; here only unprotected layers,
    over the schedule's steps, with standardization over the units still alive.  With any other
    scorer the unit scores are standardized directly.
    """

    family = "allocator"  # wording of the whole-layer refusal (HeadsAndChannelsOnly)
    name = "flap_adaptive"

    class Params(Params):
        standardize: Literal["per_layer", "across_layers"] = "per_layer"

    def __init__(self, params=None):
        self.params = params or self.Params()

    def allocate(self, scores: Scores, structures: Structures, mask: MaskSet, target: float) -> MaskSet:
        z = standardized_scores(scores, structures, mask, self.params.standardize)
        return GlobalRank().allocate(Scores(z, scores.layer_stats), structures, mask, target)


@hookimpl
def register_allocators(register):
    register("flap_adaptive", FlapAdaptive)
