"""MathQA (Amini et al., NAACL 2019): five-option multiple-choice math word problems.

Items come from a local folder holding the official ``train.json`` / ``dev.json`` /
``test.json`` (split ``"validation"`` reads ``dev.json``) when ``data_dir`` is set, else from
the Hugging Face hub.  The gold ``answer`` is the correct option's letter (``a``..``e``); the
``reference`` is the rationale (literal surrounding quotes stripped) followed by ``#### <letter>``.

The ``options`` field comes in two forms, both handled by :func:`parse_options`:
``"a ) 38 , b ) 27.675 , c ) 30 , ..."`` and the list-like ``"['a ) 4', 'b ) 4 π', ...]"``.
"""

from __future__ import annotations

import ast
import json
import re
from typing import Literal
from pathlib import Path

from resp_core import hookimpl
from resp_plugins.tasks.answer_text import after_think, boxed_contents
from resp_plugins.tasks.hub import hub_rows
from resp_plugins.tasks.subsets import pick_subset
from resp_core.errors import RespError
from resp_core.interfaces import Params, Task, TaskItem

LETTERS = "abcde"
SPLITS = ("train", "validation", "test")
_SPLIT_ALIASES = {"dev": "validation", "val": "validation"}
_FILES = {"train": "train.json", "validation": "dev.json", "test": "test.json"}
_FIELDS = ("Problem", "Rationale", "options", "correct")
DEFAULT_INSTRUCTION = "Answer with the letter of the correct option, e.g. \\boxed{a}."

# --------------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------------

_LABEL_RE = re.compile(r"^\s*([a-eA-E])\s*\)\s*")


def _clean_option(text: str) -> str:
    text = text.strip().rstrip(",").strip()
    # some items repeat the label: "a ) a ) 10,700", once even as "e ) d ) 36"
    m = _LABEL_RE.match(text)
    if m and text[m.end():].strip():
        text = text[m.end():].strip()
    return text


def _parse_list(items) -> dict[str, str]:
    out: dict[str, str] = {}
    for i, item in enumerate(items):
        text = str(item)
        m = _LABEL_RE.match(text)
        if m:
            letter = m.group(1).lower()
            text = text[m.end():]
        elif i < len(LETTERS):
            letter = LETTERS[i]
        else:
            continue
        if letter not in out:
            out[letter] = _clean_option(text)
    return out


def _parse_string(s: str) -> dict[str, str]:
    """Sequential scan for the labels a ) .. e ); each label after the first is looked for after
    a comma first (so commas inside options, as in "1,200", never split them)."""
    m = re.match(r"\s*[\[(]?\s*['\"]?\s*([aA])\s*\)", s)
    if not m:
        return {}
    starts = [(LETTERS[0], m.start(1), m.end())]
    pos = m.end()
    for letter in LETTERS[1:]:
        pat_comma = re.compile(r",\s*['\"]?\s*(" + letter + r")\s*\)", re.IGNORECASE)
        pat_bare = re.compile(r"(?<![\w])(" + letter + r")\s*\)", re.IGNORECASE)
        nxt = pat_comma.search(s, pos) or pat_bare.search(s, pos)
        if not nxt:
            break
        starts.append((letter, nxt.start(), nxt.end()))
        pos = nxt.end()
    bracketed = s.lstrip().startswith("[") and s.rstrip().endswith("]")
    out = {}
    for k, (letter, _, body_start) in enumerate(starts):
        body_end = starts[k + 1][1] if k + 1 < len(starts) else len(s)
        text = s[body_start:body_end]
        if bracketed and k + 1 == len(starts):  # a list-like string literal_eval could not read
            text = text.rstrip()[:-1]
        out[letter] = _clean_option(text.strip().strip("'\"").strip())
    return out


