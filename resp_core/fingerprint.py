"""Cheap, stable fingerprints of a model's current weights (for trace caches and run records)."""

from __future__ import annotations

import hashlib
import json

import torch


@torch.no_grad()
def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over each tensor's name, shape, float64 sum and first 4096 values.

    Masking or editing weights changes it; it does not read every byte of a multi-GB model."""
    h = hashlib.sha256()
    h.update(json.dumps(getattr(model.config, "to_dict", dict)(), sort_keys=True, default=str).encode())
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        flat = t.detach().reshape(-1)
        h.update(repr(float(flat.double().sum())).encode())
        h.update(flat[:4096].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]
