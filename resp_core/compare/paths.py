"""Path replicates of a comparison (``path_seeds``): each method's pruning paths read back, the
rows summarised over paths (mean of path means, t interval over path means, between- and
within-path SD, per-path and per-item values), paths with identical masks marked deterministic,
and every method paired with the reference method by path seed.

Two levels: a *path seed* is a run's ``seed`` (calibration draw, trace sampling,
regeneration: one pruning path); the *evaluation seeds* (``seeds``) are the sampling seeds of
the evaluators, the same in every path, on the same items.  A path's value is its mean over the
evaluation seeds; the interval of a cell is Student t over the path means; a paired difference
is taken path seed by path seed (:func:`resp_core.stats.paired_difference`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..atomic_io import atomic_write_text
from ..metric_keys import parse_seed_key
from ..stats import bootstrap_ci95, ci95_halfwidth, finite, mean, paired_difference, sd

ITEM_FIELDS = {"seed", "id", "correct"}  # per-item records a paired item-level analysis can use
REACHED = ("sparsity", "sparsity_prunable_blocks", "sparsity_all_blocks", "parameters")
EQUAL_SD = 1e-12  # differences whose SD is at most this are all equal (up to rounding)


def per_seed_values(metrics: dict) -> dict[str, dict[int, float]]:
    """``{metric: {seed: value}}`` from a metrics row's ``<metric>@seed<s>`` keys; without any,
    each ``<task>/accuracy`` under seed -1."""
    out: dict[str, dict[int, float]] = {}
    for k, v in metrics.items():
        parsed = parse_seed_key(k)
        if parsed:
            metric, seed = parsed
            out.setdefault(metric, {})[seed] = float(v)
    if not out:
        for k, v in metrics.items():
            if k.endswith("/accuracy"):
                out[k] = {-1: float(v)}
    return out


def is_finished(run: Path) -> bool:
    info = run / "run.json"
    return info.is_file() and json.loads(info.read_text()).get("status") == "finished"


def run_points(run: Path) -> list[tuple[dict, dict[str, dict[int, float]]]]:
    """Each metrics row of a finished run with its per-seed values, seeds added later included."""
    extra_file = run / "extra_seeds.json"
    extra_all = json.loads(extra_file.read_text()) if extra_file.is_file() else {}
    out = []
    for row in json.loads((run / "metrics.json").read_text()):
        values = per_seed_values(row)
        for metric, more in extra_all.get(f"{row['target']:.2f}", {}).items():
            values.setdefault(metric, {}).update({int(s): v for s, v in more.items()})
        out.append((row, values))
    return out


def write_extra_records(path: Path, records: list[dict]) -> None:
    """Per-item records of seeds evaluated after a run finished, next to its own records: kept
    records of other seeds, these seeds' records replaced."""
    seeds = {r.get("seed") for r in records}
    kept = []
    if path.is_file():
        kept = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        kept = [r for r in kept if r.get("seed") not in seeds]
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept + list(records)))


def item_tables(run: Path, label: str) -> dict[str, dict[int, dict[str, float]]]:
    """Per evaluator file of one evaluated point (``label``: ``dense``, ``milestone_0.20``):
    ``{seed: {item id: correctness}}`` from its per-item records (those with seed, id, correct)."""
    out: dict[str, dict[int, dict[str, float]]] = {}
    for f in sorted((run / "eval").glob(f"{label}_*.jsonl")):
        key = f.name.removesuffix(".jsonl").removesuffix(".extra")
        for line in f.read_text().splitlines():
            r = json.loads(line) if line.strip() else {}
            if ITEM_FIELDS <= r.keys():
                out.setdefault(key, {}).setdefault(int(r["seed"]), {})[str(r["id"])] = float(r["correct"])
    return out


def _matching_table(tables: dict, per_seed: dict[int, float]) -> dict[int, dict[str, float]] | None:
    """The per-item table whose per-seed accuracies are ``per_seed``'s values (the evaluator file
    behind a metric); None when none matches."""
    for table in tables.values():
        if set(table) == set(per_seed) and all(
                table[s] and abs(sum(table[s].values()) / len(table[s]) - v) < 1e-9 for s, v in per_seed.items()):
            return table
    return None


def mask_digest(run: Path) -> str | None:
    """One hash of every mask a run saved (names and bytes); None when it saved none."""
    files = sorted((run / "masks").glob("*.safetensors"))
    if not files:
        return None
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0" + hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


def collect_method(folder: Path, runs) -> dict:
    """Every finished path of one method: ``{(target, metric): cell}``, a cell holding per path
    seed the per-evaluation-seed values, the reached sparsity, the masks' hash and the per-item
    table.  ``runs``: the method's ``(sub, target, path seed)``."""
    cells: dict = {}
    for sub, _, path_seed in runs:
        run = folder / sub
        if not is_finished(run):
            continue
        digest = mask_digest(run)
        for row, values in run_points(run):
            tables = item_tables(run, f"milestone_{row['target']:.2f}")
            for metric, per in values.items():
                cell = cells.setdefault((row["target"], metric), {"per_path": {}, "reached": {}, "digest": {},
                                                                   "items": {}})
                cell["per_path"][path_seed] = dict(sorted(per.items()))
                cell["reached"][path_seed] = {k: row.get(k) for k in REACHED}
                cell["digest"][path_seed] = digest
                table = _matching_table(tables, per)
                if table is not None:
                    cell["items"][path_seed] = table
    return cells


