"""Accuracy through the EleutherAI lm-eval harness, on the in-memory (masked) model.

The run's model and tokenizer are wrapped in :class:`~resp_plugins.evaluators.lm_eval_model.RespLM`,
a subclass of lm-eval's own ``HFLM``; nothing is saved or reloaded, so the masks of the current
step apply.  Generative tasks sample through the run's generation backend (``ctx.generator``);
loglikelihood tasks (multiple choice, perplexity) run HFLM's own code.

* lm-eval decodes greedily when a task's ``generation_kwargs`` lack ``do_sample``: this evaluator
  writes ``do_sample``, ``temperature``, ``top_p``, ``top_k`` and ``max_gen_toks`` (``sampling``)
  into every generative task.
* ``stop_strings``: ``after_think`` (RESP) cuts only after the last ``</think>``, so a stop string
  inside a reasoning trace cannot end it; ``whole_output`` (the authors', lm-eval's HF backend)
  cuts at the first occurrence anywhere.  Unset: each task's ``metadata.resp_stop_strings``
  (the paper tasks say ``whole_output``), else ``after_think``.

Tasks shipped in ``lm_eval_tasks/`` (usable from lm-eval's own CLI with ``--include_path``):

* ``resp_gsm8k_cot_paper`` -- the paper's GSM8K: lm-eval's own ``gsm8k_cot`` (Wei et al.'s 8
  fixed exemplars, ``Q:``/``A:``, "The answer is N.", strict / flexible regex) read from the
  installed lm-eval, sampled, 2048 new tokens (the authors' ``gsm8k_cot_sample``);
* ``resp_mathqa_paper`` -- the paper's MathQA: zero-shot ``Question: …\\nOptions: {raw options}\\nAnswer:``,
  4096 new tokens (the authors' ``mathqa_decoding``), RESP's letter extraction;
* ``resp_gsm8k_cot`` -- RESP's variant: 8 human solutions drawn from the train split,
  ``Question:``/``Answer:``, ``\\boxed{}``-aware extraction and math-verify;
* ``resp_mathqa_gen`` -- RESP's variant: options listed as ``(a) …`` lines with an answer instruction.

Any other lm-eval task name works too (lm-eval's built-in tasks are indexed only when asked for).
``data_dir`` points a RESP task at local files instead of the hub.

Judging, optional: ``llm_judge`` is the authors' lenient true/false LLM judge (their
``modules/eval/answer_extract_gsm8k.py`` / ``answer_extract_mathqa.py``, ``ask_true_false``): a
local model, through a generation backend, is shown the target and the response and answers
``ANSWER: true/false``; ``judge_accuracy`` is the fraction judged true.  ``llm_extractor`` (RESP's)
asks a local model for the final answer and reports its agreement with the regex extraction.

Metrics (row keys): ``<task>/<metric>`` or ``<task>/<metric>/<filter>`` (e.g.
``resp_gsm8k_cot_paper/exact_match/strict-match``), its standard error under ``…/stderr``,
``<task>/n``, ``<task>/finished``, ``<task>/mean_tokens``, ``<task>/judge_accuracy``.  One main
metric per task (``main_metric``; default: the judge's accuracy when a judge is set, else the
task's ``metadata.resp_main_metric``, else lm-eval's first metric) also carries
``<key>@seed<s>`` per seed and ``<key>/std`` over several seeds -- the keys comparisons aggregate
and run tables show.
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field

from resp_core import hookimpl
from resp_core.errors import RespError
from resp_core.interfaces import EvalResult, Evaluator, Params, RunContext, SamplingParams
from resp_core.validation import Seed

log = logging.getLogger(__name__)

TASKS_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"
# RESP task -> kind (which local files, extraction and judge prompt it uses)
RESP_TASKS = {"resp_gsm8k_cot": "gsm8k", "resp_mathqa_gen": "mathqa",
              "resp_gsm8k_cot_paper": "gsm8k", "resp_mathqa_paper": "mathqa"}
PAPER_TASKS = {"gsm8k": "resp_gsm8k_cot_paper", "mathqa": "resp_mathqa_paper"}
# local files per kind: lm-eval split -> file name (optional ones may be missing)
LOCAL_FILES = {
    "gsm8k": {"train": "train.jsonl", "test": "test.jsonl"},
    "mathqa": {"validation": "dev.json", "test": "test.json"},
}
OPTIONAL_FILES = {"mathqa": {"train": "train.json"}}
STOP_MODES = ("after_think", "whole_output")


def _task_utils():
    from resp_plugins.evaluators.lm_eval_tasks import utils

    return utils


def _lm_module():
    try:
        from resp_plugins.evaluators import lm_eval_model
    except ImportError as exc:
        raise RespError(f"the lm_eval evaluator needs lm-eval and accelerate ({exc.name} is missing): "
                        "pip install 'resp-pruning[eval]'") from None
    return lm_eval_model


def apply_stop_sequences(text: str, until: list[str] | None, thinking: bool) -> str:
    """RESP's ``after_think`` stop-string cut (see :mod:`.lm_eval_model`)."""
    return _lm_module().apply_stop_sequences(text, until, thinking)


