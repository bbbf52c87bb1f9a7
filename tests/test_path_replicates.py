"""Path replicates in `respctl compare`: ``path_seeds`` give each method one pruning path per seed
(its own calibration draw and masks), evaluation seeds nested in every path; rows over path means,
paired differences against the reference (the interval of ``scipy.stats.ttest_rel``), the minimum
detectable difference, deterministic methods, extension and an interrupted path continued."""

from __future__ import annotations

import json
import math
import signal

import pytest
import yaml
from typer.testing import CliRunner

from resp_core.cli import app
from resp_core.compare import CompareRecipe, method_runs
from resp_core.compare.paths import paired_differences, summarise
from resp_core.stats import mde_paired, paired_difference

from test_compare import compare_recipe, write

runner = CliRunner()
LEGACY_ROW_KEYS = {"method", "target", "sparsity", "sparsity_prunable_blocks", "sparsity_all_blocks", "parameters",
                   "metric", "mean", "ci95", "n_seeds", "per_seed", "ci95_items"}
LEGACY_CSV_HEADER = ("method,target,sparsity,sparsity_prunable_blocks,sparsity_all_blocks,parameters,metric,mean,"
                     "ci95,n_seeds,per_seed")


def _recipe(model_dir, path_seeds=(0, 1), seeds=(0,), **extra) -> dict:
    data = compare_recipe(model_dir, seeds=seeds, methods=[
        {"label": "GISP", "scorer": {"name": "gisp"}},
        {"label": "magnitude", "scorer": {"name": "magnitude"}},
    ])
    data["calibration"]["params"]["num_samples"] = 4
    if path_seeds is not None:
        data["path_seeds"] = list(path_seeds)
    data.update(extra)
    return data


def _compare(tmp_path, data, out, name="cmp.yaml"):
    result = runner.invoke(app, ["compare", str(write(tmp_path, data, name)), "--out", str(out)])
    assert result.exit_code == 0, result.output
    return json.loads((out / "results.json").read_text())


# --------------------------------------------------------------------------------------------------
# statistics on synthetic numbers
# --------------------------------------------------------------------------------------------------

def test_paired_interval_equals_ttest_rel():
    from scipy.stats import ttest_rel

    a = [0.61, 0.55, 0.72, 0.48, 0.66]
    b = [0.50, 0.52, 0.58, 0.49, 0.51]
    d = paired_difference(a, b)
    ci = ttest_rel(a, b).confidence_interval(0.95)
    assert d["n"] == 5
    assert d["mean"] == pytest.approx(sum(x - y for x, y in zip(a, b)) / 5)
    assert (d["low"], d["high"]) == (pytest.approx(ci.low, abs=1e-12), pytest.approx(ci.high, abs=1e-12))

    # the same through the results: rows per path seed, paired with the reference by path seed
    rows = [{"method": m, "target": 0.2, "metric": "t/accuracy", "paths_identical": False,
             "path_means": {str(s): v for s, v in zip((3, 5, 7, 11, 13), vals)}}
            for m, vals in (("ref", b), ("new", a))]
    rows.append({**rows[1], "method": "fewer", "path_means": {"3": 0.7, "5": 0.4, "99": 0.1}})
    (new, fewer) = paired_differences(rows, "ref")
    assert new["method"] == "new" and new["n_paths"] == 5 and new["path_seeds"] == [3, 5, 7, 11, 13]
    assert (new["ci95_low"], new["ci95_high"]) == (pytest.approx(ci.low, abs=1e-12), pytest.approx(ci.high, abs=1e-12))
    assert new["excludes_zero"] is bool(ci.low > 0 or ci.high < 0) and new["note"] is None
    only = ttest_rel([0.7, 0.4], [0.50, 0.52]).confidence_interval()  # common path seeds 3 and 5
    assert fewer["n_paths"] == 2 and fewer["ci95_low"] == pytest.approx(only.low)
    one = paired_differences([rows[0], {**rows[1], "path_means": {"3": 0.9}}], "ref")[0]
    assert one["n_paths"] == 1 and one["note"] == "not resolved at n = 1" and one["excludes_zero"] is None
    assert math.isnan(one["ci95_low"]) and math.isnan(one["mde"])


