"""Offline byte-level BPE tokenizer for the testbed, with Qwen3's special tokens and chat template.

Digits are split one per token (as Qwen's tokenizers do), the byte-level alphabet guarantees
that any text (GSM8K, MathQA) can be encoded, and the chat template follows Qwen3's thinking
mode: ``enable_thinking=False`` pre-fills an empty ``<think>\\n\\n</think>\\n\\n`` block.
"""

from __future__ import annotations

import random

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from . import task

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
THINK_START = "<think>"
THINK_END = "</think>"
SPECIAL_TOKENS = [PAD_TOKEN, IM_START, IM_END, THINK_START, THINK_END]

# Qwen3's template reduced to what the testbed needs: roles, generation prompt, thinking switch.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)


def _corpus(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    out = []
    for p in task.problems(seed, n, "train"):
        out.append(p.prompt(rng.randrange(8)))
        out.append(task.thinking_response(p, rng))
        out.append(task.reference_solution(p))
    # A little generic English so GSM8K/MathQA prompts do not tokenize to raw bytes only.
    out += [
        "The question asks how many dollars she makes every day. Answer the following question.",
        "Let's think step by step. The total number of apples and oranges is the sum of both.",
        "Options: a ) 38 , b ) 27 , c ) 30 , d ) data inadequate , e ) none of these",
    ] * 20
    return out


def build_tokenizer(vocab_size: int = 512, seed: int = 0) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    # One token per digit, a leading space glued to the first digit (" 4", "7"), then GPT-2 style
    # byte-level chunks for everything else.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r" ?[0-9]"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(seed, 3000), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD_TOKEN,
        eos_token=IM_END,
        additional_special_tokens=[IM_START, THINK_START, THINK_END],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "left"
    return fast
