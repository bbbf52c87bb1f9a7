"""The per-seed metric key, ``<metric>@seed<s>``: evaluators write it, comparisons read it back
to aggregate means and 95% CIs over seeds; and which metrics are fractions (shown in %)."""

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


RAW_METRIC_WORDS = ("perplexity", "bits_per_byte", "loss", "tokens")


def is_fraction(metric: str) -> bool:
    """Accuracies and other fractions are shown in %; perplexities, bits per byte, losses and
    token counts (answer lengths) as they are."""
    return not any(w in metric for w in RAW_METRIC_WORDS)
