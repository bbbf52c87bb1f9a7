"""Effective speedup of a comparison's pruned models: the per-token decode speedup of each
compacted milestone model, measured against the dense model, times the ratio of their answer
lengths (dense tokens / pruned tokens), with 95% intervals.

Pruned reasoning models ramble: a model that decodes each token 1.4x faster but answers with 20%
more tokens saves less than its per-token speed says.  For path seed *s* of a method at a sparsity:

* **per-token speedup** *S_s*: dense time / pruned time per generated token, measured side by
  side in one process (:mod:`.timing`): ``repeats`` rounds, each timing both models on the same
  prompts with exactly ``new_tokens`` greedy tokens (end of sequence suppressed); the order is
  swapped every other round.  With *r_i* = log(dense time_i / pruned time_i) of round *i*:
  *S_s = exp(mean r_i)* (the geometric mean of the paired ratios) and its 95% interval
  *exp(mean r ± t_{0.975, R−1} · SD(r) / √R)* (a t interval of the log-ratio over the R rounds,
  ``scipy.stats.ttest_1samp(r, 0).confidence_interval()``, exponentiated);
* **length ratio** *L_s*: the dense model's mean answer length / the path's, both averaged over
  the evaluation seeds they share (``<task>/mean_tokens@seed<j>``: the same items, the same
  sampling seeds), so the ratio is paired by evaluation seed and item;
* **effective speedup** *E_s = S_s · L_s*: the ratio of the time to produce an answer.

Over the *n* path seeds of a cell, each figure *X* is summarised on the log scale: the geometric
mean *exp(mean_s log X_s)* and the 95% interval *exp(mean ± t_{0.975, n−1} · SD_s(log X_s) / √n)*
(Student t over path seeds, as every cell of a comparison).  Because log E_s = log S_s + log L_s
exactly, the interval of *E* is the delta method on logs without linearisation: the SD of the
per-path sums carries the spread of both factors over paths, their covariance and the timing
noise in each *S_s*.  With one path there is no interval over paths: *S* keeps its interval over
timing rounds, *L* and *E* are "not resolved at n = 1".  The dense model is evaluated once; like
the paired differences, the intervals are conditional on its evaluation.

Against the method's reference (the comparison's ``reference`` or the method's own), the ratio
of effective speedups is paired by path seed: the mean of log E_s(method) − log E_s(reference)
with its paired t interval (:func:`resp_core.stats.paired_difference`), exponentiated.
"""

from __future__ import annotations

import math

from pydantic import Field

from ..recipe import _Strict
from ..stats import finite, mean, paired_difference, sd, t975

EQUAL_SD = 1e-12
LENGTH_SUFFIX = "/mean_tokens"


class SpeedupSection(_Strict):
    """``speedup:`` of a comparison recipe: time every milestone model against the dense model."""

    repeats: int = Field(5, ge=2, le=100)  # timed rounds, each: dense and pruned once (order swapped every other)
    new_tokens: int = Field(64, ge=1, le=4096)  # tokens decoded per prompt (no early stop)
    prompts: int = Field(8, ge=1, le=256)  # the first prompts of the task's test split
    batch_size: int = Field(1, ge=1, le=256)  # prompts decoded together


def log_interval(logs: list[float]) -> dict:
    """Geometric mean of ``exp(logs)`` and the 95% t interval of the mean log, exponentiated
    (``low``, ``high``: NaN for fewer than two values or no spread); ``n`` and ``sd_log``."""
    n = len(logs)
    if n == 0:
        return {"mean": float("nan"), "ci95_low": float("nan"), "ci95_high": float("nan"), "n": 0,
                "sd_log": float("nan")}
    m, s = mean(logs), sd(logs)
    if n >= 2 and finite(s) and s > EQUAL_SD:
        h = t975(n - 1) * s / math.sqrt(n)
        low, high = math.exp(m - h), math.exp(m + h)
    else:
        low = high = float("nan")
    return {"mean": math.exp(m), "ci95_low": low, "ci95_high": high, "n": n, "sd_log": s}


def timing_speedup(timing: dict) -> dict:
    """One path's per-token speedup from its timing record: ``dense_s`` and ``pruned_s`` (seconds
    of each round, paired by round) -> geometric mean of the ratios and its t interval."""
    logs = [math.log(d / p) for d, p in zip(timing["dense_s"], timing["pruned_s"], strict=True)]
    out = log_interval(logs)
    tokens = timing["tokens_per_round"]
    out.update(rounds=len(logs), dense_s_per_token=mean(timing["dense_s"]) / tokens,
               pruned_s_per_token=mean(timing["pruned_s"]) / tokens)
    return out


