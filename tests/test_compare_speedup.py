"""Effective speedup in `respctl compare` (``speedup:``): per-token speedup from paired timing
rounds, answer-length ratio over path seeds, their product with t intervals on the logs (checked
against scipy on synthetic rows); the timing of every milestone model on the testbed, kept across
extensions; and a method's own ``reference`` for its paired differences."""

from __future__ import annotations

import json
import math

import pytest
from scipy import stats
from typer.testing import CliRunner

from resp_core.cli import app
from resp_core.compare import CompareRecipe
from resp_core.compare.paths import paired_differences
from resp_core.compare.speedup import SpeedupSection, length_ratio, log_interval, speedup_rows, timing_speedup

from test_compare import write

runner = CliRunner()


def _t_interval_of_logs(values):
    logs = [math.log(v) for v in values]
    low, high = stats.t.interval(0.95, len(logs) - 1, loc=sum(logs) / len(logs), scale=stats.sem(logs))
    return math.exp(low), math.exp(high)


def _timing(dense, pruned, tokens=10):
    return {"dense_s": dense, "pruned_s": pruned, "tokens_per_round": tokens}


def _synthetic():
    dense = {"method": "dense", "target": 0.0, "metric": "t/mean_tokens", "per_seed": {"0": 20.0, "1": 22.0}}
    a = {"method": "A", "target": 0.4, "metric": "t/mean_tokens",
         "per_path": {"0": {"0": 25.0, "1": 27.0}, "1": {"0": 30.0, "1": 28.0}, "2": {"0": 22.0, "1": 24.0}}}
    b = {"method": "B", "target": 0.4, "metric": "t/mean_tokens",
         "per_path": {"0": {"0": 21.0, "1": 21.0}, "1": {"0": 20.0, "1": 23.0}, "2": {"0": 19.0}}}
    timings = {("A", 0.4, "0"): _timing([1.0, 1.1, 0.9], [0.7, 0.8, 0.6]),
               ("A", 0.4, "1"): _timing([1.0, 1.2, 1.0], [0.75, 0.8, 0.7]),
               ("A", 0.4, "2"): _timing([1.1, 1.0, 1.05], [0.8, 0.72, 0.75]),
               ("B", 0.4, "0"): _timing([1.0, 1.0, 1.1], [0.9, 0.85, 0.95]),
               ("B", 0.4, "1"): _timing([1.0, 1.1, 1.0], [0.8, 0.9, 0.9]),
               ("B", 0.4, "2"): _timing([1.0, 1.05, 1.0], [0.85, 0.9, 0.92])}
    return [dense, a, b], timings


def test_per_token_speedup_is_the_t_interval_of_the_paired_log_ratios():
    t = _timing([1.0, 1.2, 0.95, 1.1], [0.7, 0.9, 0.66, 0.8], tokens=16)
    s = timing_speedup(t)
    logs = [math.log(d / p) for d, p in zip(t["dense_s"], t["pruned_s"])]
    ci = stats.ttest_1samp(logs, 0.0).confidence_interval(0.95)
    assert s["mean"] == pytest.approx(stats.gmean([d / p for d, p in zip(t["dense_s"], t["pruned_s"])]))
    assert (s["ci95_low"], s["ci95_high"]) == (pytest.approx(math.exp(ci.low)), pytest.approx(math.exp(ci.high)))
    assert s["rounds"] == 4 and s["dense_s_per_token"] == pytest.approx(sum(t["dense_s"]) / 4 / 16)
    one = log_interval([0.3])
    assert one["mean"] == pytest.approx(math.exp(0.3)) and math.isnan(one["ci95_low"])


def test_length_ratio_pairs_evaluation_seeds():
    assert length_ratio({"0": 20.0, "1": 22.0}, {"0": 25.0, "1": 27.0}) == pytest.approx(21.0 / 26.0)
    # only the seeds both have: seed 1 of the dense model has no pruned partner
    assert length_ratio({"0": 20.0, "1": 22.0}, {"0": 19.0}) == pytest.approx(20.0 / 19.0)
    assert math.isnan(length_ratio({"0": 20.0}, {"3": 19.0}))


