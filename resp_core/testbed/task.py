"""The testbed reasoning task: multi-step two-digit addition/subtraction chains.

A problem is a start value and 3-5 signed two-digit operands; every intermediate result, in
either reasoning order, stays within [0, 99].  The model is trained on two
answer styles, as a real reasoning model is:

* *thinking traces* (``<think> ... </think>`` then a one-line answer), varied the way a sampled
  chain of thought is varied: several valid orders of the steps (left to right, or additions
  first and subtractions after), several phrasings per step, optional announcements and an
  optional verification pass;
* terse *human-written* reference solutions (``47+23=70, 70-15=55 #### 55``) in another format,
  given in non-thinking mode.  They play the role GSM8K's labels play against Qwen3's traces.

Everything is generated from a seed, so train and test problems are reproducible; test problems
use a disjoint seed stream.
"""

from __future__ import annotations

import random
import re
import zlib
from dataclasses import dataclass

MIN_STEPS = 3
MAX_STEPS = 5
SYSTEM_PROMPT = None  # the testbed uses no system prompt, like Qwen3's default

_PROMPT_FORMS = (
    "Compute {expr}.",
    "What is {expr}?",
    "Work out {expr}.",
    "Calculate {expr} step by step.",
)


@dataclass(frozen=True)
class Problem:
    start: int
    operands: tuple[int, ...]  # signed: +23 means add 23, -15 means subtract 15

    @property
    def answer(self) -> int:
        return self.start + sum(self.operands)

    @property
    def expression(self) -> str:
        parts = [str(self.start)]
        for op in self.operands:
            parts.append(("+ " if op > 0 else "- ") + str(abs(op)))
        return " ".join(parts)

    def prompt(self, form: int = 0) -> str:
        return _PROMPT_FORMS[form % len(_PROMPT_FORMS)].format(expr=self.expression)

    def to_json(self) -> dict:
        return {"start": self.start, "operands": list(self.operands), "answer": self.answer}

    @classmethod
    def from_json(cls, obj: dict) -> "Problem":
        return cls(int(obj["start"]), tuple(int(x) for x in obj["operands"]))


def _split(rng: random.Random, total: int, parts: int) -> list[int]:
    """``parts`` non-negative ints summing to ``total``, uniformly over compositions."""
    cuts = sorted(rng.randint(0, total) for _ in range(parts - 1))
    return [b - a for a, b in zip([0] + cuts, cuts + [total])]


def split_of(p: Problem) -> str:
    """'test' for a fixed tenth of all problems (by a stable hash), 'train' for the rest, so
    held-out problems can never appear in training, whatever the seeds."""
    return "test" if zlib.crc32(p.expression.encode()) % 10 == 0 else "train"


def sample_problem(rng: random.Random, split: str = "train") -> Problem:
    """Every operand is two-digit; the additions never take the total above 99 and the
    subtractions never take it below 0 *in any order*, so left-to-right and additions-first
    reasoning are both valid and every intermediate result is a number in [0, 99].
    Problems are drawn from ``split``'s part of the problem space (see :func:`split_of`)."""
    while True:
        n = rng.randint(MIN_STEPS, MAX_STEPS)
        start = rng.randint(10, 99)
        k = rng.randint(0, n)  # additions; n - k subtractions
        slack_add = 99 - start - 10 * k
        slack_sub = start - 10 * (n - k)
        if slack_add < 0 or slack_sub < 0:
            continue
        adds = [10 + x for x in _split(rng, rng.randint(0, slack_add), k)] if k else []
        subs = [10 + x for x in _split(rng, rng.randint(0, slack_sub), n - k)] if n - k else []
        ops = adds + [-x for x in subs]
        rng.shuffle(ops)
        p = Problem(start, tuple(ops))
        if split_of(p) == split:
            return p


def problems(seed: int, count: int, split: str = "train") -> list[Problem]:
    """``count`` problems for ``split`` (train, test or calib): disjoint parts of the problem space
    for train and test (see :func:`split_of`), and separate seed streams for every split."""
    offset = {"train": 0, "test": 1_000_003, "calib": 2_000_029}[split]
    rng = random.Random(seed * 7919 + offset)
    part = "test" if split == "test" else "train"
    return [sample_problem(rng, part) for _ in range(count)]


# ----------------------------------------------------------------------------------------------
# Answer styles
# ----------------------------------------------------------------------------------------------

def _step(rng: random.Random, a: int, b: int, c: int) -> str:
    sign = "+" if b > 0 else "-"
    word = "plus" if b > 0 else "minus"
    verb = "Add" if b > 0 else "Subtract"
    forms = (
        f"{a} {sign} {abs(b)} = {c}.",
        f"{a} {word} {abs(b)} is {c}.",
        f"{verb} {abs(b)}: {a} {sign} {abs(b)} = {c}.",
        f"Then {a} {sign} {abs(b)} = {c}.",
    )
    return forms[rng.randrange(len(forms))]


def _left_to_right(rng: random.Random, p: Problem) -> list[str]:
    lines = []
    if rng.random() < 0.5:
        lines.append(rng.choice(("I will go left to right.", "Let me go step by step.", "One step at a time.")))
    total = p.start
    for b in p.operands:
        lines.append(_step(rng, total, b, total + b))
        total += b
    return lines


def _grouped(rng: random.Random, p: Problem) -> list[str]:
    adds = [b for b in p.operands if b > 0]
    subs = [-b for b in p.operands if b < 0]
    lines = [rng.choice(("First the additions, then the subtractions.", "Let me add everything first."))]
    total = p.start
    for b in adds:
        lines.append(_step(rng, total, b, total + b))
        total += b
    if subs:
        lines.append(rng.choice(("Now the subtractions.", "Now subtract.")))
    for s in subs:
        lines.append(_step(rng, total, -s, total - s))
        total -= s
    return lines


def _check(rng: random.Random, p: Problem) -> list[str]:
    last = p.operands[-1]
    before = p.answer - last
    return [f"Check: {p.answer} {'-' if last > 0 else '+'} {abs(last)} = {before}. Correct."]


def thinking_response(p: Problem, rng: random.Random) -> str:
    """A sampled-looking chain of thought followed by the final answer line."""
    lines = list(_left_to_right(rng, p) if rng.random() < 0.6 else _grouped(rng, p))
    if rng.random() < 0.3:
        lines += _check(rng, p)
    answer = rng.choice((f"The answer is {p.answer}.", f"So the result is {p.answer}. The answer is {p.answer}."))
    return "<think>\n" + "\n".join(lines) + "\n</think>\n\n" + answer


def reference_solution(p: Problem) -> str:
    """The terse human-style worked solution (one fixed format, GSM8K-like ``#### N`` line)."""
    total, parts = p.start, []
    for b in p.operands:
        parts.append(f"{total}{'+' if b > 0 else '-'}{abs(b)}={total + b}")
        total += b
    return ", ".join(parts) + f" #### {p.answer}"


_ANSWER_PATTERNS = (
    re.compile(r"answer is\s*(-?\d+)"),
    re.compile(r"####\s*(-?\d+)"),
)


def extract_answer(text: str) -> int | None:
    """Final answer of a completion: after ``</think>`` if present; ``answer is N`` or ``#### N``."""
    tail = text.split("</think>")[-1]
    for pat in _ANSWER_PATTERNS:
        found = pat.findall(tail)
        if found:
            return int(found[-1])
    return None
