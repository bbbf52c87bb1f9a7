"""The parts of a comparison report that path seeds add (see :mod:`resp_core.compare.paths`):
the words for the two levels, the spread over path seeds and evaluation seeds, the paired
differences against the reference method (Markdown) and their plot, ``differences.png``."""

from __future__ import annotations

from pathlib import Path

from .metric_keys import is_fraction
from .stats import finite

DETERMINISTIC_MARK = "‡"


def has_paths(results: dict) -> bool:
    """Whether ``results`` replicate pruning paths (a comparison with ``path_seeds``)."""
    return "differences" in results


def n_paths(results: dict) -> int:
    return max((r.get("n_paths") or 0 for r in results["rows"]), default=0)


def ci_words_paths(results: dict) -> str:
    """What the ± of a cell means over pruning paths, or that there is none."""
    n = n_paths(results)
    k = max((r.get("n_seeds", 0) for r in results["rows"] if r["method"] != "dense"), default=0)
    if n >= 2:
        return (f"mean ± 95% CI (t over path means) over {n} path seeds, each path the mean of {k} "
                f"evaluation seed{'s' if k != 1 else ''}")
    return f"1 path seed ({k} evaluation seed{'s' if k != 1 else ''}): no CI over paths (not resolved at n = 1)"


def header_lines(results: dict, ci_words: str) -> list[str]:
    """The report's lines on the two levels (instead of the single ``seeds`` line)."""
    info = results["info"]
    lines = [f"- path seeds (pruning paths: calibration draw, trace sampling, regeneration): {info['path_seeds']}; "
             f"evaluation seeds: {info['seeds']} (the same in every path, on the same items)",
             f"- cells: {ci_words}; dense: evaluated once, its ± over evaluation seeds"]
    if info.get("deterministic"):
        lines.append(f"- paths identical: deterministic ({DETERMINISTIC_MARK}): {', '.join(info['deterministic'])} "
                     "(every path gave the same masks; the ± of these cells is over evaluation seeds only)")
    return lines


def _scale(metric: str) -> tuple[float, int, str]:
    return (100.0, 1, " pp") if is_fraction(metric) else (1.0, 3, "")


def _spread_table(methods, targets, cell, metric) -> list[str]:
    k, d, unit = _scale(metric)
    rows = []
    for m in methods:
        if m == "dense":
            continue
        cells = []
        for t in targets:
            r = cell.get((m, t, metric))
            if r is None:
                cells.append("—")
                continue
            fmt = lambda v: f"{k * v:.{d}f}" if finite(v) else "n/a"  # noqa: E731
            cells.append(f"{fmt(r.get('sd_between_paths'))} · {fmt(r.get('sd_within_paths'))} "
                         f"({r.get('n_paths')} × {r.get('n_seeds')})")
        rows.append(f"| {m} | " + " | ".join(cells) + " |")
    return ["### Spread over path seeds and evaluation seeds", "",
            f"Each cell: SD between paths (of the path means) · mean SD within a path (over its evaluation seeds)"
            f"{' in percentage points' if unit else ''} (path seeds × evaluation seeds).", "",
            "| method | " + " | ".join(f"{t:.0%}" for t in targets) + " |",
            "|---|" + "---|" * len(targets), *rows, ""]


def reference_words(results: dict) -> str:
    """Whom the paired differences are taken against: the reference, or each method's own."""
    return "each method's reference" if results["info"].get("references") else results["info"]["reference"]


def _difference_table(results: dict, metric: str) -> list[str]:
    own = bool(results["info"].get("references"))  # some method is paired with its own reference
    ref = "its reference" if own else results["info"]["reference"]
    k, d, unit = _scale(metric)
    diffs = [x for x in results["differences"] if x["metric"] == metric]
    fmt = lambda v: f"{k * v:+.{d}f}" if finite(v) else "n/a"  # noqa: E731
    rows, short = [], []
    for x in diffs:
        if x["note"] == "not resolved at n = 1":
            interval, excludes, mde = "not resolved at n = 1", "—", "—"
        elif x["note"]:
            interval, excludes, mde = "—", x["note"], "—"
        else:
            interval = f"[{fmt(x['ci95_low'])}, {fmt(x['ci95_high'])}]"
            mde = f"{k * x['mde']:.{d}f}" if finite(x["mde"]) else "n/a"
            if x["excludes_zero"]:
                excludes = "yes"
            elif finite(x["mde"]) and abs(x["mean"]) < x["mde"]:
                excludes = "no (underpowered: smaller than the MDE)"
                short.append(x)
            else:
                excludes = "no"
        rows.append(f"| {x['method']} | " + (f"{x['reference']} | " if own else "") + f"{x['target']:.0%} | "
                    f"{fmt(x['mean'])} | {interval} | {excludes} | {mde} | {x['n_paths']} |")
    lines = [f"### Paired differences against {reference_words(results)}", "",
             f"d_s = path mean(method, s) − path mean({ref}, s), paired by path seed s (each path mean over the "
             "same evaluation seeds and items); the mean of d_s over the common path seeds, its 95% interval "
             "(t over the n differences), whether that interval excludes 0, and the minimum detectable difference "
             f"(paired t, 80% power, two-sided 5%) at this n{' — in percentage points' if unit else ''}.", "",
             "| method | " + ("reference | " if own else "") + "sparsity | difference | 95% CI | excludes 0? | MDE | "
             "n paths |", "|---|" + ("---|" if own else "") + "---|---|---|---|---|---|", *rows, ""]
    if not diffs:
        lines += ["No method shares a finished path seed with the reference yet.", ""]
    if short:
        lines += [f"{len(short)} of {len(diffs)} differences are smaller than their MDE: at these sizes the "
                  "comparison cannot tell them from 0; add path seeds to resolve them.", ""]
    return lines


