"""The plan of a comparison recipe: every method's run is planned (a one-shot method at the
comparison's largest sparsity), and the one shown is the run with the largest peak (scoring, or
recovery where a method recovers), the longer one where peaks tie."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .fit import Plan, make_plan


@dataclass
class ComparisonPlan:
    name: str                      # the comparison's name
    plans: list[tuple[str, Plan]]  # (method label, the plan of its run), in the recipe's order
    label: str                     # the method with the largest peak
    recipe: Any                    # that method's run recipe
    plan: Plan                     # and its plan


def plan_comparison(data: dict, source: str, gpu_memory: int | None = None, **kw) -> ComparisonPlan:
    """Plan every method of the comparison document ``data``; ``kw`` as :func:`make_plan` takes them."""
    from ..compare import is_oneshot, method_recipe, parse_compare
    from ..registry import get_registry

    cmp = parse_compare(data, source)
    reg = get_registry()
    plans = [(m.label, make_plan(method_recipe(cmp, m, reg, cmp.sparsities[-1] if is_oneshot(m) else None), gpu_memory,
                                 **kw)) for m in cmp.methods]
    label, p = max(plans, key=lambda lp: (_peak(lp[1]), lp[1].times.get("total", 0.0)))
    chosen = next(m for m in cmp.methods if m.label == label)
    parsed = method_recipe(cmp, chosen, reg, cmp.sparsities[-1] if is_oneshot(chosen) else None)
    return ComparisonPlan(name=cmp.name, plans=plans, label=label, recipe=parsed, plan=p)


def _peak(plan: Plan) -> float:
    """The run's largest memory peak: scoring, or its recovery's."""
    return max(plan.scoring_peak, plan.recovery["peak_bytes"] if plan.recovery else 0.0)
