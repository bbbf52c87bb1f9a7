"""Task data with human-written reference solutions (GSM8K's labels, the testbed's terse
solutions) as calibration: the 'gold' calibration of the paper's Section 3.

Default: the authors' ``gold-thinking`` data (uncc-efficient-ai/RESP,
``modules/data/data_prune_ds.py`` ``get_gsm8k_model_output_sample``, the ``'gold' in name`` branch,
selected by ``used_config: gold-thinking`` in ``configs/section5/main/gisp_gsm8k.yaml``): the
task prompt rendered with the chat template in thinking mode (``enable_thinking=True``,
generation prompt added), the gold solution as published (GSM8K's ``<<…>>`` calculator
annotations kept: the gsm8k task's ``reference_annotations: keep``) plus EOS as the target.  The
scorer masks the prompt (decode-only loss, as for self-generated traces), so GISP on this data
and RESP without regeneration differ only in the data: gold solution vs the model's own trace.

``pack: N`` cuts the calibration text into windows of N tokens, as the authors' Wanda-sp does
(``resp/pruners/wanda_sp.py`` ``wanda_sp.process_data``: every gold-thinking sample's prompt and
target tokens concatenated into one stream, ``split(seq_len)`` with ``seq_len: 256``).  Every
token of a window is a target.  The authors pad the last, shorter window with pad tokens that the
model then attends to; here the last window is kept shorter and unpadded.

Named options for what RESP shipped before (GISP as a full-sequence baseline):
``enable_thinking: false`` (the template's pre-filled empty ``<think></think>`` block), the
task's ``reference_annotations: strip`` (through ``task_params``), and the scorer's
``loss: full``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationError

from resp_core import hookimpl
from resp_core.errors import RespError
from resp_core.interfaces import CalibrationSample, CalibrationSource, Params, RunContext
from resp_core.validation import Count, first_error


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
        raise RespError(first_error(exc, f"{path}.params.task_params")) from None


def pack_windows(samples: list[CalibrationSample], size: int) -> list[CalibrationSample]:
    """Every sample's prompt and target tokens, concatenated in order and cut into windows of
    ``size`` tokens (the last one may be shorter); each window is all target."""
    stream = [t for s in samples for t in s.prompt_ids + s.target_ids]
    out = []
    for k, start in enumerate(range(0, len(stream), size)):
        window = stream[start : start + size]
        out.append(CalibrationSample([], window, {"source": "task_data", "window": k, "pack": size}))
    return out


class TaskData(CalibrationSource):
    """Task prompts with their human-written reference solutions (the authors' gold-thinking data)."""

    class Params(Params):
        num_samples: Count = 128
        task: str | None = None  # default: the recipe's task
        task_params: dict[str, Any] | None = None  # e.g. {data_dir: ...}; default: the recipe task's params
        split: str = "train"
        format: Literal["chat", "plain"] = "chat"  # chat template, or question + solution as plain text
        enable_thinking: bool = True  # chat format: the template's thinking mode (authors' gold-thinking)
        max_length: int | None = Field(None, ge=1)
        pack: int | None = Field(None, ge=1)  # cut the token stream into windows of this many tokens

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
                                                 enable_thinking=p.enable_thinking)
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
        return pack_windows(out, p.pack) if p.pack else out


@hookimpl
def register_calibration_sources(register):
    register("task_data", TaskData)
