"""Shared scoring machinery: the gradient pass, per-weight saliency reduced onto structures,
normalization, and the numerical checks every scorer runs on its result.

Scorers compute a saliency per weight entry of the prunable projections (a tensor shaped like
each weight), and :func:`unit_saliency` / :func:`aggregate` sum those onto units through the
adapter's geometry:

* query head h:   rows ``h*hd:(h+1)*hd`` of q_proj and the same columns of o_proj;
* KV group g:     its query heads, plus rows of k_proj and v_proj of KV head g;
* MLP channel c:  row c of gate_proj and up_proj, column c of down_proj;
* layer:          everything in the block.

Biases are not scored (neither are they in the authors' ``grad_sp_global.py``).  The sums run on
the weights' device in float32, whatever the weights' dtype; only the per-unit vectors ([L, n])
come back to the host.

The gradient pass (:func:`gradient_pass`) computes the loss only where it applies: the decoder
body runs on the whole batch, but the output head is applied only to the hidden states of
positions whose next-token label is not -100, so prompt positions under the decode loss never
produce vocabulary-sized logits, and no logits stay referenced during ``backward()``.

Nothing here knows module names: it goes through :class:`~resp_core.model.adapter.DecoderAdapter`.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import torch

from .errors import NumericalError, RunFailed
from .interfaces import CalibrationSet
from .model.adapter import DecoderAdapter

# part name -> per-weight saliency, for one layer: keys q, k, v, o, gate, up, down
LayerSaliency = dict[str, torch.Tensor]

PARTS = ("q", "k", "v", "o", "gate", "up", "down")
REDUCTIONS = ("sample_mean", "token_mean", "batch_token_mean")
# (padded length above which, the authors' batch size): :func:`authors_batch_size`
_AUTHORS_BATCHES = ((512, 1), (256, 4), (128, 8), (64, 16), (31, 32))
_LOW_PRECISION = (torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------------
# Reduction of per-weight saliency onto units
# --------------------------------------------------------------------------------------------------

def _layer_units(g, s: LayerSaliency) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(query heads [nq], K/V rows of each KV head [nkv], MLP channels [inter]) for one layer,
    summed in float32 on the saliency's device."""
    nq, nkv, hd = g.num_heads, g.num_kv_heads, g.head_dim
    f = {k: v.float() for k, v in s.items()}  # no copy when already float32
    q = f["q"].reshape(nq, -1).sum(1) + f["o"].reshape(f["o"].shape[0], nq, hd).sum((0, 2))
    kv_extra = f["k"].reshape(nkv, -1).sum(1) + f["v"].reshape(nkv, -1).sum(1)
    mlp = f["gate"].sum(1) + f["up"].sum(1) + f["down"].sum(0)
    return q, kv_extra, mlp


def _assemble(adapter: DecoderAdapter, q_s: torch.Tensor, kv_extra: torch.Tensor,
              mlp_s: torch.Tensor) -> dict[str, torch.Tensor]:
    g = adapter.geometry
    q_s, kv_extra, mlp_s = q_s.detach().cpu(), kv_extra.detach().cpu(), mlp_s.detach().cpu()
    kv_s = kv_extra.clone()
    kv_s.index_add_(1, g.kv_group_of_head(), q_s)
    layer_s = q_s.sum(1, keepdim=True) + kv_extra.sum(1, keepdim=True) + mlp_s.sum(1, keepdim=True)
    return {"q_head": q_s, "kv_group": kv_s, "mlp_channel": mlp_s, "layer": layer_s}


def aggregate(adapter: DecoderAdapter, saliency: Callable[[int], LayerSaliency]) -> dict[str, torch.Tensor]:
    """Sum per-weight saliency onto every unit kind. Returns kind -> [L, n] float32 CPU tensors.

    ``saliency(layer)`` returns the per-weight maps of one layer (keys :data:`PARTS`); they are
    reduced on their own device, in float32."""
    g = adapter.geometry
    rows: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    for i in range(g.num_layers):
        with torch.no_grad():
            rows.append(_layer_units(g, saliency(i)))
    dev = rows[0][0].device
    return _assemble(adapter, *(torch.stack([r[j].to(dev) for r in rows]) for j in range(3)))


def weight_map(adapter: DecoderAdapter, layer: int, fn: Callable[[torch.nn.Linear], torch.Tensor]) -> LayerSaliency:
    a, m = adapter.attention_parts(layer), adapter.mlp_parts(layer)
    parts = {"q": a.q, "k": a.k, "v": a.v, "o": a.o, "gate": m.gate, "up": m.up, "down": m.down}
    return {name: fn(lin) for name, lin in parts.items()}


