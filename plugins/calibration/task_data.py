"""Task data with human-written reference solutions (GSM8K's labels, the testbed's terse
solutions) as calibration: the 'gold' calibration of the paper's Section 3."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ValidationError

from resp_core import hookimpl
from resp_core.errors import RespError
from resp_core.interfaces import CalibrationSample, CalibrationSource, Params, RunContext


def check_task_ref(recipe, path: str, task: str | None, task_params: dict | None) -> None:
    """Check that ``task`` (default: the recipe's task) exists and accepts ``task_params``."""
    from resp_core.registry import get_registry

    name = task or recipe.task.name
    entry = get_registry().get("task", name, f"{path}.params.task")
    if not task_params:
        return
    model = getattr(entry.factory, "Params", None)
    if model is None:
        raise RespError(f"{path}.params.task_params: task {name!r} takes no parameters")
    try:
        model.model_validate(task_params)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        msg = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
        raise RespError(f"{path}.params.task_params{'.' + loc if loc else ''}: {msg}") from None


class TaskData(CalibrationSource):
    """Task prompts with their human-written reference solutions."""

    class Params(Params):
        num_samples: int = 128
        task: str | None = None  # default: the recipe's task
        task_params: dict[str, Any] | None = None  # e.g. {data_dir: ...}; default: the recipe task's params
        split: str = "train"
        format: Literal["chat", "plain"] = "chat"  # chat template (non-thinking) or question + solution
        max_length: int | None = None

    def __init__(self, params: "TaskData.Params | None" = None):
        self.params = params or self.Params()

    def check_recipe(self, recipe, path: str) -> None:
        if self.params.num_samples < 1:
            raise RespError(f"{path}.params.num_samples: need at least 1 sample, got {self.params.num_samples}")
        check_task_ref(recipe, path, self.params.task, self.params.task_params)

    def build(self, ctx: RunContext) -> list[CalibrationSample]:
        p = self.params
        task = ctx.tasks(p.task, p.task_params)
        items = task.items(p.split, p.num_samples, ctx.seed)
        tok = ctx.tokenizer
        out = []
        for it in items:
            if p.format == "chat":
                prompt = tok.apply_chat_template(it.messages, tokenize=False, add_generation_prompt=True,
                                                 enable_thinking=False)
                target = it.reference + (tok.eos_token or "")
            else:
                prompt = "\n".join(m["content"] for m in it.messages) + "\n"
                target = it.reference
            p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
            t_ids = tok(target, add_special_tokens=False)["input_ids"]
            if p.max_length:
                t_ids = t_ids[: max(0, p.max_length - len(p_ids))]
            out.append(CalibrationSample(p_ids, t_ids, {"item_id": it.id, "source": "task_data",
                                                        "text": target}))
        return out


@hookimpl
def register_calibration_sources(register):
    register("task_data", TaskData)
