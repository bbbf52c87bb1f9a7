"""Prompt building and scoring for RESP's lm-eval tasks (``resp_gsm8k_cot``, ``resp_mathqa_gen``,
``resp_gsm8k_cot_paper``, ``resp_mathqa_paper``).

lm-eval loads this file by path (``!function utils.<name>`` in the YAML files beside it), so it
imports everything absolutely.  :class:`LmEvalDerivedTask` builds a task from one of lm-eval's own
task files plus the few keys the YAML beside this file overrides (the paper tasks reuse lm-eval's
``gsm8k_cot`` and ``mathqa`` definitions that way rather than copying them).

Answer extraction is RESP's own (``resp_plugins.tasks.gsm8k`` / ``resp_plugins.tasks.mathqa``); math-verify adds a third, independent GSM8K judgement and an
equivalence check, and is optional: without it those checks fall back to RESP's extraction.

Every extractor reads only the text after the last ``</think>`` (when there is one).
"""

from __future__ import annotations

import math
import re
import threading
from pathlib import Path

from lm_eval.api.task import ConfigurableTask

from resp_plugins.tasks.gsm8k import extract_flexible, extract_strict, normalize_number
from resp_plugins.tasks.mathqa import DEFAULT_INSTRUCTION, LETTERS, extract_letter, parse_options

# --------------------------------------------------------------------------------------------------
# Tasks derived from lm-eval's own task files
# --------------------------------------------------------------------------------------------------

def lm_eval_task_file(relative: str) -> Path:
    """A task file shipped with the installed lm-eval (``relative`` to ``lm_eval/tasks``)."""
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).resolve().parent / relative


def derived_config(config: dict) -> dict:
    """lm-eval's task file named by ``metadata.derive_from``, with ``config``'s keys on top
    (``generation_kwargs`` and ``metadata`` merged key by key, ``class`` dropped)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    cfg = dict(config)
    cfg.pop("class", None)
    meta = dict(cfg.get("metadata") or {})
    relative = meta.get("derive_from")
    if not relative:
        raise ValueError(f"task {cfg.get('task')!r}: metadata.derive_from names no lm-eval task file")
    path = lm_eval_task_file(str(relative))
    if not path.is_file():
        raise FileNotFoundError(f"task {cfg.get('task')!r} derives from lm-eval's {relative}, which this "
                                f"lm-eval does not ship ({path})")
    base = load_yaml(path, resolve_func=True)
    for key in ("tag", "group", "task_list"):
        base.pop(key, None)
    merged = {**base, **cfg}
    merged["generation_kwargs"] = {**(base.get("generation_kwargs") or {}), **(cfg.get("generation_kwargs") or {})}
    base_meta = base.get("metadata") if isinstance(base.get("metadata"), dict) else {}
    merged["metadata"] = {**base_meta, **meta, "derived_from": str(path)}
    return merged


class LmEvalDerivedTask(ConfigurableTask):
    """A ConfigurableTask built from lm-eval's own task file plus overrides (``class:`` in YAML)."""

    def __init__(self, config: dict | None = None):
        super().__init__(config=derived_config(config or {}))


# --------------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------------


def after_think(text: str) -> str:
    """The text after the last ``</think>`` (all of it when there is none)."""
    text = text or ""
    i = text.rfind("</think>")
    return text if i < 0 else text[i + len("</think>"):]


def _mv_timeout() -> int | None:
    # math-verify's timeouts use SIGALRM, which only works in the main thread
    return 5 if threading.current_thread() is threading.main_thread() else None


def mv_equivalent(gold: str, pred: str) -> bool | None:
    """math-verify's verdict on ``pred`` == ``gold`` (both short answer strings); None when
    math-verify is missing or fails."""
    try:
        from math_verify import parse, verify
    except Exception:
        return None
    try:
        t = _mv_timeout()
        g = parse(f"${gold}$", parsing_timeout=t)
        p = parse(f"${pred}$", parsing_timeout=t)
        if not g or not p:
            return None
        return bool(verify(g, p, timeout_seconds=t))
    except Exception:
        return None


def numbers_equal(pred: str | None, gold: str | None) -> bool:
    """Numeric equality (1e-6 tolerance) of two answers; math-verify when not both are numbers,
    plain string equality when math-verify is not there."""
    if pred is None or gold is None:
        return False
    try:
        return math.isclose(float(pred), float(gold), rel_tol=1e-9, abs_tol=1e-6)
    except (TypeError, ValueError):
        pass
    verdict = mv_equivalent(gold, pred)
    return verdict if verdict is not None else pred.strip() == gold.strip()


# --------------------------------------------------------------------------------------------------
# GSM8K
# --------------------------------------------------------------------------------------------------

_CALC_RE = re.compile(r"<<[^>]*>>")


def gsm8k_gold(doc: dict) -> str | None:
    """The normalized gold number of a GSM8K doc (after its ``####``)."""
    answer = doc.get("answer", "")
    if "####" not in answer:
        return None
    return normalize_number(answer.rsplit("####", 1)[1])


def gsm8k_doc_to_text(doc: dict) -> str:
    return f"Question: {doc['question'].strip()}\nAnswer:"


def gsm8k_doc_to_target(doc: dict) -> str:
    """The human solution without ``<<...>>`` calculator annotations, ending in ``#### N``."""
    return _CALC_RE.sub("", doc["answer"]).strip()


def gsm8k_extract(completion: str) -> dict:
    """Everything the GSM8K metrics look at, for a completion (also used for per-item records)."""
    strict = extract_strict(completion)
    flexible = strict if strict is not None else extract_flexible(completion)
    return {"strict": strict, "flexible": flexible}


