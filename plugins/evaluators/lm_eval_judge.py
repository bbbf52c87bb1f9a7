"""Second-opinion answer checking for the ``lm_eval`` evaluator: the authors' true/false LLM judge
and RESP's LLM answer extractor, each a local model driven through a generation backend.

``llm_judge`` is the authors' lenient judge (their ``modules/eval/answer_extract_gsm8k.py`` /
``answer_extract_mathqa.py``, ``ask_true_false``): shown the target and the response, it answers
``ANSWER: true/false``, read as the authors' script reads it (the last ``ANSWER:`` line says exactly
``true``; anything else is false).  ``llm_extractor`` asks a local model for the final answer and
compares it with the gold answer and with the regex extraction.  Both side models are loaded like a
recipe's model and checked the same way at ``respctl validate`` (:func:`check_side_model`).
"""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Callable, Literal

from pydantic import Field, ValidationError

from resp_core.errors import RespError
from resp_core.interfaces import Params, Progress, SamplingParams
from resp_core.validation import NewTokens
from resp_plugins.evaluators.lm_eval_tasks_config import task_utils

MAX_RESPONSE_CHARS = 100_000_000


class SideModel(Params):
    """A second local model driven through a generation backend (greedy)."""

    model_path: str = Field(min_length=1)  # local folder (or hub id / "testbed"), loaded like a recipe's model
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str | None = None  # default: the run's device
    generator: str = "hf"  # generation backend (registry name)
    generator_params: dict = Field(default_factory=dict)
    # False: loaded for each evaluation and released after it (its memory free while the run prunes)
    keep_loaded: bool = True


class LLMExtractor(SideModel):
    """A local model that reads each completion and names its final answer (RESP's)."""

    max_new_tokens: NewTokens = 32
    # the tail of the (post-</think>) response shown to it
    max_response_chars: int = Field(4000, ge=1, le=MAX_RESPONSE_CHARS)


class LLMJudge(SideModel):
    """The authors' lenient true/false judge: target and response in, ``ANSWER: true/false`` out."""

    max_new_tokens: NewTokens = 150  # the authors' max_tokens
    prompt: Literal["auto", "gsm8k", "mathqa"] = "auto"  # auto: by task kind (GSM8K's for other tasks)
    # None: the whole response, as the authors
    max_response_chars: int | None = Field(None, ge=1, le=MAX_RESPONSE_CHARS)
    enable_thinking: bool = False  # the authors' judge is an instruct (non-thinking) model


EXTRACTOR_PROMPT = (
    "Below are a question and a response to it. Extract the final answer that the response "
    "commits to. Reply with the final answer only: {what}. If the response gives no final answer, "
    "reply NONE.\n\nQuestion:\n{question}\n\nResponse:\n{response}\n\nFinal answer:"
)
# task kind -> the answer form the extractor is asked for (kinds not listed are not extracted)
EXTRACTOR_WHAT = {"gsm8k": "a single number", "mathqa": "a single option letter (a, b, c, d or e)"}

# The authors' judge prompts, verbatim (uncc-efficient-ai/RESP, modules/eval/answer_extract_gsm8k.py
# and answer_extract_mathqa.py: SYSTEM_INSTRUCTIONS and the user message of ask_true_false).
JUDGE_SYSTEM = {
    "gsm8k": (
        "You are an answer checker.\n"
        "Return your answer in this EXACT format:\n"
        "ANSWER: true/false\n"
        "REASON: [your reasoning]\n\n"
        "Task:\n"
        "Given a JSON payload with `target` (string) and `resps` (list of strings),\n"
        "return true if ANY element of `resps` contains a representation of the value as `target` in their "
        "final answer. Otherwise return false. You do not have to be very restrict. Treat matching in a "
        "commonsense manner (do not need to check format and unit)."
    ),
    "mathqa": (
        "Return your answer in this EXACT format:\n"
        "ANSWER: true/false\n"
        "REASON: [your reasoning]\n\n"
        "Task:\n"
        "You are an expert evaluator for multiple-choice question answering tasks.\n"
        "Given a question, a correct option with the specific value (target), and a model's solution, you "
        "must determine whether the solution is correct.\n"
        "You should strictly judge correctness based on the meaning \u2014 if the solution matches the correct "
        "choice or expresses the same answer (even if written differently), mark it as true. Otherwise, "
        "mark it as false.\n"
        "The model's solution may either mention the option letter (e.g., \"B\") or the actual value "
        "(e.g., \"30 mph\"). Both count as correct if they match in meaning.\n"
        "Ignore case, punctuation, and minor phrasing differences when judging equivalence."
    ),
}
JUDGE_USER = "Return answer and reasoning in the specified format.\nDATA:\n{payload}"


