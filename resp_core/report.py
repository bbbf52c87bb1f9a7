"""Rendering comparison results: rich table, Markdown report, accuracy-vs-sparsity plot.

Everything here reads ``results.json`` (see :mod:`resp_core.compare`), so ``respctl report``
re-renders a finished comparison without recomputing anything.
"""

from __future__ import annotations

import math
from pathlib import Path

from rich.table import Table


def _fmt(mean: float, ci: float) -> str:
    if math.isnan(ci):
        return f"{100 * mean:.1f}"
    return f"{100 * mean:.1f} ± {100 * ci:.1f}"


def _pivot(results: dict):
    rows = results["rows"]
    metrics = sorted({r["metric"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    targets = sorted({r["target"] for r in rows if r["method"] != "dense"})
    cell = {(r["method"], r["target"], r["metric"]): r for r in rows}
    return metrics, methods, targets, cell


def rich_table(results: dict) -> Table:
    metrics, methods, targets, cell = _pivot(results)
    n = results["info"].get("seeds", [])
    single = len(metrics) == 1
    what = metrics[0] if single else "accuracy"
    table = Table(title=f"{results['info']['name']}: {what} % (mean ± 95% CI over {len(n)} seed(s))")
    table.add_column("method")
    if not single:
        table.add_column("metric")
    table.add_column("0%", justify="right")
    for t in targets:
        table.add_column(f"{t:.0%}", justify="right")
    for metric in metrics:
        for m in methods:
            if m == "dense":
                continue
            dense = cell.get(("dense", 0.0, metric))
            row = [m] + ([] if single else [metric]) + [_fmt(dense["mean"], dense["ci95"]) if dense else ""]
            for t in targets:
                c = cell.get((m, t, metric))
                row.append(_fmt(c["mean"], c["ci95"]) if c else "")
            table.add_row(*row)
    return table


def render_markdown(results: dict, plot: str | None = None) -> str:
    info = results["info"]
    metrics, methods, targets, cell = _pivot(results)
    lines = [f"# {info['name']}", ""]
    lines += [
        f"- model: `{info['model']}` (fingerprint `{info.get('model_fingerprint')}`)",
        f"- task: `{info['task']['name']}` {info['task'].get('params') or ''}",
        f"- structures: {info['structures']}",
        f"- default calibration: `{info['calibration']['name']}` {info['calibration'].get('params') or ''}",
        f"- sparsities: {', '.join(f'{s:.0%}' for s in info['sparsities'])} (of the unprotected blocks' parameters)",
        f"- seeds: {info['seeds']} — cells are mean ± 95% CI (Student t) over seeds",
        f"- RESP commit: `{info.get('commit')}`, torch {info.get('torch')}",
        "",
    ]
    for metric in metrics:
        lines.append(f"## {metric} (%)")
        lines.append("")
        lines.append("| method | 0% | " + " | ".join(f"{t:.0%}" for t in targets) + " |")
        lines.append("|---|" + "---|" * (len(targets) + 1))
        for m in methods:
            if m == "dense":
                continue
            dense = cell.get(("dense", 0.0, metric))
            cells = [_fmt(dense["mean"], dense["ci95"]) if dense else ""]
            for t in targets:
                c = cell.get((m, t, metric))
                cells.append(_fmt(c["mean"], c["ci95"]) if c else "")
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")
    lines.append("## Methods")
    lines.append("")
    for m in info["methods"]:
        lines.append(f"- **{m['label']}**: scorer `{m['scorer']['name']}` {m['scorer'].get('params') or ''}; "
                     f"calibration `{(m.get('calibration') or info['calibration'])['name']}`; "
                     f"allocator `{(m.get('allocator') or {'name': 'global'})['name']}`; schedule overrides "
                     f"{m.get('schedule') or {}}")
    if plot:
        lines += ["", f"![accuracy vs sparsity]({plot})"]
    return "\n".join(lines) + "\n"


def render_plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics, methods, targets, cell = _pivot(results)
    fig, axes = plt.subplots(1, len(metrics), figsize=(6 * len(metrics), 4.2), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        dense = cell.get(("dense", 0.0, metric))
        for m in methods:
            if m == "dense":
                continue
            xs, ys, lo, hi = [], [], [], []
            points = ([(0.0, dense)] if dense else []) + [(t, cell.get((m, t, metric))) for t in targets]
            for t, c in points:
                if c is None:
                    continue
                ci = 0.0 if math.isnan(c["ci95"]) else c["ci95"]
                xs.append(100 * t)
                ys.append(100 * c["mean"])
                lo.append(100 * (c["mean"] - ci))
                hi.append(100 * (c["mean"] + ci))
            line, = ax.plot(xs, ys, marker="o", label=m)
            ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.15)
        ax.set_xlabel("sparsity of prunable blocks (%)")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(metric)
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{results['info']['name']} (bands: 95% CI over {len(results['info']['seeds'])} seed(s))")
    fig.tight_layout()
    from .rundir import atomic_file

    with atomic_file(path) as tmp:  # tmp keeps the suffix savefig reads the format from
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
