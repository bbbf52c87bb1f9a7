"""Accuracy through the EleutherAI lm-eval harness, on the in-memory (masked) model.

The run's model and tokenizer are wrapped as an ``lm_eval.api.model.LM`` (:class:`RespLM`);
nothing is saved or reloaded, so the masks of the current step apply.

* ``generate_until`` goes through the run's generation backend (``ctx.generator``): the same
  batched, seeded, chat-templated (thinking-mode) sampling as calibration and ``task_accuracy``.
  Requests are grouped by their generation kwargs (one backend call per group).
* lm-eval's quirk: a task whose ``generation_kwargs`` lack ``do_sample`` decodes greedily.  This
  evaluator always writes ``do_sample``, ``temperature``, ``top_p``, ``top_k`` and
  ``max_gen_toks`` into every generative task's kwargs; :class:`RespLM` itself, given kwargs
  without ``do_sample``, samples iff ``temperature > 0`` (and warns) instead of silently going
  greedy.
* Stop strings (``until``, e.g. ``"Question:"``) are applied after generation, and only to the
  text after the last ``</think>``: with thinking on and no ``</think>`` (a trace still running
  at ``max_new_tokens``) none apply, so a stop string can never cut a reasoning trace short.
  The backend has no stop-string support, so generation always runs to EOS or the token budget.
* ``loglikelihood`` / ``loglikelihood_rolling`` (multiple-choice and perplexity tasks) run the
  model directly.

Tasks: RESP ships ``resp_gsm8k_cot`` (GSM8K 8-shot CoT, exact match on the final number) and
``resp_mathqa_gen`` (generative zero-shot MathQA, the option letter), as YAML files in
``lm_eval_tasks/`` beside this module (usable with the lm-eval CLI through ``--include_path``).
Any other lm-eval task name also works (lm-eval's built-in tasks are indexed only when asked for).
``data_dir`` points a RESP task at local files instead of the hub.

Optional ``llm_extractor``: a local model, driven through a generation backend of the same kind
as the run's, reads each completion and names its final answer (the paper uses a separate LLM for
this); its accuracy and its agreement with the regex extraction are reported.
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from pydantic import Field

from resp_core import hookimpl
from resp_core.errors import RespError
from resp_core.interfaces import EvalResult, Evaluator, Params, Progress, RunContext, SamplingParams

log = logging.getLogger(__name__)

TASKS_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"
RESP_TASKS = {"resp_gsm8k_cot": "gsm8k", "resp_mathqa_gen": "mathqa"}  # task -> kind
# local files per kind: lm-eval split -> file name (optional ones may be missing)
LOCAL_FILES = {
    "gsm8k": {"train": "train.jsonl", "test": "test.jsonl"},
    "mathqa": {"validation": "dev.json", "test": "test.json"},
}
OPTIONAL_FILES = {"mathqa": {"train": "train.json"}}
THINK_END = "</think>"


def _task_utils():
    from resp_plugins.evaluators.lm_eval_tasks import utils

    return utils


# --------------------------------------------------------------------------------------------------
# Stop strings
# --------------------------------------------------------------------------------------------------

def apply_stop_sequences(text: str, until: list[str] | None, thinking: bool) -> str:
    """Cut ``text`` at the first stop string found after the last ``</think>``.

    Without a ``</think>``: when ``thinking`` the whole text may be a reasoning trace (cut by the
    token budget) and nothing is cut; otherwise the stops apply to the whole text."""
    if not until:
        return text
    i = text.rfind(THINK_END)
    if i >= 0:
        head, tail = text[: i + len(THINK_END)], text[i + len(THINK_END):]
    elif thinking:
        return text
    else:
        head, tail = "", text
    cut = len(tail)
    for stop in until:
        if stop:
            j = tail.find(stop)
            if 0 <= j < cut:
                cut = j
    return head + tail[:cut]


# --------------------------------------------------------------------------------------------------
# The lm-eval model wrapper
# --------------------------------------------------------------------------------------------------

def _lm_base():
    try:
        from lm_eval.api.model import LM
    except ImportError:
        raise RespError(
            "the lm_eval evaluator needs the 'lm-eval' package: pip install 'resp[eval]' "
            "(or: pip install 'lm-eval>=0.4.10' math-verify)"
        ) from None
    return LM


def make_lm(*args, **kwargs):
    """A :class:`RespLM` (the class is built on first use so that importing this plugin does not
    need lm-eval)."""
    return _resp_lm_class()(*args, **kwargs)


_RESP_LM = None


def _resp_lm_class():
    global _RESP_LM
    if _RESP_LM is not None:
        return _RESP_LM
    LM = _lm_base()

    class RespLM(LM):
        """The in-memory model as an lm-eval LM: generation through a RESP generation backend,
        loglikelihoods with the model directly."""

        def __init__(self, model, tokenizer, generator, *, sampling: SamplingParams, seed: int = 0,
                     use_chat_template: bool = True, progress: Progress | None = None,
                     batch_size: int = 8, max_length: int | None = None):
            super().__init__()
            self.model, self.tokenizer, self.generator = model, tokenizer, generator
            self.defaults = sampling
            self.seed = seed
            self.use_chat_template = use_chat_template
            self.progress = progress or Progress()
            self.batch_size = max(1, batch_size)
            cfg_len = getattr(getattr(model, "config", None), "max_position_embeddings", None)
            self.max_length = max_length or cfg_len or 2048
            self._chats: dict[str, list[dict]] = {}
            self.calls: list[dict] = []  # one per backend call: sampling, until, n
            self.completions: dict[tuple, list[dict]] = defaultdict(list)  # (task, doc_id) -> info
            self._warned: set[str] = set()

        # -- chat template -------------------------------------------------------------------
        @property
        def tokenizer_name(self) -> str:
            name = str(getattr(self.tokenizer, "name_or_path", "") or "resp").replace("/", "__")
            return f"{name}-thinking{int(bool(self.defaults.enable_thinking))}"

        def chat_template(self, chat_template: bool | str = False) -> str:
            return getattr(self.tokenizer, "chat_template", None) or ""

        def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
            messages = [{"role": m["role"], "content": m["content"]} for m in chat_history]
            text = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                enable_thinking=self.defaults.enable_thinking,
            )
            if add_generation_prompt:  # the backend re-renders these messages identically
                self._chats[text] = messages
            return text

        # -- generation ----------------------------------------------------------------------
        def _warn_once(self, key: str, msg: str) -> None:
            if key not in self._warned:
                self._warned.add(key)
                log.warning(msg)

        def sampling_for(self, gen_kwargs: dict, group: int = 0) -> tuple[SamplingParams, list[str]]:
            """SamplingParams and stop strings for one set of lm-eval generation kwargs."""
            kw = dict(gen_kwargs or {})
            until = kw.pop("until", None) or []
            until = [until] if isinstance(until, str) else [str(u) for u in until]
            max_new = kw.pop("max_gen_toks", None)
            alt = kw.pop("max_new_tokens", None)
            max_new = int(max_new or alt or self.defaults.max_new_tokens)
            d = self.defaults
            temperature = float(kw.pop("temperature", d.temperature))
            top_p = float(kw.pop("top_p", d.top_p))
            top_k = int(kw.pop("top_k", d.top_k))
            do_sample = kw.pop("do_sample", None)
            if do_sample is None:
                do_sample = temperature > 0
                self._warn_once("do_sample", f"lm_eval: generation kwargs without do_sample; sampling "
                                             f"{'on' if do_sample else 'off'} from temperature={temperature} "
                                             "(lm-eval's own backends would decode greedily)")
            do_sample = bool(do_sample) and temperature > 0
            kw.pop("enable_thinking", None)  # fixed per run: the prompt is already rendered with it
            if kw:
                self._warn_once(f"ignored{sorted(kw)}", f"lm_eval: ignoring generation kwargs {sorted(kw)}")
            sp = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=max_new,
                                do_sample=do_sample, enable_thinking=d.enable_thinking,
                                seed=self.seed + 100_003 * group)
            return sp, until

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            if not requests:
                return []
            groups: dict[str, list[int]] = {}
            for i, req in enumerate(requests):
                key = json.dumps(req.args[1], sort_keys=True, default=str)
                groups.setdefault(key, []).append(i)
            out: list[str | None] = [None] * len(requests)
            for g, idxs in enumerate(groups.values()):
                sampling, until = self.sampling_for(requests[idxs[0]].args[1], g)
                chat = [i for i in idxs if requests[i].args[0] in self._chats]
                raw = [i for i in idxs if requests[i].args[0] not in self._chats]
                self.calls.append({"sampling": sampling, "until": until, "n": len(idxs),
                                   "chat": len(chat), "raw": len(raw)})
                done = []
                if chat:
                    comps = self.generator.generate([self._chats[requests[i].args[0]] for i in chat], sampling,
                                                    self.progress, "lm-eval generation")
                    done += [(i, c.text, c.finished, len(c.completion_ids), True) for i, c in zip(chat, comps)]
                if raw:
                    done += [(i, *r, False) for i, r in zip(raw, self._generate_raw(
                        [requests[i].args[0] for i in raw], sampling))]
                for i, text, finished, ntok, is_chat in done:
                    thinking = sampling.enable_thinking if is_chat else ("<think>" in text)
                    cut = apply_stop_sequences(text, until, thinking)
                    out[i] = cut
                    req = requests[i]
                    self.completions[(req.task_name, req.doc_id)].append(
                        {"raw": text, "text": cut, "finished": finished, "tokens": ntok,
                         "stopped": len(cut) < len(text)})
                    self.cache_hook.add_partial("generate_until", req.args, cut)
            return out  # type: ignore[return-value]

        @torch.no_grad()
        def _generate_raw(self, contexts: list[str], sampling: SamplingParams) -> list[tuple[str, bool, int]]:
            """Plain-text prompts (no chat template): the backend only takes conversations, so
            these are sampled with transformers ``generate`` directly, same settings and seeding."""
            self._warn_once("raw", "lm_eval: apply_chat_template is off; sampling plain-text prompts with "
                                   "transformers generate directly (not through the generation backend)")
            tok, model = self.tokenizer, self.model
            was_training = model.training
            model.eval()
            eos = tok.eos_token_id
            pad = tok.pad_token_id if tok.pad_token_id is not None else eos
            device = next(model.parameters()).device
            enc = [tok(c, add_special_tokens=False)["input_ids"] for c in contexts]
            order = sorted(range(len(enc)), key=lambda i: len(enc[i]))
            res: list = [None] * len(enc)
            bs = getattr(getattr(self.generator, "params", None), "batch_size", self.batch_size)
            for b, start in enumerate(range(0, len(order), bs)):
                idx = order[start: start + bs]
                width = max(len(enc[i]) for i in idx)
                ids = torch.full((len(idx), width), pad, dtype=torch.long)
                att = torch.zeros((len(idx), width), dtype=torch.long)
                for r, i in enumerate(idx):
                    ids[r, width - len(enc[i]):] = torch.tensor(enc[i])
                    att[r, width - len(enc[i]):] = 1
                torch.manual_seed(sampling.seed + b)
                kw = dict(max_new_tokens=sampling.max_new_tokens, do_sample=sampling.do_sample,
                          pad_token_id=pad, eos_token_id=eos)
                if sampling.do_sample:
                    kw.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k)
                else:
                    kw.update(temperature=None, top_p=None, top_k=None)
                new = model.generate(input_ids=ids.to(device), attention_mask=att.to(device), **kw)[:, width:].tolist()
                for r, i in enumerate(idx):
                    seq = new[r]
                    finished = eos in seq
                    seq = seq[: seq.index(eos)] if finished else [t for t in seq if t != pad]
                    res[i] = (tok.decode(seq, skip_special_tokens=True), finished, len(seq))
            model.train(was_training)
            return res

        # -- loglikelihoods ------------------------------------------------------------------
        @property
        def prefix_token_id(self) -> int:
            tok = self.tokenizer
            for t in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id):
                if t is not None:
                    return t
            return 0

        def _enc(self, text: str) -> list[int]:
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]

        def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
            n_spaces = len(context) - len(context.rstrip())
            if n_spaces:
                continuation = context[-n_spaces:] + continuation
                context = context[:-n_spaces]
            whole = self._enc(context + continuation)
            ctx = self._enc(context)
            return ctx, whole[len(ctx):]

        @torch.no_grad()
        def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
            """Sum of log-probabilities of each continuation given its context, and whether it is
            the greedy continuation.  Right-padded batches, longest first; left-truncated."""
            model = self.model
            was_training = model.training
            model.eval()
            device = next(model.parameters()).device
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
            order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
            res: list = [None] * len(pairs)
            for start in range(0, len(order), self.batch_size):
                idx = order[start: start + self.batch_size]
                rows, spans = [], []
                for i in idx:
                    ctx, cont = pairs[i]
                    cont = cont[-self.max_length:]
                    full = (ctx + cont)[-(self.max_length + 1):]
                    inp = full[:-1]
                    rows.append(inp)
                    spans.append((len(inp) - len(cont), cont))
                width = max(len(r) for r in rows)
                ids = torch.full((len(rows), width), pad, dtype=torch.long)
                att = torch.zeros((len(rows), width), dtype=torch.long)
                for r, row in enumerate(rows):
                    ids[r, : len(row)] = torch.tensor(row)
                    att[r, : len(row)] = 1
                logits = model(input_ids=ids.to(device), attention_mask=att.to(device)).logits
                logp = torch.log_softmax(logits.float(), dim=-1).cpu()
                for r, (i, (first, cont)) in enumerate(zip(idx, spans)):
                    lp = logp[r, first: first + len(cont)]
                    target = torch.tensor(cont, dtype=torch.long)
                    total = lp.gather(1, target[:, None]).sum().item()
                    greedy = bool((lp.argmax(-1) == target).all().item())
                    res[i] = (total, greedy)
            model.train(was_training)
            return res

        def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
            pairs = []
            for req in requests:
                context, continuation = req.args[0], req.args[1]
                if context == "":
                    pairs.append(([self.prefix_token_id], self._enc(continuation)))
                else:
                    pairs.append(self._encode_pair(context, continuation))
            out = self._score(pairs)
            for req, r in zip(requests, out):
                self.cache_hook.add_partial("loglikelihood", req.args, r)
            return out

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

            out = []
            for req in requests:
                tokens = self._enc(req.args[0])
                windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                    token_list=tokens, prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)]
                total = sum(lp for lp, _ in self._score([(list(c), list(p)) for c, p in windows]))
                out.append(total)
                self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
            return out

        def get_model_info(self) -> dict:
            return {"model_name": type(self.model).__name__, "tokenizer": self.tokenizer_name,
                    "backend": type(self.generator).__name__}

    _RESP_LM = RespLM
    return RespLM


# --------------------------------------------------------------------------------------------------
# The evaluator
# --------------------------------------------------------------------------------------------------

DEFAULT_MAX_NEW_TOKENS = {"resp_gsm8k_cot": 2048, "resp_mathqa_gen": 4096}


class LmEvalSampling(Params):
    """Decoding for every generative task (the paper's: sampled, temperature 0.6, thinking)."""

    do_sample: bool = True
    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = 20
    enable_thinking: bool = True
    # one budget for all tasks, or per task name (tasks not listed keep their YAML's max_gen_toks)
    max_new_tokens: int | dict[str, int] = Field(default_factory=lambda: dict(DEFAULT_MAX_NEW_TOKENS))

    def budget(self, task: str) -> int | None:
        if isinstance(self.max_new_tokens, int):
            return self.max_new_tokens
        return self.max_new_tokens.get(task)


class LLMExtractor(Params):
    """A local model that reads each completion and names its final answer."""

    model_path: str  # local folder (or hub id / "testbed"), loaded like a recipe's model
    dtype: str = "float32"
    device: str | None = None  # default: the run's device
    max_new_tokens: int = 32
    max_response_chars: int = 4000  # the tail of the (post-</think>) response shown to it
    generator: str = "hf"  # generation backend (registry name) that drives it, greedy
    generator_params: dict = Field(default_factory=dict)


EXTRACTOR_PROMPT = (
    "Below are a question and a response to it. Extract the final answer that the response "
    "commits to. Reply with the final answer only: {what}. If the response gives no final answer, "
    "reply NONE.\n\nQuestion:\n{question}\n\nResponse:\n{response}\n\nFinal answer:"
)
_WHAT = {"gsm8k": "a single number", "mathqa": "a single option letter (a, b, c, d or e)"}


class LmEvalHarness(Evaluator):
    """Accuracy via the lm-eval harness (GSM8K 8-shot CoT, generative MathQA, any lm-eval task) on the in-memory model."""

    class Params(Params):
        tasks: list[str] = Field(default_factory=lambda: ["resp_gsm8k_cot"])
        data_dir: dict[str, str] = Field(default_factory=dict)  # RESP task -> folder of local files
        limit: int | float | None = None  # items per task (a float < 1: a fraction)
        num_fewshot: int | dict[str, int] | None = None  # override: all tasks, or per task
        seeds: list[int] = Field(default_factory=lambda: [0])  # one full evaluation per seed, averaged
        fewshot_seed: int = 1234  # lm-eval's few-shot sampler seed
        sampling: LmEvalSampling = Field(default_factory=LmEvalSampling)
        apply_chat_template: bool = True
        fewshot_as_multiturn: bool = True
        system_instruction: str | None = None
        bootstrap_iters: int = 1000  # for stderrs of non-mean metrics (means use a closed form)
        batch_size: int = 8  # loglikelihood batches
        include_path: list[str] = Field(default_factory=list)  # extra lm-eval task folders
        records: bool = True  # per-item records (prompt, completion, extraction)
        llm_extractor: LLMExtractor | None = None

    def __init__(self, params: "LmEvalHarness.Params | None" = None):
        self.params = params or self.Params()
        self._extractor = None
        self.last_lm = None  # the RespLM of the last seed evaluated (tests, debugging)
        self.last_results = None  # lm-eval's raw results of the last seed

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

    @staticmethod
    def _load_yaml(path: Path) -> dict:
        try:
            from lm_eval.tasks._yaml_loader import load_yaml  # newer lm-eval (0.4.13)

            return load_yaml(path, resolve_func=True)
        except ImportError:
            from lm_eval.utils import load_yaml_config  # older lm-eval (0.4.10)

            return load_yaml_config(yaml_path=str(path), mode="full")

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
        """Task names, or full config dicts for RESP tasks given a data_dir / num_fewshot."""
        p = self.params
        specs = []
        for name in p.tasks:
            if name not in RESP_TASKS:
                if name in p.data_dir:
                    raise RespError(f"lm_eval: data_dir is only for RESP tasks ({', '.join(RESP_TASKS)})")
                specs.append(name)
                continue
            cfg = self._load_yaml(TASKS_DIR / f"{name}.yaml")
            if name in p.data_dir:
                cfg["dataset_path"] = "json"
                cfg["dataset_name"] = None
                cfg["dataset_kwargs"] = {"data_files": self._local_files(name, p.data_dir[name])}
            specs.append(cfg)
        return specs

    def _load_tasks(self, tm) -> dict:
        specs = self._task_specs()
        if hasattr(tm, "load"):  # newer lm-eval (0.4.13)
            return dict(tm.load(specs)["tasks"])
        from lm_eval.tasks import get_task_dict  # older (0.4.10): a nested dict; flatten it

        flat: dict = {}

        def walk(d):
            for k, v in d.items():
                if isinstance(v, dict):
                    walk(v)
                elif v is not None and not isinstance(v, tuple):
                    flat[getattr(v, "task_name", None) or getattr(v.config, "task", str(k))] = v

        walk(get_task_dict(specs, tm))
        return flat

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

    # -- running -----------------------------------------------------------------------------
    def _run_seed(self, ctx: RunContext, seed: int):
        import lm_eval

        p = self.params
        s = p.sampling
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
        default_budget = s.max_new_tokens if isinstance(s.max_new_tokens, int) else 256
        lm = make_lm(ctx.model, ctx.tokenizer, ctx.generator,
                     sampling=SamplingParams(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                                             max_new_tokens=default_budget, do_sample=s.do_sample,
                                             enable_thinking=s.enable_thinking, seed=seed),
                     seed=seed, use_chat_template=p.apply_chat_template, progress=ctx.progress,
                     batch_size=p.batch_size)
        results = lm_eval.simple_evaluate(
            model=lm, tasks=list(tasks.values()), task_manager=tm, limit=p.limit,
            bootstrap_iters=p.bootstrap_iters, log_samples=True,
            system_instruction=p.system_instruction, apply_chat_template=p.apply_chat_template,
            fewshot_as_multiturn=p.fewshot_as_multiturn if p.apply_chat_template else False,
            random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
            fewshot_random_seed=p.fewshot_seed,
        )
        return lm, tasks, results

    def evaluate(self, ctx: RunContext) -> EvalResult:
        p = self.params
        if ctx.generator is None or ctx.tokenizer is None:
            raise RespError("lm_eval: the run context has no generator/tokenizer")
        self.check_recipe(None, "evaluator")
        per_seed: list[dict[str, float]] = []
        records: list[dict] = []
        for seed in p.seeds:
            with _preserved_rng():
                lm, tasks, results = self._run_seed(ctx, seed)
            self.last_lm, self.last_results = lm, results
            metrics, recs = self._collect(lm, tasks, results, seed)
            if p.llm_extractor is not None:
                metrics.update(self._llm_extract(ctx, recs))
            per_seed.append(metrics)
            if p.records:
                records += recs
        return EvalResult(_combine(per_seed, p.seeds), records)

    def _collect(self, lm, tasks: dict, results: dict, seed: int) -> tuple[dict[str, float], list[dict]]:
        utils = _task_utils()
        metrics: dict[str, float] = {}
        for task, values in (results.get("results") or {}).items():
            for key, value in values.items():
                if key == "alias" or "," not in key:
                    continue
                metric, filt = key.split(",", 1)
                name = f"{task}/{metric}" if filt == "none" else f"{task}/{metric}/{filt}"
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    metrics[name] = float(value)
            n = (results.get("n-samples") or {}).get(task, {}).get("effective")
            if n is not None:
                metrics[f"{task}/n"] = float(n)
        recs: list[dict] = []
        per_task_info: dict[str, list[dict]] = defaultdict(list)
        for task, samples in (results.get("samples") or {}).items():
            tobj = tasks.get(task)
            meta = (tobj.get_config("metadata") or {}) if tobj is not None else {}
            kind = meta.get("resp_kind") if isinstance(meta, dict) else None
            for sample in samples:
                doc_id = sample.get("doc_id")
                infos = lm.completions.get((task, doc_id), [])
                resps = sample.get("resps") or [[]]
                completion = resps[0][0] if resps and resps[0] else ""
                args = sample.get("arguments") or [[""]]
                rec = {"task": task, "seed": seed, "doc_id": doc_id, "target": sample.get("target"),
                       "prompt": args[0][0] if args and args[0] else "", "completion": completion,
                       **{m: sample.get(m) for m in sample.get("metrics", [])}}
                if kind:
                    rec["kind"] = kind
                    rec["gold"] = utils.gold_of(kind, sample["doc"])
                    rec.update(utils.extract_records(kind, sample["doc"], completion))
                    rec["_doc"] = sample["doc"]
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
        for rec in recs:
            doc = rec.pop("_doc", None)
            if doc is not None:
                rec["doc"] = {k: v for k, v in doc.items() if isinstance(v, (str, int, float))}
        return metrics, recs

    # -- LLM answer extraction ----------------------------------------------------------------
    def _llm_extract(self, ctx: RunContext, recs: list[dict]) -> dict[str, float]:
        utils = _task_utils()
        cfg = self.params.llm_extractor
        todo = [r for r in recs if r.get("kind") in _WHAT]
        if not todo:
            return {}
        gen = self._extractor_generator(ctx)
        convs = []
        for r in todo:
            tail = utils.after_think(r["completion"]).strip()[-cfg.max_response_chars:]
            question = utils.question_of(r["kind"], r["doc"])
            convs.append([{"role": "user", "content": EXTRACTOR_PROMPT.format(
                what=_WHAT[r["kind"]], question=question, response=tail or "(empty)")}])
        sampling = SamplingParams(max_new_tokens=cfg.max_new_tokens, do_sample=False, temperature=0.0,
                                  enable_thinking=False, seed=0)
        comps = gen.generate(convs, sampling, ctx.progress, "LLM answer extraction")
        stats: dict[str, list[tuple[bool, bool]]] = defaultdict(list)
        for r, c in zip(todo, comps):
            got = utils.parse_extractor_reply(r["kind"], c.text)
            regex = utils.regex_answer(r["kind"], r["doc"], r["completion"])
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

    def _extractor_generator(self, ctx: RunContext):
        if self._extractor is None:
            from resp_core.loading import load_model_and_tokenizer
            from resp_core.recipe import ModelSection

            cfg = self.params.llm_extractor
            section = ModelSection(path=cfg.model_path, dtype=cfg.dtype, device=cfg.device or ctx.device)
            model, tokenizer = load_model_and_tokenizer(section)
            gen = _create_generator(cfg.generator, cfg.generator_params)
            gen.bind(model, tokenizer)
            self._extractor = gen
        return self._extractor


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------

def _create_generator(name: str, params: dict):
    if name == "hf":  # the built-in backend, without building the whole registry
        from resp_plugins.generators.hf import HFGenerator

        return HFGenerator(HFGenerator.Params(**params))
    from resp_core.registry import get_registry

    return get_registry().create("generator", name, params, "evaluator.params.llm_extractor.generator")


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


_NOT_SCORES = ("_stderr", "/n", "/finished", "/mean_tokens", "/std")


def _combine(per_seed: list[dict[str, float]], seeds: list[int]) -> dict[str, float]:
    """The mean over seeds under each metric's name; for every score also ``<name>@seed<s>``
    (the convention :mod:`resp_core.compare` aggregates into means and 95% CIs) and, with
    several seeds, ``<name>/std`` (sample standard deviation over seeds)."""
    out: dict[str, float] = {}
    keys = sorted({k for m in per_seed for k in m})
    for k in keys:
        vals = [m[k] for m in per_seed if k in m]
        mean = sum(vals) / len(vals)
        out[k] = mean
        if k.endswith(_NOT_SCORES):
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