def judge_messages(kind: str, target: str, responses: list[str]) -> list[dict]:
    """The judge's conversation: the authors' system instructions and ``DATA:`` payload."""
    payload = json.dumps({"target": (target or "").strip(), "resps": [(r or "").strip() for r in responses]},
                         ensure_ascii=False)
    return [{"role": "system", "content": JUDGE_SYSTEM["mathqa" if kind == "mathqa" else "gsm8k"]},
            {"role": "user", "content": JUDGE_USER.format(payload=payload)}]


def parse_judge_reply(reply: str) -> bool:
    """The authors' reading: the (last) ``ANSWER:`` line says exactly ``true``; anything else,
    including no such line, is false.  A thinking judge's trace is skipped."""
    verdict = False
    for line in task_utils().after_think(reply or "").splitlines():
        s = line.strip()
        if s.lower().startswith("answer:"):
            verdict = s.split(":", 1)[1].strip().lower() == "true"
    return verdict


def judge_target(kind: str | None, doc: dict, target) -> str:
    """What the judge is told the right answer is: GSM8K's number after ``####`` (lm-eval's
    ``gsm8k_cot`` target), MathQA's ``Options: …\\n Correct: x`` (the authors' ``mathqa_decoding``
    target); for other tasks lm-eval's own target."""
    if kind == "gsm8k" and "####" in str(doc.get("answer", "")):
        return str(doc["answer"]).split("####")[-1].strip()
    if kind == "mathqa" and "options" in doc and "correct" in doc:
        return f"Options: {doc['options']}\n Correct: {doc['correct']}"
    if isinstance(target, list):
        target = target[0] if len(target) == 1 else ", ".join(str(t) for t in target)
    return str(target)


def run_llm_judge(cfg: LLMJudge, recs: list[dict], generator: Callable[[], object],
                  progress: Progress | None, regex_metric: dict[str, str] | None = None) -> dict[str, float]:
    """Judge every generative record in place (``judge_target``, ``judge_prompt``: the user
    message the judge read, ``judge_reply``, ``judge_verdict``); returns ``<task>/judge_accuracy``.
    ``generator()`` gives the judge's backend, asked for only when there is something to judge.

    ``regex_metric`` (task -> the record key of the task's own per-item score, e.g.
    ``exact_match/strict-match``): each such record also gets ``judge_agrees_regex`` (the verdict
    equals "that score is 1") and the task ``<task>/judge_regex_agreement``, their mean."""
    todo = [r for r in recs if "finished" in r]  # generative items
    if not todo:
        return {}
    gen = generator()
    convs = []
    for r in todo:
        kind = r.get("kind") if cfg.prompt == "auto" else cfg.prompt
        response = r["completion"] if cfg.max_response_chars is None else r["completion"][-cfg.max_response_chars:]
        target = judge_target(r.get("kind"), r["_doc"], r.get("target"))
        r["judge_target"] = target
        conv = judge_messages(kind or "gsm8k", target, [response])
        r["judge_prompt"] = conv[-1]["content"]
        convs.append(conv)
    sampling = SamplingParams(max_new_tokens=cfg.max_new_tokens, do_sample=False, temperature=0.0,
                              enable_thinking=cfg.enable_thinking, seed=0)
    comps = gen.generate(convs, sampling, progress, "LLM judge")
    verdicts: dict[str, list[bool]] = defaultdict(list)
    agree: dict[str, list[bool]] = defaultdict(list)
    for r, c in zip(todo, comps):
        r["judge_reply"] = c.text
        r["judge_verdict"] = parse_judge_reply(c.text)
        verdicts[r["task"]].append(r["judge_verdict"])
        score = r.get((regex_metric or {}).get(r["task"], ""))
        if isinstance(score, (int, float)) and not isinstance(score, bool):
            r["judge_agrees_regex"] = bool(float(score) >= 0.5) == r["judge_verdict"]
            agree[r["task"]].append(r["judge_agrees_regex"])
    out = {f"{task}/judge_accuracy": sum(v) / len(v) for task, v in verdicts.items()}
    out.update({f"{task}/judge_regex_agreement": sum(v) / len(v) for task, v in agree.items()})
    return out


