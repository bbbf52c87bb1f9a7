"""Generation backend on transformers: batched ``generate`` with KV cache, chat template with
thinking mode, temperature / top-p / top-k / max-new-tokens, seeded per batch.

Prompts are sorted by length before batching (less padding) and results returned in input
order.  Each batch is seeded with ``sampling.seed + batch index`` so that a run is reproducible
for the same prompts, batch size and model.
"""

from __future__ import annotations

import torch

from resp_core import hookimpl
from resp_core.interfaces import Completion, Generator, Params, Progress, SamplingParams


class HFGenerator(Generator):
    """transformers generate(): batched, KV cache, chat template with thinking mode, seeded."""

    class Params(Params):
        batch_size: int = 64

    def __init__(self, params: "HFGenerator.Params | None" = None):
        self.params = params or self.Params()

    def prompt_text(self, messages: list[dict], enable_thinking: bool) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, enable_thinking=enable_thinking
        )

    @torch.no_grad()
    def generate(self, conversations, sampling: SamplingParams, progress: Progress | None = None,
                 description: str = "Generating") -> list[Completion]:
        tok, model = self.tokenizer, self.model
        was_training = model.training
        model.eval()
        eos = tok.eos_token_id
        pad = tok.pad_token_id if tok.pad_token_id is not None else eos
        encoded = [
            tok(self.prompt_text(c, sampling.enable_thinking), add_special_tokens=False)["input_ids"]
            for c in conversations
        ]
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        results: list[Completion | None] = [None] * len(encoded)
        bs = self.params.batch_size
        device = next(model.parameters()).device
        progress = progress or Progress()
        with progress.task(description, total=len(encoded)) as advance:
            for b, start in enumerate(range(0, len(order), bs)):
                idx = order[start : start + bs]
                width = max(len(encoded[i]) for i in idx)
                ids = torch.full((len(idx), width), pad, dtype=torch.long)
                att = torch.zeros((len(idx), width), dtype=torch.long)
                for r, i in enumerate(idx):  # left padding
                    ids[r, width - len(encoded[i]) :] = torch.tensor(encoded[i])
                    att[r, width - len(encoded[i]) :] = 1
                torch.manual_seed(sampling.seed + b)
                kwargs = dict(max_new_tokens=sampling.max_new_tokens, do_sample=sampling.do_sample,
                              pad_token_id=pad, eos_token_id=eos, use_cache=True)
                if sampling.do_sample:
                    kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k)
                else:
                    kwargs.update(temperature=None, top_p=None, top_k=None)
                out = model.generate(input_ids=ids.to(device), attention_mask=att.to(device), **kwargs)
                new = out[:, width:].tolist()
                for r, i in enumerate(idx):
                    seq = new[r]
                    finished = eos in seq
                    seq = seq[: seq.index(eos) + 1] if finished else [t for t in seq if t != pad]
                    text = tok.decode(seq, skip_special_tokens=False)
                    text = text.replace(tok.eos_token, "").replace(tok.pad_token or "\0", "")
                    results[i] = Completion(encoded[i], seq, text, finished)
                advance(len(idx))
        model.train(was_training)
        return results  # type: ignore[return-value]


@hookimpl
def register_generators(register):
    register("hf", HFGenerator)
