"""Generation backend on transformers: batched ``generate`` with KV cache, chat template with
thinking mode, temperature / top-p / top-k / max-new-tokens, seeded per batch.

The sampling loop (length-sorted batches, the tokenizer's own left padding, batch ``b`` seeded
with ``sampling.seed + b``) is :func:`resp_core.generation.sample`, shared by everything in RESP
that generates with transformers.
"""

from __future__ import annotations

from pydantic import Field

from resp_core import hookimpl
from resp_core.generation import encode, sample
from resp_core.interfaces import Completion, Generator, Params, Progress, SamplingParams


class HFGenerator(Generator):
    """transformers generate(): batched, KV cache, chat template with thinking mode, seeded."""

    class Params(Params):
        batch_size: int = Field(64, ge=1)

    def __init__(self, params: "HFGenerator.Params | None" = None):
        self.params = params or self.Params()

    def prompt_text(self, messages: list[dict], enable_thinking: bool) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, enable_thinking=enable_thinking
        )

    def generate(self, conversations, sampling: SamplingParams, progress: Progress | None = None,
                 description: str = "Generating") -> list[Completion]:
        texts = [self.prompt_text(c, sampling.enable_thinking) for c in conversations]
        return self.generate_text(texts, sampling, progress, description)

    def generate_text(self, prompts: list[str], sampling: SamplingParams, progress: Progress | None = None,
                      description: str = "Generating", add_special_tokens: bool = False) -> list[Completion]:
        ids = encode(self.tokenizer, prompts, add_special_tokens)
        return sample(self.model, self.tokenizer, ids, sampling, self.params.batch_size, progress, description)


@hookimpl
def register_generators(register):
    register("hf", HFGenerator)