def _reached_mean(values: list):
    if not values or not all(finite(v) for v in values):
        return values[0] if values else None
    if all(v == values[0] for v in values):
        return values[0]
    return round(mean(values), 4)


def _per_item(items: dict, paths: list) -> tuple[dict | None, list | None]:
    """``{"ids": [...], "per_path": {path: {seed: [correctness per id]}}}`` and the per-item
    bootstrap 95% CI of the accuracy (each item averaged over paths and seeds); (None, None)
    unless every path has per-item records."""
    if not paths or any(p not in items for p in paths):
        return None, None
    first = items[paths[0]]
    ids = list(dict.fromkeys(i for s in sorted(first) for i in first[s]))
    per_path = {str(p): {str(s): [items[p][s].get(i) for i in ids] for s in sorted(items[p])} for p in paths}
    pooled = [[v for p in paths for s in items[p] if (v := items[p][s].get(i)) is not None] for i in ids]
    low, high = bootstrap_ci95([sum(v) / len(v) for v in pooled if v])
    return {"ids": ids, "per_path": per_path}, [low, high]


def summarise(method: str, target: float, metric: str, cell: dict) -> dict:
    """One result row over the paths of a cell (see the module docstring)."""
    paths = sorted(cell["per_path"])
    per_path = cell["per_path"]
    path_means = [mean(per_path[p].values()) for p in paths]
    within = [sd(per_path[p].values()) for p in paths]
    digests = [cell["digest"][p] for p in paths]
    identical = None if len(paths) < 2 else digests[0] is not None and all(d == digests[0] for d in digests)
    if identical:  # one distinct path: its spread is over evaluation seeds only
        ci, over = ci95_halfwidth(per_path[paths[0]].values()), "evaluation seeds (paths identical: deterministic)"
    else:
        ci, over = ci95_halfwidth(path_means), "path means"
    reached = {k: _reached_mean([cell["reached"][p][k] for p in paths]) for k in REACHED}
    per_item, ci_items = _per_item(cell["items"], paths)
    row = {"method": method, "target": target, **reached, "metric": metric, "mean": mean(path_means), "ci95": ci,
           "ci_over": over, "n_paths": len(paths), "n_seeds": len({s for p in paths for s in per_path[p]}),
           "sd_between_paths": sd(path_means), "sd_within_paths": mean(v for v in within if finite(v)),
           "paths_identical": identical, "path_means": {str(p): m for p, m in zip(paths, path_means)},
           "per_path": {str(p): {str(s): v for s, v in per_path[p].items()} for p in paths},
           "ci95_items": ci_items}
    if per_item is not None:
        row["per_item"] = per_item
    return row


def dense_row(row: dict, metric: str, per_seed: dict[int, float], tables: dict) -> dict:
    """The dense model's row: evaluated once, so its interval is over evaluation seeds."""
    vals = [per_seed[s] for s in sorted(per_seed)]
    out = {"method": "dense", "target": row["target"], **{k: row.get(k) for k in REACHED}, "metric": metric,
           "mean": mean(vals), "ci95": ci95_halfwidth(vals), "ci_over": "evaluation seeds", "n_paths": None,
           "n_seeds": len(vals), "per_seed": {str(s): per_seed[s] for s in sorted(per_seed)}, "ci95_items": None}
    table = _matching_table(tables, per_seed)
    if table is not None:
        ids = list(dict.fromkeys(i for s in sorted(table) for i in table[s]))
        out["per_item"] = {"ids": ids, "per_seed": {str(s): [table[s].get(i) for i in ids] for s in sorted(table)}}
        low, high = bootstrap_ci95([mean(v for s in table if (v := table[s].get(i)) is not None) for i in ids])
        out["ci95_items"] = [low, high]
    return out


def paired_differences(rows: list[dict], reference: str | dict[str, str]) -> list[dict]:
    """Every method against its reference at every sparsity and metric, paired by path seed over
    the path seeds both have: ``d_s = path mean(method, s) - path mean(reference, s)``.
    ``reference``: one label for every method, or ``{method: reference label}``."""
    cell = {(r["method"], r["target"], r["metric"]): r for r in rows if r["method"] != "dense"}
    out = []
    for (method, target, metric), r in cell.items():
        against = reference if isinstance(reference, str) else reference.get(method)
        ref = cell.get((against, target, metric))
        if method == against or ref is None:
            continue
        common = [p for p in r["path_means"] if p in ref["path_means"]]
        if not common:
            continue
        a, b = [r["path_means"][p] for p in common], [ref["path_means"][p] for p in common]
        d = paired_difference(a, b)
        note = None
        if d["n"] < 2:
            note = "not resolved at n = 1"
        elif r.get("paths_identical") and ref.get("paths_identical"):
            note = "paths identical in both methods: no spread over paths"
        elif d["sd"] <= EQUAL_SD:
            note = f"all {d['n']} differences equal: no spread to build an interval on"
        if note is not None:  # a zero-width interval or MDE would claim a precision the paths do not give
            d.update(low=float("nan"), high=float("nan"), mde=float("nan"))
        resolved = note is None and finite(d["low"])
        out.append({"method": method, "reference": against, "target": target, "metric": metric,
                    "n_paths": d["n"], "path_seeds": [int(p) for p in common],
                    "per_path": {p: x - y for p, x, y in zip(common, a, b)}, "mean": d["mean"],
                    "ci95_low": d["low"], "ci95_high": d["high"],
                    "excludes_zero": (d["low"] > 0 or d["high"] < 0) if resolved else None,
                    "sd": d["sd"], "mde": d["mde"], "note": note})
    return out