def _layer_linears(adapter: DecoderAdapter, layer: int) -> dict[str, torch.nn.Linear]:
    a, m = adapter.attention_parts(layer), adapter.mlp_parts(layer)
    return {"q": a.q, "k": a.k, "v": a.v, "o": a.o, "gate": m.gate, "up": m.up, "down": m.down}


# --------------------------------------------------------------------------------------------------
# The gradient pass
# --------------------------------------------------------------------------------------------------

@dataclass
class GradientPass:
    """Result of :func:`gradient_pass`: the calibration loss and the accumulated gradients.

    Gradients of float32 weights are in ``weight.grad``; those of bf16/fp16 weights were summed
    over the batches in float32 buffers (``fp32_grads``), never in a low-precision running sum.
    :meth:`grad` returns the float32 gradient of either kind."""

    loss: float  # the mean loss under the pass's reduction
    samples: int  # samples with at least one target token
    tokens: int  # target tokens (after the causal shift)
    reduction: str
    fp32_grads: dict[int, torch.Tensor] = field(default_factory=dict)

    def grad(self, weight: torch.Tensor) -> torch.Tensor | None:
        return self.fp32_grads.get(id(weight), weight.grad)

    def release(self) -> None:
        self.fp32_grads.clear()


@contextmanager
def _checkpointed(layers, enabled: bool):
    """Recompute each decoder layer's activations in backward (``torch.utils.checkpoint``,
    non-reentrant).  Wrapped per instance so that it works in eval mode (transformers' own
    switch applies only in training mode, which would turn dropout on)."""
    if not enabled:
        yield
        return
    from torch.utils.checkpoint import checkpoint

    saved = []
    for layer in layers:
        own = layer.__dict__.get("forward")  # e.g. accelerate's hooks install an instance forward
        inner = layer.forward

        def wrapped(*args, _inner=inner, **kwargs):
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        layer.forward = wrapped
        saved.append((layer, own))
    try:
        yield
    finally:
        for layer, own in saved:
            if own is None:
                del layer.forward
            else:
                layer.forward = own


