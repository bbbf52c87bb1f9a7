"""Reproducible subsets of a data file's items, shared by the file-backed tasks."""

from __future__ import annotations

import random

from resp_core.errors import RespError


def pick_subset(n: int, count: int | None, seed: int) -> list[int]:
    """Indices of a reproducible subset of ``count`` out of ``n``, in file order."""
    if count is None or count >= n:
        return list(range(n))
    if count < 0:
        raise RespError(f"count must be >= 0, not {count}")
    return sorted(random.Random(seed).sample(range(n), count))
