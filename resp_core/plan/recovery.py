"""The memory and time of recovery (``recovery:``) in ``respctl plan``: arithmetic on the dense
model's counts (an upper bound: the compacted model the recovery trains is smaller).

Peak of one training step (:mod:`resp_core.recovery.trainer`):

* the run's model (every parameter, the weights' dtype) stays in memory, plus the compacted
  copy's projection weights (at most the dense projections);
* trained tensors: ``mode: full`` the kept projection weights in the weights' dtype;
  ``mode: lora`` r · (in + out) per adapted projection in float32 (peft keeps adapters of
  low-precision models in float32);
* their gradients (same size and dtype) and AdamW's two moment buffers (twice that);
* activations, output head and backward transients as in the scoring pass
  (:func:`~resp_core.plan.formulas.scoring_memory`) at ``batch_size`` sequences of
  ``max_tokens``; the head's float32 tensors at the decode positions (self_distill adds the
  coarsened copy: counted as one more ``[labelled, vocab]`` float32 tensor).

Time: per step the scoring pass's FLOPs (``6·P·tokens`` for the projections and attention) on
``batch_size`` sequences, times ``steps``, times the recovered points (1 with ``at: final``, every
milestone with ``at: milestones``); self_distill adds one forward pass (2·P per token) of the dense
model over the traces for the teacher.
"""

from __future__ import annotations

from .formulas import DTYPE_BYTES, ModelCounts, scoring_flops, scoring_memory

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _shapes(c: ModelCounts) -> dict[str, tuple[int, int]]:
    """(in, out) of each projection of one dense layer."""
    q, kv = c.heads * c.head_dim, c.kv_heads * c.head_dim
    return {"q_proj": (c.hidden, q), "k_proj": (c.hidden, kv), "v_proj": (c.hidden, kv), "o_proj": (q, c.hidden),
            "gate_proj": (c.hidden, c.intermediate), "up_proj": (c.hidden, c.intermediate),
            "down_proj": (c.intermediate, c.hidden)}


def recovery_settings(recipe) -> dict | None:
    """The recovery's settings the plan needs (its validated params), or None without recovery."""
    if recipe.recovery is None:
        return None
    from ..registry import get_registry

    r = recipe.recovery
    rec = get_registry().create("recovery", r.name, r.params, "recovery")
    p = getattr(rec, "params", None)
    get = lambda name, default: getattr(p, name, default)  # noqa: E731
    return {"name": r.name, "at": r.at, "mode": get("mode", "lora"), "steps": int(get("steps", 100)),
            "batch_size": int(get("batch_size", 4)), "max_tokens": int(get("max_tokens", 1024)),
            "rank": int(get("rank", 8)), "targets": list(get("target_modules", PROJECTIONS)),
            "teacher": rec.teacher() is not None}


def recovery_memory(c: ModelCounts, dtype: str, r: dict, labelled: int) -> dict[str, float]:
    """Bytes of each part of one recovery step at its peak (see the module docstring)."""
    e = DTYPE_BYTES[dtype]
    shapes = {k: v for k, v in _shapes(c).items() if k in r["targets"]}
    if r["mode"] == "lora":
        trained = c.layers * sum(r["rank"] * (i + o) for i, o in shapes.values())
        tb = 4
    else:
        trained = c.layers * sum(i * o for i, o in shapes.values())
        tb = e
    seq = r["max_tokens"]
    lab = min(labelled, seq)
    act = scoring_memory(c, dtype, r["batch_size"], seq, lab, False)
    head = act["output_head"] + (r["batch_size"] * lab * c.vocab * 4 if r["teacher"] else 0)
    return {"run_model_weights": c.parameters * e, "compacted_projections": c.projection * e,
            "trained": trained * tb, "gradients": trained * tb, "adamw_state": 2 * trained * tb,
            "activations": act["activations"], "output_head": head, "backward_transients": act["backward_transients"]}


def recovery_plan(recipe, c: ModelCounts, dtype: str, settings: dict, flops_per_s: float) -> dict | None:
    """``{settings, bytes, peak_bytes, seconds, points}`` of the recipe's recovery, or None."""
    r = recovery_settings(recipe)
    if r is None:
        return None
    labelled = settings["new_tokens"]
    seq = min(r["max_tokens"], settings["prompt_tokens"] + settings["new_tokens"])
    parts = recovery_memory(c, dtype, {**r, "max_tokens": seq}, labelled)
    points = max(1, settings["milestones"]) if r["at"] == "milestones" else 1
    step_s = scoring_flops(c, r["batch_size"], seq, min(labelled, seq)) / flops_per_s
    teacher_s = (2 * c.parameters * settings["calibration_samples"] * seq / flops_per_s) if r["teacher"] else 0.0
    return {"settings": r, "sequence_tokens": seq, "bytes": parts, "peak_bytes": sum(parts.values()), "points": points,
            "seconds": step_s * r["steps"] * points + teacher_s, "teacher_seconds": teacher_s}


def recovery_rows(rec: dict) -> list[tuple[str, str, float]]:
    """(phase, part, bytes) rows of ``respctl plan``'s memory table."""
    s = rec["settings"]
    phase = f"recovery ({s['name']}, {s['mode']}, batch {s['batch_size']} x {rec['sequence_tokens']} tokens)"
    rows = [(phase if i == 0 else "", part.replace("_", " "), v) for i, (part, v) in enumerate(rec["bytes"].items())]
    return rows + [("", "[bold]recovery peak[/]", rec["peak_bytes"])]


__all__ = ["recovery_memory", "recovery_plan", "recovery_rows", "recovery_settings"]