def test_effective_speedup_rows_against_a_direct_computation():
    rows, timings = _synthetic()
    out = speedup_rows(rows, timings, {"A": "B", "B": "B"})
    assert [(r["method"], r["target"], r["task"]) for r in out] == [("A", 0.4, "t"), ("B", 0.4, "t")]
    a, b = out
    dense = {"0": 20.0, "1": 22.0}
    for row, src in ((a, rows[1]), (b, rows[2])):
        speed = {p: stats.gmean([d / q for d, q in zip(timings[(row["method"], 0.4, p)]["dense_s"],
                                                        timings[(row["method"], 0.4, p)]["pruned_s"])])
                 for p in ("0", "1", "2")}
        ratio = {p: sum(dense[s] for s in seeds) / sum(seeds.values()) for p, seeds in src["per_path"].items()}
        eff = {p: speed[p] * ratio[p] for p in speed}
        for key, direct in (("per_token_speedup", speed), ("length_ratio", ratio), ("effective_speedup", eff)):
            cell = row[key]
            assert cell["per_path"] == pytest.approx(direct), key
            assert cell["mean"] == pytest.approx(stats.gmean(list(direct.values()))), key
            low, high = _t_interval_of_logs(list(direct.values()))
            assert (cell["ci95_low"], cell["ci95_high"]) == (pytest.approx(low), pytest.approx(high)), key
            assert cell["n"] == 3 and cell["note"] is None
        # the product holds for the point estimates: geometric means multiply
        assert row["effective_speedup"]["mean"] == pytest.approx(row["per_token_speedup"]["mean"]
                                                                 * row["length_ratio"]["mean"])
    # A against its reference B, paired by path seed on the logs
    vs = a["against_reference"]
    ea, eb = a["effective_speedup"]["per_path"], b["effective_speedup"]["per_path"]
    ci = stats.ttest_rel([math.log(ea[p]) for p in "012"], [math.log(eb[p]) for p in "012"]).confidence_interval()
    assert vs["reference"] == "B" and vs["n_paths"] == 3
    assert vs["ratio"] == pytest.approx(stats.gmean([ea[p] / eb[p] for p in "012"]))
    assert (vs["ci95_low"], vs["ci95_high"]) == (pytest.approx(math.exp(ci.low)), pytest.approx(math.exp(ci.high)))
    assert "against_reference" not in b  # the reference itself

    # one path: the per-token interval is over the timing rounds, the rest not resolved
    single = speedup_rows(rows, {("A", 0.4, "1"): timings[("A", 0.4, "1")]}, {})[0]
    direct = timing_speedup(timings[("A", 0.4, "1")])
    assert single["per_token_speedup"]["ci95_low"] == pytest.approx(direct["ci95_low"])
    assert single["per_token_speedup"]["ci_over"].startswith("timing rounds")
    assert single["effective_speedup"]["note"] == "not resolved at n = 1"
    assert math.isnan(single["effective_speedup"]["ci95_low"]) and single["effective_speedup"]["mean"] > 0


def test_per_method_reference_pairs_each_method_with_its_own():
    rows = [{"method": m, "target": 0.2, "metric": "t/accuracy", "paths_identical": False,
             "path_means": {"0": v[0], "1": v[1], "2": v[2]}}
            for m, v in (("GISP", (0.5, 0.6, 0.55)), ("GISP full", (0.4, 0.45, 0.5)),
                         ("Wanda", (0.3, 0.2, 0.25)), ("Wanda authors", (0.1, 0.2, 0.2)))]
    refs = {"GISP": "GISP", "GISP full": "GISP", "Wanda": "GISP", "Wanda authors": "Wanda"}
    diffs = {d["method"]: d for d in paired_differences(rows, refs)}
    assert set(diffs) == {"GISP full", "Wanda", "Wanda authors"}
    assert diffs["Wanda authors"]["reference"] == "Wanda" and diffs["GISP full"]["reference"] == "GISP"
    ci = stats.ttest_rel([0.1, 0.2, 0.2], [0.3, 0.2, 0.25]).confidence_interval()
    assert diffs["Wanda authors"]["ci95_low"] == pytest.approx(ci.low)
    assert paired_differences(rows, "GISP") == paired_differences(rows, {m: "GISP" for m in refs})


def test_recipe_checks_method_reference_and_speedup(tiny_model_dir):
    from test_path_replicates import _recipe

    base = _recipe(tiny_model_dir)
    methods = [{**base["methods"][0]}, {**base["methods"][1], "reference": "GISP"}]
    cmp = CompareRecipe.model_validate({**base, "methods": methods, "reference": "magnitude"})
    assert cmp.references() == {"GISP": "magnitude", "magnitude": "GISP"}
    bad_methods = (([{**methods[0], "reference": "GISP"}, methods[1]], "not paired with itself"),
                   ([methods[0], {**methods[1], "reference": "nope"}], "not a method label"))
    for bad, words in bad_methods:
        with pytest.raises(ValueError, match=words):
            CompareRecipe.model_validate({**base, "methods": bad})
    with pytest.raises(ValueError, match=r"methods\[1\]\.reference.*give path_seeds too"):
        CompareRecipe.model_validate({**base, "methods": methods, "path_seeds": None})
    assert CompareRecipe.model_validate({**base, "speedup": {}}).speedup == SpeedupSection()
    for bad in ({"repeats": 1}, {"new_tokens": 0}, {"prompts": 257}, {"batch_size": 0}, {"rounds": 3}):
        with pytest.raises(ValueError):
            CompareRecipe.model_validate({**base, "speedup": bad})
    with pytest.raises(ValueError, match="speedup: .*give path_seeds too"):
        CompareRecipe.model_validate({**base, "speedup": {}, "path_seeds": None})


