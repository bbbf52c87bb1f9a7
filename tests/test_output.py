"""Output people read: untruncated tables off a terminal, --json, plain progress lines, the run
table's main metrics, the plot, the statistics and valid JSON."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
from rich.console import Console
from typer.testing import CliRunner

from resp_core.cli import app
from resp_core.progress import PlainProgressReporter, RichProgressReporter, make_console
from resp_core.report import (band, ci_words, plot_series, render_markdown, render_plot, results_table,
                               rich_table)
from resp_core.stats import bootstrap_ci95, ci95_halfwidth, json_safe, t975
from test_cli import small_recipe, write

runner = CliRunner()


def _strict_json(text: str):
    def refuse(name):
        raise ValueError(f"{name} is not JSON")
    return json.loads(text, parse_constant=refuse)


def test_plugins_piped_are_never_truncated():
    env = {**os.environ, "COLUMNS": "80"}
    proc = subprocess.run([sys.executable, "-m", "resp_core.cli", "plugins"], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    line = next(ln for ln in proc.stdout.splitlines() if " self_generated " in ln)
    assert "resp_plugins.calibration.self_generated" in line and "resp-pruning" in line
    assert "…" not in proc.stdout


def test_plugins_json():
    result = runner.invoke(app, ["plugins", "--json"])
    assert result.exit_code == 0, result.output
    data = _strict_json(result.stdout)
    names = {(p["kind"], p["name"]) for p in data["plugins"]}
    assert ("calibration", "self_generated") in names and ("scorer", "resp") in names
    entry = next(p for p in data["plugins"] if p["name"] == "resp")
    assert entry["distribution"] == "resp-pruning" and entry["version"]
    assert isinstance(data["problems"], list)


def test_console_is_wide_off_a_terminal_and_normal_on_one():
    import io

    piped = make_console()
    piped.file = io.StringIO()
    assert not piped.is_terminal and piped.width >= 1000
    tty = Console(file=io.StringIO(), force_terminal=True, width=80)
    assert tty.width == 80


def test_run_json_and_plain_progress(tmp_path, tiny_model_dir):
    recipe = write(tmp_path, small_recipe(tiny_model_dir, **{"schedule.params.steps": 2,
                                                             "schedule.params.milestones": [0.2, 0.4]}))
    out = tmp_path / "run"
    result = runner.invoke(app, ["run", str(recipe), "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    data = _strict_json(result.stdout)  # stdout holds the JSON and nothing else
    assert data["run_dir"] == str(out)
    assert data["run"]["status"] == "finished"
    assert [r["target"] for r in data["metrics"]] == [0.0, 0.2, 0.4]
    assert any(p["kind"] == "scorer" and p["name"] == "resp" for p in data["run"]["plugins"])
    # not a terminal: plain lines, one per finished phase with its time, on stderr
    assert "done in" in result.stderr and "Generating" in result.stderr, result.stderr
    # the run table shows one main metric per task
    table = runner.invoke(app, ["report", str(out)])
    assert table.exit_code == 0, table.output
    header = next(ln for ln in table.output.splitlines() if "sparsity" in ln and "parameters" in ln)
    assert "testbed_arith accuracy" in header and "finished" not in header and "mean_tokens" not in header
    chosen = runner.invoke(app, ["report", str(out), "--metric", "testbed_arith/mean_tokens"])
    assert chosen.exit_code == 0 and "mean_tokens" in chosen.output
    bad = runner.invoke(app, ["report", str(out), "--metric", "nope/acc"])
    assert bad.exit_code == 2 and "--metric" in bad.output
    report_json = _strict_json(runner.invoke(app, ["report", str(out), "--json"]).stdout)
    assert report_json["metrics"] == data["metrics"]


def test_run_table_one_main_metric_per_task():
    rows = [{"step": 0, "sparsity": 0.0, "parameters": 1e6,
             "gsm8k/exact_match,strict-match": 0.5, "gsm8k/exact_match,strict-match@seed0": 0.5,
             "gsm8k/exact_match,strict-match_stderr": 0.1, "gsm8k/exact_match,flexible-extract": 0.6,
             "mathqa/acc": 0.3, "mathqa/acc@seed0": 0.3, "mathqa/acc_norm": 0.31, "mathqa/acc_stderr": 0.02}]
    console = Console(width=300, record=True)
    console.print(results_table(rows, "t"))
    text = console.export_text()
    header = next(ln for ln in text.splitlines() if "sparsity" in ln)
    assert "gsm8k exact_match,strict-match" in header and "mathqa acc" in header
    assert "stderr" not in header and "flexible" not in header and "acc_norm" not in header
    # without per-seed keys: <task>/accuracy
    rows = [{"step": 1, "sparsity": 0.1, "parameters": 9e5, "t/accuracy": 0.4, "t/finished": 1.0}]
    console = Console(width=300, record=True)
    console.print(results_table(rows, "t"))
    assert "t accuracy" in console.export_text() and "t finished" not in console.export_text()


def test_plain_progress_lines_with_eta():
    now = [0.0]
    console = Console(file=__import__("io").StringIO(), width=200)
    p = PlainProgressReporter(console, interval=10.0, clock=lambda: now[0])
    with p.task("Scoring", total=4) as advance:
        for _ in range(4):
            now[0] += 6.0
            advance(1)
    p.log("step 1/2: target 0.200")
    lines = console.file.getvalue().strip().splitlines()
    assert lines[0].startswith("Scoring: 2/4 (50%), 12.0s elapsed, ETA 12.0s")
    assert lines[-2] == "Scoring: 4/4 done in 24.0s"
    assert lines[-1] == "[24.0s] step 1/2: target 0.200"
    # a reporter asked for on a non-terminal console is the plain one, and lm-eval's and the
    # datasets library's own tqdm bars are off (their work shows as RESP's phases)
    assert isinstance(RichProgressReporter(console), PlainProgressReporter)
    assert os.environ.get("TQDM_DISABLE") == "1" and os.environ.get("HF_DATASETS_DISABLE_PROGRESS_BARS") == "1"


def _results(n_seeds: int, with_items: bool = False) -> dict:
    rows = []
    per = {"dense": [(0.0, 0.0, 0.96, 0.05)], "A": [(0.2, 0.213, 0.90, 0.08), (0.4, 0.398, 0.02, 0.05)],
           "B": [(0.2, 0.19, 0.85, float("nan")), (0.4, 0.41, 0.40, 0.1)]}
    for method, pts in per.items():
        for target, reached, m, h in pts:
            rows.append({"method": method, "target": target, "sparsity": reached, "parameters": 100,
                         "metric": "t/accuracy", "mean": m, "ci95": h if n_seeds > 1 else float("nan"),
                         "n_seeds": n_seeds, "per_seed": {str(s): m for s in range(n_seeds)},
                         "ci95_items": [m - 0.03, min(1.0, m + 0.03)] if with_items else None})
    info = {"name": "cmp", "model": "m", "task": {"name": "t"}, "seeds": list(range(n_seeds)),
            "sparsities": [0.2, 0.4], "structures": {"sparsity_basis": "prunable_blocks"},
            "calibration": {"name": "c"}, "methods": [{"label": "A", "scorer": {"name": "resp"}},
                                                      {"label": "B", "scorer": {"name": "gisp"}}]}
    return {"info": info, "rows": rows}


def test_plot_series_reached_sparsity_and_clipped_bands():
    series = plot_series(_results(3), "t/accuracy")
    xs = [round(x, 3) for x, _, _ in series["A"]]
    assert xs == [0.0, 21.3, 39.8]  # the reached sparsity, not the target
    lo, hi = series["A"][2][2]
    assert lo == 0.0 and hi == pytest.approx(7.0)  # 2% - 5% clipped at 0
    assert series["A"][0][2][1] == 100.0  # 96% + 5% clipped at 100
    assert series["B"][1][2] is None  # no CI: no band
    items = plot_series(_results(1, with_items=True), "t/accuracy", ci="items")
    assert items["A"][1][2] == pytest.approx((87.0, 93.0))


def test_one_seed_claims_no_band(tmp_path):
    one = _results(1)
    assert ci_words(one) == "1 seed: no CI"
    console = Console(width=300, record=True)
    console.print(rich_table(one))
    text = " ".join(console.export_text().split())
    assert "1 seed: no CI" in text and "±" not in text
    assert "95% CI over" not in render_markdown(one)
    render_plot(one, tmp_path / "accuracy.png")
    svg = (tmp_path / "accuracy.svg").read_text()
    assert "95% CI" not in svg and "bands" not in svg
    three = _results(3)
    assert "over 3 seeds" in ci_words(three)
    assert band(three["rows"][1]) == pytest.approx((0.82, 0.98))


def test_report_gives_reached_sparsity_on_both_bases():
    res = _results(3)
    assert "both bases" not in render_markdown(res)  # rows without the figures: no table
    for r in res["rows"]:
        r["sparsity_prunable_blocks"], r["sparsity_all_blocks"] = r["sparsity"], r["sparsity"] * 0.8
    text = render_markdown(res)
    table = text.split("## Reached sparsity on both bases")[1].split("## Methods")[0]
    row_a = next(ln for ln in table.splitlines() if ln.startswith("| A |"))
    assert row_a == "| A | 21.3% · 17.0% · 0.0001M | 39.8% · 31.8% · 0.0001M |"


def test_plot_files_are_deterministic(tmp_path):
    res = _results(3)
    written = render_plot(res, tmp_path / "a" / "accuracy.png")
    assert [p.name for p in written] == ["accuracy.png", "accuracy.pdf", "accuracy.svg"]
    render_plot(res, tmp_path / "b" / "accuracy.png")
    for name in ("accuracy.png", "accuracy.pdf", "accuracy.svg"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_distinct_markers_and_line_styles(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    render_plot(_results(3), tmp_path / "accuracy.png")
    # re-draw to inspect the artists
    from resp_core import report

    calls = []
    real = plt.Axes.plot

    def spy(self, *a, **k):
        calls.append((k.get("marker"), str(k.get("linestyle"))))
        return real(self, *a, **k)

    plt.Axes.plot = spy
    try:
        report.render_plot(_results(3), tmp_path / "again.png")
    finally:
        plt.Axes.plot = real
    assert len(calls) == 2 and len(set(calls)) == 2 and calls[0][0] != calls[1][0] and calls[0][1] != calls[1][1]


def test_t_quantile_and_bootstrap():
    from scipy import stats

    for dof in (1, 2, 10, 30, 31, 40, 100):
        assert t975(dof) == pytest.approx(stats.t.ppf(0.975, dof))
    assert t975(40) > 2.0  # the old table said 1.96 above 30 degrees of freedom
    vals = [0.1 * i for i in range(41)]
    m = sum(vals) / len(vals)
    sd = math.sqrt(sum((v - m) ** 2 for v in vals) / 40)
    assert ci95_halfwidth(vals) == pytest.approx(stats.t.ppf(0.975, 40) * sd / math.sqrt(41))
    assert math.isnan(ci95_halfwidth([0.5]))
    items = [1.0] * 60 + [0.0] * 40
    lo, hi = bootstrap_ci95(items, seed=0)
    assert lo < 0.6 < hi and 0.45 < lo and hi < 0.75
    assert bootstrap_ci95(items, seed=0) == (lo, hi)  # seeded
    assert bootstrap_ci95([1.0, 1.0, 1.0]) == (1.0, 1.0)
    assert all(math.isnan(x) for x in bootstrap_ci95([1.0]))


def test_results_json_is_valid_json(tmp_path):
    from resp_core.compare import write_results

    res = _results(1)
    res["rows"][0]["mean"] = float("inf")
    write_results(tmp_path, res)
    data = _strict_json((tmp_path / "results.json").read_text())
    assert data["rows"][0]["ci95"] is None and data["rows"][0]["mean"] is None
    assert json_safe({"a": [float("nan"), 1.5]}) == {"a": [None, 1.5]}
    for name in ("accuracy.png", "accuracy.pdf", "accuracy.svg", "report.md", "results.csv"):
        assert (tmp_path / name).is_file(), name


def test_perplexity_is_shown_as_is_not_as_a_percentage():
    from resp_core.report import _fmt, is_fraction, plot_series

    assert is_fraction("testbed_arith/accuracy") and not is_fraction("gsm8k_text/word_perplexity")
    cell = {"metric": "gsm8k_text/perplexity", "mean": 4.007, "ci95": 0.25, "target": 0.0, "sparsity": 0.0}
    assert _fmt(cell) == "4.007 ± 0.250"
    acc = {"metric": "testbed_arith/accuracy", "mean": 0.5, "ci95": 0.1, "target": 0.0, "sparsity": 0.0}
    assert _fmt(acc) == "50.0 ± 10.0"
    results = {"info": {"name": "x"}, "rows": [
        {"method": "dense", **cell},
        {"method": "m", "metric": "gsm8k_text/perplexity", "mean": 120.0, "ci95": 30.0, "target": 0.4, "sparsity": 0.4}]}
    points = plot_series(results, "gsm8k_text/perplexity")["m"]
    assert points[-1][1] == 120.0 and points[-1][2] == (90.0, 150.0)  # not clipped to 100, not x100
