"""Input statistics of the prunable projections over a calibration set (activation-based methods).

Wanda, FLAP, OWL and SparseGPT all look at what flows *into* a projection: for every input
channel j of a projection, over the calibration tokens,

* ``count``   number of tokens n,
* ``sum``     Σ_t x_tj            (FLAP's baseline mean, for bias compensation),
* ``sum_sq``  Σ_t x_tj²           (Wanda's ‖X_j‖₂², FLAP's fluctuation with ``sum``),
* ``gram``    XᵀX, only when asked (SparseGPT's Hessian, d × d).

:func:`collect_input_stats` runs the *current* (masked) model forward under ``torch.no_grad``
with forward hooks on the projections it is asked about, found through the
:class:`~resp_core.model.adapter.DecoderAdapter` (never by module name).  Sites:

* ``"o"``        input of o_proj   = the concatenated head outputs      (``adapter.attention_input``)
* ``"down"``     input of down_proj = the MLP channel activations        (``adapter.mlp_input``)
* ``"qkv"``      input of q/k/v_proj = the normed residual stream         (OWL's outlier ratios)
* ``"gate_up"``  input of gate/up_proj = the normed residual stream       (OWL's outlier ratios)

Only tokens with ``attention_mask == 1`` are counted (padding never is); with
``tokens="target"`` only positions whose next token carries the decode-only loss (Eq. 4) are.

``sequential=True`` takes the statistics layer by layer through the already-pruned earlier
layers, as Wanda does (locuslab/wanda ``lib/prune.py`` ``prune_wanda``: each layer's inputs are
the outputs of the earlier layers after their pruning) and as the RESP authors' Wanda-sp does
(uncc-efficient-ai/RESP ``resp/pruners/wanda_sp.py`` ``baseline_uniform_wanda`` with
``act_type: sparse``): for each asked layer in order, the statistics of that layer's sites are
collected in one pass (the layer itself still whole), then ``decide(layer, stats)`` returns the
input channels of o_proj / down_proj that stay (``{"o": bool[in], "down": bool[in]}``, or None);
the removed channels are zeroed at those projections' inputs for the passes of later layers.
That equals removing the units (a head's o_proj columns, a channel's down_proj column) and
changes no weight.  Each layer's pass runs the model up to that layer (early stop), so the cost
is about L/2 full passes instead of the authors' one pass with cached hidden states; in exchange
no decoder-layer call signature is needed.
Sums are accumulated in float64 and Gram matrices in float32, on the model's device; Gram
matrices are d × d per layer and site, so they are only built when ``gram=True``.  When only some
layers are asked for, the forward pass stops after the last of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Literal

import torch

from .interfaces import CalibrationSet, Progress
from .model.adapter import DecoderAdapter

SITES = ("qkv", "o", "gate_up", "down")
_SITE_ORDER = {s: k for k, s in enumerate(SITES)}  # order in which a layer's hooks fire


@dataclass
class InputStats:
    """Per-input-channel statistics of one projection's input over the selected tokens."""

    count: int
    sum: torch.Tensor  # [d] float64
    sum_sq: torch.Tensor  # [d] float64
    gram: torch.Tensor | None = None  # [d, d] float32, Σ_t x_t x_tᵀ

    def mean(self) -> torch.Tensor:
        """E[x_j] over tokens (FLAP's baseline input)."""
        return self.sum / max(self.count, 1)

    def variance(self) -> torch.Tensor:
        """Unbiased sample variance over tokens, Σ_t (x_tj − x̄_j)² / (n − 1) (FLAP's fluctuation)."""
        n = self.count
        if n < 2:
            return torch.zeros_like(self.sum)
        return ((self.sum_sq - self.sum * self.sum / n) / (n - 1)).clamp_min(0.0)

    def norm(self) -> torch.Tensor:
        """‖X_j‖₂ = sqrt(Σ_t x_tj²) (Wanda's activation norm)."""
        return self.sum_sq.clamp_min(0.0).sqrt()

    def hessian(self) -> torch.Tensor:
        """H = XᵀX / n (the layer-wise reconstruction Hessian, up to SparseGPT's factor 2)."""
        if self.gram is None:
            raise ValueError("Gram matrix not collected (collect_input_stats(..., gram=True))")
        return self.gram.double() / max(self.count, 1)


class _Accumulator:
    def __init__(self, dim: int, device, gram: bool):
        self.count = 0
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self.sum_sq = torch.zeros(dim, dtype=torch.float64, device=device)
        self.gram = torch.zeros(dim, dim, dtype=torch.float32, device=device) if gram else None

    def add(self, x: torch.Tensor) -> None:  # x: [n, d], any float dtype
        if x.shape[0] == 0:
            return
        xf = x.float()
        self.count += xf.shape[0]
        self.sum += xf.sum(0).double()
        self.sum_sq += torch.linalg.vector_norm(xf, dim=0).double().square()
        if self.gram is not None:
            self.gram.addmm_(xf.t(), xf)

    def freeze(self) -> InputStats:
        return InputStats(self.count, self.sum, self.sum_sq, self.gram)


class _StopForward(Exception):
    """Raised by the last hook when the remaining layers are not needed."""


def site_module(adapter: DecoderAdapter, layer: int, site: str) -> torch.nn.Module:
    """The module whose forward input is ``site`` in ``layer`` (q_proj stands for q/k/v, gate for gate/up)."""
    if site == "o":
        return adapter.attention_input(layer)
    if site == "down":
        return adapter.mlp_input(layer)
    if site == "qkv":
        return adapter.attention_parts(layer).q
    if site == "gate_up":
        return adapter.mlp_parts(layer).gate
    raise ValueError(f"unknown site {site!r}; known: {', '.join(SITES)}")


