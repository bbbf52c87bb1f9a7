"""One-step arithmetic (``a + b``, ``a - b``), bare or as a short word problem, generated offline.

A task a small instruction-tuned model actually solves, so that pruning damage shows on an
accuracy that starts high (GSM8K accuracy of a 135M model is near zero before any pruning).

Every problem is a triple (operation, a, b) with ``min_operand <= a, b <= max_operand`` (for
``sub``, ``a >= b``: answers are never negative).  A triple belongs to the test split when the
first 8 bytes of ``sha256("<op>:<a>:<b>")`` fall in the lowest ``test_fraction`` of their range,
else to the train split: the splits are disjoint by construction, and a triple's split does not
depend on the operand range or on any seed.  ``items(split, count, seed)`` draws ``count``
triples of the split reproducibly by ``seed``; the wording of a word problem (name, object,
phrasing) is fixed per triple.

Prompts (``style``):

* ``bare``: ``What is 7 + 5?``
* ``word``: ``Tom has 7 apples. He buys 5 more. How many apples does Tom have now?``
  (``sub``: ``... He gives 5 of them to a friend. How many apples does Tom have left?``)

followed by ``prompt_suffix`` (none by default).  With ``fewshot: k`` the conversation starts
with k solved problems of the train split as earlier user/assistant turns (each answered by its
reference solution), chosen per triple and never the triple itself: a test item's examples are
train triples, so no test answer leaks.  A small chat model then answers in the same short form.

The defaults (``add``, ``bare``, operands 1-12, two examples: 107 train and 37 test problems) are
the setting the dense SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized) solves: 86% greedy, 81% at
T=0.6 (seeds 0/1/2: 76/84/84%); without the examples 38% greedy, as word problems with two
examples 32% (every candidate measured: docs/evaluation.md, "word_arith").

Answers are read as GSM8K's are (strict forms ``\\boxed{N}``, ``#### N``, ``answer is N`` first,
else the last number after any ``</think>``) and compared as numbers.  The reference solution
(``task_data`` calibration, and the examples' answers) is one line: ``7 + 5 = 12. The answer is 12.``
"""

from __future__ import annotations

import hashlib
import random
from typing import Literal

from pydantic import Field, model_validator

from resp_core import hookimpl
from resp_core.errors import RespError
from resp_core.interfaces import Params, TaskItem
from resp_plugins.tasks.gsm8k import NumericAnswerTask
from resp_plugins.tasks.subsets import pick_subset

SPLITS = ("train", "test")
SYMBOL = {"add": "+", "sub": "-"}

NAMES = [("Tom", "He"), ("Anna", "She"), ("Ben", "He"), ("Maria", "She"), ("Sam", "He"), ("Lucy", "She"),
         ("Jack", "He"), ("Emma", "She")]
OBJECTS = ["apples", "pencils", "books", "marbles", "cookies", "stickers", "toy cars", "shells"]
WORD_FORMS = {
    "add": [
        "{name} has {a} {obj}. {pron} buys {b} more. How many {obj} does {name} have now?",
        "{name} had {a} {obj}. {pron} found {b} more. How many {obj} does {name} have now?",
        "{name} has {a} {obj} and gets {b} more from a friend. How many {obj} does {name} have in total?",
    ],
    "sub": [
        "{name} has {a} {obj}. {pron} gives {b} of them to a friend. How many {obj} does {name} have left?",
        "{name} had {a} {obj}. {pron} lost {b} of them. How many {obj} does {name} have left?",
        "{name} had {a} {obj} and sold {b} of them. How many {obj} does {name} have left?",
    ],
}


