"""A comparison's results: rows (method x sparsity x metric: mean, 95% CI, per-seed values) from
its finished runs, written as results.json / results.csv, report.md and the plot."""

from __future__ import annotations

import io
import json
from pathlib import Path

from ..atomic_io import atomic_write_text, write_json
from ..metric_keys import parse_seed_key
from ..stats import ci95_halfwidth, json_safe, mean
from .schema import method_runs, saved_compare


def _per_seed(metrics: dict) -> dict[str, dict[int, float]]:
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


def collect_results(folder: Path) -> dict:
    """Rows (method × sparsity) from the finished runs in a comparison folder."""
    cmp = saved_compare(folder)
    rows = []

    def add(method: str, row: dict, extra: dict[str, dict[int, float]]):
        seeds = _per_seed(row)
        for metric, more in extra.items():
            seeds.setdefault(metric, {}).update(more)
        for metric, per_seed in seeds.items():
            vals = [per_seed[s] for s in sorted(per_seed)]
            rows.append({
                "method": method, "target": row["target"], "sparsity": row["sparsity"],
                **{k: row.get(k) for k in ("sparsity_prunable_blocks", "sparsity_all_blocks")},
                "parameters": row["parameters"], "metric": metric, "mean": mean(vals),
                "ci95": ci95_halfwidth(vals), "n_seeds": len(vals),
                "per_seed": {str(s): per_seed[s] for s in sorted(per_seed)},
                # per-item bootstrap 95% CI [low, high] when the evaluator reports one (task_accuracy)
                "ci95_items": ([row[f"{metric}_items_ci95_low"], row[f"{metric}_items_ci95_high"]]
                               if f"{metric}_items_ci95_low" in row else None),
            })

    dense_file = folder / "dense" / "metrics.json"
    if dense_file.is_file():
        dense_rows = json.loads(dense_file.read_text())
        extra = json.loads((folder / "dense" / "extra_seeds.json").read_text()) if (folder / "dense" / "extra_seeds.json").is_file() else {}
        for r in dense_rows[:1]:
            add("dense", r, {k: {int(s): v for s, v in d.items()} for k, d in extra.get("0.00", {}).items()})
    for m in cmp.methods:
        for sub, _ in method_runs(cmp, m):
            run = folder / sub
            if not (run / "run.json").is_file() or json.loads((run / "run.json").read_text()).get("status") != "finished":
                continue
            extra_all = json.loads((run / "extra_seeds.json").read_text()) if (run / "extra_seeds.json").is_file() else {}
            for r in json.loads((run / "metrics.json").read_text()):
                extra = extra_all.get(f"{r['target']:.2f}", {})
                add(m.label, r, {k: {int(s): v for s, v in d.items()} for k, d in extra.items()})
    info = {
        "name": cmp.name, "model": cmp.model.path, "task": cmp.task.model_dump(), "seeds": cmp.seeds,
        "sparsities": cmp.sparsities, "structures": cmp.structures.model_dump(),
        "calibration": cmp.calibration.model_dump(),
        "methods": [m.model_dump(exclude_none=True) for m in cmp.methods],
    }
    for run_json in sorted(folder.glob("runs/*/run.json")) + sorted(folder.glob("runs/*/*/run.json")):
        meta = json.loads(run_json.read_text())
        info.setdefault("commit", meta.get("commit"))
        info.setdefault("model_fingerprint", meta.get("model_fingerprint"))
        info.setdefault("torch", meta.get("torch"))
    return {"info": info, "rows": rows}


def write_results(folder: Path, results: dict, ci: str = "seeds") -> None:
    """results.json, results.csv, report.md and the plot (PNG, PDF, SVG); ``ci``: which 95% CI
    the report and plot show (``seeds`` or ``items``, see :mod:`resp_core.report`)."""
    import csv

    write_json(folder / "results.json", json_safe(results))  # valid JSON: null, never NaN
    fh = io.StringIO(newline="")
    w = csv.writer(fh)
    w.writerow(["method", "target", "sparsity", "sparsity_prunable_blocks", "sparsity_all_blocks", "parameters",
                "metric", "mean", "ci95", "n_seeds", "per_seed"])
    for r in results["rows"]:
        w.writerow([r["method"], r["target"], r["sparsity"], r.get("sparsity_prunable_blocks"),
                    r.get("sparsity_all_blocks"), r["parameters"], r["metric"], f"{r['mean']:.6f}",
                    "" if r["ci95"] != r["ci95"] else f"{r['ci95']:.6f}", r["n_seeds"],
                    ";".join(f"{k}:{v:.4f}" for k, v in r["per_seed"].items())])
    atomic_write_text(folder / "results.csv", fh.getvalue())
    from ..report import render_markdown, render_plot

    render_plot(results, folder / "accuracy.png", ci=ci)
    atomic_write_text(folder / "report.md", render_markdown(results, plot="accuracy.png", ci=ci))
