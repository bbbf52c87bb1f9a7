"""Masks over a model's dense geometry: the truth during a run.

A :class:`MaskSet` holds one boolean tensor per unit kind (True = kept).  Masks are exact:
:func:`apply_mask` zeroes every weight (and bias) that a removed unit owns, so that the masked
model computes the same function as the compacted one in which the units are gone (a removed
head contributes nothing because its o_proj columns are zero; a removed channel because its
down_proj column is zero; a removed layer because all its projections are zero, leaving the
residual stream untouched).  Masks of a schedule are nested; they are saved as safetensors.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from .adapter import DecoderAdapter, Geometry


class MaskSet:
    def __init__(self, geometry: Geometry, tensors: dict[str, torch.Tensor]):
        self.geometry = geometry
        self.kv_group = tensors["kv_group"].bool().clone()
        self.q_head = tensors["q_head"].bool().clone()
        self.mlp_channel = tensors["mlp_channel"].bool().clone()
        self.layer = tensors["layer"].bool().reshape(-1, 1).clone()

    # --- construction ------------------------------------------------------------------------
    @classmethod
    def full(cls, g: Geometry) -> "MaskSet":
        return cls(
            g,
            {
                "kv_group": torch.ones(g.num_layers, g.num_kv_heads, dtype=torch.bool),
                "q_head": torch.ones(g.num_layers, g.num_heads, dtype=torch.bool),
                "mlp_channel": torch.ones(g.num_layers, g.intermediate_size, dtype=torch.bool),
                "layer": torch.ones(g.num_layers, 1, dtype=torch.bool),
            },
        )

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"kv_group": self.kv_group, "q_head": self.q_head, "mlp_channel": self.mlp_channel,
                "layer": self.layer}

    def __getitem__(self, kind: str) -> torch.Tensor:
        return self.tensors()[kind]

    def clone(self) -> "MaskSet":
        return MaskSet(self.geometry, self.tensors())

    # --- semantics -----------------------------------------------------------------------------
    def effective(self) -> "MaskSet":
        """Propagate couplings: a dead layer kills its units, a dead KV group its query heads,
        a KV head without live query heads is dead too."""
        g = self.geometry
        layer = self.layer[:, 0]
        group = g.kv_group_of_head()
        q = self.q_head & self.kv_group[:, group] & layer[:, None]
        kv_has_q = torch.stack([q[:, group == k].any(dim=1) for k in range(g.num_kv_heads)], dim=1)
        kv = self.kv_group & kv_has_q & layer[:, None]
        mlp = self.mlp_channel & layer[:, None]
        return MaskSet(g, {"kv_group": kv, "q_head": q, "mlp_channel": mlp, "layer": self.layer})

    def is_subset_of(self, other: "MaskSet") -> bool:
        a, b = self.effective(), other.effective()
        return all(bool((~x | y).all()) for x, y in zip(a.tensors().values(), b.tensors().values()))

    def __eq__(self, other) -> bool:
        if not isinstance(other, MaskSet):
            return NotImplemented
        return all(torch.equal(x, y) for x, y in zip(self.tensors().values(), other.tensors().values()))

    def summary(self) -> dict:
        e = self.effective()
        return {
            "q_heads_kept": e.q_head.sum(dim=1).tolist(),
            "kv_heads_kept": e.kv_group.sum(dim=1).tolist(),
            "mlp_channels_kept": e.mlp_channel.sum(dim=1).tolist(),
            "layers_kept": e.layer[:, 0].tolist(),
        }

    # --- io ------------------------------------------------------------------------------------
    def save(self, path: Path, metadata: dict | None = None) -> None:
        """uint8 tensors per unit kind, the geometry and ``metadata`` as strings; written atomically
        with a canonical header (same mask, same bytes)."""
        from ..atomic_io import write_safetensors

        meta = {k: str(v) for k, v in (metadata or {}).items()}
        meta.update({f"geometry.{k}": str(v) for k, v in self.geometry.to_json().items()})
        write_safetensors(Path(path), {k: v.to(torch.uint8) for k, v in self.tensors().items()}, meta)

    @classmethod
    def load(cls, path: Path, geometry: Geometry) -> "MaskSet":
        """A saved mask for a model of ``geometry``; one-line :class:`RespError` naming the file
        when it is missing, unreadable, or made for another geometry."""
        from ..errors import RespError

        path = Path(path)
        if not path.is_file():
            raise RespError(f"{path}: mask file does not exist")
        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
                tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        except Exception as exc:  # safetensors raises its own error types for a bad header
            raise RespError(f"{path}: not a readable mask file ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
        for k, v in geometry.to_json().items():
            saved = meta.get(f"geometry.{k}")
            if saved is not None and saved != str(v):
                raise RespError(f"{path}: mask made for {k}={saved}, the model has {k}={v}")
        shapes = {"kv_group": (geometry.num_layers, geometry.num_kv_heads),
                  "q_head": (geometry.num_layers, geometry.num_heads),
                  "mlp_channel": (geometry.num_layers, geometry.intermediate_size),
                  "layer": (geometry.num_layers, 1)}
        for kind, shape in shapes.items():
            if kind not in tensors:
                raise RespError(f"{path}: mask has no {kind!r} tensor")
            t = tensors[kind]
            if kind == "layer":
                t = t.reshape(-1, 1) if t.numel() == geometry.num_layers else t
            if tuple(t.shape) != shape:
                raise RespError(f"{path}: {kind!r} has shape {tuple(t.shape)}, the model needs {shape}")
            tensors[kind] = t
        return cls(geometry, {k: tensors[k].bool() for k in shapes})


# --------------------------------------------------------------------------------------------------
# Applying masks to a dense model
# --------------------------------------------------------------------------------------------------

def _rows(idx: torch.Tensor, width: int) -> torch.Tensor:
    """Row indices of the per-unit blocks ``idx`` of size ``width``."""
    return (idx[:, None] * width + torch.arange(width)[None, :]).reshape(-1)


@torch.no_grad()
def apply_mask(adapter: DecoderAdapter, mask: MaskSet) -> None:
    """Zero, in place, every weight owned by a removed unit (see module docstring)."""
    g = adapter.geometry
    e = mask.effective()
    hd = g.head_dim
    for i in range(g.num_layers):
        a, m = adapter.attention_parts(i), adapter.mlp_parts(i)
        dead_q = (~e.q_head[i]).nonzero().flatten()
        if dead_q.numel():
            r = _rows(dead_q, hd)
            a.q.weight[r] = 0
            if a.q.bias is not None:
                a.q.bias[r] = 0
            a.o.weight[:, r] = 0
        dead_kv = (~e.kv_group[i]).nonzero().flatten()
        if dead_kv.numel():
            r = _rows(dead_kv, hd)
            for lin in (a.k, a.v):
                lin.weight[r] = 0
                if lin.bias is not None:
                    lin.bias[r] = 0
        dead_c = (~e.mlp_channel[i]).nonzero().flatten()
        if dead_c.numel():
            for lin in (m.gate, m.up):
                lin.weight[dead_c] = 0
                if lin.bias is not None:
                    lin.bias[dead_c] = 0
            m.down.weight[:, dead_c] = 0
        if not bool(e.layer[i, 0]):
            # A removed block must be the identity: output biases (e.g. FLAP's) go too.
            for lin in (a.o, m.down):
                if lin.bias is not None:
                    lin.bias.zero_()


def kept_parameter_count(adapter: DecoderAdapter, mask: MaskSet, costs: dict[str, torch.Tensor]) -> int:
    """Parameter count the compacted model will have under ``mask``."""
    e = mask.effective()
    removed = 0.0
    g = adapter.geometry
    per_q = costs["q_head"]
    kv_only = costs["kv_group"] - g.heads_per_group * per_q[:, :1]  # k and v rows of one KV head
    removed += float(((~e.q_head) * per_q).sum())
    removed += float(((~e.kv_group) * kv_only).sum())
    removed += float(((~e.mlp_channel) * costs["mlp_channel"]).sum())
    dense = adapter.parameter_count()
    # Parameters no unit owns: a removed layer loses its norms, q/k norms and output biases; an
    # attention left without heads (compacted to EmptyAttention) loses its q/k norms but keeps
    # its o_proj bias.
    for i in range(g.num_layers):
        if not bool(e.layer[i, 0]):
            layer = adapter.layers[i]
            unit_params = sum(float(t) for t in (per_q[i].sum(), kv_only[i].sum(), costs["mlp_channel"][i].sum()))
            total = sum(p.numel() for p in layer.parameters())
            removed += total - unit_params
        elif not bool(e.q_head[i].any()):
            attn = adapter.attention(i)
            a = adapter.attention_parts(i)
            owned = {id(p) for lin in (a.q, a.k, a.v) for p in lin.parameters()} | {id(a.o.weight)}
            removed += sum(p.numel() for p in attn.parameters() if id(p) not in owned and p is not a.o.bias)
    return int(round(dense - removed))


def removed_parameters(mask: MaskSet, structures, basis: str | None = None) -> torch.Tensor:
    """[L] float64: projection parameters each layer has lost under ``mask``, as counted on
    ``basis`` (default: the recipe's).  A removed layer loses all its projections.  K/V rows of a
    KV head without query heads count except on the authors' basis with ``q_head`` units
    (:meth:`Structures.counts_kv_removal`); on ``prunable_blocks`` protected layers count 0."""
    basis = basis or structures.spec.sparsity_basis
    e = mask.effective()
    c = structures.costs
    per_layer = ((~e.q_head) * c["q_head"]).sum(1, dtype=torch.float64)
    if structures.counts_kv_removal(basis):
        per_layer = per_layer + ((~e.kv_group) * structures.kv_only).sum(1, dtype=torch.float64)
    per_layer = per_layer + ((~e.mlp_channel) * c["mlp_channel"]).sum(1, dtype=torch.float64)
    per_layer = torch.where(e.layer[:, 0], per_layer, c["layer"][:, 0].double())
    if basis != "all_blocks":
        per_layer = torch.where(structures.prunable_layers, per_layer, torch.zeros_like(per_layer))
    return per_layer


def sparsity_on(mask: MaskSet, structures, basis: str) -> float:
    """Fraction of the ``basis`` denominator removed (see :mod:`resp_core.model.structures`)."""
    total = structures.basis_total(basis)
    return float(removed_parameters(mask, structures, basis).sum()) / total if total else 0.0


def sparsity_of(mask: MaskSet, structures) -> float:
    """The run's 'sparsity': on the recipe's ``structures.sparsity_basis``."""
    return sparsity_on(mask, structures, structures.spec.sparsity_basis)


def sparsity_report(mask: MaskSet, structures) -> dict:
    """Both figures and the recipe's, for every metrics row: ``sparsity`` (on the recipe's
    basis), ``sparsity_prunable_blocks`` (RESP's) and ``sparsity_all_blocks`` (the authors')."""
    out = {f"sparsity_{b}": sparsity_on(mask, structures, b) for b in ("prunable_blocks", "all_blocks")}
    return {"sparsity": out[f"sparsity_{structures.spec.sparsity_basis}"], **out}
