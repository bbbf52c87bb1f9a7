"""The shipped testbed task: multi-step two-digit +/- chains (see ``resp_core.testbed.task``)."""

from __future__ import annotations

import random

from pydantic import Field

from resp_core import hookimpl
from resp_core.interfaces import Params, Task, TaskItem
from resp_core.testbed import task as arith


class TestbedArithmetic(Task):
    """Testbed multi-step arithmetic; answers checked exactly, generated offline from a seed."""

    name = "testbed_arith"
    splits = ("train", "test")

    class Params(Params):
        prompt_forms: int = Field(4, ge=1, le=len(arith._PROMPT_FORMS))  # how many prompt phrasings to draw from

    def __init__(self, params: "TestbedArithmetic.Params | None" = None):
        self.params = params or self.Params()

    def items(self, split: str, count: int | None, seed: int) -> list[TaskItem]:
        if split not in ("train", "test"):
            raise ValueError(f"testbed_arith has splits 'train' and 'test', not {split!r}")
        count = 500 if count is None else count
        rng = random.Random(seed)
        out = []
        for i, p in enumerate(arith.problems(seed, count, split)):
            form = rng.randrange(self.params.prompt_forms)
            out.append(TaskItem(
                id=f"{split}-{seed}-{i}",
                messages=[{"role": "user", "content": p.prompt(form)}],
                answer=str(p.answer),
                reference=arith.reference_solution(p),
                meta=p.to_json(),
            ))
        return out

    def extract_answer(self, completion: str) -> str | None:
        got = arith.extract_answer(completion)
        return None if got is None else str(got)


@hookimpl
def register_tasks(register):
    register("testbed_arith", TestbedArithmetic)