def test_minimum_detectable_difference_formula():
    from scipy.stats import t

    for n, sd_d in ((2, 0.05), (3, 0.031), (10, 0.2)):
        direct = (t.ppf(0.975, n - 1) + t.ppf(0.80, n - 1)) * sd_d / math.sqrt(n)
        assert mde_paired(sd_d, n) == pytest.approx(direct, rel=1e-12)
    a, b = [0.2, 0.5, 0.4, 0.9], [0.1, 0.1, 0.3, 0.2]
    d = [x - y for x, y in zip(a, b)]
    m = sum(d) / 4
    sd_d = math.sqrt(sum((v - m) ** 2 for v in d) / 3)
    assert paired_difference(a, b)["mde"] == pytest.approx((t.ppf(0.975, 3) + t.ppf(0.8, 3)) * sd_d / 2)
    assert math.isnan(mde_paired(0.1, 1))


def test_summary_over_paths_and_identical_paths():
    cell = {"per_path": {0: {0: 0.5, 1: 0.7}, 1: {0: 0.9, 1: 0.9}, 2: {0: 0.2, 1: 0.4}},
            "reached": {p: {"sparsity": 0.2, "sparsity_prunable_blocks": 0.2, "sparsity_all_blocks": 0.1,
                            "parameters": 100} for p in range(3)},
            "digest": {0: "a", 1: "b", 2: "a"}, "items": {}}
    r = summarise("m", 0.2, "t/accuracy", cell)
    means = [0.6, 0.9, 0.3]
    assert r["mean"] == pytest.approx(0.6) and r["n_paths"] == 3 and r["n_seeds"] == 2
    from scipy.stats import t

    sd_b = math.sqrt(sum((x - 0.6) ** 2 for x in means) / 2)
    assert r["sd_between_paths"] == pytest.approx(sd_b)
    assert r["ci95"] == pytest.approx(t.ppf(0.975, 2) * sd_b / math.sqrt(3))
    assert r["sd_within_paths"] == pytest.approx((math.sqrt(0.02) + 0 + math.sqrt(0.02)) / 3)
    assert r["ci_over"] == "path means" and r["paths_identical"] is False
    assert r["per_path"] == {"0": {"0": 0.5, "1": 0.7}, "1": {"0": 0.9, "1": 0.9}, "2": {"0": 0.2, "1": 0.4}}
    same = summarise("m", 0.2, "t/accuracy", {**cell, "per_path": {p: {0: 0.5, 1: 0.7} for p in range(3)},
                                              "digest": {p: "a" for p in range(3)}})
    assert same["paths_identical"] is True and same["sd_between_paths"] == 0.0
    assert same["ci_over"].startswith("evaluation seeds") and same["ci95"] > 0  # no fake zero-width spread


def test_recipe_checks_path_seeds_and_reference(tiny_model_dir):
    base = _recipe(tiny_model_dir)
    cmp = CompareRecipe.model_validate(base)
    assert cmp.reference_label() == "GISP"
    assert [(sub, p) for sub, _, p in method_runs(cmp, cmp.methods[0])] == [("runs/gisp/path0", 0),
                                                                            ("runs/gisp/path1", 1)]
    oneshot = cmp.methods[0].model_copy(update={"schedule": {"name": "oneshot"}})
    assert [sub for sub, _, _ in method_runs(cmp, oneshot)][:2] == ["runs/gisp/path0/0.20", "runs/gisp/path0/0.40"]
    for bad, words in (({"path_seeds": []}, "at least one path seed"), ({"path_seeds": [1, 1]}, "unique"),
                       ({"path_seeds": [-1]}, "greater than or equal"), ({"reference": "nope"}, "not a method label"),
                       ({"path_seeds": None, "reference": "GISP"}, "give path_seeds too")):
        with pytest.raises(ValueError, match=words):
            CompareRecipe.model_validate({**base, **bad})


# --------------------------------------------------------------------------------------------------
# comparisons on the tiny model
# --------------------------------------------------------------------------------------------------

def test_default_keeps_one_path_per_method_and_the_same_results_shape(tmp_path, tiny_model_dir):
    out = tmp_path / "cmp"
    res = _compare(tmp_path, _recipe(tiny_model_dir, path_seeds=None), out)
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["gisp", "magnitude"]
    assert (out / "runs" / "gisp" / "masks").is_dir()
    assert set(res) == {"info", "rows"} and "path_seeds" not in res["info"]
    assert {k for r in res["rows"] for k in r} == LEGACY_ROW_KEYS
    assert (out / "results.csv").read_text().splitlines()[0] == LEGACY_CSV_HEADER
    assert not (out / "differences.csv").exists() and not (out / "differences.png").exists()
    assert "path seeds" not in (out / "report.md").read_text()
    assert "path_seeds" not in (out / "compare.yaml").read_text()