def gsm8k_math_verify(completion: str, gold: str | None) -> float:
    """math-verify's own extraction (boxed / "answer is" / last expression) checked against the
    gold; falls back to RESP's flexible extraction when math-verify is not installed."""
    if gold is None:
        return 0.0
    try:
        from math_verify import parse, verify
    except Exception:
        return float(numbers_equal(gsm8k_extract(completion)["flexible"], gold))
    try:
        t = _mv_timeout()
        pred = parse(after_think(completion), parsing_timeout=t)
        if not pred:
            return 0.0
        return float(verify(parse(f"${gold}$", parsing_timeout=t), pred, timeout_seconds=t))
    except Exception:
        return float(numbers_equal(gsm8k_extract(completion)["flexible"], gold))


def gsm8k_process_results(doc: dict, results: list) -> dict:
    completion = results[0] if results else ""
    gold = gsm8k_gold(doc)
    got = gsm8k_extract(completion)
    return {
        "exact_match_strict": float(numbers_equal(got["strict"], gold)),
        "exact_match_flexible": float(numbers_equal(got["flexible"], gold)),
        "exact_match_math_verify": gsm8k_math_verify(completion, gold),
    }


# --------------------------------------------------------------------------------------------------
# MathQA
# --------------------------------------------------------------------------------------------------


def _strip_quotes(text: str) -> str:
    t = (text or "").strip()
    if len(t) >= 2 and t[0] == t[-1] and t[0] in "\"'":
        t = t[1:-1].strip()
    return t


def mathqa_gold(doc: dict) -> str:
    return doc["correct"].strip().lower()


def mathqa_doc_to_text(doc: dict) -> str:
    """The problem, its five options as ``(a) ...`` lines, and the answer instruction (the same
    prompt as RESP's ``mathqa`` task)."""
    options = parse_options(doc["options"])
    if len(options) == len(LETTERS):
        lines = [f"({k}) {options[k]}" for k in LETTERS]
    else:  # unparseable options: show them as given rather than drop the item
        lines = [str(doc["options"]).strip()]
    return "\n".join([doc["Problem"].strip(), "", "Options:", *lines, "", DEFAULT_INSTRUCTION])


def mathqa_doc_to_target(doc: dict) -> str:
    """The rationale followed by the boxed gold letter (used for few-shot examples)."""
    return f"{_strip_quotes(doc['Rationale'])}\nThe answer is \\boxed{{{mathqa_gold(doc)}}}."


def mathqa_extract(completion: str, options_text) -> dict:
    """``letter``: the option letter the completion commits to (RESP's extraction);
    ``flexible``: that letter, else the single option whose value equals the completion's final
    number (``\\boxed{38}`` for option ``(a) 38``)."""
    letter = extract_letter(completion)
    flexible = letter
    if flexible is None:
        value = extract_strict(completion)
        if value is None:
            value = extract_flexible(completion)
        if value is not None:
            options = parse_options(options_text)
            hits = [k for k, v in options.items() if numbers_equal(normalize_number(v), value)]
            if len(hits) == 1:
                flexible = hits[0]
    return {"letter": letter, "flexible": flexible}


def mathqa_process_results(doc: dict, results: list) -> dict:
    completion = results[0] if results else ""
    gold = mathqa_gold(doc)
    got = mathqa_extract(completion, doc["options"])
    return {"acc": float(got["letter"] == gold), "acc_flexible": float(got["flexible"] == gold)}


# --------------------------------------------------------------------------------------------------
# What the evaluator needs per task kind (records, the LLM extractor)
# --------------------------------------------------------------------------------------------------


def question_of(kind: str, doc: dict) -> str:
    return gsm8k_doc_to_text(doc) if kind == "gsm8k" else mathqa_doc_to_text(doc)


def gold_of(kind: str, doc: dict) -> str | None:
    return gsm8k_gold(doc) if kind == "gsm8k" else mathqa_gold(doc)


def regex_answer(kind: str, doc: dict, completion: str) -> str | None:
    """The answer RESP's regex extraction settles on (GSM8K: strict, else last number;
    MathQA: the letter, else the matching option)."""
    if kind == "gsm8k":
        return gsm8k_extract(completion)["flexible"]
    return mathqa_extract(completion, doc["options"])["flexible"]


def extract_records(kind: str, doc: dict, completion: str) -> dict:
    if kind == "gsm8k":
        return {f"extracted_{k}": v for k, v in gsm8k_extract(completion).items()}
    return {f"extracted_{k}": v for k, v in mathqa_extract(completion, doc["options"]).items()}


_LETTER_RE = re.compile(r"(?<![A-Za-z])\(?([a-eA-E])\)?(?![A-Za-z])")


def parse_extractor_reply(kind: str, reply: str) -> str | None:
    """The answer in an extractor model's short reply (None for "NONE" or nothing usable)."""
    text = after_think(reply or "").strip()
    if not text or text.upper().startswith("NONE"):
        return None
    if kind == "gsm8k":
        got = extract_strict(text)
        return got if got is not None else normalize_number(text)
    got = extract_letter(text)
    if got is None:
        m = _LETTER_RE.search(text)
        got = m.group(1).lower() if m else None
    return got


def answers_match(kind: str, pred: str | None, gold: str | None) -> bool:
    if pred is None or gold is None:
        return False
    if kind == "gsm8k":
        return numbers_equal(pred, gold)
    return pred == gold
