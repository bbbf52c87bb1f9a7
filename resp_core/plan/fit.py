"""The plan of a recipe (``respctl plan``, and the fit check ``run`` and ``validate`` make on a GPU):
the model's config and exact parameter counts, the settings the formulas need, the plan, and
what does not fit."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import RespError
from .formulas import (DEVICES, DTYPE_BYTES, GRADIENT_SCORERS, GiB, ModelCounts, forward_only_memory,
                       generation_time, hf_generation_memory, kv_bytes_per_token, scoring_flops, scoring_memory)
from .recovery import recovery_plan

# Hub configs of models the shipped recipes name, for machines without network (the values of
# each model's config.json on the hub); a local folder or the hub cache is always preferred.
KNOWN_CONFIGS: dict[str, dict] = {
    "Qwen/Qwen3-0.6B": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                            num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
    "Qwen/Qwen3-1.7B": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                            num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
    "Qwen/Qwen3-4B": dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                          num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
    "Qwen/Qwen3-8B": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                          num_key_value_heads=8, head_dim=128, tie_word_embeddings=False),
    "Qwen/Qwen3-14B": dict(hidden_size=5120, intermediate_size=17408, num_hidden_layers=40, num_attention_heads=40,
                           num_key_value_heads=8, head_dim=128, tie_word_embeddings=False),
    "Qwen/Qwen3-32B": dict(hidden_size=5120, intermediate_size=25600, num_hidden_layers=64, num_attention_heads=64,
                           num_key_value_heads=8, head_dim=128, tie_word_embeddings=False),
}
_QWEN3_COMMON = dict(model_type="qwen3", vocab_size=151936, max_position_embeddings=40960, rms_norm_eps=1e-6,
                     attention_bias=False, rope_theta=1000000.0)


def parse_size(text: str, field: str = "--gpu-memory") -> int:
    """``80GiB``, ``80GB``, ``141 GB``, ``81920MiB`` or a byte count -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]i?B|B)?\s*", text, re.IGNORECASE)
    if not m:
        raise RespError(f"{field}: {text!r} is not a size like 80GiB or 141GB")
    value, unit = float(m.group(1)), (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12,
             "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40}[unit]
    if value <= 0:
        raise RespError(f"{field}: {text!r} must be positive")
    return int(value * scale)


def gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB"


# --------------------------------------------------------------------------------------------------
# The model: config and exact parameter counts (meta device)
# --------------------------------------------------------------------------------------------------

def load_config(path: str, config_file: str | None = None):
    """The model's config without weights: ``config_file``, a local folder, the hub (or its cache),
    else the built-in copy of a known hub config.  Returns ``(config, source)``."""
    from transformers import AutoConfig, PretrainedConfig

    if config_file:
        try:
            return AutoConfig.from_pretrained(config_file), config_file
        except Exception as exc:
            raise RespError(f"--config: cannot read {config_file}: {str(exc).splitlines()[0]}") from None
    from ..model_source import model_source

    source = model_source(path)
    if path in KNOWN_CONFIGS and not __import__("pathlib").Path(path).exists():
        try:
            return AutoConfig.from_pretrained(path, local_files_only=True), f"{path} (hub cache)"
        except Exception:
            from transformers import Qwen3Config

            data = {**_QWEN3_COMMON, **KNOWN_CONFIGS[path]}
            data.pop("model_type")
            return Qwen3Config(**data), f"built-in copy of {path}'s hub config (not in the hub cache here)"
    try:
        return AutoConfig.from_pretrained(source.location, gguf_file=source.gguf_file) if source.gguf_file \
            else AutoConfig.from_pretrained(source.location), source.location
    except Exception as exc:
        raise RespError(f"model.path: cannot read the config of {path!r} ({str(exc).splitlines()[0]}); "
                        "give a local folder, or --config path/to/config.json") from None


def count_parameters(config) -> ModelCounts:
    """Exact counts from the model built on the meta device (no memory, no weights)."""
    from transformers import AutoModelForCausalLM

    from ..model.adapter import geometry_from_config

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    unique = {id(p): p for p in model.parameters()}
    projections = [m.weight for name, m in model.named_modules()
                   if name.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                  "down_proj")]
    g = geometry_from_config(config)
    emb = model.get_input_embeddings().weight.numel()
    return ModelCounts(parameters=sum(p.numel() for p in unique.values()),
                       projection=sum(w.numel() for w in projections),
                       largest_projection=max(w.numel() for w in projections), embedding=emb,
                       layers=g.num_layers, hidden=g.hidden_size, intermediate=g.intermediate_size,
                       heads=g.num_heads, kv_heads=g.num_kv_heads, head_dim=g.head_dim,
                       vocab=config.vocab_size)