def make_lm(model, tokenizer, generator=None, **kwargs):
    """A :class:`~resp_plugins.evaluators.lm_eval_model.RespLM` on an in-memory model."""
    return _lm_module().RespLM(model, tokenizer, generator=generator, **kwargs)


# --------------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------------

DEFAULT_MAX_NEW_TOKENS = {"resp_gsm8k_cot": 2048, "resp_mathqa_gen": 4096,
                          "resp_gsm8k_cot_paper": 2048, "resp_mathqa_paper": 4096}


class LmEvalSampling(Params):
    """Decoding for every generative task (the paper's: sampled, temperature 0.6, thinking)."""

    do_sample: bool = True
    temperature: float = Field(0.6, ge=0)
    top_p: float = Field(0.95, gt=0, le=1)
    top_k: int = Field(20, ge=0)
    enable_thinking: bool = True
    # one budget for all tasks, or per task name (tasks not listed keep their YAML's max_gen_toks)
    max_new_tokens: int | dict[str, int] = Field(default_factory=lambda: dict(DEFAULT_MAX_NEW_TOKENS))

    def budget(self, task: str) -> int | None:
        if isinstance(self.max_new_tokens, int):
            return self.max_new_tokens
        return self.max_new_tokens.get(task)


class SideModel(Params):
    """A second local model driven through a generation backend (greedy)."""

    model_path: str  # local folder (or hub id / "testbed"), loaded like a recipe's model
    dtype: str = "float32"
    device: str | None = None  # default: the run's device
    generator: str = "hf"  # generation backend (registry name)
    generator_params: dict = Field(default_factory=dict)


class LLMExtractor(SideModel):
    """A local model that reads each completion and names its final answer (RESP's)."""

    max_new_tokens: int = Field(32, ge=1)
    max_response_chars: int = Field(4000, ge=1)  # the tail of the (post-</think>) response shown to it


class LLMJudge(SideModel):
    """The authors' lenient true/false judge: target and response in, ``ANSWER: true/false`` out."""

    max_new_tokens: int = Field(150, ge=1)  # the authors' max_tokens
    prompt: Literal["auto", "gsm8k", "mathqa"] = "auto"  # auto: by task kind (GSM8K's for other tasks)
    max_response_chars: int | None = Field(None, ge=1)  # None: the whole response, as the authors
    enable_thinking: bool = False  # the authors' judge is an instruct (non-thinking) model


EXTRACTOR_PROMPT = (
    "Below are a question and a response to it. Extract the final answer that the response "
    "commits to. Reply with the final answer only: {what}. If the response gives no final answer, "
    "reply NONE.\n\nQuestion:\n{question}\n\nResponse:\n{response}\n\nFinal answer:"
)
_WHAT = {"gsm8k": "a single number", "mathqa": "a single option letter (a, b, c, d or e)"}

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
    for line in _task_utils().after_think(reply or "").splitlines():
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


# --------------------------------------------------------------------------------------------------
# The evaluator
# --------------------------------------------------------------------------------------------------

