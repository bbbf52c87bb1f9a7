"""The per-seed metric key, ``<metric>@seed<s>``: evaluators write it, comparisons read it back
to aggregate means and 95% CIs over seeds."""

from __future__ import annotations

import re

SEED_KEY = re.compile(r"^(?P<metric>.+)@seed(?P<seed>-?\d+)$")


def seed_key(metric: str, seed: int) -> str:
    """The key under which an evaluator reports ``metric`` for one ``seed``."""
    return f"{metric}@seed{seed}"


def parse_seed_key(key: str) -> tuple[str, int] | None:
    """``(metric, seed)`` of a per-seed key; None for any other key."""
    m = SEED_KEY.match(key)
    return (m.group("metric"), int(m.group("seed"))) if m else None