# --------------------------------------------------------------------------------------------------
# The plan of a recipe
# --------------------------------------------------------------------------------------------------

@dataclass
class Plan:
    model: str
    config_source: str
    dtype: str
    counts: ModelCounts
    gpu_memory: int | None
    device: str
    scoring: dict[str, float]
    scoring_checkpointed: dict[str, float]
    generation: dict[str, Any]
    times: dict[str, float]
    settings: dict[str, Any]
    problems: list[str] = field(default_factory=list)
    recovery: dict | None = None  # resp_core/plan/recovery.py (None: the recipe has no recovery)

    @property
    def scoring_peak(self) -> float:
        return sum(self.scoring.values())

    @property
    def scoring_checkpointed_peak(self) -> float:
        return sum(self.scoring_checkpointed.values())

    def to_json(self) -> dict:
        return {"model": self.model, "config_source": self.config_source, "dtype": self.dtype,
                "parameters": self.counts.parameters, "projection_parameters": self.counts.projection,
                "gpu_memory_bytes": self.gpu_memory, "device": self.device, "settings": self.settings,
                "scoring_bytes": self.scoring, "scoring_peak_bytes": self.scoring_peak,
                "scoring_checkpointed_bytes": self.scoring_checkpointed,
                "scoring_checkpointed_peak_bytes": self.scoring_checkpointed_peak,
                "generation": self.generation, "seconds": self.times, "problems": self.problems,
                **({"recovery": self.recovery} if self.recovery is not None else {})}


def _params(ref) -> dict:
    return dict(getattr(ref, "params", {}) or {})


# items of the shipped lm-eval tasks (test splits: GSM8K 1,319 problems, MathQA 2,985)
LM_EVAL_TASK_ITEMS = {"resp_gsm8k_cot": 1319, "resp_mathqa_gen": 2985}


def _evaluator_items(name: str, p: dict, task_items: int | None) -> int:
    count = p.get("num_items") or p.get("limit")
    if isinstance(count, int) and count > 0:
        return count
    if name == "lm_eval":
        total = 0
        for t in p.get("tasks") or ["resp_gsm8k_cot"]:
            size = next((v for k, v in LM_EVAL_TASK_ITEMS.items() if t.startswith(k)), None)
            total += int(size * count) if isinstance(count, float) and size else (size or 0)
        return total
    return task_items or 0


def recipe_settings(recipe, prompt_tokens: int = 256) -> dict:
    """What the plan needs from a recipe: batch sizes, trace length, sample counts, the schedule's
    steps and milestones (from the schedule plugin itself), evaluation items."""
    from ..registry import get_registry

    reg = get_registry()
    cal = _params(recipe.calibration)
    sampling = dict(cal.get("sampling") or {})
    new = int(sampling.get("max_new_tokens", cal.get("max_length", 256)))
    sc = _params(recipe.scorer)
    schedule = reg.create("schedule", recipe.schedule.name, _params(recipe.schedule), "schedule")
    steps = schedule.steps()
    stop = getattr(schedule, "stop_at", None)
    if stop is not None:  # a fixed grid the run leaves at its target: its points up to the first at or past it
        steps = steps[:next((i + 1 for i, st in enumerate(steps) if st.sparsity >= stop), len(steps))]
    measured: dict = {}  # milestones crossed by measured sparsity (``milestones_on: reached``), with their ρ
    for st in steps:
        measured.update(getattr(st, "measured_milestones", None) or {})
    task_items = None
    try:
        task = reg.create("task", recipe.task.name, _params(recipe.task), "task")
        task_items = task.split_size("test") if hasattr(task, "split_size") else None
    except Exception:  # a task whose data is not here: the count stays unknown
        pass
    evaluators = []
    for ev in recipe.evaluation.evaluators:
        p = _params(ev)
        evaluators.append({"name": ev.name, "items": _evaluator_items(ev.name, p, task_items),
                           "new_tokens": int((p.get("sampling") or {}).get("max_new_tokens", new)),
                           "seeds": len(p.get("seeds") or [0])})
    return {
        "calibration_samples": int(cal.get("num_samples", 128)),
        "prompt_tokens": prompt_tokens, "new_tokens": new,
        "scoring_batch_size": int(sc.get("batch_size", 16)),
        "gradient_checkpointing": bool(sc.get("gradient_checkpointing", False)),
        "steps": len(steps), "milestones": max(sum(1 for st in steps if st.milestone), len(measured)),
        "regenerated_fractions": sum(st.regenerate_fraction for st in steps if st.milestone)
        + sum(float(v or 0.0) for v in measured.values()),
        "generator": recipe.generator.name, "generator_params": _params(recipe.generator),
        "evaluate_dense": bool(recipe.evaluation.evaluate_dense), "evaluators": evaluators,
    }