def parse_options(s: str) -> dict[str, str]:
    """The options of a MathQA item as ``{'a': '38', 'b': '27.675', ...}``.

    Handles ``"a ) 38 , b ) 1,200 , ..."`` and the list-like ``"['a ) 4', 'b ) 4 π', ...]"``
    (read with :func:`ast.literal_eval`, never ``eval``).  Returns whatever labels it finds
    (normally exactly a..e); an unparseable string gives ``{}``."""
    if isinstance(s, (list, tuple)):
        return _parse_list(s)
    s = str(s or "").strip()
    if s.startswith("["):
        try:
            value = ast.literal_eval(s)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            value = None
        if isinstance(value, (list, tuple)):
            parsed = _parse_list(value)
            if parsed:
                return parsed
    return _parse_string(s)


# --------------------------------------------------------------------------------------------------
# Answer extraction
# --------------------------------------------------------------------------------------------------

_LATEX_TEXT_RE = re.compile(r"\\(?:text|textbf|textrm|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")
_BOX_LETTER_RE = re.compile(
    r"^(?:(?:option|choice)\s*)?[(\[]?\s*([a-eA-E])\s*(?:[)\]]|[.:,]|\s|$)", re.IGNORECASE
)
# a letter after "answer is" / "answer:" must be parenthesised or end its phrase
# ("the answer is a bit larger" gives nothing)
_ANSWER_RE = re.compile(
    r"answer\s*(?:is|:)[\s:*$]*(?:(?:option|choice)[\s:*]*)?(?:\\text(?:bf)?\{)?\s*"
    r"(?:\(\s*([a-eA-E])\s*\)|([a-eA-E])(?=\s*(?:$|[.,;:!*)\]}$\n])|\s+[-–—]))",
    re.IGNORECASE,
)
_PAREN_RE = re.compile(r"(?<![\w\\])\(\s*([a-eA-E])\s*\)")


def _box_letter(content: str) -> str | None:
    c = _LATEX_TEXT_RE.sub(r"\1", content).replace("$", "").strip().strip("*").strip()
    m = _BOX_LETTER_RE.match(c + " ")
    return m.group(1).lower() if m else None


def extract_letter(text: str) -> str | None:
    """The option letter (``a``..``e``) a completion commits to, or None.

    Read after the last ``</think>``: the last ``\\boxed{x}``, else the last "answer is (x)" /
    "answer is x" / "answer: x", else the last standalone "(x)"."""
    if not text:
        return None
    tail = after_think(text)
    boxes = boxed_contents(tail)
    if boxes:
        got = _box_letter(boxes[-1])
        if got:
            return got
    found = list(_ANSWER_RE.finditer(tail))
    if found:
        m = found[-1]
        return (m.group(1) or m.group(2)).lower()
    found = list(_PAREN_RE.finditer(tail))
    if found:
        return found[-1].group(1).lower()
    return None


# --------------------------------------------------------------------------------------------------
# The task
# --------------------------------------------------------------------------------------------------

def _strip_quotes(text: str) -> str:
    t = text.strip()
    if len(t) >= 2 and t[0] == t[-1] and t[0] in "\"'":
        t = t[1:-1].strip()
    return t


