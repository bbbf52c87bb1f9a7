"""`respctl compare` and `respctl report` on a tiny random model: outputs, extension, bad inputs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from resp_core.cli import app
from resp_core.stats import ci95_halfwidth

runner = CliRunner()


def compare_recipe(model_dir: Path, methods=None, seeds=(0, 1)) -> dict:
    return {
        "name": "tiny-compare",
        "model": {"path": str(model_dir)},
        "task": {"name": "testbed_arith"},
        "structures": {"attention": "kv_group", "mlp": "channel"},
        "generator": {"name": "hf", "params": {"batch_size": 16}},
        "calibration": {"name": "task_data", "params": {"num_samples": 6}},
        "sparsities": [0.2, 0.4],
        "steps": 2,
        "seeds": list(seeds),
        "evaluators": [{"name": "task_accuracy", "params": {"num_items": 4, "sampling": {"max_new_tokens": 8}}}],
        "methods": methods or [
            {"label": "GISP", "scorer": {"name": "gisp"}},
            {"label": "RESP", "scorer": {"name": "resp"},
             "calibration": {"name": "self_generated", "params": {"num_samples": 4, "sampling": {"max_new_tokens": 8}}},
             "schedule": {"regenerate_fraction": 1.0, "regenerate_overrides": {0.2: 0.5}}},
        ],
    }


def write(tmp_path, data, name="cmp.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return p


def test_compare_outputs_and_extension(tmp_path, tiny_model_dir):
    out = tmp_path / "cmp"
    result = runner.invoke(app, ["compare", str(write(tmp_path, compare_recipe(tiny_model_dir))), "--out", str(out)])
    assert result.exit_code == 0, result.output
    for name in ("results.json", "results.csv", "report.md", "accuracy.png", "compare.yaml", "dense/metrics.json"):
        assert (out / name).is_file(), name
    res = json.loads((out / "results.json").read_text())
    rows = res["rows"]
    methods = {r["method"] for r in rows}
    assert methods == {"dense", "GISP", "RESP"}
    for r in rows:
        assert r["n_seeds"] == 2
        vals = list(r["per_seed"].values())
        assert r["mean"] == pytest.approx(sum(vals) / 2)
        if len(set(vals)) > 1:
            assert r["ci95"] == pytest.approx(ci95_halfwidth(vals))
    targets = sorted({r["target"] for r in rows if r["method"] == "GISP"})
    assert targets == [0.2, 0.4]
    # one pruning run per method serves every sparsity: one run folder each, masks nested
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["gisp", "resp"]
    assert (out / "runs" / "gisp" / "models" / "milestone_0.20" / "model.safetensors").is_file()
    with open(out / "results.csv") as fh:
        assert len(list(csv.DictReader(fh))) == len(rows)
    report = (out / "report.md").read_text()
    assert "tiny-compare" in report and "seeds: [0, 1]" in report and "commit" in report
    assert "accuracy.png" in report

    # extend: one more seed and one more method; finished runs are not pruned again
    mtime = (out / "runs" / "gisp" / "metrics.json").stat().st_mtime
    more = compare_recipe(tiny_model_dir, seeds=(0, 1, 2))
    more["methods"].append({"label": "Magnitude-free GISP decode", "scorer": {"name": "gisp", "params": {"loss": "decode"}}})
    result = runner.invoke(app, ["compare", str(write(tmp_path, more, "more.yaml")), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "runs" / "gisp" / "metrics.json").stat().st_mtime == mtime
    assert (out / "runs" / "gisp" / "extra_seeds.json").is_file()
    res = json.loads((out / "results.json").read_text())
    assert {r["n_seeds"] for r in res["rows"]} == {3}
    assert "Magnitude-free GISP decode" in {r["method"] for r in res["rows"]}

    # report re-renders without recomputing
    (out / "report.md").unlink()
    (out / "accuracy.png").unlink()
    result = runner.invoke(app, ["report", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "report.md").is_file() and (out / "accuracy.png").is_file()


def _assert_error(result, *fragments):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    text = " ".join(result.output.split())
    assert text.startswith("error:")
    for f in fragments:
        assert f in text, (f, text)


def test_compare_bad_inputs(tmp_path, tiny_model_dir):
    base = compare_recipe(tiny_model_dir)
    out = tmp_path / "cmp"
    bad_task = {**base, "task": {"name": "gsm8kk"}}
    _assert_error(runner.invoke(app, ["compare", str(write(tmp_path, bad_task)), "--out", str(out)]),
                  "unknown task 'gsm8kk'", "did you mean 'gsm8k'")
    assert not out.exists()
    disagree = {**base, "methods": base["methods"] + [
        {"label": "other", "scorer": {"name": "resp"}, "structures": {"attention": "q_head"}}]}
    _assert_error(runner.invoke(app, ["compare", str(write(tmp_path, disagree)), "--out", str(out)]),
                  "methods[2].structures differs")
    assert not out.exists()
    other_model = {**base, "methods": [{"label": "x", "scorer": {"name": "resp"}, "model": {"path": "testbed"}}]}
    _assert_error(runner.invoke(app, ["compare", str(write(tmp_path, other_model)), "--out", str(out)]),
                  "methods[0].model differs")
    _assert_error(runner.invoke(app, ["compare", str(write(tmp_path, base)), "--out", str(out), "--seeds", "a,b"]),
                  "--seeds")
    unordered = {**base, "sparsities": [0.4, 0.2]}
    _assert_error(runner.invoke(app, ["compare", str(write(tmp_path, unordered)), "--out", str(out)]),
                  "sparsities must be strictly increasing")
    assert not out.exists()


def test_report_refuses_unfinished_or_foreign_folders(tmp_path):
    _assert_error(runner.invoke(app, ["report", str(tmp_path)]), "not a RESP run folder")
    (tmp_path / "run.json").write_text(json.dumps({"status": "running"}))
    _assert_error(runner.invoke(app, ["report", str(tmp_path)]), "not a finished run")


def test_extension_refuses_changed_shared_fields(tmp_path, tiny_model_dir):
    out = tmp_path / "cmp"
    out.mkdir()
    (out / "compare.yaml").write_text(yaml.safe_dump(compare_recipe(tiny_model_dir)))
    changed = compare_recipe(tiny_model_dir)
    changed["structures"] = {"attention": "q_head", "mlp": "channel"}
    before = sorted(p.name for p in out.iterdir())
    _assert_error(runner.invoke(app, ["compare", str(write(tmp_path, changed)), "--out", str(out)]),
                  "different structures")
    assert sorted(p.name for p in out.iterdir()) == before
    (tmp_path / "plain").mkdir()
    _assert_error(runner.invoke(app, ["compare", str(write(tmp_path, changed, "c2.yaml")), "--out", str(tmp_path / "plain")]),
                  "not a comparison folder")