class LmEvalHarness(Evaluator):
    """Accuracy via the lm-eval harness (the paper's GSM8K / MathQA, RESP's variants, any lm-eval task) on the in-memory model."""

    class Params(Params):
        tasks: list[str] = Field(default_factory=lambda: ["resp_gsm8k_cot"])
        data_dir: dict[str, str] = Field(default_factory=dict)  # RESP task -> folder of local files
        limit: int | float | None = None  # items per task (a float < 1: a fraction)
        num_fewshot: int | dict[str, int] | None = None  # override: all tasks, or per task
        seeds: list[Seed] = Field(default_factory=lambda: [0], min_length=1)  # one full evaluation per seed, averaged
        fewshot_seed: Seed = 1234  # lm-eval's few-shot sampler seed
        sampling: LmEvalSampling = Field(default_factory=LmEvalSampling)
        stop_strings: Literal["after_think", "whole_output"] | None = None  # None: per task (metadata)
        apply_chat_template: bool = True
        fewshot_as_multiturn: bool = True
        system_instruction: str | None = None
        main_metric: str | dict[str, str] | None = None  # one per task: e.g. exact_match/strict-match
        bootstrap_iters: int = Field(1000, ge=0)  # for stderrs of non-mean metrics
        batch_size: int = Field(8, ge=1)  # loglikelihood batches
        max_length: int | None = Field(None, ge=2)  # loglikelihood context (default: the model's)
        include_path: list[str] = Field(default_factory=list)  # extra lm-eval task folders (code!)
        records: bool = True  # per-item records (prompt, completion, extraction)
        llm_judge: LLMJudge | None = None
        llm_extractor: LLMExtractor | None = None

    def __init__(self, params: "LmEvalHarness.Params | None" = None):
        self.params = params or self.Params()
        self._side: dict[str, Any] = {}
        self.last_lm = None  # the RespLM of the last seed evaluated (tests, debugging)
        self.last_results = None  # lm-eval's raw results of the last seed
        self.main_keys: dict[str, str] = {}  # task -> main metric of the last evaluation

    def check_recipe(self, recipe, path: str) -> None:
        p = self.params
        if not p.tasks:
            raise RespError(f"{path}.params.tasks: name at least one task")
        if not p.seeds:
            raise RespError(f"{path}.params.seeds: give at least one seed")
        for name in p.data_dir:
            if name not in RESP_TASKS:
                raise RespError(f"{path}.params.data_dir: {name!r} is not a RESP lm-eval task "
                                f"({', '.join(RESP_TASKS)})")
        if isinstance(p.main_metric, dict):
            for name in p.main_metric:
                if name not in p.tasks:
                    raise RespError(f"{path}.params.main_metric: {name!r} is not one of the tasks "
                                    f"({', '.join(p.tasks)})")

    # -- tasks -------------------------------------------------------------------------------
    def _task_manager(self):
        from lm_eval.tasks import TaskManager

        p = self.params
        paths = [str(TASKS_DIR)] + [str(Path(x).expanduser()) for x in p.include_path]
        tm = TaskManager(include_path=paths, include_defaults=False)
        # indexing lm-eval's own few thousand task files takes seconds: only when a task needs it
        if any(t not in tm.all_tasks for t in p.tasks):
            tm = TaskManager(include_path=paths, include_defaults=True)
        return tm

    def _local_files(self, task: str, folder: str) -> dict[str, str]:
        kind = RESP_TASKS[task]
        root = Path(folder).expanduser()
        if not root.is_dir():
            raise RespError(f"lm_eval: data_dir for {task} {str(root)!r} is not a folder")
        files = {}
        for split, name in LOCAL_FILES[kind].items():
            f = root / name
            if not f.is_file():
                raise RespError(f"lm_eval: {task}: missing file {str(f)!r} in data_dir")
            files[split] = str(f.resolve())
        for split, name in OPTIONAL_FILES.get(kind, {}).items():
            if (root / name).is_file():
                files[split] = str((root / name).resolve())
        return files

    def _task_specs(self) -> list:
        """Task names, or full config dicts for RESP tasks given a data_dir."""
        from lm_eval.tasks._yaml_loader import load_yaml

        p = self.params
        specs = []
        for name in p.tasks:
            if name not in RESP_TASKS:
                if name in p.data_dir:
                    raise RespError(f"lm_eval: data_dir is only for RESP tasks ({', '.join(RESP_TASKS)})")
                specs.append(name)
                continue
            if name not in p.data_dir:
                specs.append(name)
                continue
            cfg = load_yaml(TASKS_DIR / f"{name}.yaml", resolve_func=True)
            cfg["dataset_path"] = "json"
            cfg["dataset_name"] = None
            cfg["dataset_kwargs"] = {"data_files": self._local_files(name, p.data_dir[name])}
            specs.append(cfg)
        return specs

    def _load_tasks(self, tm) -> dict:
        return dict(tm.load(self._task_specs())["tasks"])

    def _configure(self, tasks: dict) -> None:
        """Write the run's sampling into every generative task (do_sample always explicit) and
        apply num_fewshot overrides."""
        p, s = self.params, self.params.sampling
        for name, task in tasks.items():
            if task.get_config("output_type") == "generate_until":
                gen = dict(task.get_config("generation_kwargs") or {})
                gen.update(do_sample=s.do_sample, temperature=float(s.temperature), top_p=float(s.top_p),
                           top_k=int(s.top_k))
                budget = s.budget(name)
                if budget is not None:
                    gen["max_gen_toks"] = int(budget)
                gen.pop("max_new_tokens", None)
                gen.setdefault("until", [])
                task.set_config(key="generation_kwargs", value=gen)
            shots = p.num_fewshot if not isinstance(p.num_fewshot, dict) else p.num_fewshot.get(name)
            if shots is not None:
                task.set_config(key="num_fewshot", value=int(shots))

    @staticmethod
    def _meta(task) -> dict:
        meta = task.get_config("metadata") if task is not None else None
        return meta if isinstance(meta, dict) else {}

    def _stop_modes(self, tasks: dict) -> dict[str, str]:
        p = self.params
        out = {}
        for name, task in tasks.items():
            mode = p.stop_strings or self._meta(task).get("resp_stop_strings") or "after_think"
            if mode not in STOP_MODES:
                raise RespError(f"lm_eval: task {name}: metadata.resp_stop_strings {mode!r} is not one of "
                                f"{', '.join(STOP_MODES)}")
            out[name] = mode
        return out

    def _main_metrics(self, tasks: dict) -> dict[str, str]:
        """The main metric of each task (checked against the metrics the task reports)."""
        p = self.params
        out = {}
        for name, task in tasks.items():
            metrics = list(getattr(task, "_metric_fn_list", {}) or [])
            filters = [getattr(f, "name", "none") for f in getattr(task, "_filters", [])] or ["none"]
            available = [m if f == "none" else f"{m}/{f}" for f in filters for m in metrics]
            generative = task.get_config("output_type") == "generate_until"
            if p.llm_judge is not None and generative:
                available.append("judge_accuracy")
            if p.llm_extractor is not None and self._meta(task).get("resp_kind") in _WHAT:
                available.append("llm_extracted_accuracy")
            chosen = p.main_metric.get(name) if isinstance(p.main_metric, dict) else p.main_metric
            if chosen is None:
                if p.llm_judge is not None and generative:
                    chosen = "judge_accuracy"
                else:
                    chosen = self._meta(task).get("resp_main_metric") or (available[0] if available else None)
            if chosen is None:
                continue
            if available and chosen not in available:
                raise RespError(f"evaluator.params.main_metric: task {name} reports no metric {chosen!r} "
                                f"(it reports: {', '.join(available)})")
            out[name] = chosen
        return out

    # -- running -----------------------------------------------------------------------------
    def _load(self):
        p = self.params
        tm = self._task_manager()
        try:
            tasks = self._load_tasks(tm)
        except RespError:
            raise
        except Exception as exc:  # unknown task, no network for a hub dataset, bad YAML ...
            msg = (str(exc).strip().splitlines() or [""])[0]
            hint = " (set data_dir to local files for RESP tasks)" if not all(t in p.data_dir for t in p.tasks) else ""
            raise RespError(f"lm_eval: could not load tasks {', '.join(p.tasks)}: "
                            f"{type(exc).__name__}: {msg}{hint}") from None
        self._configure(tasks)
        return tm, tasks

    def _run_seed(self, ctx: RunContext, seed: int, tm, tasks: dict):
        import lm_eval

        p = self.params
        s = p.sampling
        default_budget = s.max_new_tokens if isinstance(s.max_new_tokens, int) else 256
        modes = self._stop_modes(tasks)
        lm = make_lm(ctx.model, ctx.tokenizer, ctx.generator,
                     sampling=SamplingParams(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                                             max_new_tokens=default_budget, do_sample=s.do_sample,
                                             enable_thinking=s.enable_thinking, seed=seed),
                     enable_thinking=s.enable_thinking, stop_strings=p.stop_strings or "after_think",
                     task_stop_strings=modes, seed=seed, progress=ctx.progress, batch_size=p.batch_size,
                     max_length=p.max_length)
        results = lm_eval.simple_evaluate(
            model=lm, tasks=list(tasks.values()), task_manager=tm, limit=p.limit,
            bootstrap_iters=p.bootstrap_iters, log_samples=True,
            system_instruction=p.system_instruction, apply_chat_template=p.apply_chat_template,
            fewshot_as_multiturn=p.fewshot_as_multiturn if p.apply_chat_template else False,
            random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
            fewshot_random_seed=p.fewshot_seed,
        )
        return lm, results

    def evaluate(self, ctx: RunContext) -> EvalResult:
        if ctx.generator is None or ctx.tokenizer is None:
            raise RespError("lm_eval: the run context has no generator/tokenizer")
        self.check_recipe(None, "evaluator")
        was_training = ctx.model.training
        try:
            with _preserved_rng():
                return self._evaluate(ctx)
        finally:
            ctx.model.train(was_training)

    def _evaluate(self, ctx: RunContext) -> EvalResult:
        p = self.params
        tm, tasks = self._load()
        self.main_keys = self._main_metrics(tasks)
        per_seed: list[dict[str, float]] = []
        records: list[dict] = []
        for seed in p.seeds:
            lm, results = self._run_seed(ctx, seed, tm, tasks)
            self.last_lm, self.last_results = lm, results
            metrics, recs = self._collect(lm, tasks, results, seed)
            if p.llm_judge is not None:
                metrics.update(self._llm_judge(ctx, recs))
            if p.llm_extractor is not None:
                metrics.update(self._llm_extract(ctx, recs))
            per_seed.append(metrics)
            for rec in recs:
                doc = rec.pop("_doc", None) or {}
                rec["doc"] = {k: v for k, v in doc.items() if isinstance(v, (str, int, float))}
            if p.records:
                records += recs
        mains = {_key(t, m) for t, m in self.main_keys.items()}
        return EvalResult(_combine(per_seed, p.seeds, mains), records)

    def _collect(self, lm, tasks: dict, results: dict, seed: int) -> tuple[dict[str, float], list[dict]]:
        utils = _task_utils()
        metrics: dict[str, float] = {}
        for task, values in (results.get("results") or {}).items():
            for key, value in values.items():
                if key == "alias" or "," not in key:
                    continue
                metric, filt = key.split(",", 1)
                stderr = metric.endswith("_stderr")
                name = _key(task, (metric[: -len("_stderr")] if stderr else metric)
                            + ("" if filt == "none" else f"/{filt}")) + ("/stderr" if stderr else "")
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    metrics[name] = float(value)
            n = (results.get("n-samples") or {}).get(task, {}).get("effective")
            if n is not None:
                metrics[f"{task}/n"] = float(n)
        recs: list[dict] = []
        per_task_info: dict[str, list[dict]] = defaultdict(list)
        for task, samples in (results.get("samples") or {}).items():
            kind = self._meta(tasks.get(task)).get("resp_kind")
            by_doc: dict[Any, list[dict]] = {}  # lm-eval logs one sample per doc and filter
            for sample in samples:
                by_doc.setdefault(sample.get("doc_id"), []).append(sample)
            for doc_id, group in by_doc.items():
                sample = group[0]
                infos = lm.completions.get((task, doc_id), [])
                resps = sample.get("resps") or [[]]
                completion = resps[0][0] if resps and resps[0] else ""
                args = sample.get("arguments") or [[""]]
                rec = {"task": task, "seed": seed, "doc_id": doc_id, "target": sample.get("target"),
                       "prompt": args[0][0] if args and args[0] else "", "completion": completion}
                for s in group:
                    filt = s.get("filter", "none")
                    for m in s.get("metrics", []):
                        rec[m if filt == "none" else f"{m}/{filt}"] = s.get(m)
                    if filt != "none":
                        got = s.get("filtered_resps")
                        rec[f"filtered/{filt}"] = got[0] if isinstance(got, list) and len(got) == 1 else got
                if kind:
                    rec["kind"] = kind
                    rec["gold"] = utils.gold_of(kind, sample["doc"])
                    rec.update(utils.extract_records(kind, sample["doc"], completion))
                rec["_doc"] = sample.get("doc") or {}
                if infos:
                    info = infos[0]
                    rec.update(finished=info["finished"], tokens=info["tokens"], stopped=info["stopped"])
                    if info["stopped"]:
                        rec["raw_completion"] = info["raw"]
                    per_task_info[task].append(info)
                recs.append(rec)
        for task, infos in per_task_info.items():
            metrics[f"{task}/finished"] = sum(i["finished"] for i in infos) / len(infos)
            metrics[f"{task}/mean_tokens"] = sum(i["tokens"] for i in infos) / len(infos)
        return metrics, recs

    # -- the LLM judge ------------------------------------------------------------------------
    def _llm_judge(self, ctx: RunContext, recs: list[dict]) -> dict[str, float]:
        cfg = self.params.llm_judge
        todo = [r for r in recs if "finished" in r]  # generative items
        if not todo:
            return {}
        gen = self._side_generator(ctx, "judge", cfg)
        convs = []
        for r in todo:
            kind = r.get("kind") if cfg.prompt == "auto" else cfg.prompt
            response = r["completion"] if cfg.max_response_chars is None else r["completion"][-cfg.max_response_chars:]
            target = judge_target(r.get("kind"), r["_doc"], r.get("target"))
            r["judge_target"] = target
            convs.append(judge_messages(kind or "gsm8k", target, [response]))
        sampling = SamplingParams(max_new_tokens=cfg.max_new_tokens, do_sample=False, temperature=0.0,
                                  enable_thinking=cfg.enable_thinking, seed=0)
        comps = gen.generate(convs, sampling, ctx.progress, "LLM judge")
        verdicts: dict[str, list[bool]] = defaultdict(list)
        for r, c in zip(todo, comps):
            r["judge_reply"] = c.text
            r["judge_verdict"] = parse_judge_reply(c.text)
            verdicts[r["task"]].append(r["judge_verdict"])
        return {f"{task}/judge_accuracy": sum(v) / len(v) for task, v in verdicts.items()}

    # -- LLM answer extraction ----------------------------------------------------------------
    def _llm_extract(self, ctx: RunContext, recs: list[dict]) -> dict[str, float]:
        utils = _task_utils()
        cfg = self.params.llm_extractor
        todo = [r for r in recs if r.get("kind") in _WHAT]
        if not todo:
            return {}
        gen = self._side_generator(ctx, "extractor", cfg)
        convs = []
        for r in todo:
            tail = utils.after_think(r["completion"]).strip()[-cfg.max_response_chars:]
            question = utils.question_of(r["kind"], r["_doc"])
            convs.append([{"role": "user", "content": EXTRACTOR_PROMPT.format(
                what=_WHAT[r["kind"]], question=question, response=tail or "(empty)")}])
        sampling = SamplingParams(max_new_tokens=cfg.max_new_tokens, do_sample=False, temperature=0.0,
                                  enable_thinking=False, seed=0)
        comps = gen.generate(convs, sampling, ctx.progress, "LLM answer extraction")
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

    def _side_generator(self, ctx: RunContext, role: str, cfg: SideModel):
        if role not in self._side:
            from resp_core.loading import load_model_and_tokenizer
            from resp_core.recipe import ModelSection

            section = ModelSection(path=cfg.model_path, dtype=cfg.dtype, device=cfg.device or ctx.device)
            model, tokenizer = load_model_and_tokenizer(section)
            gen = _create_generator(cfg.generator, cfg.generator_params, f"evaluator.params.llm_{role}.generator")
            gen.bind(model, tokenizer)
            self._side[role] = gen
        return self._side[role]


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------

