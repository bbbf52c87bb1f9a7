"""GSM8K (Cobbe et al., 2021): grade-school math word problems with a numeric final answer.

Items come from a local folder holding ``train.jsonl`` / ``test.jsonl`` (the files of
``openai/grade-school-math``) when ``data_dir`` is set, else from the Hugging Face hub.
Each item's ``answer`` is the gold number normalized (``"1,080"`` -> ``"1080"``); its
``reference`` is the human solution ending in its ``#### N`` line, with the ``<<...>>``
calculator annotations kept as published (``reference_annotations: keep``, what the authors'
gold calibration trains on: uncc-efficient-ai/RESP ``modules/data/data_prune_ds.py``
``get_gsm8k_model_output_sample``) or removed (``strip``).

Answer extraction looks only at the text after the last ``</think>`` (when there is one):
strict forms first (``\\boxed{N}``, then ``#### N``, then ``answer is N``), else the last
number in the text.
"""

from __future__ import annotations

import json
import math
import re
from decimal import Decimal, InvalidOperation, localcontext
from fractions import Fraction
from pathlib import Path
from typing import Literal

from resp_core import hookimpl
from resp_plugins.tasks.answer_text import after_think, boxed_contents
from resp_plugins.tasks.hub import hub_rows
from resp_plugins.tasks.subsets import pick_subset
from resp_core.errors import RespError
from resp_core.interfaces import Params, Task, TaskItem

SPLITS = ("train", "test")
DEFAULT_SUFFIX = "\nPlease reason step by step, and put your final answer within \\boxed{}."

# --------------------------------------------------------------------------------------------------
# Numbers
# --------------------------------------------------------------------------------------------------

# an unsigned number: 1,234,567 or 1234 or 3.5 or .5
_UNUM = r"(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"
# a sign that belongs to the number: not the minus of "5-3" or "x-3"
_SIGN = r"(?:(?<![\w)\]}.])[-−])?"
_NUMBER_RE = re.compile(_SIGN + _UNUM)
# flexible matching also takes an unspaced fraction such as 3/4
_FLEX_RE = re.compile(_SIGN + _UNUM + r"(?:/\d+(?:\.\d+)?)?")
_MIXED_RE = re.compile(r"([-−]?)(\d+)\s+(\d+)\s*/\s*(\d+)")  # 1 1/2
_FRACTION_RE = re.compile(r"([-−]?\s*" + _UNUM + r")\s*/\s*(" + _UNUM + r")")
_LATEX_FRAC_RE = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_LATEX_TEXT_RE = re.compile(r"\\(?:text|textbf|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")


def _to_decimal(s: str) -> Decimal:
    return Decimal(s.replace(",", "").replace("−", "-").replace(" ", ""))