def metric_sections(results: dict, methods, targets, cell, metric: str) -> list[str]:
    """The spread and paired-difference tables of one metric."""
    return _spread_table(methods, targets, cell, metric) + _difference_table(results, metric)


def render_difference_plot(results: dict, path: Path) -> list[Path]:
    """``differences.png`` (and .pdf, .svg): per metric, each method's mean paired difference
    against the reference at every sparsity, with its 95% t interval over path seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .atomic_io import atomic_file

    diffs = results["differences"]
    metrics = sorted({x["metric"] for x in diffs})
    methods = list(dict.fromkeys(x["method"] for x in diffs))
    ref = "the reference" if results["info"].get("references") else results["info"]["reference"]
    legend = {x["method"]: f"{x['method']} − {x['reference']}" if results["info"].get("references") else x["method"]
              for x in diffs}
    path = Path(path)
    written = []
    with matplotlib.rc_context({"svg.hashsalt": "resp", "svg.fonttype": "path"}):
        fig, axes = plt.subplots(1, max(1, len(metrics)), figsize=(6 * max(1, len(metrics)), 4.2), squeeze=False)
        for ax, metric in zip(axes[0], metrics):
            k = 100.0 if is_fraction(metric) else 1.0
            for i, m in enumerate(methods):
                own = sorted((x for x in diffs if x["method"] == m and x["metric"] == metric), key=lambda x: x["target"])
                xs = [100 * x["target"] + (i - (len(methods) - 1) / 2) * 0.6 for x in own]
                ys = [k * x["mean"] for x in own]
                lo = [k * (x["mean"] - x["ci95_low"]) if finite(x["ci95_low"]) else 0.0 for x in own]
                hi = [k * (x["ci95_high"] - x["mean"]) if finite(x["ci95_high"]) else 0.0 for x in own]
                ax.errorbar(xs, ys, yerr=[lo, hi], marker="osD^v<>"[i % 7], capsize=3, linestyle="none",
                            label=legend[m])
            ax.axhline(0.0, color="black", linewidth=0.8)
            ax.set_xlabel("target sparsity, %")
            ax.set_ylabel(f"difference against {ref}" + (" (pp)" if k == 100.0 else ""))
            ax.set_title(metric)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(f"{results['info']['name']}: paired differences\n(95% t interval over {n_paths(results)} "
                     "path seeds)", fontsize=10)
        fig.tight_layout()
        metadata = {".png": {"Software": None}, ".pdf": {"CreationDate": None, "ModDate": None, "Producer": None},
                    ".svg": {"Date": None, "Creator": None}}
        for p in (path.with_suffix(".png"), path.with_suffix(".pdf"), path.with_suffix(".svg")):
            with atomic_file(p) as tmp:
                fig.savefig(tmp, dpi=120, metadata=metadata[p.suffix])
            written.append(p)
        plt.close(fig)
    return written


def _ratio(c: dict | None) -> str:
    if not c or not finite(c.get("mean")):
        return "n/a"
    if finite(c.get("ci95_low")) and finite(c.get("ci95_high")):
        return f"{c['mean']:.2f} [{c['ci95_low']:.2f}, {c['ci95_high']:.2f}]"
    return f"{c['mean']:.2f}" + (f" ({c['note']})" if c.get("note") else "")


def speedup_lines(results: dict) -> list[str]:
    """The effective-speedup table (a comparison with ``speedup``): per-token speedup x answer-length
    ratio, each a geometric mean over path seeds with its 95% interval, and the ratio of effective
    speedups against each method's reference."""
    sp = results["info"]["speedup"]
    rows = []
    for r in results["speedup"]:
        vs = r.get("against_reference")
        against = "—" if vs is None else f"{_ratio({'mean': vs['ratio'], **vs})} vs {vs['reference']}"
        rows.append(f"| {r['method']} | {r['target']:.0%} | {r['task'] or '—'} | {_ratio(r['per_token_speedup'])} | "
                    f"{_ratio(r.get('length_ratio'))} | {_ratio(r.get('effective_speedup'))} | {against} | "
                    f"{r['per_token_speedup']['n']} |")
    lines = ["## Effective speedup (measured)", "",
             f"Per-token speedup: dense / compacted time per generated token, timed side by side in one process "
             f"({sp['repeats']} rounds, order swapped every other round; {sp['prompts']} prompts × "
             f"{sp['new_tokens']} greedy tokens, batch {sp['batch_size']}, end of sequence suppressed). Length "
             "ratio: dense / pruned mean answer length (the same items and evaluation seeds). Effective speedup: "
             "their product, the ratio of the time to produce an answer. Each cell: the geometric mean over path "
             "seeds [95% interval: t over path seeds of the logs]; with one path the per-token interval is over "
             "the timing rounds. Last column: effective speedup / the reference's, paired by path seed.", "",
             "| method | sparsity | task | per-token speedup | length ratio | effective speedup | "
             "effective vs reference | n paths |", "|---|---|---|---|---|---|---|---|", *rows, ""]
    if not rows:
        lines += ["No milestone model has been timed yet.", ""]
    return lines
