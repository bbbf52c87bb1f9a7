"""Native sampled generative accuracy on a task's held-out items (fast; ``--limit`` friendly).

Generates with the run's generation backend (thinking mode, temperature 0.6 by default, as the
paper evaluates) and checks each completion with the task's own answer extraction.
"""

from __future__ import annotations

from pydantic import Field

from resp_core import hookimpl
from resp_core.interfaces import EvalResult, Evaluator, Params, RunContext
from resp_core.stats import ci95_halfwidth
from resp_plugins.calibration.self_generated import SamplingSettings


class TaskAccuracy(Evaluator):
    """Sampled generative accuracy on a task's test split (answer extracted by the task)."""

    class Params(Params):
        task: str | None = None  # default: the recipe's task
        split: str = "test"
        num_items: int = 200
        seed: int = 1234  # which items (and the sampling seed when `seeds` is not given)
        seeds: list[int] | None = None  # repeated sampling: one accuracy per seed, mean and 95% CI
        sampling: SamplingSettings = Field(default_factory=SamplingSettings)

    def __init__(self, params: "TaskAccuracy.Params | None" = None):
        self.params = params or self.Params()

    def evaluate(self, ctx: RunContext) -> EvalResult:
        p = self.params
        task = ctx.tasks(p.task)
        items = task.items(p.split, p.num_items, p.seed)
        seeds = p.seeds or [p.seed]
        records, accuracies = [], []
        for seed in seeds:
            label = f"Evaluating {task.name}" + (f" (seed {seed})" if len(seeds) > 1 else "")
            comps = ctx.generator.generate([it.messages for it in items], p.sampling.to_sampling(seed),
                                           ctx.progress, label)
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
        metrics = {
            f"{name}/accuracy": sum(accuracies) / len(accuracies),
            f"{name}/finished": sum(r["finished"] for r in records) / n,
            f"{name}/mean_tokens": sum(r["tokens"] for r in records) / n,
        }
        if p.seeds:
            metrics[f"{name}/accuracy_ci95"] = ci95_halfwidth(accuracies)
            for seed, acc in zip(seeds, accuracies):
                metrics[f"{name}/accuracy@seed{seed}"] = acc
        return EvalResult(metrics, records)


@hookimpl
def register_evaluators(register):
    register("task_accuracy", TaskAccuracy)
