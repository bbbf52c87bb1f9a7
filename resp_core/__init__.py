"""RESP: self-reflective structured pruning for reasoning language models."""

from .hookspecs import hookimpl, hookspec

__version__ = "0.1.0"

__all__ = ["hookimpl", "hookspec", "load_pruned", "__version__"]


def load_pruned(path, dtype=None, device=None):
    """Load a pruned model saved by RESP (see :func:`resp_core.model.compaction.load_pruned`)."""
    from .model.compaction import load_pruned as _load

    return _load(path, dtype=dtype, device=device)
