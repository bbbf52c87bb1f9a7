"""Native sampled generative accuracy on a task's held-out items (fast; ``--limit`` friendly).

Generates with the run's generation backend (thinking mode, temperature 0.6 by default, as the
paper evaluates) and checks each completion with the task's own answer extraction.
"""

from __future__ import annotations

from pydantic import Field

from resp_core import hookimpl
from resp_core.interfaces import EvalResult, Evaluator, Params, RunContext
from resp_plugins.calibration.self_generated import SamplingSettings


class TaskAccuracy(Evaluator):
    """Sampled generative accuracy on a task's test split (answer extracted by the task)."""

    class Params(Params):
        task: str | None = None  # default: the recipe's task
        split: str = "test"
        num_items: int = 200
        seed: int = 1234
        sampling: SamplingSettings = Field(default_factory=SamplingSettings)

    def __init__(self, params: "TaskAccuracy.Params | None" = None):
        self.params = params or self.Params()

    def evaluate(self, ctx: RunContext) -> EvalResult:
        p = self.params
        task = ctx.tasks(p.task)
        items = task.items(p.split, p.num_items, p.seed)
        comps = ctx.generator.generate([it.messages for it in items], p.sampling.to_sampling(p.seed),
                                       ctx.progress, f"Evaluating {task.name}")
        records, correct = [], 0
        for it, c in zip(items, comps):
            got = task.extract_answer(c.text)
            ok = task.is_correct(c.text, it)
            correct += ok
            records.append({"id": it.id, "answer": it.answer, "extracted": got, "correct": ok,
                            "finished": c.finished, "tokens": len(c.completion_ids), "completion": c.text})
        n = max(1, len(items))
        metrics = {
            f"{task.name}/accuracy": correct / n,
            f"{task.name}/finished": sum(r["finished"] for r in records) / n,
            f"{task.name}/mean_tokens": sum(r["tokens"] for r in records) / n,
        }
        return EvalResult(metrics, records)


@hookimpl
def register_evaluators(register):
    register("task_accuracy", TaskAccuracy)