def _testbed_recipe(speedup: dict | None) -> dict:
    data = {
        "name": "testbed-pairs", "model": {"path": "testbed"}, "task": {"name": "testbed_arith"},
        "structures": {"attention": "q_head"}, "generator": {"name": "hf", "params": {"batch_size": 16}},
        "calibration": {"name": "task_data", "params": {"num_samples": 4}},
        "sparsities": [0.2, 0.4], "steps": 2, "path_seeds": [0, 1], "seeds": [0], "reference": "magnitude",
        "evaluators": [{"name": "task_accuracy", "params": {"num_items": 4, "sampling": {"max_new_tokens": 96}}}],
        "methods": [{"label": "magnitude", "scorer": {"name": "magnitude"}},
                    {"label": "GISP", "scorer": {"name": "gisp"}},
                    {"label": "GISP decode", "scorer": {"name": "gisp", "params": {"loss": "decode"}},
                     "reference": "GISP"}],
    }
    if speedup is not None:
        data["speedup"] = speedup
    return data


def test_effective_speedup_and_method_reference_on_the_testbed(tmp_path, testbed_available):
    out = tmp_path / "cmp"

    def compare(data, name):
        result = runner.invoke(app, ["compare", str(write(tmp_path, data, name)), "--out", str(out)])
        assert result.exit_code == 0, result.output
        return json.loads((out / "results.json").read_text())

    plain = compare(_testbed_recipe(None), "plain.yaml")
    assert "speedup" not in plain and not (out / "speedup").exists() and not (out / "speedup.csv").exists()
    assert "speedup" not in (out / "compare.yaml").read_text()
    # per-method reference: GISP decode against GISP, the others against magnitude
    refs = {(d["method"], d["reference"]) for d in plain["differences"]}
    assert refs == {("GISP", "magnitude"), ("GISP decode", "GISP")}
    assert plain["info"]["references"] == {"magnitude": "magnitude", "GISP": "magnitude", "GISP decode": "GISP"}
    report = (out / "report.md").read_text()
    assert "Paired differences against each method's reference" in report and "| GISP decode | GISP | 20% |" in report
    with open(out / "differences.csv") as fh:
        assert {tuple(line.split(",")[:2]) for line in list(fh)[1:]} == {("GISP", "magnitude"), ("GISP decode", "GISP")}

    # speedup turned on for the finished comparison: every milestone model is timed, nothing pruned again
    kept = (out / "runs" / "gisp" / "path0" / "metrics.json").stat().st_mtime_ns
    spec = {"repeats": 2, "new_tokens": 4, "prompts": 2, "batch_size": 2}
    res = compare(_testbed_recipe(spec), "speedup.yaml")
    assert (out / "runs" / "gisp" / "path0" / "metrics.json").stat().st_mtime_ns == kept
    assert res["info"]["speedup"] == spec
    rows = {(r["method"], r["target"]): r for r in res["speedup"]}
    assert set(rows) == {(m, t) for m in ("magnitude", "GISP", "GISP decode") for t in (0.2, 0.4)}
    for r in rows.values():
        assert r["task"] == "testbed_arith" and r["per_token_speedup"]["n"] == 2
        for key in ("per_token_speedup", "length_ratio", "effective_speedup"):
            assert math.isfinite(r[key]["mean"]) and r[key]["mean"] > 0, key
            assert set(r[key]["per_path"]) == {"0", "1"}
        for timing in r["per_token_speedup"]["per_path_timing"].values():
            assert timing["rounds"] == 2 and timing["dense_s_per_token"] > 0 and timing["pruned_s_per_token"] > 0
        low, high = r["per_token_speedup"]["ci95_low"], r["per_token_speedup"]["ci95_high"]
        assert 0 < low <= r["per_token_speedup"]["mean"] <= high  # timing noise: never all equal
    assert rows[("GISP decode", 0.4)]["against_reference"]["reference"] == "GISP"
    assert rows[("GISP", 0.4)]["against_reference"]["reference"] == "magnitude"
    assert "against_reference" not in rows[("magnitude", 0.4)]
    record = json.loads((out / "speedup" / "gisp" / "path1" / "milestone_0.40.json").read_text())
    assert record["model"] == "runs/gisp/path1/models/milestone_0.40" and len(record["dense_s"]) == 2
    assert record["pruned_parameters"] < record["dense_parameters"]  # the compacted model was timed
    assert "## Effective speedup (measured)" in (out / "report.md").read_text()
    assert len((out / "speedup.csv").read_text().splitlines()) == 1 + len(rows)

    # extended again with the same settings: nothing is timed again, the results are the same bytes
    timed = {f: f.stat().st_mtime_ns for f in (out / "speedup").rglob("*.json")}
    before = (out / "results.json").read_bytes()
    compare(_testbed_recipe(spec), "again.yaml")
    assert {f: f.stat().st_mtime_ns for f in timed} == timed and (out / "results.json").read_bytes() == before
    # other settings: timed again
    compare(_testbed_recipe({**spec, "new_tokens": 3}), "other.yaml")
    assert all(f.stat().st_mtime_ns != t for f, t in timed.items())
