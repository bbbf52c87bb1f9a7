"""lora_sft: LoRA fine-tuning of the pruned model with next-token cross-entropy on decode tokens,
as LLM-Pruner recovers its pruned models (horseee/LLM-Pruner, ``post_training.py``, ``main``:
LoRA r = 8, α = 16 on q/k/v/o/gate/down/up through peft, the prompt masked unless
``--train_on_inputs``).

Loss::

    L = − mean over decode tokens t of log q_S(x_t | x_<t)

``data: traces`` (default): the run's calibration traces (generation 0, the dense model's own
reasoning; prompt masked as in the scorer's decode-only loss).  ``data: gold``: the task's
human-written solutions (``split``, ``num_samples``; the same samples the ``task_data``
calibration source builds).  Differences from LLM-Pruner: the adapters are merged back into the
weights (LLM-Pruner saves them beside the model), training data are reasoning traces or the
task's gold solutions instead of Alpaca, and the number of optimizer steps is given instead of
epochs.
"""

from __future__ import annotations

from typing import Any, Literal

from resp_core import hookimpl
from resp_core.interfaces import RecoveryContext, Recoverer
from resp_core.recovery.divergence import decode_cross_entropy, decode_positions, logits_at
from resp_core.recovery.trainer import TrainingParams, train
from resp_core.validation import Count
from resp_plugins.calibration.task_data import TaskData


class LoraSFT(Recoverer):
    """LoRA with cross-entropy on decode tokens (traces or the task's gold solutions), as LLM-Pruner."""

    class Params(TrainingParams):
        mode: Literal["lora"] = "lora"
        data: Literal["traces", "gold"] = "traces"
        num_samples: Count = 128  # data: gold
        split: str = "train"  # data: gold
        task: str | None = None  # data: gold; default: the recipe's task
        task_params: dict[str, Any] | None = None

    def __init__(self, params: "LoraSFT.Params | None" = None):
        self.params = params or self.Params()

    def _gold(self) -> TaskData:
        p = self.params
        return TaskData(TaskData.Params(num_samples=p.num_samples, split=p.split, task=p.task,
                                        task_params=p.task_params, max_length=p.max_tokens))

    def check_recipe(self, recipe, path: str) -> None:
        self.params.check(path)
        if self.params.data == "gold":
            self._gold().check_recipe(recipe, path)

    def recover(self, ctx: RecoveryContext) -> dict:
        p = self.params
        samples = self._gold().build(ctx) if p.data == "gold" else ctx.samples

        def loss(model, batch, ids):
            where = decode_positions(batch.labels)
            logits = logits_at(model, batch.input_ids, batch.attention_mask, where)
            return decode_cross_entropy(logits, batch.labels[:, 1:][where])

        summary = train(ctx, p, samples, loss, f"Recovery (lora_sft, {p.data})", probe=ctx.samples)
        return {"data": p.data, "samples": len(samples), **summary}


@hookimpl
def register_recoverers(register):
    register("lora_sft", LoraSFT)