def run_llm_extractor(cfg: LLMExtractor, recs: list[dict], generator: Callable[[], object],
                      progress: Progress | None) -> dict[str, float]:
    """Ask the extractor for each GSM8K / MathQA record's final answer (recorded in place);
    returns ``<task>/llm_extracted_accuracy`` and ``<task>/llm_regex_agreement``."""
    utils = task_utils()
    todo = [r for r in recs if r.get("kind") in EXTRACTOR_WHAT]
    if not todo:
        return {}
    gen = generator()
    convs = []
    for r in todo:
        tail = utils.after_think(r["completion"]).strip()[-cfg.max_response_chars:]
        question = utils.question_of(r["kind"], r["_doc"])
        convs.append([{"role": "user", "content": EXTRACTOR_PROMPT.format(
            what=EXTRACTOR_WHAT[r["kind"]], question=question, response=tail or "(empty)")}])
    sampling = SamplingParams(max_new_tokens=cfg.max_new_tokens, do_sample=False, temperature=0.0,
                              enable_thinking=False, seed=0)
    comps = gen.generate(convs, sampling, progress, "LLM answer extraction")
    stats: dict[str, list[tuple[bool, bool]]] = defaultdict(list)
    for r, c in zip(todo, comps):
        got = utils.parse_extractor_reply(r["kind"], c.text)
        regex = utils.regex_answer(r["kind"], r["_doc"], r["completion"])
        r["llm_reply"] = c.text
        r["llm_extracted"] = got
        correct = utils.answers_match(r["kind"], got, r["gold"])
        agree = (got is None and regex is None) or utils.answers_match(r["kind"], got, regex)
        r["llm_correct"] = correct
        r["llm_regex_agree"] = agree
        stats[r["task"]].append((correct, agree))
    out = {}
    for task, xs in stats.items():
        out[f"{task}/llm_extracted_accuracy"] = sum(c for c, _ in xs) / len(xs)
        out[f"{task}/llm_regex_agreement"] = sum(a for _, a in xs) / len(xs)
    return out


def side_model_section(cfg: SideModel, device: str, field: str):
    """The side model as a recipe ``model`` section (its device: ``cfg.device``, else ``device``);
    a bad device is one line naming ``field``."""
    from resp_core.recipe import ModelSection

    try:
        return ModelSection(path=cfg.model_path, dtype=cfg.dtype, device=cfg.device or device)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(x) for x in err.get("loc", ()))
        raise RespError(f"{field}.{where}: {err.get('msg', 'invalid')}".replace("Value error, ", "")) from None


def _renamed(exc: RespError, field: str) -> RespError:
    """A model loading/checking error, its ``model.path`` naming the side model's field instead."""
    text = str(exc)
    if text.startswith("model.path"):
        text = field + ".model_path" + text[len("model.path"):]
    elif text.startswith("model."):
        text = field + "." + text[len("model."):]
    else:
        text = f"{field}.model_path: {text}"
    return RespError(text)


def check_side_model(cfg: SideModel, device: str, field: str) -> None:
    """What ``respctl validate`` checks of a side model without loading it: device syntax, and
    for a local folder (or ``testbed``) its config, tokenizer files and weight headers; a hub id
    is checked only when it is in the local cache (never looked up)."""
    from resp_core.preflight import check_model

    section = side_model_section(cfg, device, field)
    try:
        check_model(section, field="model.path", portable=True)
    except RespError as exc:
        raise _renamed(exc, field) from None


def load_side_generator(cfg: SideModel, role: str, device: str, field: str | None = None):
    """Load a side model (``role``: ``judge`` / ``extractor``) and bind its generation backend;
    errors name ``field`` (default ``evaluator.params.llm_<role>``)."""
    from resp_core.loading import load_model_and_tokenizer

    field = field or f"evaluator.params.llm_{role}"
    section = side_model_section(cfg, device, field)
    try:
        model, tokenizer = load_model_and_tokenizer(section)
    except RespError as exc:
        raise _renamed(exc, field) from None
    gen = create_generator(cfg.generator, cfg.generator_params, f"{field}.generator")
    gen.bind(model, tokenizer)
    return gen


def release_side_generator(gen) -> None:
    """Free a side model's backend (an engine's ``close()``), its weights and cached GPU memory."""
    import gc

    import torch

    close = getattr(gen, "close", None)
    if callable(close):
        close()
    gen.model = gen.tokenizer = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def create_generator(name: str, params: dict, where: str):
    """A generation backend by registry name (``hf`` directly)."""
    if name == "hf":  # the built-in backend, without building the whole registry
        from resp_plugins.generators.hf import HFGenerator

        return HFGenerator(HFGenerator.Params(**params))
    from resp_core.registry import get_registry

    return get_registry().create("generator", name, params, where)
