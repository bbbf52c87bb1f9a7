"""A comparison's results: rows (method x sparsity x metric: mean, 95% CI, per-seed values) from
its finished runs, written as results.json / results.csv, report.md and the plot.  With path
seeds, the rows are over pruning paths and come with paired differences against the reference
method (:mod:`.paths`; also differences.csv and, with several path seeds, differences.png)."""

from __future__ import annotations

import io
import json
from pathlib import Path

from ..atomic_io import atomic_write_text, write_json
from ..stats import ci95_halfwidth, json_safe, mean
from .paths import collect_method, dense_row, item_tables, paired_differences, summarise
from .paths import per_seed_values as _per_seed
from .schema import method_runs, saved_compare


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

    if cmp.path_seeds is not None:
        return _collect_paths(folder, cmp)
    dense_file = folder / "dense" / "metrics.json"
    if dense_file.is_file():
        dense_rows = json.loads(dense_file.read_text())
        extra = json.loads((folder / "dense" / "extra_seeds.json").read_text()) if (folder / "dense" / "extra_seeds.json").is_file() else {}
        for r in dense_rows[:1]:
            add("dense", r, {k: {int(s): v for s, v in d.items()} for k, d in extra.get("0.00", {}).items()})
    for m in cmp.methods:
        for sub, _, _ in method_runs(cmp, m):
            run = folder / sub
            if not (run / "run.json").is_file() or json.loads((run / "run.json").read_text()).get("status") != "finished":
                continue
            extra_all = json.loads((run / "extra_seeds.json").read_text()) if (run / "extra_seeds.json").is_file() else {}
            for r in json.loads((run / "metrics.json").read_text()):
                extra = extra_all.get(f"{r['target']:.2f}", {})
                add(m.label, r, {k: {int(s): v for s, v in d.items()} for k, d in extra.items()})
    return {"info": _info(folder, cmp), "rows": rows}


def _info(folder: Path, cmp, extra: dict | None = None) -> dict:
    info = {
        "name": cmp.name, "model": cmp.model.path, "task": cmp.task.model_dump(), "seeds": cmp.seeds,
        **(extra or {}),
        "sparsities": cmp.sparsities, "structures": cmp.structures.model_dump(),
        "calibration": cmp.calibration.model_dump(),
        "methods": [m.model_dump(exclude_none=True) for m in cmp.methods],
    }
    found = sorted(folder.glob("runs/*/run.json")) + sorted(folder.glob("runs/*/*/run.json"))
    if cmp.path_seeds is not None:
        found += sorted(folder.glob("runs/*/*/*/run.json"))
    for run_json in found:
        meta = json.loads(run_json.read_text())
        info.setdefault("commit", meta.get("commit"))
        info.setdefault("model_fingerprint", meta.get("model_fingerprint"))
        info.setdefault("torch", meta.get("torch"))
    return info


def _collect_paths(folder: Path, cmp) -> dict:
    """Rows over pruning paths (one per method x sparsity x metric) and the paired differences."""
    rows = []
    dense = folder / "dense"
    if (dense / "metrics.json").is_file():
        extra = json.loads((dense / "extra_seeds.json").read_text()) if (dense / "extra_seeds.json").is_file() else {}
        for r in json.loads((dense / "metrics.json").read_text())[:1]:
            values = _per_seed(r)
            for metric, more in extra.get("0.00", {}).items():
                values.setdefault(metric, {}).update({int(s): v for s, v in more.items()})
            tables = item_tables(dense, "dense")
            rows += [dense_row(r, metric, per, tables) for metric, per in values.items()]
    for m in cmp.methods:
        cells = collect_method(folder, method_runs(cmp, m))
        rows += [summarise(m.label, target, metric, cell) for (target, metric), cell in sorted(cells.items())]
    reference = cmp.reference_label()
    info = _info(folder, cmp, {"path_seeds": cmp.path_seeds, "reference": reference})
    # methods whose paths all gave identical masks: their spread is over evaluation seeds only
    info["deterministic"] = [m.label for m in cmp.methods if (own := [r for r in rows if r["method"] == m.label])
                             and all(r["paths_identical"] for r in own)]
    references = cmp.references()
    if any(m.reference is not None for m in cmp.methods):  # some method is paired with its own reference
        info["references"] = references
    out = {"info": info, "rows": rows, "differences": paired_differences(rows, references)}
    if cmp.speedup is not None:
        from .speedup import speedup_rows
        from .timing import read_timings

        info["speedup"] = cmp.speedup.model_dump()
        out["speedup"] = speedup_rows(rows, read_timings(cmp, folder), references)
    return out


