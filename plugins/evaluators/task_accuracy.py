"""Native sampled generative accuracy on a task's held-out items (fast; ``--limit`` friendly).

Generates with the run's generation backend (thinking mode, temperature 0.6 by default, as the
paper evaluates) and checks each completion with the task's own answer extraction.

Metrics: ``<task>/accuracy`` (the main metric; mean over seeds), ``<task>/accuracy@seed<s>`` per
sampling seed, ``<task>/accuracy_ci95`` with several seeds, ``<task>/finished``, and the
answer length: ``<task>/mean_tokens`` (also per seed, ``<task>/mean_tokens@seed<s>``, so that
comparisons replicate it over paths like the accuracy), ``<task>/median_tokens`` and
``<task>/at_token_limit`` (the share of answers cut by ``max_new_tokens``).  :func:`measure` is the one loop; ``respctl testbed evaluate`` uses it too.
"""

from __future__ import annotations

import statistics

from pydantic import Field

from resp_core import hookimpl
from resp_core.interfaces import EvalResult, Evaluator, Generator, Params, Progress, RunContext, Task
from resp_core.metric_keys import seed_key
from resp_core.stats import bootstrap_ci95, ci95_halfwidth
from resp_core.validation import Count, Seed
from resp_plugins.calibration.self_generated import SamplingSettings


def measure(task: Task, generator: Generator, split: str, num_items: int | None, item_seed: int,
            seeds: list[int], sampling: SamplingSettings, progress: Progress | None = None,
            ci: bool = True) -> EvalResult:
    """Sampled accuracy of ``generator``'s model on ``num_items`` items of ``task``'s ``split``
    (chosen by ``item_seed``), once per sampling seed."""
    items = task.items(split, num_items, item_seed)
    records, accuracies = [], []
    for seed in seeds:
        label = f"Evaluating {task.name}" + (f" (seed {seed})" if len(seeds) > 1 else "")
        comps = generator.generate([it.messages for it in items], sampling.to_sampling(seed), progress, label)
        correct = 0
        for it, c in zip(items, comps):
            ok = task.is_correct(c.text, it)
            correct += ok
            records.append({"seed": seed, "id": it.id, "answer": it.answer, "extracted": task.extract_answer(c.text),
                            "correct": ok, "finished": c.finished, "tokens": len(c.completion_ids),
                            "completion": c.text})
        accuracies.append(correct / max(1, len(items)))
    n = max(1, len(records))
    name = task.name
    tokens = sorted(r["tokens"] for r in records)
    metrics = {
        f"{name}/accuracy": sum(accuracies) / len(accuracies),
        f"{name}/finished": sum(r["finished"] for r in records) / n,
        f"{name}/mean_tokens": sum(tokens) / n,
        # answer length: what a pruned reasoning model that rambles costs at decode time
        f"{name}/median_tokens": statistics.median(tokens) if tokens else float("nan"),
        f"{name}/at_token_limit": sum(not r["finished"] for r in records) / n,
    }
    if ci:
        metrics[f"{name}/accuracy_ci95"] = ci95_halfwidth(accuracies)
    # per-item bootstrap 95% CI of the accuracy (each item's correctness averaged over the seeds)
    per_item: dict[str, list[float]] = {}
    for r in records:
        per_item.setdefault(r["id"], []).append(float(r["correct"]))
    low, high = bootstrap_ci95([sum(v) / len(v) for v in per_item.values()], seed=item_seed)
    metrics[f"{name}/accuracy_items_ci95_low"] = low
    metrics[f"{name}/accuracy_items_ci95_high"] = high
    for seed, acc in zip(seeds, accuracies):
        metrics[seed_key(f"{name}/accuracy", seed)] = acc
        seed_tokens = [r["tokens"] for r in records if r["seed"] == seed]
        metrics[seed_key(f"{name}/mean_tokens", seed)] = sum(seed_tokens) / max(1, len(seed_tokens))
    return EvalResult(metrics, records)


class TaskAccuracy(Evaluator):
    """Sampled generative accuracy on a task's test split (answer extracted by the task)."""

    class Params(Params):
        task: str | None = None  # default: the recipe's task
        split: str = "test"
        num_items: Count = 200
        seed: Seed = 1234  # which items (and the sampling seed when `seeds` is not given)
        seeds: list[Seed] | None = Field(None, min_length=1)  # repeated sampling: one accuracy per seed, mean and 95% CI
        sampling: SamplingSettings = Field(default_factory=SamplingSettings)

    def __init__(self, params: "TaskAccuracy.Params | None" = None):
        self.params = params or self.Params()

    def evaluate(self, ctx: RunContext) -> EvalResult:
        p = self.params
        return measure(ctx.tasks(p.task), ctx.generator, p.split, p.num_items, p.seed, p.seeds or [p.seed],
                       p.sampling, ctx.progress, ci=bool(p.seeds))


@hookimpl
def register_evaluators(register):
    register("task_accuracy", TaskAccuracy)
