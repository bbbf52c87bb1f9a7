"""RNG state (torch, CUDA, python ``random``, numpy) as JSON, for checkpoints, and seeding."""

from __future__ import annotations

import base64
import json
import sys


def rng_state() -> dict:
    import random

    import torch

    def b64(t) -> str:
        return base64.b64encode(t.cpu().numpy().tobytes()).decode()

    state = {"torch": b64(torch.random.get_rng_state()), "python": json.loads(json.dumps(random.getstate()))}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [b64(s) for s in torch.cuda.get_rng_state_all()]
    np = sys.modules.get("numpy")
    if np is not None:
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        state["numpy"] = [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)]
    return state


def set_rng_state(state: dict) -> None:
    import random

    import torch

    def tensor(s: str):
        return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()

    torch.random.set_rng_state(tensor(state["torch"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensor(s) for s in state["cuda"]])
    np = sys.modules.get("numpy")
    if np is not None and state.get("numpy"):
        kind, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))


def seed_everything(seed: int) -> None:
    """Seed torch (every device), python ``random`` and numpy's global generator."""
    import random

    import torch

    torch.manual_seed(seed)
    random.seed(seed)
    np = sys.modules.get("numpy")
    if np is not None:
        np.random.seed(seed % (2 ** 32))


__all__ = ["rng_state", "set_rng_state", "seed_everything"]
