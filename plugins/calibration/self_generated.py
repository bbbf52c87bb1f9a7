"""Self-generated calibration (RESP, Section 4.1): the model's own sampled reasoning traces.

The model answers N task prompts of the train split with its standard decoding (thinking mode,
temperature 0.6 by default), the decode length capped at ``sampling.max_new_tokens``; the
completions are the calibration targets and the prompt tokens are masked from the loss.

``regenerate`` (Section 4.3) replaces a fraction ρ of the traces with new ones from the current
pruned model on the same prompts with the same budget.

``require_correct``: keep only traces whose final answer is right, resampling a prompt up to
``max_attempts`` times; when every attempt is wrong, fall back to the prompt's last good trace
(from an earlier generation) or, if it never had one, keep the last attempt.  Whether to learn
importance from wrong reasoning is the user's call; each sample's meta records what happened.

Traces can be cached across runs (``cache_dir``): the cache key covers the model fingerprint,
the prompts and the sampling settings, and the JSONL file records all of them in its first line
(the header), with the number of traces and the sha256 of the trace lines.  A cache is used only
when its header matches this run (fingerprint, sampling, seed, prompts), it holds exactly that
many complete lines and the hash matches; otherwise the traces are generated again, with a
warning naming the file, and the file is replaced (written atomically).

Resuming a run restores the generation counter (``state_dict``/``load_state_dict``), so
regenerated traces are seeded as in an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from pathlib import Path
from typing import Literal

from pydantic import Field

from resp_core import hookimpl
from resp_core.errors import RespError
from resp_core.fingerprint import model_fingerprint
from resp_core.atomic_io import atomic_write_text
from resp_core.interfaces import CalibrationSample, CalibrationSource, Params, RunContext, SamplingParams
from resp_core.validation import Count, NewTokens


CACHE_FORMAT = 2


def _lines_hash(lines: list[str]) -> str:
    return hashlib.sha256("".join(line + "\n" for line in lines).encode()).hexdigest()


class SamplingSettings(Params):
    temperature: float = Field(0.6, ge=0, le=100)  # 0: greedy
    top_p: float = Field(0.95, gt=0, le=1)
    top_k: int = Field(20, ge=0)  # 0: no top-k cut
    max_new_tokens: NewTokens = 256
    enable_thinking: bool = True

    def to_sampling(self, seed: int) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                              max_new_tokens=self.max_new_tokens, do_sample=self.temperature > 0,
                              enable_thinking=self.enable_thinking, seed=seed)


def regenerated_count(fraction: float, n: int, rounding: str = "round") -> int:
    """How many of ``n`` traces a regeneration of ``fraction`` replaces (see
    ``SelfGenerated.Params.regenerate_rounding``)."""
    return min(n, math.ceil(n * fraction)) if rounding == "ceil" else int(round(fraction * n))  # their order: n * rho


class SelfGenerated(CalibrationSource):
    """The model's own sampled reasoning traces on task prompts (decode tokens as targets)."""

    regenerable = True

    class Params(Params):
        num_samples: Count = 128
        task: str | None = None  # default: the recipe's task
        task_params: dict | None = None  # e.g. {data_dir: ...}; default: the recipe task's params
        split: str = "train"
        sampling: SamplingSettings = Field(default_factory=SamplingSettings)
        require_correct: bool = False
        max_attempts: int = Field(4, ge=1, le=100)
        cache_dir: str | None = None
        # how many traces a fraction rho of n regenerates: "round" (the nearest count, RESP's) or
        # "ceil" (the authors': uncc-efficient-ai/RESP resp/pruners/data_refresh_GISP.py
        # data_refresh_GISP.update_data, math.ceil(len(data) * refresh_ratio)); rho = 0.6 of 64:
        # 38 or 39
        regenerate_rounding: Literal["round", "ceil"] = "round"

    def __init__(self, params: "SelfGenerated.Params | None" = None):
        self.params = params or self.Params()
        self._items = None
        self._generation = 0

    def state_dict(self) -> dict:
        return {"generation": self._generation}

    def load_state_dict(self, state: dict) -> None:
        self._generation = int(state["generation"])

    def check_recipe(self, recipe, path: str) -> None:
        if self.params.num_samples < 1:
            raise RespError(f"{path}.params.num_samples: need at least 1 sample, got {self.params.num_samples}")
        if self.params.max_attempts < 1:
            raise RespError(f"{path}.params.max_attempts: must be at least 1")
        from resp_plugins.calibration.task_data import check_task_ref

        check_task_ref(recipe, path, self.params.task, self.params.task_params)

    # --- generation ------------------------------------------------------------------------------
    def _task_items(self, ctx: RunContext):
        if self._items is None:
            self._task = ctx.tasks(self.params.task, self.params.task_params)
            self._items = self._task.items(self.params.split, self.params.num_samples, ctx.seed)
        return self._items

    def _sample(self, ctx: RunContext, indices: list[int], previous: dict[int, CalibrationSample]) -> dict[int, CalibrationSample]:
        p = self.params
        items = self._task_items(ctx)
        fingerprint = model_fingerprint(ctx.model)
        out: dict[int, CalibrationSample] = {}
        pending = list(indices)
        attempts = {i: 0 for i in indices}
        for attempt in range(p.max_attempts if p.require_correct else 1):
            if not pending:
                break
            seed = ctx.seed + 1000 * self._generation + 97 * attempt
            sampling = p.sampling.to_sampling(seed)
            label = "Generating traces" if attempt == 0 else f"Resampling wrong traces (attempt {attempt + 1})"
            comps = ctx.generator.generate([items[i].messages for i in pending], sampling, ctx.progress, label)
            still = []
            for i, c in zip(pending, comps):
                attempts[i] += 1
                correct = self._task.is_correct(c.text, items[i])
                out[i] = CalibrationSample(c.prompt_ids, c.completion_ids, {
                    "item_id": items[i].id, "source": "self_generated", "text": c.text, "correct": correct,
                    "finished": c.finished, "attempts": attempts[i], "generation": self._generation,
                    "fingerprint": fingerprint, "seed": seed,
                })
                if p.require_correct and not correct:
                    still.append(i)
            pending = still
        for i in pending:  # every attempt wrong: fall back to the last good trace, if any
            prev = previous.get(i)
            if prev is not None and prev.meta.get("correct"):
                fallback = CalibrationSample(prev.prompt_ids, prev.target_ids, dict(prev.meta))
                fallback.meta["fallback"] = "previous_correct_trace"
                out[i] = fallback
            else:
                out[i].meta["fallback"] = "kept_wrong_trace"
        self._generation += 1
        return out

    def _cache_key(self, ctx: RunContext) -> str:
        items = self._task_items(ctx)
        blob = json.dumps({
            "fingerprint": model_fingerprint(ctx.model),
            "prompts": [it.messages for it in items],
            "sampling": self.params.sampling.model_dump(),
            "require_correct": self.params.require_correct,
            "max_attempts": self.params.max_attempts,
            "seed": ctx.seed,
        }, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:20]

    def _cache_header(self, ctx: RunContext) -> dict:
        return {"format": CACHE_FORMAT, "fingerprint": model_fingerprint(ctx.model),
                "sampling": self.params.sampling.model_dump(), "seed": ctx.seed,
                "require_correct": self.params.require_correct, "max_attempts": self.params.max_attempts,
                "prompts": [it.messages for it in self._task_items(ctx)]}

    def _read_cache(self, cache_file: Path, expected: dict) -> tuple[list[CalibrationSample] | None, str]:
        """The cached traces, or None and why they cannot be used."""
        try:
            text = cache_file.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            return None, f"unreadable ({exc})"
        lines = text.split("\n")
        if not text.endswith("\n"):
            return None, "the last line is cut (half-written file)"
        lines = lines[:-1]
        try:
            header = json.loads(lines[0]) if lines else None
        except ValueError:
            return None, "the header line is not valid JSON"
        if not isinstance(header, dict):
            return None, "no header line"
        for key, want in expected.items():
            if header.get(key) != want:
                return None, f"its header's {key!r} differs from this run's"
        body = lines[1:]
        if header.get("count") != len(body) or len(body) != len(expected["prompts"]):
            return None, f"it holds {len(body)} traces, its header says {header.get('count')}, this run needs {len(expected['prompts'])}"
        if header.get("sha256") != _lines_hash(body):
            return None, "the traces do not match the header's sha256"
        try:
            return [CalibrationSample.from_json(json.loads(line)) for line in body], ""
        except (ValueError, KeyError, TypeError):
            return None, "a trace line is not a valid sample"

    def build(self, ctx: RunContext) -> list[CalibrationSample]:
        items = self._task_items(ctx)
        cache_file = None
        if self.params.cache_dir:
            cache_file = Path(self.params.cache_dir) / f"traces-{self._cache_key(ctx)}.jsonl"
            if cache_file.is_file():
                samples, why = self._read_cache(cache_file, self._cache_header(ctx))
                if samples is not None:
                    ctx.progress.log(f"Loaded cached traces from {cache_file}")
                    self._generation = 1
                    return samples
                ctx.progress.log(f"warning: trace cache {cache_file} not used: {why}; generating the traces again")
        got = self._sample(ctx, list(range(len(items))), {})
        samples = [got[i] for i in range(len(items))]
        if cache_file is not None:
            body = [json.dumps(s.to_json(), default=str) for s in samples]
            header = {**self._cache_header(ctx), "count": len(body), "sha256": _lines_hash(body)}
            try:
                atomic_write_text(cache_file, "\n".join([json.dumps(header)] + body) + "\n")
            except RespError as exc:  # a cache is an optimization: the run goes on without it
                ctx.progress.log(f"warning: trace cache not saved: {exc}")
        return samples

    def regenerate(self, ctx: RunContext, samples: list[CalibrationSample], fraction: float) -> list[CalibrationSample]:
        n = len(samples)
        k = regenerated_count(fraction, n, self.params.regenerate_rounding)
        if k == 0:
            return samples
        rng = random.Random(ctx.seed * 7919 + self._generation)
        chosen = sorted(rng.sample(range(n), k))
        fresh = self._sample(ctx, chosen, {i: samples[i] for i in chosen})
        return [fresh.get(i, s) for i, s in enumerate(samples)]


@hookimpl
def register_calibration_sources(register):
    register("self_generated", SelfGenerated)