def problem_hash(op: str, a: int, b: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{op}:{a}:{b}".encode()).digest()[:8], "big")


def split_of(op: str, a: int, b: int, test_fraction: float) -> str:
    """``test`` or ``train``: fixed per triple, independent of the operand range and of seeds."""
    return "test" if problem_hash(op, a, b) < test_fraction * 2**64 else "train"


class WordArithmetic(NumericAnswerTask):
    """One-step addition/subtraction, bare or as a word problem; splits disjoint by construction."""

    name = "word_arith"
    splits = SPLITS

    class Params(Params):
        ops: list[Literal["add", "sub"]] = Field(default_factory=lambda: ["add"], min_length=1)
        style: Literal["bare", "word"] = "bare"
        min_operand: int = Field(1, ge=0, le=10_000)
        max_operand: int = Field(12, ge=1, le=10_000)
        test_fraction: float = Field(0.25, gt=0, lt=1)
        prompt_suffix: str = ""  # appended to every prompt, e.g. " Answer with a number."
        fewshot: int = Field(2, ge=0, le=16)  # solved train problems before the question, as chat turns

        @model_validator(mode="after")
        def _range(self):
            if self.max_operand < self.min_operand:
                raise ValueError(f"max_operand ({self.max_operand}) is below min_operand ({self.min_operand})")
            if len(set(self.ops)) != len(self.ops):
                raise ValueError("each operation may be listed once")
            return self

    def __init__(self, params: "WordArithmetic.Params | None" = None):
        self.params = params or self.Params()
        self._pools: dict[str, list[tuple[str, int, int]]] = {}

    def _pool(self, split: str) -> list[tuple[str, int, int]]:
        if split not in SPLITS:
            raise RespError(f"word_arith has splits 'train' and 'test', not {split!r}")
        if split not in self._pools:
            p = self.params
            r = range(p.min_operand, p.max_operand + 1)
            n = len(r)
            if sum(n * n if op == "add" else n * (n + 1) // 2 for op in p.ops) > 2_000_000:
                raise RespError("word_arith: the operand range gives more than 2,000,000 problems; "
                                "lower max_operand")
            triples = [(op, a, b) for op in p.ops for a in r for b in r if op == "add" or a >= b]
            for s in SPLITS:
                self._pools[s] = [t for t in triples if split_of(*t, p.test_fraction) == s]
        return self._pools[split]

    def split_size(self, split: str) -> int | None:
        return len(self._pool(split)) if split in SPLITS else None

    def prompt(self, op: str, a: int, b: int) -> str:
        if self.params.style == "bare":
            text = f"What is {a} {SYMBOL[op]} {b}?"
        else:
            rng = random.Random(problem_hash(op, a, b))
            name, pron = rng.choice(NAMES)
            obj = rng.choice(OBJECTS)
            text = rng.choice(WORD_FORMS[op]).format(name=name, pron=pron, obj=obj, a=a, b=b)
        return text + self.params.prompt_suffix

    @staticmethod
    def solution(op: str, a: int, b: int) -> str:
        c = a + b if op == "add" else a - b
        return f"{a} {SYMBOL[op]} {b} = {c}. The answer is {c}."

    def examples(self, op: str, a: int, b: int) -> list[dict]:
        """The ``fewshot`` solved train problems shown before triple (op, a, b), as chat turns."""
        k = self.params.fewshot
        if not k:
            return []
        train = [t for t in self._pool("train") if t != (op, a, b)]
        if len(train) < k:
            raise RespError(f"word_arith: fewshot {k} needs at least {k + 1} train problems; the operand range "
                            f"gives {len(self._pool('train'))}")
        rng = random.Random(problem_hash(op, a, b) + 1)
        turns = []
        for t in rng.sample(train, k):
            turns += [{"role": "user", "content": self.prompt(*t)}, {"role": "assistant", "content": self.solution(*t)}]
        return turns

    def items(self, split: str, count: int | None, seed: int) -> list[TaskItem]:
        pool = self._pool(split)
        if not pool:
            raise RespError(f"word_arith: the {split} split is empty for this operand range; widen it")
        out = []
        for i in pick_subset(len(pool), count, seed):
            op, a, b = pool[i]
            out.append(TaskItem(
                id=f"word_arith-{split}-{op}-{a}-{b}",
                messages=self.examples(op, a, b) + [{"role": "user", "content": self.prompt(op, a, b)}],
                answer=str(a + b if op == "add" else a - b),
                reference=self.solution(op, a, b),
                meta={"split": split, "op": op, "a": a, "b": b},
            ))
        return out


@hookimpl
def register_tasks(register):
    register("word_arith", WordArithmetic)