def test_path_seeds_replicate_paths_and_extend_like_an_uncut_comparison(tmp_path, tiny_model_dir):
    whole = tmp_path / "whole"
    res = _compare(tmp_path, _recipe(tiny_model_dir), whole)
    gisp = [whole / "runs" / "gisp" / f"path{s}" for s in (0, 1)]
    for p in gisp:
        assert json.loads((p / "run.json").read_text())["status"] == "finished"
    assert [json.loads((p / "run.json").read_text())["seed"] for p in gisp] == [0, 1]
    # each path seed draws its own calibration set and prunes its own masks
    calib = [(p / "calibration" / "generation_00.jsonl").read_bytes() for p in gisp]
    assert calib[0] != calib[1]
    masks = [(p / "masks" / "milestone_0.40.safetensors").read_bytes() for p in gisp]
    assert masks[0] != masks[1]
    # magnitude ignores the calibration draw: identical masks, said so instead of a spread
    mag = [whole / "runs" / "magnitude" / f"path{s}" / "masks" / "step_02.safetensors" for s in (0, 1)]
    assert mag[0].read_bytes() == mag[1].read_bytes()
    assert res["info"]["path_seeds"] == [0, 1] and res["info"]["reference"] == "GISP"
    assert res["info"]["deterministic"] == ["magnitude"]
    rows = {(r["method"], r["target"]): r for r in res["rows"] if r["metric"].endswith("/accuracy")}
    assert rows[("magnitude", 0.4)]["paths_identical"] is True
    g = rows[("GISP", 0.4)]
    assert g["n_paths"] == 2 and g["paths_identical"] is False and g["ci_over"] == "path means"
    assert g["mean"] == pytest.approx(sum(g["path_means"].values()) / 2)
    assert set(g["per_path"]) == {"0", "1"} and all(set(v) == {"0"} for v in g["per_path"].values())
    items = g["per_item"]
    assert len(items["ids"]) == 4 and set(items["per_path"]) == {"0", "1"}
    assert sum(items["per_path"]["1"]["0"]) / 4 == pytest.approx(g["per_path"]["1"]["0"])
    assert rows[("dense", 0.0)]["ci_over"] == "evaluation seeds"
    (diff_mag, *_) = [d for d in res["differences"] if d["method"] == "magnitude" and d["target"] == 0.4]
    assert diff_mag["reference"] == "GISP" and diff_mag["n_paths"] == 2
    assert diff_mag["mean"] == pytest.approx(rows[("magnitude", 0.4)]["mean"] - g["mean"])
    report = (whole / "report.md").read_text()
    assert "Paired differences against GISP" in report and "t over path means" in report
    assert "paths identical: deterministic" in report and "evaluation seeds: [0]" in report
    for name in ("differences.csv", "differences.png", "differences.svg", "results.csv"):
        assert (whole / name).is_file(), name
    assert "per_path" in (whole / "results.csv").read_text().splitlines()[0]

    # the first path seed alone: one path, nothing resolved; then extended with the second
    cut = tmp_path / "cut"
    one = _compare(tmp_path, _recipe(tiny_model_dir, path_seeds=(0,)), cut, "one.yaml")
    assert {d["note"] for d in one["differences"]} == {"not resolved at n = 1"}
    assert "not resolved at n = 1" in (cut / "report.md").read_text() and not (cut / "differences.png").exists()
    kept = (cut / "runs" / "gisp" / "path0" / "metrics.json").stat().st_mtime_ns
    _compare(tmp_path, _recipe(tiny_model_dir), cut)
    assert (cut / "runs" / "gisp" / "path0" / "metrics.json").stat().st_mtime_ns == kept
    assert (cut / "results.json").read_bytes() == (whole / "results.json").read_bytes()
    assert (cut / "report.md").read_bytes() == (whole / "report.md").read_bytes()
    # the same path seed run twice (whole and cut): the same masks
    for s in (0, 1):
        for f in (whole / "runs" / "gisp" / f"path{s}" / "masks").iterdir():
            assert (cut / "runs" / "gisp" / f"path{s}" / "masks" / f.name).read_bytes() == f.read_bytes()

    # a new evaluation seed on every finished path, its per-item records kept
    more = _compare(tmp_path, _recipe(tiny_model_dir, seeds=(0, 1)), cut, "more.yaml")
    g2 = {(r["method"], r["target"]): r for r in more["rows"] if r["metric"].endswith("/accuracy")}[("GISP", 0.4)]
    assert g2["n_seeds"] == 2 and g2["per_path"]["0"]["0"] == g["per_path"]["0"]["0"]
    assert set(g2["per_item"]["per_path"]["1"]) == {"0", "1"}
    assert (cut / "runs" / "gisp" / "path1" / "eval" / "milestone_0.40_0_task_accuracy.extra.jsonl").is_file()

    # the layout is fixed once: a comparison without path seeds is not extended with them
    result = runner.invoke(app, ["compare", str(write(tmp_path, _recipe(tiny_model_dir, path_seeds=None), "no.yaml")),
                                 "--out", str(cut)])
    assert result.exit_code == 2 and "path_seeds" in result.output


