"""Rendering results: a run's table; a comparison's rich table, Markdown report and
accuracy-vs-sparsity plot.

Everything here reads the results dict (``results.json``, see :mod:`resp_core.compare`), so
``respctl report`` re-renders a finished comparison without recomputing anything.

Two confidence intervals, chosen with ``ci``:

* ``seeds`` (default): 95% CI of the mean over sampling seeds (Student t, ``resp_core.stats``);
  with one seed there is none, and the tables and plot say so instead of drawing a band; in a
  comparison with path seeds, t over the pruning paths' means (each the mean over the
  evaluation seeds), and the report adds the spread and the paired differences against the
  reference method (:mod:`resp_core.report_paths`);
* ``items``: percentile-bootstrap 95% CI over the evaluated items (``scipy.stats.bootstrap``,
  each item's correctness averaged over the seeds), for evaluators that report it
  (``task_accuracy``).

The plot puts each point at the sparsity the run *reached* (on the recipe's basis), not the
target; bands are clipped to [0, 100]; every method has its own marker and line style, so that
the figure reads in grayscale; it is written as PNG, PDF and SVG.
"""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from .errors import RespError
from .metric_keys import RAW_METRIC_WORDS, SEED_KEY, is_fraction  # noqa: F401
from .report_paths import (DETERMINISTIC_MARK, ci_words_paths, has_paths, header_lines, metric_sections,
                           reference_words, speedup_lines)
from .report_paths import n_paths as n_paths_of
from .stats import finite

CI_CHOICES = ("seeds", "items")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p")
LINESTYLES = ("-", "--", "-.", ":", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1)))
BASIS_WORDS = {"prunable_blocks": "of the unprotected layers' projections",
               "all_blocks": "of the projections of all layers"}


def band(c: dict | None, ci: str = "seeds") -> tuple[float, float] | None:
    """The 95% CI ``(low, high)`` of a result cell (fractions), or None when there is none."""
    if c is None or not finite(c.get("mean")):
        return None
    if ci == "items":
        v = c.get("ci95_items")
        if isinstance(v, (list, tuple)) and len(v) == 2 and finite(v[0]) and finite(v[1]):
            return float(v[0]), float(v[1])
        return None
    h = c.get("ci95")
    return (c["mean"] - h, c["mean"] + h) if finite(h) else None


def format_run_metric(metric: str, value, ci95=None) -> str:
    """One metric of a run (the table at the end and the line printed at each milestone): a
    fraction in %, a perplexity, token count or loss as it is; empty when absent, ``n/a`` when
    not finite."""
    if not finite(value):
        return "" if value is None else "n/a"
    if 0.0 <= value <= 1.0 and not metric.endswith(("perplexity", "tokens", "loss")):
        return f"{value:.1%}" + (f" ± {ci95:.1%}" if finite(ci95) else "")
    return f"{value:.4g}" + (f" ± {ci95:.2g}" if finite(ci95) else "")


