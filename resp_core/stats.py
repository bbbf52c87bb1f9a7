"""Small statistics for repeated sampling: means and 95% confidence intervals.

* :func:`ci95_halfwidth`: over seeds (or any repeated measurement), Student t with ``k - 1``
  degrees of freedom, quantile from ``scipy.stats.t``.
* :func:`bootstrap_ci95`: over the items of one evaluation (0/1 correctness per item), a
  percentile bootstrap with ``scipy.stats.bootstrap`` (resamples of the items, seeded).
* :func:`json_safe`: NaN and infinities as ``None`` so that every JSON file RESP writes is valid
  JSON (``null``, never ``NaN``).
"""

from __future__ import annotations

import math
from typing import Any


def t975(dof: int) -> float:
    """The 97.5% quantile of Student's t with ``dof`` degrees of freedom (NaN below 1)."""
    if dof < 1:
        return float("nan")
    from scipy.stats import t

    return float(t.ppf(0.975, dof))


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def ci95_halfwidth(values) -> float:
    """Half-width of the 95% CI of the mean (t distribution); NaN for fewer than two values."""
    values = list(values)
    k = len(values)
    if k < 2:
        return float("nan")
    m = mean(values)
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (k - 1))
    return t975(k - 1) * sd / math.sqrt(k)


def bootstrap_ci95(values, n_resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap 95% CI ``(low, high)`` of the mean of per-item ``values`` (e.g. 0/1
    correctness); ``(nan, nan)`` for fewer than two items.  All-equal values give ``(v, v)``."""
    import numpy as np
    from scipy.stats import bootstrap

    data = np.asarray(list(values), dtype=float)
    if data.size < 2:
        return float("nan"), float("nan")
    if np.all(data == data[0]):
        return float(data[0]), float(data[0])
    res = bootstrap((data,), np.mean, confidence_level=0.95, n_resamples=n_resamples, method="percentile",
                    random_state=np.random.default_rng(seed), vectorized=True)
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by ``None`` (recursively)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def finite(x) -> bool:
    """True for a finite number (False for None, NaN and infinities)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
