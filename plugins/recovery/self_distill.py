"""self_distill: the pruned model learns the dense model's next-token distributions on the run's
own calibration traces (decode tokens only).

Loss (per decode token, averaged over a batch's decode tokens; see
:mod:`resp_core.recovery.divergence`)::

    L = τ² · D(p_T ‖ q_S)     p_T: the dense model's distribution at temperature τ, kept as its
                               top-k log-probabilities plus one tail bucket (stored before pruning)
                               q_S: the pruned model's distribution at τ, coarsened the same way
    D = KL(p‖q) (forward, default) | KL(q‖p) (reverse) | JS(p, q) (js)

Knowledge distillation (Hinton et al. 2015) on self-generated sequences is sequence-level
self-distillation (Kim & Rush 2016); reverse KL follows MiniLLM (Gu et al. 2024).  The traces are
calibration generation 0 (the dense model's), the same tokens and the same mask as the scorer's
decode-only loss (prompt masked).  ``mode: lora`` trains LoRA adapters (merged back at the end),
``mode: full`` the kept projection weights.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from resp_core import hookimpl
from resp_core.errors import RespError
from resp_core.interfaces import RecoveryContext, Recoverer, TeacherSpec
from resp_core.recovery.divergence import decode_positions, distill_loss, logits_at
from resp_core.recovery.teacher import TeacherLogits
from resp_core.recovery.trainer import TrainingParams, train


class SelfDistill(Recoverer):
    """Self-distillation: the pruned model learns the dense model's top-k token distributions on the traces."""

    class Params(TrainingParams):
        divergence: Literal["forward", "reverse", "js"] = "forward"
        top_k: int = Field(32, ge=1, le=4096)  # teacher log-probabilities kept per decode token
        tail: Literal["bucket", "renormalize"] = "bucket"  # the other tokens as one outcome, or dropped
        temperature: float = Field(1.0, ge=0.05, le=20.0)
        teacher_batch_size: int = Field(4, ge=1, le=4096)  # sequences per forward pass of the dense model

    def __init__(self, params: "SelfDistill.Params | None" = None):
        self.params = params or self.Params()

    def check_recipe(self, recipe, path: str) -> None:
        self.params.check(path)

    def teacher(self) -> TeacherSpec:
        p = self.params
        return TeacherSpec(top_k=p.top_k, temperature=p.temperature, max_tokens=p.max_tokens,
                           batch_size=p.teacher_batch_size)

    def recover(self, ctx: RecoveryContext) -> dict:
        p = self.params
        if ctx.teacher_file is None:
            raise RespError("recovery: self_distill has no teacher file (recovery/teacher_topk.safetensors)")
        teacher = TeacherLogits.load(ctx.teacher_file, self.teacher(), len(ctx.samples))

        def loss(model, batch, ids):
            where = decode_positions(batch.labels)
            idx, logp = teacher.rows(ids)
            if int(where.sum()) != idx.shape[0]:
                raise RespError(f"recovery: the teacher file has {idx.shape[0]} decode positions for samples {ids}, "
                                f"the traces {int(where.sum())}; it was computed on other traces")
            logits = logits_at(model, batch.input_ids, batch.attention_mask, where)
            return distill_loss(logits, idx.to(logits.device), logp, p.divergence, p.tail, p.temperature)

        summary = train(ctx, p, ctx.samples, loss, f"Recovery (self_distill, {p.divergence} KL)"
                        if p.divergence != "js" else "Recovery (self_distill, JS)")
        return {"divergence": p.divergence, "top_k": p.top_k, "tail": p.tail, "temperature": p.temperature,
                **summary}


@hookimpl
def register_recoverers(register):
    register("self_distill", SelfDistill)