def _first_nonfinite_site(adapter: DecoderAdapter, body, ids, att) -> str:
    """Rerun one batch without gradients and name the first attention / MLP output that is not
    finite (for the one-line error of a non-finite loss)."""
    found: list[str] = []
    hooks = []

    def watch(label):
        def hook(_module, _inputs, output):
            out = output[0] if isinstance(output, tuple) else output
            if not found and torch.is_tensor(out) and not bool(torch.isfinite(out).all()):
                found.append(label)
        return hook

    for i in range(adapter.geometry.num_layers):
        hooks.append(adapter.attention(i).register_forward_hook(watch(f"layer {i}, unit kind q_head/kv_group "
                                                                      f"(attention output)")))
        hooks.append(adapter.mlp(i).register_forward_hook(watch(f"layer {i}, unit kind mlp_channel (MLP output)")))
    try:
        with torch.no_grad():
            body(input_ids=ids, attention_mask=att, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return found[0] if found else "layer: none, unit kind: none (decoder outputs finite; the output head overflows)"


def authors_batch_size(length: int) -> int:
    """The authors' scoring batch size for a set padded to ``length`` tokens: >512: 1, 257-512: 4,
    129-256: 8, 65-128: 16, 32-64: 32, <32: 64 (uncc-efficient-ai/RESP ``non_uniform_pruner.py``
    ``fill_information``)."""
    return next((size for longer_than, size in _AUTHORS_BATCHES if length > longer_than), 64)


def batch_token_weights(calibration: CalibrationSet, loss: str) -> list[float]:
    """Per-sample token weights of ``batch_token_mean``: the samples cut in order into batches of
    :func:`authors_batch_size` (the set's longest sample); a token of batch b (B_b samples, T_b
    target tokens) weighs B_b / (T_b · N), N the set's samples (theirs: ``loss * batch_size``,
    then ``grad / n_samples``).  A batch without target tokens weighs nothing."""
    rows = [len(s.prompt_ids) + len(s.target_ids) for s in calibration.samples]
    size = authors_batch_size(min(max(rows, default=0), calibration.max_length or 1 << 62))
    counts = [int(c) for b in calibration.batches(1, loss) for c in (b.labels[:, 1:] != -100).sum(1)]
    out: list[float] = []
    for start in range(0, len(counts), size):
        chunk = counts[start:start + size]
        out += [len(chunk) / (sum(chunk) * len(counts)) if sum(chunk) else 0.0] * len(chunk)
    return out


def gradient_pass(model, adapter: DecoderAdapter, calibration: CalibrationSet, loss: str = "decode",
                  reduction: str = "token_mean", batch_size: int = 16, gradient_checkpointing: bool = False,
                  progress=None, description: str = "Scoring", step: int = 0) -> GradientPass:
    """Backpropagate the calibration loss into the prunable projection weights.

    Loss per sample s with target positions T_s (labels != -100 after the causal shift) and token
    NLL ℓ_{s,t}; S = the samples with |T_s| > 0:

    * ``sample_mean``: L = (1/|S|) Σ_s (1/|T_s|) Σ_{t∈T_s} ℓ_{s,t} — the mean over samples of each
      sample's mean token loss.  The authors' objective: uncc-efficient-ai/RESP
      ``resp/pruners/non_uniform_pruner.py`` ``fill_information`` backpropagates
      ``model(batch, labels=…).loss * batch_size`` (one trace per batch for traces over 512
      tokens) and ``grad_sp_global.py`` / ``data_refresh_GISP.py`` ``obtain_info_iterative``
      divide the gradient by the sample count (``weight.grad / n_samples``); the same in
      uncc-efficient-ai/GISP ``pruners/grad_sp_global.py``.  Here it is exact whatever the
      batch size (each sample's tokens are weighted 1/(|T_s|·|S|)).
    * ``token_mean``: L = Σ_s Σ_t ℓ_{s,t} / Σ_s |T_s| — one token-weighted mean over the set
      (ours, and LLM-Pruner's ``labels=input_ids`` loss).  Long traces weigh more; it is *not*
      a constant multiple of ``sample_mean`` when lengths differ, so rankings can differ.
    * ``batch_token_mean``: the authors' batches exactly (:func:`batch_token_weights`; one sample
      per batch past 512 tokens, i.e. ``sample_mean`` there); ``batch_size`` only sets memory.

    Only the projection weights require gradients (embeddings, norms and head are frozen for the
    pass).  The output head runs only on labelled positions (see the module docstring).  bf16 /
    fp16 weights accumulate their gradients in float32 buffers.  A non-finite batch loss raises
    :class:`NumericalError` naming ``step`` and the first layer whose output is not finite; a set
    without any target token raises :class:`RunFailed`."""
    from .interfaces import Progress

    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, not {reduction!r}")
    params = [lin.weight for lin in adapter.prunable_linears().values()]
    batches = list(calibration.batches(batch_size, loss))
    counts = [(b.labels[:, 1:] != -100).sum(1) for b in batches]
    weights = (torch.tensor(batch_token_weights(calibration, loss), dtype=torch.float64).split(batch_size)
               if reduction == "batch_token_mean" else None)
    total_tokens = int(sum(int(c.sum()) for c in counts))
    n_samples = int(sum(int((c > 0).sum()) for c in counts))
    if total_tokens == 0:
        raise RunFailed(f"step {step}: calibration has no target tokens for the {loss!r} loss "
                        f"({len(calibration)} samples); nothing to score")

    saved = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    fp32: dict[int, torch.Tensor] = {}
    hooks = []

    def to_fp32(p):
        buf = fp32.get(id(p))
        if buf is None:
            fp32[id(p)] = p.grad.float()
        else:
            buf.add_(p.grad)
        p.grad = None

    for p in params:
        p.requires_grad_(True)
        p.grad = None
        if p.dtype in _LOW_PRECISION:
            hooks.append(p.register_post_accumulate_grad_hook(to_fp32))
    was_training = model.training
    model.eval()  # no dropout; gradients still flow
    device = params[0].device
    body = adapter.decoder_body()
    total = 0.0
    progress = progress or Progress()
    try:
        with progress.task(description, total=len(batches)) as advance, \
                _checkpointed(adapter.layers, gradient_checkpointing):
            for k, (batch, n_tok) in enumerate(zip(batches, counts), start=1):
                target = batch.labels[:, 1:]
                where = target != -100  # [B, T-1]: positions whose next token carries a loss
                if not bool(where.any()):
                    advance(1)
                    continue
                ids, att = batch.input_ids.to(device), batch.attention_mask.to(device)
                hidden = body(input_ids=ids, attention_mask=att, use_cache=False).last_hidden_state
                out_dev = hidden.device  # the last layers' device when a model spans several
                picked = hidden[:, :-1][where.to(out_dev)]  # [N, hidden]: only the labelled positions
                del hidden
                logits = adapter.output_logits(picked)  # [N, V]
                if logits.dtype in _LOW_PRECISION:
                    logits = logits.float()  # the loss in float32, as transformers' own loss does
                nll = torch.nn.functional.cross_entropy(logits, target[where].to(logits.device), reduction="none")
                del logits, picked  # nothing vocabulary-sized stays referenced but what autograd saved
                if reduction == "token_mean":
                    objective = nll.sum() / total_tokens
                else:  # each sample's tokens weigh 1 / (its target count · samples with targets)
                    row_w = 1.0 / (n_tok.clamp_min(1).to(torch.float64) * n_samples) if weights is None \
                        else weights[k - 1]  # the authors' batches: B_b / (T_b · N)
                    tok_w = row_w[:, None].expand_as(where)[where].to(device=nll.device, dtype=nll.dtype)
                    objective = (nll * tok_w).sum()
                value = float(objective.detach())
                if not math.isfinite(value):
                    site = _first_nonfinite_site(adapter, body, ids, att)
                    raise NumericalError(f"step {step}: calibration loss is {value} (batch {k} of {len(batches)}, "
                                         f"{loss} loss); first non-finite output: {site}")
                objective.backward()
                del objective, nll
                total += value
                advance(1)
    finally:
        for h in hooks:
            h.remove()
        for p in model.parameters():
            p.requires_grad_(saved[id(p)])
        model.train(was_training)
    return GradientPass(loss=total, samples=n_samples, tokens=total_tokens, reduction=reduction, fp32_grads=fp32)


def accumulate_gradients(model, adapter: DecoderAdapter, calibration: CalibrationSet, loss: str,
                         batch_size: int, progress=None, description: str = "Scoring",
                         reduction: str = "token_mean", gradient_checkpointing: bool = False,
                         step: int = 0) -> float:
    """:func:`gradient_pass` leaving every gradient in ``weight.grad`` (in the weight's dtype);
    returns the mean loss.  Kept for scorers that read ``.grad`` (``llm_pruner``, plugins)."""
    gp = gradient_pass(model, adapter, calibration, loss=loss, reduction=reduction, batch_size=batch_size,
                       gradient_checkpointing=gradient_checkpointing, progress=progress,
                       description=description, step=step)
    for p in (lin.weight for lin in adapter.prunable_linears().values()):
        buf = gp.fp32_grads.get(id(p))
        if buf is not None:
            p.grad = buf.to(p.dtype)
    gp.release()
    return gp.loss


def release_gradients(adapter: DecoderAdapter) -> None:
    for lin in adapter.prunable_linears().values():
        lin.weight.grad = None


def taylor_unit_scores(adapter: DecoderAdapter, gp: GradientPass, signed: bool = False,
                       step: int = 0) -> dict[str, torch.Tensor]:
    """Σ_{w∈S} |w·g| per unit (``signed``: Σ_{w∈S} w·g, for ``granularity: group``), reduced on
    the weights' device in float32 and returned as [L, n] CPU tensors.  Non-finite gradients or
    scores raise :class:`NumericalError` naming ``step``, the layer and the projection."""
    g = adapter.geometry
    q_rows, kv_rows, mlp_rows = [], [], []
    with torch.no_grad():
        for i in range(g.num_layers):
            sal = {}
            for name, lin in _layer_linears(adapter, i).items():
                s = torch.mul(lin.weight, gp.grad(lin.weight))  # float32 by type promotion
                sal[name] = s if signed else s.abs_()
            q, kv_extra, mlp = _layer_units(g, sal)
            del sal
            q_rows.append(q)
            kv_rows.append(kv_extra)
            mlp_rows.append(mlp)
        q_s, kv_s, mlp_s = torch.stack(q_rows), torch.stack(kv_rows), torch.stack(mlp_rows)
        if not bool(torch.isfinite(q_s).all() & torch.isfinite(kv_s).all() & torch.isfinite(mlp_s).all()):
            _raise_nonfinite_taylor(adapter, gp, step, q_s, kv_s, mlp_s)
    return _assemble(adapter, q_s, kv_s, mlp_s)


def _raise_nonfinite_taylor(adapter, gp, step, q_s, kv_s, mlp_s):
    for i in range(adapter.geometry.num_layers):
        for kind, v in (("q_head", q_s[i]), ("kv_group", kv_s[i]), ("mlp_channel", mlp_s[i])):
            if bool(torch.isfinite(v).all()):
                continue
            for name, lin in _layer_linears(adapter, i).items():
                grad = gp.grad(lin.weight)
                if not bool(torch.isfinite(grad).all()):
                    raise NumericalError(f"step {step}: non-finite gradient in layer {i}, unit kind {kind} "
                                         f"({name} projection)")
            raise NumericalError(f"step {step}: non-finite scores in layer {i}, unit kind {kind}")
    raise NumericalError(f"step {step}: non-finite scores")


# --------------------------------------------------------------------------------------------------
# Checks shared by every scorer
# --------------------------------------------------------------------------------------------------

def check_scores(values: dict[str, torch.Tensor], step: int, structures=None, mask=None,
                 scorer: str = "") -> None:
    """Raise :class:`NumericalError` when scores are non-finite, or degenerate: every unit of a
    kind the run prunes (unprotected and still kept) has exactly the same score, e.g. all zero
    after a loss that overflowed — a ranking of equal scores would remove units in index order.

    ``structures`` (a :class:`~resp_core.model.structures.Structures`) limits the degenerate
    check to the kinds and layers the run prunes; ``mask`` to the units still kept.  One line,
    naming the step, the layer and the unit kind."""
    who = f" from scorer {scorer!r}" if scorer else ""
    for kind, v in values.items():
        finite = torch.isfinite(v)
        if not bool(finite.all()):
            bad = (~finite).reshape(v.shape[0], -1).any(1).nonzero()
            layer = int(bad[0, 0]) if v.dim() > 1 and bad.numel() else 0
            what = "nan" if bool(torch.isnan(v).any()) else "inf"
            raise NumericalError(f"step {step}: non-finite scores ({what}){who} in layer {layer}, "
                                 f"unit kind {kind}")
    kinds = structures.kinds if structures is not None else list(values)
    for kind in kinds:
        v = values.get(kind)
        if v is None:
            continue
        kept = torch.ones(v.shape, dtype=torch.bool)
        if mask is not None:
            kept &= mask.effective()[kind].reshape(v.shape)
        live = kept
        if structures is not None and kind in structures.costs:
            live = kept & structures.candidate(kind).reshape(v.shape)  # the units the run may remove
        picked = v[live]
        if picked.numel() >= 2 and bool((picked == picked[0]).all()):
            layers = sorted({int(i) for i in live.nonzero()[:, 0]})
            span = f"layers {layers[0]}-{layers[-1]}" if len(layers) > 1 else f"layer {layers[0]}"
            raise NumericalError(f"step {step}: degenerate scores{who}: all {picked.numel()} units of kind "
                                 f"{kind} in {span} score exactly {float(picked[0])} "
                                 f"(the loss or gradients vanished)")


# --------------------------------------------------------------------------------------------------
# Normalization (Eq. 5 "normalized per block type")
# --------------------------------------------------------------------------------------------------

def block_constants(adapter: DecoderAdapter) -> dict[str, float]:
    """The per-kind divisors of ``normalize: block_constant``.

    ``q_head``: 4·head_dim·hidden and ``mlp_channel``: 3·intermediate are the authors'
    (uncc-efficient-ai/RESP ``resp/pruners/grad_sp_global.py`` ``obtain_info_iterative``,
    ``structural_size``; a query head there is q rows + o columns, K/V never scored).
    ``kv_group`` is ours: the unit is n_rep query heads plus one K and one V head (each K/V head
    the size of a query head's q or o slice), i.e. (n_rep + 1) times a query head's parameters,
    so its divisor is (n_rep + 1)·4·head_dim·hidden — dividing by one head's constant would
    inflate KV-group scores n_rep + 1 times against MLP channels.  ``layer``: 1."""
    g = adapter.geometry
    head = 4 * g.head_dim * g.hidden_size
    return {"q_head": float(head), "kv_group": float(head * (g.heads_per_group + 1)),
            "mlp_channel": float(3 * g.intermediate_size), "layer": 1.0}


def normalize_scores(values: dict[str, torch.Tensor], method: str, adapter: DecoderAdapter,
                     costs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``block_constant``: divide each block type by one constant (:func:`block_constants`;
    the authors' for query heads and MLP channels, scaled by the unit's size for KV groups);
    ``per_parameter``: divide each unit by its parameter count; ``mean``: divide each kind by its
    mean over units; ``none``."""
    out = {}
    consts = block_constants(adapter) if method == "block_constant" else {}
    for kind, v in values.items():
        if method == "none":
            out[kind] = v
        elif method == "block_constant":
            out[kind] = v / consts[kind]
        elif method == "per_parameter":
            out[kind] = v / costs[kind].clamp_min(1)
        elif method == "mean":
            m = v[v > 0].mean() if bool((v > 0).any()) else torch.tensor(1.0)
            out[kind] = v / m
        else:
            raise ValueError(f"unknown normalization {method!r}")
    return out
