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

Tasks shipped in ``lm_eval_tasks/`` (usable from lm-eval's own CLI with ``--include_path``; task
settings: :mod:`.lm_eval_tasks_config`):

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

Judging, optional (:mod:`.lm_eval_judge`): ``llm_judge`` is the authors' lenient true/false LLM
judge (their ``modules/eval/answer_extract_gsm8k.py`` / ``answer_extract_mathqa.py``,
``ask_true_false``): a local model, through a generation backend, is shown the target and the
response and answers ``ANSWER: true/false``; ``judge_accuracy`` is the fraction judged true and
``judge_regex_agreement`` the fraction where the verdict equals the task's own per-item score (its
main metric without a judge).  The judge's folder, device and dtype are checked by
``respctl validate`` (:meth:`LmEvalHarness.check_recipe`), before any model loads.
``llm_extractor`` (RESP's) asks a local model for the final answer and reports its agreement with
the regex extraction.

Metrics (row keys): ``<task>/<metric>`` or ``<task>/<metric>/<filter>`` (e.g.
``resp_gsm8k_cot_paper/exact_match/strict-match``), its standard error under ``…/stderr``,
``<task>/n``, ``<task>/finished``, ``<task>/mean_tokens``, ``<task>/judge_accuracy``,
``<task>/judge_regex_agreement``.  One main
metric per task (``main_metric``; default: the judge's accuracy when a judge is set, else the
task's ``metadata.resp_main_metric``, else lm-eval's first metric) also carries
``<key>@seed<s>`` per seed and ``<key>/std`` over several seeds -- the keys comparisons aggregate
and run tables show.
"""

from __future__ import annotations

import logging
import math
import random
from collections import defaultdict
from contextlib import contextmanager
from typing import Any, Literal

import torch
from pydantic import Field, field_validator

from resp_core import hookimpl
from resp_core.errors import RespError
from resp_core.interfaces import EvalResult, Evaluator, Params, RunContext, SamplingParams
from resp_core.metric_keys import seed_key
from resp_core.validation import MAX_COUNT, MAX_NEW_TOKENS, BatchSize, NewTokens, Seed
from resp_plugins.evaluators.lm_eval_judge import (EXTRACTOR_WHAT, LLMExtractor, LLMJudge, SideModel,
                                                    check_side_model, load_side_generator, release_side_generator,
                                                    run_llm_extractor, run_llm_judge)
from resp_plugins.evaluators.lm_eval_tasks_config import (DEFAULT_MAX_NEW_TOKENS, RESP_TASKS, configure_tasks,
                                                           load_tasks, stop_modes, task_manager, task_meta,
                                                           task_utils)
# still importable from here, next to the evaluator they serve
from resp_plugins.evaluators.lm_eval_judge import JUDGE_SYSTEM, parse_judge_reply  # noqa: F401
from resp_plugins.evaluators.lm_eval_tasks_config import TASKS_DIR  # noqa: F401

log = logging.getLogger(__name__)


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

class LmEvalSampling(Params):
    """Decoding for every generative task (the paper's: sampled, temperature 0.6, thinking)."""

    do_sample: bool = True
    temperature: float = Field(0.6, ge=0, le=100)
    top_p: float = Field(0.95, gt=0, le=1)
    top_k: int = Field(20, ge=0)
    enable_thinking: bool = True
    # one budget for all tasks, or per task name (tasks not listed keep their YAML's max_gen_toks)
    max_new_tokens: NewTokens | dict[str, NewTokens] = Field(default_factory=lambda: dict(DEFAULT_MAX_NEW_TOKENS))

    def budget(self, task: str) -> int | None:
        if isinstance(self.max_new_tokens, int):
            return self.max_new_tokens
        return self.max_new_tokens.get(task)


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
        bootstrap_iters: int = Field(1000, ge=0, le=MAX_COUNT)  # for stderrs of non-mean metrics
        batch_size: BatchSize = 8  # loglikelihood batches
        max_length: int | None = Field(None, ge=2, le=MAX_NEW_TOKENS)  # loglikelihood context (default: the model's)
        include_path: list[str] = Field(default_factory=list)  # extra lm-eval task folders (code!)
        records: bool = True  # per-item records (prompt, completion, extraction)
        llm_judge: LLMJudge | None = None
        llm_extractor: LLMExtractor | None = None

        @field_validator("limit")
        @classmethod
        def _limit(cls, v):
            if v is None or (isinstance(v, float) and 0 < v < 1):
                return v
            if float(v).is_integer() and 1 <= v <= MAX_COUNT:
                return int(v)
            raise ValueError(f"give an item count (1 to {MAX_COUNT:,}) or a fraction between 0 and 1, not {v!r}")

    def __init__(self, params: "LmEvalHarness.Params | None" = None):
        self.params = params or self.Params()
        self._side: dict[str, Any] = {}
        self.last_lm = None  # the RespLM of the last seed evaluated (tests, debugging)
        self.last_results = None  # lm-eval's raw results of the last seed
        self.main_keys: dict[str, str] = {}  # task -> main metric of the last evaluation
        self.own_keys: dict[str, str] = {}  # task -> its own (regex) main metric, judge or not
        self._where = "evaluator"  # the recipe field of this evaluator (error messages)

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
        if recipe is not None:  # resolve(): the side models' folders, before any model loads
            self._where = path
            for role, cfg in (("judge", p.llm_judge), ("extractor", p.llm_extractor)):
                if cfg is not None:
                    check_side_model(cfg, recipe.model.device, f"{path}.params.llm_{role}")

    # -- tasks -------------------------------------------------------------------------------
    def _main_metrics(self, tasks: dict) -> dict[str, str]:
        """The main metric of each task (checked against the metrics the task reports)."""
        p = self.params
        out = {}
        self.own_keys = {}
        for name, task in tasks.items():
            metrics = list(getattr(task, "_metric_fn_list", {}) or [])
            filters = [getattr(f, "name", "none") for f in getattr(task, "_filters", [])] or ["none"]
            available = [m if f == "none" else f"{m}/{f}" for f in filters for m in metrics]
            generative = task.get_config("output_type") == "generate_until"
            if p.llm_judge is not None and generative:
                available.append("judge_accuracy")
            if p.llm_extractor is not None and task_meta(task).get("resp_kind") in EXTRACTOR_WHAT:
                available.append("llm_extracted_accuracy")
            own = task_meta(task).get("resp_main_metric") or (available[0] if available else None)
            if own is not None and own in available and own not in ("judge_accuracy", "llm_extracted_accuracy"):
                self.own_keys[name] = own
            chosen = p.main_metric.get(name) if isinstance(p.main_metric, dict) else p.main_metric
            if chosen is None:
                chosen = "judge_accuracy" if p.llm_judge is not None and generative else own
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
        tm = task_manager(p.tasks, p.include_path)
        try:
            tasks = load_tasks(tm, p.tasks, p.data_dir)
        except RespError:
            raise
        except Exception as exc:  # unknown task, no network for a hub dataset, bad YAML ...
            msg = (str(exc).strip().splitlines() or [""])[0]
            hint = " (set data_dir to local files for RESP tasks)" if not all(t in p.data_dir for t in p.tasks) else ""
            raise RespError(f"lm_eval: could not load tasks {', '.join(p.tasks)}: "
                            f"{type(exc).__name__}: {msg}{hint}") from None
        configure_tasks(tasks, p.sampling, p.num_fewshot)
        return tm, tasks

    def _run_seed(self, ctx: RunContext, seed: int, tm, tasks: dict):
        import lm_eval

        p = self.params
        s = p.sampling
        default_budget = s.max_new_tokens if isinstance(s.max_new_tokens, int) else 256
        modes = stop_modes(tasks, p.stop_strings)
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
            for role, cfg in (("judge", self.params.llm_judge), ("extractor", self.params.llm_extractor)):
                if cfg is not None and not cfg.keep_loaded and role in self._side:
                    release_side_generator(self._side.pop(role))

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
        utils = task_utils()
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
            kind = task_meta(tasks.get(task)).get("resp_kind")
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

    # -- the LLM judge and answer extraction -------------------------------------------------
    def _llm_judge(self, ctx: RunContext, recs: list[dict]) -> dict[str, float]:
        cfg = self.params.llm_judge
        return run_llm_judge(cfg, recs, lambda: self._side_generator(ctx, "judge", cfg), ctx.progress,
                             regex_metric=self.own_keys)

    def _llm_extract(self, ctx: RunContext, recs: list[dict]) -> dict[str, float]:
        cfg = self.params.llm_extractor
        return run_llm_extractor(cfg, recs, lambda: self._side_generator(ctx, "extractor", cfg), ctx.progress)

    def _side_generator(self, ctx: RunContext, role: str, cfg: SideModel):
        if role not in self._side:
            self._side[role] = load_side_generator(cfg, role, ctx.device, f"{self._where}.params.llm_{role}")
        return self._side[role]


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------

def _key(task: str, metric: str) -> str:
    return f"{task}/{metric}"


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
                out[seed_key(k, s)] = m[k]
    return out


@hookimpl
def register_evaluators(register):
    register("lm_eval", LmEvalHarness)