def write_results(folder: Path, results: dict, ci: str = "seeds") -> None:
    """results.json, results.csv, report.md and the plot (PNG, PDF, SVG); ``ci``: which 95% CI
    the report and plot show (``seeds`` or ``items``, see :mod:`resp_core.report`)."""
    write_json(folder / "results.json", json_safe(results))  # valid JSON: null, never NaN
    if "differences" in results:
        _write_path_csv(folder, results)
    else:
        _write_csv(folder, results)
    from ..report import render_markdown, render_plot
    from ..report_paths import n_paths, render_difference_plot

    if "speedup" in results:
        _write_speedup_csv(folder, results)
    render_plot(results, folder / "accuracy.png", ci=ci)
    if "differences" in results and n_paths(results) >= 2:
        render_difference_plot(results, folder / "differences.png")
    atomic_write_text(folder / "report.md", render_markdown(results, plot="accuracy.png", ci=ci))


def _write_csv(folder: Path, results: dict) -> None:
    import csv

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


def _num(v, fmt: str = ".6f") -> str:
    return "" if v is None or v != v else format(v, fmt)


def _write_path_csv(folder: Path, results: dict) -> None:
    """results.csv over pruning paths (``per_path``: ``<path seed>/<evaluation seed>:<value>``,
    the dense model's path ``dense``) and differences.csv (one row per paired difference)."""
    import csv

    fh = io.StringIO(newline="")
    w = csv.writer(fh)
    w.writerow(["method", "target", "sparsity", "sparsity_prunable_blocks", "sparsity_all_blocks", "parameters",
                "metric", "mean", "ci95", "ci_over", "n_paths", "n_seeds", "sd_between_paths", "sd_within_paths",
                "paths_identical", "per_path"])
    for r in results["rows"]:
        per_path = r.get("per_path") or {"dense": r.get("per_seed") or {}}
        w.writerow([r["method"], r["target"], r["sparsity"], r.get("sparsity_prunable_blocks"),
                    r.get("sparsity_all_blocks"), r["parameters"], r["metric"], _num(r["mean"]), _num(r["ci95"]),
                    r["ci_over"], "" if r.get("n_paths") is None else r["n_paths"], r["n_seeds"],
                    _num(r.get("sd_between_paths")), _num(r.get("sd_within_paths")),
                    "" if r.get("paths_identical") is None else r["paths_identical"],
                    ";".join(f"{p}/{s}:{v:.4f}" for p, per in per_path.items() for s, v in per.items())])
    atomic_write_text(folder / "results.csv", fh.getvalue())
    fh = io.StringIO(newline="")
    w = csv.writer(fh)
    w.writerow(["method", "reference", "target", "metric", "n_paths", "mean_difference", "ci95_low", "ci95_high",
                "excludes_zero", "sd_difference", "mde", "note", "per_path"])
    for d in results["differences"]:
        w.writerow([d["method"], d["reference"], d["target"], d["metric"], d["n_paths"], _num(d["mean"]),
                    _num(d["ci95_low"]), _num(d["ci95_high"]), "" if d["excludes_zero"] is None else d["excludes_zero"],
                    _num(d["sd"]), _num(d["mde"]), d["note"] or "",
                    ";".join(f"{p}:{v:.4f}" for p, v in d["per_path"].items())])
    atomic_write_text(folder / "differences.csv", fh.getvalue())


def _write_speedup_csv(folder: Path, results: dict) -> None:
    """speedup.csv: per method x sparsity x task, the per-token speedup, length ratio and effective
    speedup (geometric means over path seeds, 95% interval) and the effective speedup against the
    method's reference."""
    import csv

    fh = io.StringIO(newline="")
    w = csv.writer(fh)
    figures = ("per_token_speedup", "length_ratio", "effective_speedup")
    w.writerow(["method", "target", "task"] + [f"{f}{x}" for f in figures for x in ("", "_ci95_low", "_ci95_high")]
               + ["n_paths", "reference", "effective_vs_reference", "vs_reference_ci95_low",
                  "vs_reference_ci95_high"])
    for r in results["speedup"]:
        cells = []
        for f in figures:
            c = r.get(f) or {}
            cells += [_num(c.get("mean")), _num(c.get("ci95_low")), _num(c.get("ci95_high"))]
        ref = r.get("against_reference") or {}
        w.writerow([r["method"], r["target"], r["task"] or "", *cells, r["per_token_speedup"]["n"],
                    ref.get("reference", ""), _num(ref.get("ratio")), _num(ref.get("ci95_low")),
                    _num(ref.get("ci95_high"))])
    atomic_write_text(folder / "speedup.csv", fh.getvalue())