def main_metrics(rows: list[dict], chosen: list[str] | None = None) -> list[str]:
    """The metric columns of a run table: ``chosen`` when given, else one main metric per task —
    the one an evaluator reports per seed (``<metric>@seed<s>``: ``task_accuracy``'s accuracy,
    the ``lm_eval`` evaluator's ``main_metric``), else ``<task>/accuracy``.  Every other metric
    stays in ``metrics.json`` (and ``run --json``)."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    if chosen:
        unknown = [c for c in chosen if c not in keys]
        if unknown:
            raise RespError(f"--metric: {unknown[0]!r} is not a metric of this run; it has "
                            f"{', '.join(k for k in keys if '/' in k) or 'none'}")
        return list(chosen)
    mains = [m.group("metric") for k in keys if (m := SEED_KEY.match(k))]
    mains = list(dict.fromkeys(mains)) or [k for k in keys if k.endswith("/accuracy")]
    per_task: dict[str, str] = {}
    for k in mains:
        per_task.setdefault(k.split("/", 1)[0], k)
    return list(per_task.values())


def results_table(rows: list[dict], title: str, metrics: list[str] | None = None) -> Table:
    """Sparsity, parameter count and one main metric per task for each evaluated point of a run."""
    metric_keys = main_metrics(rows, metrics)
    table = Table(title=title)
    table.add_column("step", justify="right")
    table.add_column("sparsity", justify="right")
    table.add_column("parameters", justify="right")
    for k in metric_keys:
        table.add_column(k.replace("/", " "), justify="right")
    # answer length of each task with a main metric (task_accuracy): mean / median tokens, share cut
    lengths = [t for t in dict.fromkeys(k.split("/", 1)[0] for k in metric_keys)
               if any(f"{t}/median_tokens" in r for r in rows)]
    for t in lengths:
        table.add_column(f"{t} tokens mean / median", justify="right")
        table.add_column(f"{t} at token limit", justify="right")
    table.add_column("traces correct", justify="right")
    for r in rows:
        cells = [str(r.get("step", "")), f"{r['sparsity']:.1%}", f"{r['parameters'] / 1e6:.3f}M"]
        for k in metric_keys:
            cells.append(format_run_metric(k, r.get(k), r.get(f"{k}_ci95")))
        for t in lengths:
            mean_t, median_t, cut = r.get(f"{t}/mean_tokens"), r.get(f"{t}/median_tokens"), r.get(f"{t}/at_token_limit")
            cells.append("" if mean_t is None else f"{mean_t:.1f} / {median_t:g}")
            cells.append("" if cut is None else f"{cut:.1%}")
        c = r.get("calibration_correct_fraction")
        cells.append("" if c is None else f"{c:.1%}")
        table.add_row(*cells)
    return table


def _fmt(c: dict | None, ci: str = "seeds", metric: str = "") -> str:
    if c is None:
        return ""
    if not finite(c.get("mean")):
        return "n/a"
    k = 100 if is_fraction(metric or str(c.get("metric", ""))) else 1
    d = 1 if k == 100 else 3
    b = band(c, ci)
    mark = f" {DETERMINISTIC_MARK}" if c.get("paths_identical") else ""
    if b is None:
        return f"{k * c['mean']:.{d}f}{mark}"
    if ci == "seeds":
        return f"{k * c['mean']:.{d}f} ± {k * c['ci95']:.{d}f}{mark}"
    return f"{k * c['mean']:.{d}f} [{k * b[0]:.{d}f}, {k * b[1]:.{d}f}]{mark}"


def _pivot(results: dict):
    rows = results["rows"]
    metrics = sorted({r["metric"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    targets = sorted({r["target"] for r in rows if r["method"] != "dense"})
    cell = {(r["method"], r["target"], r["metric"]): r for r in rows}
    return metrics, methods, targets, cell


def ci_words(results: dict, ci: str = "seeds") -> str:
    """What the ± in the tables means, or that there is none."""
    rows = results["rows"]
    if ci == "items":
        if any(band(r, "items") for r in rows):
            return "mean [95% bootstrap CI over items]"
        return "no per-item CI reported by the evaluators"
    if has_paths(results):
        return ci_words_paths(results)
    n = max((r.get("n_seeds", 0) for r in rows), default=0)
    if n >= 2:
        return f"mean ± 95% CI (Student t) over {n} seeds"
    return "1 seed: no CI"


def rich_table(results: dict, ci: str = "seeds") -> Table:
    metrics, methods, targets, cell = _pivot(results)
    single = len(metrics) == 1
    what = metrics[0] if single else "accuracy"
    unit = " %" if is_fraction(what) else ""
    table = Table(title=f"{results['info']['name']}: {what}{unit} ({ci_words(results, ci)})")
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
            row = [m] + ([] if single else [metric]) + [_fmt(cell.get(("dense", 0.0, metric)), ci)]
            row += [_fmt(cell.get((m, t, metric)), ci) for t in targets]
            table.add_row(*row)
    return table


def _sparsity_table(methods, targets, cell, metric) -> list[str]:
    """Reached sparsity of every cell on both bases: the unprotected blocks' projection parameters
    (RESP's default) and all layers' projection parameters (the authors'), with the parameters
    left.  Empty when the rows carry neither figure."""
    if metric is None:
        return []
    rows, any_figure = [], False
    for m in methods:
        if m == "dense":
            continue
        cells = []
        for t in targets:
            r = cell.get((m, t, metric))
            pb, ab = (r or {}).get("sparsity_prunable_blocks"), (r or {}).get("sparsity_all_blocks")
            if r is None or not (finite(pb) or finite(ab)):
                cells.append("—")
                continue
            any_figure = True
            fmt = lambda v: f"{v:.1%}" if finite(v) else "?"  # noqa: E731
            params = f" · {r['parameters'] / 1e6:.3g}M" if finite(r.get("parameters")) else ""
            cells.append(f"{fmt(pb)} · {fmt(ab)}{params}")
        rows.append(f"| {m} | " + " | ".join(cells) + " |")
    if not any_figure:
        return []
    return ["## Reached sparsity on both bases", "",
            "Each cell: the fraction removed of the unprotected layers' projection parameters (prunable "
            "blocks) · of all layers' projection parameters (all blocks, the authors' basis) · the whole "
            "model's parameters left.", "",
            "| method | " + " | ".join(f"{t:.0%}" for t in targets) + " |",
            "|---|" + "---|" * len(targets), *rows, ""]


def render_markdown(results: dict, plot: str | None = None, ci: str = "seeds") -> str:
    info = results["info"]
    metrics, methods, targets, cell = _pivot(results)
    basis = (info.get("structures") or {}).get("sparsity_basis", "prunable_blocks")
    lines = [f"# {info['name']}", ""]
    lines += [
        f"- model: `{info['model']}` (fingerprint `{info.get('model_fingerprint')}`)",
        f"- task: `{info['task']['name']}` {info['task'].get('params') or ''}",
        f"- structures: {info['structures']}",
        f"- default calibration: `{info['calibration']['name']}` {info['calibration'].get('params') or ''}",
        f"- sparsities: {', '.join(f'{s:.0%}' for s in info['sparsities'])} (targets; parameters "
        f"{BASIS_WORDS.get(basis, basis)})",
        *([f"- seeds: {info['seeds']}; cells: {ci_words(results, ci)}"] if not has_paths(results)
          else header_lines(results, ci_words(results, ci))),
        f"- RESP commit: `{info.get('commit')}`, torch {info.get('torch')}",
        "",
    ]
    for metric in metrics:
        lines.append(f"## {metric}" + (" (%)" if is_fraction(metric) else ""))
        lines.append("")
        lines.append("| method | 0% | " + " | ".join(f"{t:.0%}" for t in targets) + " |")
        lines.append("|---|" + "---|" * (len(targets) + 1))
        for m in methods:
            if m == "dense":
                continue
            cells = [_fmt(cell.get(("dense", 0.0, metric)), ci)] + [_fmt(cell.get((m, t, metric)), ci)
                                                                    for t in targets]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")
        reached = [(m, t, cell[(m, t, metric)]["sparsity"]) for m in methods for t in targets
                   if (m, t, metric) in cell and finite(cell[(m, t, metric)].get("sparsity"))]
        off = [f"{m} {t:.0%}→{s:.1%}" for m, t, s in reached if abs(s - t) >= 0.005]
        if off:
            lines += [f"Reached sparsity differs from the target: {', '.join(off)}.", ""]
        if has_paths(results):
            lines += metric_sections(results, methods, targets, cell, metric)
    if "speedup" in results:
        lines += speedup_lines(results)
    lines += _sparsity_table(methods, targets, cell, metrics[0] if metrics else None)
    lines.append("## Methods")
    lines.append("")
    for m in info["methods"]:
        lines.append(f"- **{m['label']}**: scorer `{m['scorer']['name']}` {m['scorer'].get('params') or ''}; "
                     f"calibration `{(m.get('calibration') or info['calibration'])['name']}`; "
                     f"allocator `{(m.get('allocator') or {'name': 'global'})['name']}`; schedule overrides "
                     f"{m.get('schedule') or {}}"
                     + (f"; paired with **{m['reference']}**" if m.get("reference") else ""))
    if plot:
        stem = Path(plot).stem
        lines += ["", f"![accuracy vs sparsity]({plot}) (also [{stem}.pdf]({stem}.pdf), [{stem}.svg]({stem}.svg))"]
        if has_paths(results) and n_paths_of(results) >= 2:
            lines += ["", f"![paired differences against {reference_words(results)}](differences.png) (also "
                      "[differences.pdf](differences.pdf), [differences.svg](differences.svg))"]
    return "\n".join(lines) + "\n"


def plot_series(results: dict, metric: str, ci: str = "seeds") -> dict[str, list[tuple[float, float, tuple | None]]]:
    """Per method: ``(x %, y %, (low %, high %) or None)`` points, x at the *reached* sparsity,
    the dense model at 0, bands clipped to [0, 100]."""
    metrics, methods, targets, cell = _pivot(results)
    dense = cell.get(("dense", 0.0, metric))
    out: dict[str, list] = {}
    for m in methods:
        if m == "dense":
            continue
        points = []
        for c in ([dense] if dense else []) + [cell.get((m, t, metric)) for t in targets]:
            if c is None or not finite(c.get("mean")):
                continue
            x = c.get("sparsity") if finite(c.get("sparsity")) else c["target"]
            b = band(c, ci)
            if is_fraction(metric):
                clipped = None if b is None else (min(100.0, max(0.0, 100 * b[0])), min(100.0, max(0.0, 100 * b[1])))
                points.append((100 * x, 100 * c["mean"], clipped))
            else:
                points.append((100 * x, c["mean"], None if b is None else (max(0.0, b[0]), b[1])))
        out[m] = points
    return out


def plot_paths(path: Path) -> list[Path]:
    """The files :func:`render_plot` writes for ``path`` (PNG, PDF, SVG)."""
    path = Path(path)
    return [path.with_suffix(".png"), path.with_suffix(".pdf"), path.with_suffix(".svg")]


def render_plot(results: dict, path: Path, ci: str = "seeds") -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .atomic_io import atomic_file

    metrics = _pivot(results)[0]
    basis = (results["info"].get("structures") or {}).get("sparsity_basis", "prunable_blocks")
    any_band = False
    with matplotlib.rc_context({"svg.hashsalt": "resp", "svg.fonttype": "path"}):
        fig, axes = plt.subplots(1, len(metrics), figsize=(6 * len(metrics), 4.2), squeeze=False)
        for ax, metric in zip(axes[0], metrics):
            for i, (m, points) in enumerate(plot_series(results, metric, ci).items()):
                if not points:
                    continue
                xs, ys = [p[0] for p in points], [p[1] for p in points]
                line, = ax.plot(xs, ys, marker=MARKERS[i % len(MARKERS)], linestyle=LINESTYLES[i % len(LINESTYLES)],
                                label=m, markersize=5)
                banded = [p for p in points if p[2] is not None]
                if len(banded) >= 2:
                    any_band = True
                    ax.fill_between([p[0] for p in banded], [p[2][0] for p in banded], [p[2][1] for p in banded],
                                    color=line.get_color(), alpha=0.15, linewidth=0)
                elif len(banded) == 1:
                    any_band = True
                    x, y, (lo, hi) = banded[0]
                    ax.errorbar([x], [y], yerr=[[y - lo], [hi - y]], color=line.get_color(), capsize=3)
            ax.set_xlabel(f"reached sparsity, % {BASIS_WORDS.get(basis, basis)}")
            ax.set_title(metric)
            if is_fraction(metric):
                ax.set_ylabel("accuracy (%)")
                ax.set_ylim(-2, 102)
            else:
                ax.set_ylabel(metric.rsplit("/", 1)[-1].replace("_", " "))
                if "tokens" not in metric:  # perplexities span orders of magnitude; answer lengths do not
                    ax.set_yscale("log")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        title = results["info"]["name"]
        if any_band:
            title += f" (bands: {ci_words(results, ci).replace('mean ± ', '').replace('mean ', '')})"
        fig.suptitle(title)
        fig.tight_layout()
        written = []
        metadata = {".png": {"Software": None}, ".pdf": {"CreationDate": None, "ModDate": None, "Producer": None},
                    ".svg": {"Date": None, "Creator": None}}
        for p in plot_paths(path):
            with atomic_file(p) as tmp:  # tmp keeps the suffix savefig reads the format from
                fig.savefig(tmp, dpi=120, metadata=metadata[p.suffix])
            written.append(p)
        plt.close(fig)
    return written
