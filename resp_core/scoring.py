"""Shared scoring machinery: per-weight saliency maps aggregated onto structures.

Scorers compute a saliency per weight entry of the prunable projections (a tensor shaped like
each weight), and :func:`aggregate` sums those onto units through the adapter's geometry:

* query head h:   rows ``h*hd:(h+1)*hd`` of q_proj (+ bias) and the same columns of o_proj;
* KV group g:     its query heads, plus rows of k_proj and v_proj of KV head g;
* MLP channel c:  row c of gate_proj and up_proj, column c of down_proj;
* layer:          everything in the block.

Nothing here knows module names: it goes through :class:`~resp_core.model.adapter.DecoderAdapter`.
"""

from __future__ import annotations

from typing import Callable

import torch

from .interfaces import CalibrationSet
from .model.adapter import DecoderAdapter

# part name -> per-weight saliency, for one layer: keys q, k, v, o, gate, up, down
LayerSaliency = dict[str, torch.Tensor]


def aggregate(adapter: DecoderAdapter, saliency: Callable[[int], LayerSaliency]) -> dict[str, torch.Tensor]:
    """Sum per-weight saliency onto every unit kind. Returns kind -> [L, n] float tensors."""
    g = adapter.geometry
    L, hd, nq, nkv = g.num_layers, g.head_dim, g.num_heads, g.num_kv_heads
    q_s = torch.zeros(L, nq)
    kv_extra = torch.zeros(L, nkv)
    mlp_s = torch.zeros(L, g.intermediate_size)
    for i in range(L):
        s = {k: v.detach().float().cpu() for k, v in saliency(i).items()}
        q_s[i] = s["q"].reshape(nq, -1).sum(1) + s["o"].reshape(s["o"].shape[0], nq, hd).sum((0, 2))
        kv_extra[i] = s["k"].reshape(nkv, -1).sum(1) + s["v"].reshape(nkv, -1).sum(1)
        mlp_s[i] = s["gate"].sum(1) + s["up"].sum(1) + s["down"].sum(0)
    group = g.kv_group_of_head()
    kv_s = kv_extra.clone()
    kv_s.index_add_(1, group, q_s)
    layer_s = q_s.sum(1, keepdim=True) + kv_extra.sum(1, keepdim=True) + mlp_s.sum(1, keepdim=True)
    return {"q_head": q_s, "kv_group": kv_s, "mlp_channel": mlp_s, "layer": layer_s}


def weight_map(adapter: DecoderAdapter, layer: int, fn: Callable[[torch.nn.Linear], torch.Tensor]) -> LayerSaliency:
    a, m = adapter.attention_parts(layer), adapter.mlp_parts(layer)
    parts = {"q": a.q, "k": a.k, "v": a.v, "o": a.o, "gate": m.gate, "up": m.up, "down": m.down}
    return {name: fn(lin) for name, lin in parts.items()}


def accumulate_gradients(model, adapter: DecoderAdapter, calibration: CalibrationSet, loss: str,
                         batch_size: int, progress=None, description: str = "Scoring") -> float:
    """Backpropagate the mean token loss of the whole calibration set into the prunable weights.

    Only the projection weights require gradients (embeddings, norms and head are frozen for the
    pass), and each batch's summed token loss is divided by the token count of the whole set, so
    the accumulated ``.grad`` is exactly the gradient of the set-level mean loss (Eq. 4 for
    ``loss='decode'``).  Returns that mean loss."""
    params = [lin.weight for lin in adapter.prunable_linears().values()]
    saved = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
        p.grad = None
    was_training = model.training
    model.eval()  # no dropout; gradients still flow
    device = params[0].device
    total_tokens = max(1, calibration.target_token_count(loss))
    total = 0.0
    n_batches = (len(calibration) + batch_size - 1) // batch_size
    from .interfaces import Progress

    progress = progress or Progress()
    try:
        with progress.task(description, total=n_batches) as advance:
            for batch in calibration.batches(batch_size, loss):
                logits = model(input_ids=batch.input_ids.to(device),
                               attention_mask=batch.attention_mask.to(device)).logits
                labels = batch.labels.to(device)
                nll = torch.nn.functional.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
                    ignore_index=-100, reduction="sum")
                (nll / total_tokens).backward()
                total += float(nll.detach())
                advance(1)
    finally:
        for p in model.parameters():
            p.requires_grad_(saved[id(p)])
        model.train(was_training)
    return total / total_tokens


def release_gradients(adapter: DecoderAdapter) -> None:
    for lin in adapter.prunable_linears().values():
        lin.weight.grad = None


# Per-block-type normalization (Eq. 5 "normalized per block type").
def normalize_scores(values: dict[str, torch.Tensor], method: str, adapter: DecoderAdapter,
                     costs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``block_constant``: divide each block type by one constant, as the authors' code does
    (attention: 4·head_dim·hidden, MLP: 3·intermediate); ``per_parameter``: divide each unit by
    its parameter count; ``mean``: divide each kind by its mean over units; ``none``."""
    g = adapter.geometry
    out = {}
    for kind, v in values.items():
        if method == "none":
            out[kind] = v
        elif method == "block_constant":
            const = {"q_head": 4 * g.head_dim * g.hidden_size, "kv_group": 4 * g.head_dim * g.hidden_size,
                     "mlp_channel": 3 * g.intermediate_size, "layer": 1.0}[kind]
            out[kind] = v / const
        elif method == "per_parameter":
            out[kind] = v / costs[kind].clamp_min(1)
        elif method == "mean":
            m = v[v > 0].mean() if bool((v > 0).any()) else torch.tensor(1.0)
            out[kind] = v / m
        else:
            raise ValueError(f"unknown normalization {method!r}")
    return out