def length_ratio(dense: dict, pruned: dict) -> float:
    """Dense mean answer length / pruned mean answer length over the evaluation seeds both have
    (``{seed: mean tokens}`` each; seed keys as strings or ints); NaN when they share none."""
    d, q = {str(k): v for k, v in dense.items()}, {str(k): v for k, v in pruned.items()}
    common = [k for k in q if k in d]
    if not common:
        return float("nan")
    den = mean(q[k] for k in common)
    return mean(d[k] for k in common) / den if den > 0 else float("nan")


def _cell(per_path: dict[str, float], over: str) -> dict:
    paths = [p for p, v in per_path.items() if finite(v) and v > 0]
    out = log_interval([math.log(per_path[p]) for p in paths])
    out.update(per_path={p: per_path[p] for p in paths}, ci_over=over)
    if out["n"] == 1:
        out["note"] = "not resolved at n = 1"
    elif out["n"] >= 2 and not finite(out["ci95_low"]):
        out["note"] = f"all {out['n']} paths equal: no spread to build an interval on"
    else:
        out["note"] = None
    return out


def speedup_rows(rows: list[dict], timings: dict, references: dict[str, str]) -> list[dict]:
    """One row per method x sparsity x task: per-token speedup, length ratio and effective speedup
    over path seeds (see the module docstring), and the effective speedup against the method's
    reference.  ``rows``: a comparison's rows over paths; ``timings``: ``{(method, target, path
    seed as str): timing record}``; ``references``: ``{method: reference label}``."""
    dense = {r["metric"]: r for r in rows if r["method"] == "dense"}
    tasks = sorted({m[:-len(LENGTH_SUFFIX)] for m in dense if m.endswith(LENGTH_SUFFIX)})
    cells = {(r["method"], r["target"], r["metric"]): r for r in rows if r["method"] != "dense"}
    timed: dict = {}
    for (method, target, path), timing in timings.items():
        timed.setdefault((method, target), {})[str(path)] = timing
    methods = list(dict.fromkeys(m for m, _ in timed))
    timed = dict(sorted(timed.items(), key=lambda kv: (methods.index(kv[0][0]), kv[0][1])))
    out = []
    for (method, target), per in timed.items():  # methods in the recipe's order, then sparsities
        per_token = {p: timing_speedup(t) for p, t in sorted(per.items(), key=lambda kv: int(kv[0]))}
        speed = {p: v["mean"] for p, v in per_token.items()}
        for task in tasks or [None]:
            row = {"method": method, "target": target, "task": task}
            s_cell = _cell(speed, "path seeds")
            if s_cell["n"] == 1:  # one path: its interval over timing rounds
                (only,) = per_token.values()
                s_cell.update(ci95_low=only["ci95_low"], ci95_high=only["ci95_high"], note=None,
                              ci_over="timing rounds (one path)")
            s_cell["per_path_timing"] = per_token
            row["per_token_speedup"] = s_cell
            if task is not None:
                length = cells.get((method, target, task + LENGTH_SUFFIX))
                ratios = {} if length is None else {
                    p: length_ratio(dense[task + LENGTH_SUFFIX].get("per_seed") or {}, seeds)
                    for p, seeds in length["per_path"].items()}
                row["length_ratio"] = _cell(ratios, "path seeds")
                row["effective_speedup"] = _cell({p: speed[p] * ratios[p] for p in speed if p in ratios},
                                                 "path seeds")
            out.append(row)
    effective = {(r["method"], r["target"], r["task"]): r["effective_speedup"]["per_path"] for r in out
                 if "effective_speedup" in r}
    for r in out:
        ref = references.get(r["method"])
        if "effective_speedup" not in r or ref is None or ref == r["method"]:
            continue
        r["against_reference"] = against_reference(effective[(r["method"], r["target"], r["task"])],
                                                   effective.get((ref, r["target"], r["task"]), {}), ref)
    return out


def against_reference(own: dict[str, float], ref: dict[str, float], reference: str) -> dict:
    """Ratio of effective speedups method / reference, paired by path seed: exp of the mean of
    log E_s(method) − log E_s(reference) and of its paired t interval."""
    common = [p for p in own if p in ref]
    out = {"reference": reference, "n_paths": len(common), "path_seeds": [int(p) for p in common]}
    if not common:
        return {**out, "ratio": float("nan"), "ci95_low": float("nan"), "ci95_high": float("nan"),
                "note": "no path seed in common"}
    d = paired_difference([math.log(own[p]) for p in common], [math.log(ref[p]) for p in common])
    note = None
    if d["n"] < 2:
        note = "not resolved at n = 1"
    elif d["sd"] <= EQUAL_SD:
        note = f"all {d['n']} ratios equal: no spread to build an interval on"
    low, high = (float("nan"), float("nan")) if note else (math.exp(d["low"]), math.exp(d["high"]))
    return {**out, "ratio": math.exp(d["mean"]), "ci95_low": low, "ci95_high": high, "note": note}
