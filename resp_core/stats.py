"""Small statistics for repeated sampling: mean and a 95% confidence interval (Student t)."""

from __future__ import annotations

import math

# two-sided 97.5% quantiles of Student's t for 1..30 degrees of freedom
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042]


def t975(dof: int) -> float:
    if dof < 1:
        return float("nan")
    return _T975[dof - 1] if dof <= len(_T975) else 1.96


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