def _key(task: str, metric: str) -> str:
    return f"{task}/{metric}"


def _create_generator(name: str, params: dict, where: str):
    if name == "hf":  # the built-in backend, without building the whole registry
        from resp_plugins.generators.hf import HFGenerator

        return HFGenerator(HFGenerator.Params(**params))
    from resp_core.registry import get_registry

    return get_registry().create("generator", name, params, where)


@contextmanager
def _preserved_rng():
    """lm-eval reseeds Python, NumPy and torch globally; a pruning run continues afterwards, so
    their states are restored."""
    py = random.getstate()
    try:
        import numpy as np

        npstate: Any = np.random.get_state()
    except ImportError:  # pragma: no cover
        np, npstate = None, None
    cpu = torch.random.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(py)
        if np is not None:
            np.random.set_state(npstate)
        torch.random.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def _combine(per_seed: list[dict[str, float]], seeds: list[int], mains: set[str]) -> dict[str, float]:
    """The mean over seeds under each metric's name; for the main metrics also ``<name>@seed<s>``
    (the convention :mod:`resp_core.compare` aggregates into means and 95% CIs) and, with
    several seeds, ``<name>/std`` (sample standard deviation over seeds)."""
    out: dict[str, float] = {}
    keys = sorted({k for m in per_seed for k in m})
    for k in keys:
        vals = [m[k] for m in per_seed if k in m]
        mean = sum(vals) / len(vals)
        out[k] = mean
        if k not in mains:
            continue
        if len(vals) > 1:
            out[f"{k}/std"] = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))
        for s, m in zip(seeds, per_seed):
            if k in m:
                out[f"{k}@seed{s}"] = m[k]
    return out


@hookimpl
def register_evaluators(register):
    register("lm_eval", LmEvalHarness)
