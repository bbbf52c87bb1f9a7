"""Small statistics for repeated sampling: means and 95% confidence intervals.

* :func:`ci95_halfwidth`: over seeds (or any repeated measurement), Student t with ``k - 1``
  degrees of freedom, quantile from ``scipy.stats.t``.
* :func:`bootstrap_ci95`: over the items of one evaluation (0/1 correctness per item), a
  percentile bootstrap with ``scipy.stats.bootstrap`` (resamples of the items, seeded).
* :func:`paired_difference`: the mean of paired differences ``d_i = a_i - b_i`` with its 95% t
  interval (what ``scipy.stats.ttest_rel(a, b).confidence_interval()`` gives) and the minimum
  detectable difference (:func:`mde_paired`) for that many pairs.
* :func:`json_safe`: NaN and infinities as ``None`` so that every JSON file RESP writes is valid
  JSON (``null``, never ``NaN``).
"""

from __future__ import annotations

import math
from typing import Any


def t975(dof: int) -> float:
    """The 97.5% quantile of Student's t with ``dof`` degrees of freedom (NaN below 1)."""
    return t_quantile(0.975, dof)


def t_quantile(q: float, dof: int) -> float:
    """The ``q`` quantile of Student's t with ``dof`` degrees of freedom (NaN below 1)."""
    if dof < 1:
        return float("nan")
    from scipy.stats import t

    return float(t.ppf(q, dof))


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def sd(values) -> float:
    """Sample standard deviation (``k - 1`` in the denominator); NaN for fewer than two values."""
    values = list(values)
    k = len(values)
    if k < 2:
        return float("nan")
    m = mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (k - 1))


def mde_paired(sd_d: float, n: int, power: float = 0.80) -> float:
    """Minimum detectable difference of a paired t test (two-sided 5%) at ``power`` with ``n``
    pairs whose differences have standard deviation ``sd_d``:
    ``(t_{0.975, n-1} + t_{power, n-1}) * sd_d / sqrt(n)``; NaN for fewer than two pairs."""
    if n < 2 or not math.isfinite(sd_d):
        return float("nan")
    return (t975(n - 1) + t_quantile(power, n - 1)) * sd_d / math.sqrt(n)


def paired_difference(a, b) -> dict:
    """Mean of the paired differences ``a_i - b_i``, its 95% t interval over the pairs
    (``low``, ``high``: NaN for fewer than two pairs), the SD of the differences, ``n`` and the
    minimum detectable difference (:func:`mde_paired`)."""
    d = [x - y for x, y in zip(a, b, strict=True)]
    n, m, s = len(d), mean(d), sd(d)
    h = t975(n - 1) * s / math.sqrt(n) if n >= 2 else float("nan")
    return {"n": n, "mean": m, "low": m - h, "high": m + h, "sd": s, "mde": mde_paired(s, n)}


def ci95_halfwidth(values) -> float:
    """Half-width of the 95% CI of the mean (t distribution); NaN for fewer than two values."""
    values = list(values)
    k = len(values)
    if k < 2:
        return float("nan")
    return t975(k - 1) * sd(values) / math.sqrt(k)


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