def token_selection(batch, tokens: str) -> torch.Tensor:
    """bool [B, T]: the positions whose activations are counted."""
    sel = batch.attention_mask.bool()
    if tokens == "all":
        return sel
    if tokens == "target":
        carries = torch.zeros_like(sel)
        carries[:, :-1] = batch.labels[:, 1:] != -100  # position t predicts token t+1
        return sel & carries
    raise ValueError(f"tokens must be 'all' or 'target', not {tokens!r}")


@torch.no_grad()
def collect_input_stats(model: torch.nn.Module, adapter: DecoderAdapter, calibration: CalibrationSet, *,
                        sites: Iterable[str] = ("o", "down"), layers: Iterable[int] | None = None,
                        gram: bool = False, tokens: Literal["all", "target"] = "all", batch_size: int = 8,
                        progress: Progress | None = None, description: str = "Collecting activations",
                        sequential: bool = False,
                        decide: Callable[[int, dict[str, InputStats]], dict[str, torch.Tensor] | None] | None = None,
                        ) -> dict[tuple[int, str], InputStats]:
    """Statistics of the inputs of ``sites`` in ``layers`` (default: all) -> ``{(layer, site): stats}``.

    ``sequential=True`` needs ``decide`` (see the module docstring)."""
    if sequential:
        if decide is None:
            raise ValueError("sequential statistics need a decide(layer, stats) callback")
        return _collect_sequential(model, adapter, calibration, sites=sites, layers=layers, gram=gram,
                                   tokens=tokens, batch_size=batch_size, progress=progress,
                                   description=description, decide=decide)
    sites = tuple(dict.fromkeys(sites))
    for s in sites:
        if s not in _SITE_ORDER:
            raise ValueError(f"unknown site {s!r}; known: {', '.join(SITES)}")
    n_layers = adapter.geometry.num_layers
    layer_list = sorted(set(range(n_layers) if layers is None else layers))
    if not layer_list or not sites:
        return {}
    device = next(model.parameters()).device
    acc: dict[tuple[int, str], _Accumulator] = {}
    state: dict[str, torch.Tensor | None] = {"sel": None}
    last_layer = layer_list[-1]
    last_site = max(sites, key=_SITE_ORDER.__getitem__)
    stop_early = last_layer < n_layers - 1

    def make_hook(key):
        layer, site = key

        def hook(module, args, output):
            x = args[0]
            x = x.reshape(-1, x.shape[-1])[state["sel"]]
            if key not in acc:
                acc[key] = _Accumulator(x.shape[-1], x.device, gram)
            acc[key].add(x)
            if stop_early and layer == last_layer and site == last_site:
                raise _StopForward

        return hook

    handles = []
    for i in layer_list:
        for s in sites:
            handles.append(site_module(adapter, i, s).register_forward_hook(make_hook((i, s))))
    was_training = model.training
    model.eval()
    progress = progress or Progress()
    loss = "decode" if tokens == "target" else "full"
    n_batches = (len(calibration) + batch_size - 1) // batch_size
    try:
        with progress.task(description, total=n_batches) as advance:
            for batch in calibration.batches(batch_size, loss):
                state["sel"] = token_selection(batch, tokens).reshape(-1).to(device)
                try:
                    model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
                          use_cache=False)
                except _StopForward:
                    pass
                advance(1)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    out = {}
    for i in layer_list:
        for s in sites:
            if (i, s) in acc:
                out[(i, s)] = acc[(i, s)].freeze()
            else:  # no forward reached it (empty calibration set)
                d = site_module(adapter, i, s).in_features
                out[(i, s)] = _Accumulator(d, device, gram).freeze()
    return out


_MASKABLE = ("o", "down")  # sites whose input channels are units (heads' columns, MLP channels)


def _collect_sequential(model, adapter: DecoderAdapter, calibration: CalibrationSet, *, sites, layers, gram,
                        tokens, batch_size, progress, description, decide) -> dict[tuple[int, str], InputStats]:
    n_layers = adapter.geometry.num_layers
    layer_list = sorted(set(range(n_layers) if layers is None else layers))
    out: dict[tuple[int, str], InputStats] = {}
    handles = []

    def zero_removed(keep: torch.Tensor):
        def pre_hook(module, args):
            x = args[0]
            return (x * keep.to(device=x.device, dtype=x.dtype),) + tuple(args[1:])

        return pre_hook

    try:
        for k, i in enumerate(layer_list):
            stats = collect_input_stats(model, adapter, calibration, sites=sites, layers=[i], gram=gram,
                                        tokens=tokens, batch_size=batch_size, progress=progress,
                                        description=f"{description} (layer {k + 1}/{len(layer_list)})")
            out.update(stats)
            keep = decide(i, {s: stats[(i, s)] for s in dict.fromkeys(sites)}) or {}
            for site, mask in keep.items():
                if site not in _MASKABLE:
                    raise ValueError(f"decide() may only mask the inputs of {_MASKABLE}, not {site!r}")
                mask = mask.reshape(-1).bool()
                module = site_module(adapter, i, site)
                if mask.numel() != module.in_features:
                    raise ValueError(f"decide(): layer {i} {site} mask has {mask.numel()} entries, "
                                     f"the projection {module.in_features} inputs")
                if not bool(mask.all()):
                    handles.append(module.register_forward_pre_hook(zero_removed(mask)))
    finally:
        for h in handles:
            h.remove()
    return out