def _format(value: Decimal) -> str:
    if value == value.to_integral_value():
        return str(int(value))
    text = format(value.normalize(), "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def normalize_number(s: str | None) -> str | None:
    """Canonical text of the number in ``s``, or None if there is none.

    Strips ``$``, thousands separators, a trailing period and units; ``'18.00'`` -> ``'18'``,
    ``'-3'`` -> ``'-3'``, ``'3/4'`` and ``'\\frac{3}{4}'`` -> ``'0.75'``, ``'1 1/2'`` -> ``'1.5'``.
    When the text is an equation (``'12 + 6 = 18'``), the part after the last ``=`` counts.
    """
    if s is None:
        return None
    t = str(s).strip()
    if not t:
        return None
    t = _LATEX_TEXT_RE.sub(r" \1 ", t)
    for _ in range(3):  # \frac nested at most a little
        t = _LATEX_FRAC_RE.sub(r"(\1)/(\2)", t)
    t = re.sub(r"\\[,!;: ]|\\left|\\right|\\\$|\\%|\\cdot", " ", t)
    t = t.replace("$", " ").replace("{", " ").replace("}", " ")
    if "=" in t:
        t = t.rsplit("=", 1)[1]
    t = re.sub(r"\(\s*([-−]?[\d.,]+)\s*\)", r"\1", t)  # (3)/(4) -> 3/4
    t = t.strip()
    try:
        m = _MIXED_RE.match(t)
        if m and not re.match(r"\s*[\d.]", t[m.end():]):
            value = Fraction(int(m.group(2))) + Fraction(int(m.group(3)), int(m.group(4)))
            if m.group(1):
                value = -value
            return _format_fraction(value)
        m = _FRACTION_RE.search(t)
        first = _NUMBER_RE.search(t)
        if m and first and m.start() <= first.start() + 1:
            num, den = _to_decimal(m.group(1)), _to_decimal(m.group(2))
            if den == 0:
                return None
            return _format_fraction(Fraction(num) / Fraction(den))
        if first is None:
            return None
        return _format(_to_decimal(first.group(0)))
    except (InvalidOperation, ValueError, ZeroDivisionError):
        return None


def _format_fraction(value: Fraction) -> str:
    with localcontext() as ctx:
        ctx.prec = 15
        return _format(Decimal(value.numerator) / Decimal(value.denominator))


def _as_float(s: str | None) -> float | None:
    if s is None:
        return None
    try:
        return float(s)
    except ValueError:
        return None


# --------------------------------------------------------------------------------------------------
# Answer extraction
# --------------------------------------------------------------------------------------------------

# "#### N" only when a number follows (not a markdown heading such as "#### Step 1")
_HASHES_RE = re.compile(r"####[ \t]*((?:\\?\$)?[ \t]*[-−]?[ \t]*\.?\d[^\n]*)")
_ANSWER_IS_RE = re.compile(
    r"answer\s*(?:is|:)\s*:?[\s*:]*((?:\\\$|\$|\\\(|\\\[)?\s*[-−]?\s*[\d.,]*\d(?:\s*/\s*\d+)?)",
    re.IGNORECASE,
)


def extract_strict(text: str) -> str | None:
    """The normalized number of an explicit final-answer form, or None.

    Tried in order, each taking its last occurrence: ``\\boxed{N}``, ``#### N``, ``answer is N``
    (also ``answer: N``).  Only the text after the last ``</think>`` is read."""
    if not text:
        return None
    tail = after_think(text)
    boxes = boxed_contents(tail)
    if boxes:  # a last box holding no number falls through to the other forms
        got = normalize_number(boxes[-1])
        if got is not None:
            return got
    for m in reversed(list(_HASHES_RE.finditer(tail))):
        got = normalize_number(m.group(1))
        if got is not None:
            return got
    for m in reversed(list(_ANSWER_IS_RE.finditer(tail))):
        got = normalize_number(m.group(1))
        if got is not None:
            return got
    return None


def extract_flexible(text: str) -> str | None:
    """The normalized last number in the text after the last ``</think>``, or None."""
    if not text:
        return None
    found = _FLEX_RE.findall(after_think(text))
    for cand in reversed(found):
        got = normalize_number(cand)
        if got is not None:
            return got
    return None


# --------------------------------------------------------------------------------------------------
# The task
# --------------------------------------------------------------------------------------------------

def _gold(answer: str) -> str | None:
    if "####" not in answer:
        return None
    return normalize_number(answer.rsplit("####", 1)[1])


def _reference(answer: str, annotations: str = "keep") -> str:
    text = answer if annotations == "keep" else re.sub(r"<<[^>]*>>", "", answer)
    return text.rstrip()


class NumericAnswerTask(Task):
    """A task whose answer is a number: the strict "#### N" / "The answer is N" form first, else the
    last number; correct when it equals the gold number (GSM8K, word_arith)."""

    def extract_answer(self, completion: str) -> str | None:
        got = extract_strict(completion)
        return got if got is not None else extract_flexible(completion)

    def is_correct(self, completion: str, item: TaskItem) -> bool:
        got = _as_float(self.extract_answer(completion))
        gold = _as_float(normalize_number(item.answer))
        return got is not None and gold is not None and math.isclose(got, gold, rel_tol=1e-9, abs_tol=1e-6)


class GSM8K(NumericAnswerTask):
    """GSM8K grade-school math word problems; numeric answers compared with a 1e-6 tolerance."""

    name = "gsm8k"
    splits = SPLITS

    class Params(Params):
        data_dir: str | None = None  # folder with train.jsonl / test.jsonl; None = load from the hub
        hub_id: str = "openai/gsm8k"
        hub_config: str = "main"
        prompt_suffix: str = DEFAULT_SUFFIX
        reference_annotations: Literal["keep", "strip"] = "keep"  # GSM8K's <<...>> calculator annotations

    def __init__(self, params: "GSM8K.Params | None" = None):
        self.params = params or self.Params()
        self._rows: dict[str, list[dict]] = {}

    # -- data ------------------------------------------------------------------------------------

    def _load(self, split: str) -> list[dict]:
        if split not in SPLITS:
            raise RespError(f"gsm8k has splits 'train' and 'test', not {split!r}")
        if split not in self._rows:
            rows = self._load_local(split) if self.params.data_dir else self._load_hub(split)
            self._rows[split] = rows
        return self._rows[split]

    def _load_local(self, split: str) -> list[dict]:
        folder = Path(self.params.data_dir).expanduser()
        if not folder.is_dir():
            raise RespError(f"gsm8k: data_dir {str(folder)!r} is not a folder")
        path = folder / f"{split}.jsonl"
        if not path.is_file():
            raise RespError(f"gsm8k: missing file {str(path)!r} (data_dir must hold train.jsonl and test.jsonl)")
        rows = []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise RespError(f"gsm8k: {path}:{lineno}: not valid JSON ({exc.msg})") from None
                rows.append(self._check(obj, f"{path}:{lineno}"))
        if not rows:
            raise RespError(f"gsm8k: {path} holds no items")
        return rows

    def _load_hub(self, split: str) -> list[dict]:
        p = self.params
        rows = hub_rows("gsm8k", p.hub_id, split, p.hub_config)
        return [self._check(row, f"{p.hub_id}[{split}][{i}]") for i, row in enumerate(rows)]

    @staticmethod
    def _check(obj, where: str) -> dict:
        if not isinstance(obj, dict):
            raise RespError(f"gsm8k: {where}: expected an object with fields 'question' and 'answer'")
        missing = [k for k in ("question", "answer") if not isinstance(obj.get(k), str)]
        if missing:
            raise RespError(f"gsm8k: {where}: missing field(s) {', '.join(repr(k) for k in missing)}")
        if _gold(obj["answer"]) is None:
            raise RespError(f"gsm8k: {where}: 'answer' does not end in a '#### <number>' line")
        return obj

    def split_size(self, split: str) -> int | None:
        """Known for local files (read and checked now, before any run); None for the hub."""
        return len(self._load(split)) if self.params.data_dir and split in SPLITS else None

    def items(self, split: str, count: int | None, seed: int) -> list[TaskItem]:
        rows = self._load(split)
        out = []
        for i in pick_subset(len(rows), count, seed):
            row = rows[i]
            out.append(TaskItem(
                id=f"gsm8k-{split}-{i}",
                messages=[{"role": "user", "content": row["question"] + self.params.prompt_suffix}],
                answer=_gold(row["answer"]),
                reference=_reference(row["answer"], self.params.reference_annotations),
                meta={"split": split, "index": i},
            ))
        return out


@hookimpl
def register_tasks(register):
    register("gsm8k", GSM8K)