class MathQA(Task):
    """MathQA five-option math word problems; the answer is the option letter a-e."""

    name = "mathqa"
    splits = SPLITS + tuple(_SPLIT_ALIASES)

    class Params(Params):
        data_dir: str | None = None  # folder with dev.json / test.json (and train.json); None = hub
        hub_id: str = "regisss/math_qa"  # the mirror lm-eval uses (allenai/math_qa is script-based)
        instruction: str = DEFAULT_INSTRUCTION  # last line of each prompt
        # "paper": the authors' calibration prompt "Question: {Problem}\nOptions: {options}\nAnswer:"
        # with the options string as given and the raw Rationale as the reference
        # (uncc-efficient-ai/RESP modules/data/data_prune_ds.py get_mathqa_model_output_sample)
        prompt_format: Literal["resp", "paper"] = "resp"

    def __init__(self, params: "MathQA.Params | None" = None):
        self.params = params or self.Params()
        self._rows: dict[str, list[dict]] = {}

    # -- data ------------------------------------------------------------------------------------

    @staticmethod
    def _split(split: str) -> str:
        s = _SPLIT_ALIASES.get(split, split)
        if s not in SPLITS:
            raise RespError(f"mathqa has splits 'train', 'validation' (dev) and 'test', not {split!r}")
        return s

    def _load(self, split: str) -> list[dict]:
        if split not in self._rows:
            self._rows[split] = self._load_local(split) if self.params.data_dir else self._load_hub(split)
        return self._rows[split]

    def _load_local(self, split: str) -> list[dict]:
        folder = Path(self.params.data_dir).expanduser()
        if not folder.is_dir():
            raise RespError(f"mathqa: data_dir {str(folder)!r} is not a folder")
        path = folder / _FILES[split]
        if not path.is_file():
            hint = " (the official train.json is large and often left out; load it from the hub)" \
                if split == "train" else ""
            raise RespError(f"mathqa: missing file {str(path)!r} for split {split!r}{hint}")
        text = path.read_text(encoding="utf-8")
        try:
            if text.lstrip().startswith("["):
                data = json.loads(text)
            else:  # tolerate JSONL
                data = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as exc:
            raise RespError(f"mathqa: {path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
        if not data:
            raise RespError(f"mathqa: {path} holds no items")
        return [self._check(obj, f"{path}[{i}]") for i, obj in enumerate(data)]

    def _load_hub(self, split: str) -> list[dict]:
        hub_id = self.params.hub_id
        return [self._check(row, f"{hub_id}[{split}][{i}]") for i, row in enumerate(hub_rows("mathqa", hub_id, split))]

    @staticmethod
    def _check(obj, where: str) -> dict:
        if not isinstance(obj, dict):
            raise RespError(f"mathqa: {where}: expected an object with fields {', '.join(_FIELDS)}")
        missing = [k for k in _FIELDS if not isinstance(obj.get(k), str)]
        if missing:
            raise RespError(f"mathqa: {where}: missing field(s) {', '.join(repr(k) for k in missing)}")
        if obj["correct"].strip().lower() not in LETTERS:
            raise RespError(f"mathqa: {where}: 'correct' must be one of a-e, not {obj['correct']!r}")
        return obj

    def _prompt(self, row: dict, options: dict[str, str]) -> str:
        if self.params.prompt_format == "paper":
            return f"Question: {row['Problem']}\nOptions: {row['options']}\nAnswer:"
        if len(options) == len(LETTERS):
            lines = [f"({k}) {options[k]}" for k in LETTERS]
        else:  # unparseable options: show them as given rather than drop the item
            lines = [row["options"].strip()]
        return "\n".join([row["Problem"].strip(), "", "Options:", *lines, "", self.params.instruction])

    def split_size(self, split: str) -> int | None:
        """Known for local files (read and checked now, before any run); None for the hub."""
        return len(self._load(self._split(split))) if self.params.data_dir else None

    def items(self, split: str, count: int | None, seed: int) -> list[TaskItem]:
        split = self._split(split)
        rows = self._load(split)
        out = []
        for i in pick_subset(len(rows), count, seed):
            row = rows[i]
            letter = row["correct"].strip().lower()
            options = parse_options(row["options"])
            out.append(TaskItem(
                id=f"mathqa-{split}-{i}",
                messages=[{"role": "user", "content": self._prompt(row, options)}],
                answer=letter,
                reference=(row["Rationale"] if self.params.prompt_format == "paper"
                           else f"{_strip_quotes(row['Rationale'])}\n#### {letter}"),
                meta={"split": split, "index": i, "options": options, "category": row.get("category", "")},
            ))
        return out

    # -- answers ---------------------------------------------------------------------------------

    def extract_answer(self, completion: str) -> str | None:
        return extract_letter(completion)

    def is_correct(self, completion: str, item: TaskItem) -> bool:
        got = self.extract_answer(completion)
        return got is not None and got == item.answer.strip().lower()


@hookimpl
def register_tasks(register):
    register("mathqa", MathQA)