def test_an_interrupted_path_continues_to_the_bytes_of_an_uncut_comparison(tmp_path, tiny_model_dir):
    """GISP's path 0 (score:1, score:2) finishes, path 1 is killed in its first step (score:3):
    the next call keeps path 0, continues path 1 from its checkpoint, and ends as an uncut run."""
    from test_resume import compare_digest, run_in_child

    from resp_core.run_record import source_commit

    source_commit()  # read once here, so that every forked run records the same commit
    cmp = tmp_path / "cmp.yaml"
    data = _recipe(tiny_model_dir)
    data["methods"] = data["methods"][:1]
    cmp.write_text(yaml.safe_dump(data))
    code, out = run_in_child(["compare", str(cmp), "--out", str(tmp_path / "whole")], tmp_path, name="whole")
    assert code == 0, out
    folder = tmp_path / "cut"
    code, out = run_in_child(["compare", str(cmp), "--out", str(folder)], tmp_path, {"RESP_TEST_KILL_AT": "score:3"})
    assert code == -signal.SIGKILL, out
    done = folder / "runs" / "gisp" / "path0"
    assert json.loads((done / "run.json").read_text())["status"] == "finished"
    kept = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in done.rglob("*") if p.is_file()}
    code, out = run_in_child(["compare", str(cmp), "--out", str(folder)], tmp_path, name="again")
    assert code == 0, out
    assert "GISP (path seed 1): continuing the unfinished run from its last checkpoint" in out, out
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in kept} == kept
    assert compare_digest(folder) == compare_digest(tmp_path / "whole")


class _Shipped:
    """An executor that runs each job through :func:`resp_core.compare.run_path` (what a Ray
    worker is given: the recipe as JSON), here, one after the other."""

    in_process = False

    def run(self, jobs, run_one, say):
        return [run_one(*job.args) for job in jobs]


def test_oneshot_and_init_from_follow_their_own_path_seed(tmp_path, tiny_model_dir):
    from resp_core.compare import parse_compare, run_compare
    from resp_core.interfaces import Progress

    data = _recipe(tiny_model_dir)
    data["methods"] = [{"label": "Wanda", "scorer": {"name": "wanda_sp"}, "allocator": {"name": "uniform"},
                        "schedule": {"name": "oneshot"}},
                       {"label": "GISP from Wanda", "scorer": {"name": "gisp"},
                        "init_from": {"method": "Wanda", "milestone": 0.2}}]
    out = tmp_path / "cmp"
    res = run_compare(parse_compare(data, "cmp.yaml"), "cmp.yaml", out, Progress(), executor=_Shipped())
    for s in (0, 1):
        for t in ("0.20", "0.40"):
            run = out / "runs" / "wanda" / f"path{s}" / t
            assert json.loads((run / "run.json").read_text())["seed"] == s
        recipe = yaml.safe_load((out / "runs" / "gisp-from-wanda" / f"path{s}" / "recipe.yaml").read_text())
        assert recipe["seed"] == s
        assert recipe["init_from"].endswith(f"runs/wanda/path{s}/0.20/masks/milestone_0.20.safetensors")
    rows = {(r["method"], r["target"]): r for r in res["rows"] if r["metric"].endswith("/accuracy")}
    assert rows[("Wanda", 0.2)]["n_paths"] == 2 and rows[("Wanda", 0.4)]["n_paths"] == 2
    assert {d["method"] for d in res["differences"]} == {"GISP from Wanda"}  # against the first method
