"""RESP's model as an lm-eval model: lm-eval's own ``HFLM`` on an in-memory model, generation
through a RESP generation backend.

:class:`RespLM` subclasses ``lm_eval.models.huggingface.HFLM`` (which accepts an already built
model object) and overrides only what RESP needs:

* ``generate_until`` goes through a RESP generation backend (``hf`` by default, or the run's own,
  e.g. ``vllm``): prompts as lm-eval rendered them (chat template, few-shot as turns, thinking on
  or off), batched and seeded like every RESP generation, one backend call per set of
  generation kwargs.  lm-eval's own ``normalize_gen_kwargs`` reads the kwargs (no ``do_sample``:
  sampled iff temperature > 0); values a task leaves out (temperature, top-p, top-k) come from
  RESP's sampling defaults, else the model's ``generation_config``.
* stop strings (``until``), two ways:

  - ``after_think`` (RESP's default): cut at the first stop string *after the last* ``</think>``;
    a trace still thinking at the token budget is never cut, so a ``"Q:"`` inside a reasoning
    trace cannot end it;
  - ``whole_output`` (the authors' evaluation, lm-eval's ``HFLM``): cut at the first stop string
    anywhere in the output (lm-eval's ``postprocess_generated_text``).

  Generation itself always runs to EOS or the token budget; cutting afterwards gives the text
  lm-eval's stopping criteria would have left.
* ``loglikelihood`` / ``loglikelihood_rolling`` (multiple choice, perplexity tasks) are HFLM's,
  unchanged.

From lm-eval's own command line (lm-eval discovers no third-party models by itself, so RESP's
``resp-lm-eval`` is lm-eval's CLI with this model registered and RESP's task folder included)::

    resp-lm-eval --model resp --model_args path=runs/demo/model --tasks resp_gsm8k_cot_paper --device cpu
    python -m resp_plugins.evaluators.lm_eval_cli --model resp --model_args path=RUN/model ...

``path`` is anything ``respctl testbed evaluate --model`` takes: ``testbed``, a RESP run's
``model/`` folder (loaded with ``resp_core.load_pruned``) or a plain transformers folder.
In Python, importing this module registers ``resp`` with lm-eval
(``lm_eval.simple_evaluate(model="resp", model_args={"path": ...})``).
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from contextlib import contextmanager
from typing import Literal

import torch

from resp_core.errors import RespError
from resp_core.interfaces import Progress, SamplingParams
from resp_plugins.evaluators.lm_eval_tasks_config import STOP_MODES

try:
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
    from lm_eval.models.utils import (handle_stop_sequences, has_bos_prefix, normalize_gen_kwargs,
                                      postprocess_generated_text)
except ImportError as exc:  # pragma: no cover - exercised only without the eval extra
    raise RespError(f"the lm_eval evaluator needs lm-eval and accelerate ({exc.name} is missing): "
                    "pip install 'resp-pruning[eval]'") from None

log = logging.getLogger(__name__)

THINK_END = "</think>"

StopMode = Literal["after_think", "whole_output"]


def apply_stop_sequences(text: str, until: list[str] | None, thinking: bool) -> str:
    """RESP's ``after_think`` cut: at the first stop string after the last ``</think>``.

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


def cut_at_stops(text: str, until: list[str], mode: str, thinking: bool) -> str:
    if mode == "whole_output":  # lm-eval's HFLM: the first stop string anywhere
        return postprocess_generated_text(text, until, think_end_token=None)
    return apply_stop_sequences(text, until, thinking)


def _as_bool(value) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise RespError(f"lm-eval model_args: expected true or false, got {value!r}")


@contextmanager
def _quiet_hflm():
    """HFLM warns on every in-memory model ("pretrained is not of type str"); RESP always passes
    one, so that warning is noise."""
    logger = logging.getLogger("lm_eval.models.huggingface")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@register_model("resp")