def make_plan(recipe, gpu_memory: int | None = None, gpu: str = "h100", config_file: str | None = None,
              prompt_tokens: int = 256, mfu: float = 0.4) -> Plan:
    """The memory and time plan of ``recipe`` (a :class:`~resp_core.recipe.Recipe`)."""
    if gpu not in DEVICES:
        raise RespError(f"--gpu: {gpu!r} is not one of {', '.join(DEVICES)}")
    dev = DEVICES[gpu]
    config, source = load_config(recipe.model.path, config_file)
    counts = count_parameters(config)
    dtype = recipe.model.dtype
    s = recipe_settings(recipe, prompt_tokens)
    seq = s["prompt_tokens"] + s["new_tokens"]
    bs = s["scoring_batch_size"]
    if recipe.scorer.name in GRADIENT_SCORERS:
        scoring = scoring_memory(counts, dtype, bs, seq, s["new_tokens"], s["gradient_checkpointing"])
        ckpt = scoring_memory(counts, dtype, bs, seq, s["new_tokens"], True)
    else:
        scoring = ckpt = forward_only_memory(counts, dtype, bs, seq)
    memory = gpu_memory if gpu_memory is not None else dev["memory"]
    # generation
    gp = s["generator_params"]
    weights = counts.parameters * DTYPE_BYTES[dtype]
    kv_tok = kv_bytes_per_token(counts, dtype)
    if s["generator"] == "vllm":
        util = float(gp.get("gpu_memory_utilization", 0.45))
        engine = util * memory
        kv_room = engine - weights - 2 * GiB  # activations / CUDA graphs of the engine: about 2 GiB
        concurrency = max(0, int(kv_room // (kv_tok * seq)))
        concurrency = min(concurrency, int(gp.get("max_num_seqs") or 256))
        sleep = bool(gp.get("enable_sleep_mode", True))
        generation = {"backend": "vllm", "engine_bytes": engine, "kv_cache_bytes": max(0.0, kv_room),
                      "kv_bytes_per_token": kv_tok, "concurrent_sequences": concurrency,
                      "hf_weights_bytes": weights, "peak_bytes": weights + engine, "sleep_during_scoring": sleep}
    else:
        gbs = int(gp.get("batch_size", 64))
        parts = hf_generation_memory(counts, dtype, gbs, seq)
        concurrency = gbs
        generation = {"backend": s["generator"], **parts, "kv_bytes_per_token": kv_tok,
                      "concurrent_sequences": gbs, "peak_bytes": sum(parts.values())}
    # time
    flops, bw = dev["flops"], dev["bandwidth"]
    score_s = scoring_flops(counts, s["calibration_samples"], seq, s["new_tokens"]) / (flops * mfu)
    if recipe.scorer.name not in GRADIENT_SCORERS:
        score_s /= 3  # forward only
    calib_gen = generation_time(counts, dtype, s["calibration_samples"], s["prompt_tokens"], s["new_tokens"],
                                max(1, concurrency), flops, bw, mfu)
    regen = s["regenerated_fractions"] * calib_gen
    points = s["milestones"] + (1 if s["evaluate_dense"] else 0)
    ev_s = sum(generation_time(counts, dtype, max(1, e["items"]) * e["seeds"], s["prompt_tokens"], e["new_tokens"],
                               max(1, concurrency), flops, bw, mfu) for e in s["evaluators"] if e["items"]) * points
    times = {"scoring_pass": score_s, "scoring_all_steps": score_s * s["steps"],
             "calibration_generation": calib_gen, "regeneration": regen, "evaluation": ev_s,
             "total": score_s * s["steps"] + calib_gen + regen + ev_s}
    recovery = recovery_plan(recipe, counts, dtype, s, flops * mfu)
    if recovery is not None:
        times["recovery"] = recovery["seconds"]
        times["total"] += recovery["seconds"]
    plan = Plan(model=recipe.model.path, config_source=source, dtype=dtype, counts=counts, gpu_memory=memory,
                device=recipe.model.device, scoring=scoring, scoring_checkpointed=ckpt, generation=generation,
                times=times, settings={**s, "gpu": gpu, "mfu": mfu}, recovery=recovery)
    plan.problems = fit_problems(plan, memory)
    return plan


def fit_problems(plan: Plan, memory: int) -> list[str]:
    """What does not fit in ``memory`` bytes, each naming what to change."""
    out = []
    s = plan.settings
    peak = plan.scoring_peak
    gen = plan.generation
    if gen["backend"] == "vllm" and not gen["sleep_during_scoring"]:
        peak += gen["engine_bytes"]
    if peak > memory and not plan.scoring["projection_gradients"]:
        out.append(f"scoring (forward only) needs {gib(peak)} but the GPU has {gib(memory)}: set "
                   "scorer.params.batch_size smaller, or use a GPU with more memory")
    elif peak > memory:
        fixes = []
        if s["scoring_batch_size"] > 1:
            fixes.append("scorer.params.batch_size: 1")
        if not s["gradient_checkpointing"]:
            fixes.append("scorer.params.gradient_checkpointing: true")
        if gen["backend"] == "vllm" and not gen["sleep_during_scoring"]:
            fixes.append("generator.params.enable_sleep_mode: true")
        fixes.append("use a GPU with more memory")
        out.append(f"scoring needs {gib(peak)} (weights {gib(plan.scoring['weights'])}, projection gradients "
                   f"{gib(plan.scoring['projection_gradients'])}, activations {gib(plan.scoring['activations'])} at "
                   f"batch {s['scoring_batch_size']} x {s['prompt_tokens'] + s['new_tokens']} tokens) but the GPU has "
                   f"{gib(memory)}: set " + " or ".join(fixes))
    if gen["backend"] == "vllm":
        if gen["peak_bytes"] > memory:
            out.append(f"generation needs {gib(gen['peak_bytes'])} (HF weights {gib(gen['hf_weights_bytes'])} + vLLM's "
                       f"gpu_memory_utilization share {gib(gen['engine_bytes'])}) but the GPU has {gib(memory)}: lower "
                       "generator.params.gpu_memory_utilization")
        elif gen["concurrent_sequences"] < 1:
            out.append(f"vLLM's share {gib(gen['engine_bytes'])} holds the weights but no {s['prompt_tokens'] + s['new_tokens']}"
                       "-token sequence: raise generator.params.gpu_memory_utilization")
    elif gen["peak_bytes"] > memory:
        out.append(f"generation needs {gib(gen['peak_bytes'])} (KV cache {gib(gen['kv_cache'])} at batch "
                   f"{gen['concurrent_sequences']}) but the GPU has {gib(memory)}: lower generator.params.batch_size")
    rec = plan.recovery
    if rec is not None and rec["peak_bytes"] > memory:
        r = rec["settings"]
        out.append(f"recovery needs {gib(rec['peak_bytes'])} (trained {gib(rec['bytes']['trained'])} + gradients + "
                   f"AdamW state, activations {gib(rec['bytes']['activations'])} at batch {r['batch_size']} x "
                   f"{rec['sequence_tokens']} tokens) but the GPU has {gib(memory)}: set recovery.params.batch_size or "
                   "max_tokens smaller" + (", or mode: lora" if r["mode"] == "full" else ""))
    return out


def check_fits(recipe, gpu_memory: int | None = None) -> Plan | None:
    """Before a run loads its model: on a CUDA device (or with ``gpu_memory`` given), raise a
    one-line :class:`RespError` naming what to change when the plan does not fit.  Returns the
    plan, or None where nothing was checked (CPU)."""
    if gpu_memory is None:
        if not recipe.model.device.startswith("cuda") or not torch.cuda.is_available():
            return None
        index = int(recipe.model.device.split(":")[1]) if ":" in recipe.model.device else 0
        gpu_memory = torch.cuda.get_device_properties(index).total_memory
    plan = make_plan(recipe, gpu_memory)
    if plan.problems:
        raise RespError(f"plan: {plan.problems[0]} (respctl plan RECIPE prints the whole plan)")
    return plan


def format_seconds(s: float) -> str:
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"