class RespLM(HFLM):
    """lm-eval's HFLM on RESP's in-memory (masked or compacted) model; generation through a RESP
    generation backend, ``</think>``-aware stop strings."""

    def __init__(self, pretrained=None, tokenizer=None, *, path: str | None = None, generator=None,
                 generator_batch_size: int = 64, sampling: SamplingParams | None = None,
                 enable_thinking: bool | str | None = True, stop_strings: StopMode = "after_think",
                 task_stop_strings: dict[str, str] | None = None, seed: int | str = 0,
                 progress: Progress | None = None, batch_size: int | str = 8, max_length: int | None = None,
                 device: str | None = None, dtype: str = "float32", **kwargs):
        enable_thinking = _as_bool(enable_thinking)
        if stop_strings not in STOP_MODES:
            raise RespError(f"stop_strings: {stop_strings!r} is not one of {', '.join(STOP_MODES)}")
        if pretrained is None or isinstance(pretrained, str):  # the lm-eval CLI: load a folder
            where = path or pretrained
            if not where:
                raise RespError("lm-eval model 'resp' needs model_args path=<RESP run model folder, "
                                "transformers folder or 'testbed'>")
            from resp_core.testbed.evaluate import load_any

            if device and str(device).startswith("cuda") and not torch.cuda.is_available():
                log.warning("lm-eval model 'resp': %s requested but CUDA is not available; using cpu", device)
                device = "cpu"  # lm-eval's CLI defaults to cuda:0; HFLM falls back the same way
            pretrained, tokenizer = load_any(str(where), dtype=dtype, device=device)
            self._source = str(where)
        else:
            if tokenizer is None:
                raise RespError("RespLM needs the tokenizer of the in-memory model")
            self._source = None
        had_pad = tokenizer.pad_token
        self.thinking = enable_thinking
        with _quiet_hflm():
            # thinking reaches the chat template through chat_template_args: HFLM's own
            # enable_thinking would also refuse every loglikelihood task
            super().__init__(pretrained=pretrained, tokenizer=tokenizer, batch_size=batch_size,
                             max_length=int(max_length) if max_length else None,
                             chat_template_args=({} if enable_thinking is None
                                                 else {"enable_thinking": enable_thinking}), **kwargs)
        if had_pad is None and tokenizer.pad_token is not None:
            tokenizer.pad_token = None  # HFLM set one; the run's tokenizer stays as it was
        if generator is None:
            from resp_plugins.generators.hf import HFGenerator

            generator = HFGenerator(HFGenerator.Params(batch_size=int(generator_batch_size)))
            generator.bind(pretrained, tokenizer)
        self.generator = generator
        self.defaults = sampling or self._sampling_from_generation_config(pretrained)
        self.stop_mode = stop_strings
        self.task_stop_modes = dict(task_stop_strings or {})
        self.seed = int(seed)
        self.progress = progress or Progress()
        self._chats: dict[str, list[dict]] = {}
        self.calls: list[dict] = []  # one per backend call: sampling, until, stop mode, n
        self.completions: dict[tuple, list[dict]] = defaultdict(list)  # (task, doc_id) -> info

    @staticmethod
    def _sampling_from_generation_config(model) -> SamplingParams:
        gc = getattr(model, "generation_config", None)
        d = SamplingParams()
        return SamplingParams(temperature=float(getattr(gc, "temperature", None) or d.temperature),
                              top_p=float(getattr(gc, "top_p", None) or d.top_p),
                              top_k=int(getattr(gc, "top_k", None) or d.top_k))

    # -- chat template ---------------------------------------------------------------------------
    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        text = super().apply_chat_template(chat_history, add_generation_prompt)
        if add_generation_prompt:  # for backends that take conversations only
            self._chats[text] = [{"role": m["role"], "content": m["content"]} for m in chat_history]
        return text

    @property
    def tokenizer_name(self) -> str:
        return f"{super().tokenizer_name}-thinking{int(bool(self.thinking))}"

    # -- generation ------------------------------------------------------------------------------
    def sampling_for(self, gen_kwargs: dict, group: int = 0) -> tuple[SamplingParams, list[str]]:
        """SamplingParams and stop strings (EOS text added, as lm-eval does) for one set of
        lm-eval generation kwargs."""
        d = self.defaults
        kw = dict(normalize_gen_kwargs(dict(gen_kwargs or {}), d.max_new_tokens))
        eos = self.tok_decode(self.eot_token_id, skip_special_tokens=False) if self.eot_token_id is not None else None
        until = handle_stop_sequences(kw.pop("until", None), eos=eos)
        do_sample = bool(kw.pop("do_sample"))
        temperature = float(kw.pop("temperature", d.temperature))
        kw.pop("enable_thinking", None)  # fixed per model: prompts are rendered with it
        sp = SamplingParams(temperature=temperature, top_p=float(kw.pop("top_p", d.top_p)),
                            top_k=int(kw.pop("top_k", d.top_k)), max_new_tokens=int(kw.pop("max_gen_toks")),
                            do_sample=do_sample and temperature > 0,
                            enable_thinking=bool(self.thinking) if self.thinking is not None else True,
                            seed=self.seed + 100_003 * group)
        if kw:
            log.warning("lm_eval: ignoring generation kwargs %s", sorted(kw))
        return sp, until

    def _stop_mode(self, task_name) -> str:
        return self.task_stop_modes.get(task_name, self.stop_mode)

    def _encode_args(self, prompt: str) -> bool:
        """Whether tokenizing ``prompt`` adds the tokenizer's special tokens (HFLM's rule)."""
        if has_bos_prefix(prompt, getattr(self.tokenizer, "bos_token", None)):
            return False
        return True if self.add_bos_token is None else bool(self.add_bos_token)

    def _generate(self, prompts: list[str], sampling: SamplingParams):
        try:
            groups: dict[bool, list[int]] = defaultdict(list)
            for i, p in enumerate(prompts):
                groups[self._encode_args(p)].append(i)
            out: list = [None] * len(prompts)
            for special, idx in groups.items():
                comps = self.generator.generate_text([prompts[i] for i in idx], sampling, self.progress,
                                                     "lm-eval generation", add_special_tokens=special)
                for i, c in zip(idx, comps):
                    out[i] = c
            return out
        except NotImplementedError:
            missing = [p for p in prompts if p not in self._chats]
            if missing:
                raise RespError(f"lm_eval: the generation backend {type(self.generator).__name__} takes "
                                "conversations only; use apply_chat_template (or the hf backend)") from None
            return self.generator.generate([self._chats[p] for p in prompts], sampling, self.progress,
                                           "lm-eval generation")

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        if not requests:
            return []
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        out: list[str | None] = [None] * len(requests)
        for g, idxs in enumerate(groups.values()):
            sampling, until = self.sampling_for(requests[idxs[0]].args[1], g)
            prompts = [requests[i].args[0] for i in idxs]
            comps = self._generate(prompts, sampling)
            modes = {self._stop_mode(requests[i].task_name) for i in idxs}
            self.calls.append({"sampling": sampling, "until": until, "stop_strings": sorted(modes), "n": len(idxs)})
            for i, c in zip(idxs, comps):
                req = requests[i]
                chat = req.args[0] in self._chats
                thinking = bool(self.thinking) if chat else ("<think>" in c.text)
                cut = cut_at_stops(c.text, until, self._stop_mode(req.task_name), thinking)
                out[i] = cut
                self.completions[(req.task_name, req.doc_id)].append(
                    {"raw": c.text, "text": cut, "finished": c.finished, "tokens": len(c.completion_ids),
                     "stopped": len(cut) < len(c.text)})
                self.cache_hook.add_partial("generate_until", req.args, cut)
        return out  # type: ignore[return-value]

    def get_model_info(self) -> dict:
        model = self._model
        return {"model_num_parameters": sum(p.numel() for p in model.parameters()),
                "model_dtype": str(getattr(model, "dtype", "")), "model_source": self._source or "in-memory",
                "generation_backend": type(self.generator).__name__}
