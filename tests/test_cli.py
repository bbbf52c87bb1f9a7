"""The CLI end to end on a tiny random model, and every bad input: one line, exit code 2, nothing written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from resp_core.cli import app

runner = CliRunner()


def small_recipe(model_dir: Path, **overrides) -> dict:
    recipe = yaml.safe_load((Path(__file__).parents[1] / "recipes" / "testbed-resp.yaml").read_text())
    recipe["model"]["path"] = str(model_dir)
    recipe["calibration"]["params"].update(num_samples=6, sampling={"temperature": 0.6, "max_new_tokens": 12})
    recipe["evaluation"]["evaluators"][0]["params"] = {"num_items": 6, "sampling": {"max_new_tokens": 12}}
    recipe["schedule"]["params"].update(steps=4)
    for dotted, value in overrides.items():
        node = recipe
        keys = dotted.split(".")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    return recipe


def write(tmp_path: Path, recipe, name="recipe.yaml") -> Path:
    p = tmp_path / name
    p.write_text(recipe if isinstance(recipe, str) else yaml.safe_dump(recipe))
    return p


def assert_user_error(result, *fragments):
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = [ln for ln in result.output.strip().splitlines() if ln.strip()]
    joined = " ".join(lines)
    assert "Traceback" not in result.output
    assert joined.startswith("error:"), result.output
    for f in fragments:
        assert f in joined, (f, joined)


def test_run_end_to_end(tmp_path, tiny_model_dir):
    recipe = write(tmp_path, small_recipe(tiny_model_dir))
    out = tmp_path / "run"
    result = runner.invoke(app, ["run", str(recipe), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "accuracy per milestone" in result.output
    rows = json.loads((out / "metrics.json").read_text())
    assert [r["target"] for r in rows] == [0.0, 0.1, 0.2, 0.3, 0.4]
    assert rows[-1]["parameters"] < rows[0]["parameters"]
    assert all(abs(r["sparsity"] - r["target"]) < 0.05 for r in rows)
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "finished"
    assert info["compaction_max_abs_logit_diff"] <= 1e-5
    for name in ("recipe.yaml", "model/model.safetensors", "model/resp_pruning.json", "masks/milestone_0.40.safetensors",
                 "calibration/generation_00.jsonl", "calibration/generation_03.jsonl"):
        assert (out / name).is_file(), name
    # traces record what produced them
    first = json.loads((out / "calibration" / "generation_00.jsonl").read_text().splitlines()[0])
    assert {"fingerprint", "seed", "text", "correct"} <= set(first["meta"])
    # the compacted model loads back with one call and matches the masked model from the masks
    from resp_core import load_pruned

    reloaded = load_pruned(out / "model")
    assert sum(p.numel() for p in reloaded.parameters()) == info["compacted_parameters"]
    # nested masks
    from resp_core.model.adapter import geometry_from_config
    from resp_core.model.masks import MaskSet
    from transformers import AutoConfig

    g = geometry_from_config(AutoConfig.from_pretrained(tiny_model_dir))
    masks = [MaskSet.load(out / "masks" / f"milestone_{s:.2f}.safetensors", g) for s in (0.1, 0.2, 0.3, 0.4)]
    assert all(b.is_subset_of(a) for a, b in zip(masks, masks[1:]))
    assert not masks[0].is_subset_of(masks[-1])


def test_validate_ok(tmp_path, tiny_model_dir):
    result = runner.invoke(app, ["validate", str(write(tmp_path, small_recipe(tiny_model_dir)))])
    assert result.exit_code == 0, result.output
    assert "ok" in result.output


def test_plugins_lists_builtins():
    result = runner.invoke(app, ["plugins"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for name in ("resp", "gisp", "self_generated", "task_data", "progressive", "global", "task_accuracy", "hf"):
        assert f" {name} " in result.output, name
    assert "built-in" in result.output


@pytest.mark.parametrize(
    "mutate, fragments",
    [
        (lambda r: "name: [unclosed\n  scorer: {", ["not valid YAML", "line"]),
        (lambda r: "- just\n- a list\n", ["must be a YAML mapping"]),
        (lambda r: {**r, "scorer": {"name": "rsep"}}, ["scorer", "unknown scorer 'rsep'", "did you mean 'resp'"]),
        (lambda r: {**r, "calibration": {"name": "self_generatd"}}, ["did you mean 'self_generated'"]),
        (lambda r: {**r, "schedule": {"name": "progressive", "params": {"target": 1.2}}},
         ["schedule.params.target", "[0, 1)"]),
        (lambda r: {**r, "schedule": {"name": "progressive", "params": {"target": -0.1}}}, ["schedule.params.target"]),
        (lambda r: {**r, "schedule": {"name": "progressive", "params": {"target": 0.4, "milestones": [0.3, 0.1]}}},
         ["milestones must be strictly increasing"]),
        (lambda r: {**r, "model": {"path": "./no/such/model"}}, ["model.path", "does not exist"]),
        (lambda r: {**r, "scorer": {"name": "resp", "params": {"lr": 1}}}, ["scorer.params.lr"]),
        (lambda r: {**r, "unexpected": 1}, ["unexpected", "unknown field"]),
        (lambda r: {**r, "calibration": {"name": "self_generated", "params": {"num_samples": 0}}},
         ["calibration.params.num_samples"]),
    ],
)
def test_bad_recipes(tmp_path, tiny_model_dir, mutate, fragments):
    recipe = write(tmp_path, mutate(small_recipe(tiny_model_dir)))
    out = tmp_path / "run"
    for cmd in (["validate", str(recipe)], ["run", str(recipe), "--out", str(out)]):
        assert_user_error(runner.invoke(app, cmd), *fragments)
        assert not out.exists()


def test_missing_recipe_file(tmp_path):
    assert_user_error(runner.invoke(app, ["run", str(tmp_path / "nope.yaml")]), "does not exist")


def test_existing_run_folder_is_not_touched(tmp_path, tiny_model_dir):
    recipe = write(tmp_path, small_recipe(tiny_model_dir))
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_user_error(runner.invoke(app, ["run", str(recipe), "--out", str(out)]), "already exists")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "mine"


def test_bad_input_in_a_real_process_has_no_traceback(tmp_path):
    bad = write(tmp_path, "scorer: [")
    proc = subprocess.run([sys.executable, "-m", "resp_core.cli", "validate", str(bad)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr + proc.stdout
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("error:")


def test_third_party_plugin_installed_and_used(tmp_path, tiny_model_dir, monkeypatch):
    """`respctl plugin new` writes a package; install it (as a user would), list it, run a recipe
    with its scorer, and find its distribution and version in run.json."""
    pkg = tmp_path / "pkg"
    result = runner.invoke(app, ["plugin", "new", "example_fisher", "--out", str(pkg)])
    assert result.exit_code == 0, result.output
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                    "--quiet", "--target", str(site), str(pkg)], check=True, timeout=300,
                   env={**os.environ, "PIP_NO_CACHE_DIR": "1"})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    from resp_core import registry

    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setattr(registry, "_REGISTRY", None)
    listing = runner.invoke(app, ["plugins"])
    assert listing.exit_code == 0, listing.output
    line = next(ln for ln in listing.output.splitlines() if "example_fisher" in ln)
    assert "resp-example-fisher 0.1.0" in line or "resp_example_fisher 0.1.0" in line
    # the scaffold's own tests pass against this RESP
    import importlib.util

    spec = importlib.util.spec_from_file_location("scaffold_test_plugin", pkg / "tests" / "test_plugin.py")
    scaffold_tests = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scaffold_tests)
    for name in ("test_registered", "test_bounded_params", "test_scores_every_unit"):
        getattr(scaffold_tests, name)()
    recipe = write(tmp_path, small_recipe(tiny_model_dir, **{"scorer": {"name": "example_fisher",
                                                                         "params": {"batch_size": 4}}}))
    bad = write(tmp_path, small_recipe(tiny_model_dir, **{"scorer": {"name": "example_fisher",
                                                                      "params": {"batch_size": 0}}}), "bad.yaml")
    assert_user_error(runner.invoke(app, ["validate", str(bad)]), "scorer.params.batch_size")
    monkeypatch.setattr(registry, "_REGISTRY", None)
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "resp_core.cli", "run", str(recipe), "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads((out / "metrics.json").read_text())
    assert rows[-1]["sparsity"] == pytest.approx(0.4, abs=0.05)
    saved = yaml.safe_load((out / "recipe.yaml").read_text())
    assert saved["scorer"]["name"] == "example_fisher"
    plugins = json.loads((out / "run.json").read_text())["plugins"]
    scorer = next(p for p in plugins if p["kind"] == "scorer")
    assert scorer["name"] == "example_fisher" and scorer["version"] == "0.1.0"
    assert scorer["distribution"].replace("_", "-") == "resp-example-fisher"
    assert any(p["kind"] == "task" and p["distribution"] == "resp-pruning" for p in plugins)


def test_plugin_new_bad_inputs(tmp_path):
    assert_user_error(runner.invoke(app, ["plugin", "new", "Bad-Name", "--out", str(tmp_path / "x")]), "NAME")
    (tmp_path / "taken").mkdir()
    assert_user_error(runner.invoke(app, ["plugin", "new", "ok_name", "--out", str(tmp_path / "taken")]),
                      "already exists")
    assert not (tmp_path / "x").exists() and list((tmp_path / "taken").iterdir()) == []


def _fake_distribution(site: Path, dist: str, version: str, entry_points: dict[str, str], modules: dict[str, str]):
    """An installed distribution (dist-info with entry points) and its modules, in ``site``."""
    info = site / f"{dist}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text("[resp]\n" + "".join(f"{k} = {v}\n" for k, v in entry_points.items()))
    for name, text in modules.items():
        (site / f"{name}.py").write_text(text)


SCORER_MODULE = """
from resp_core import hookimpl
from resp_plugins.scorers.simple import MagnitudeScorer

@hookimpl
def register_scorers(register):
    register({name!r}, MagnitudeScorer)
"""


@pytest.fixture
def hostile_plugins(tmp_path, monkeypatch):
    """Installed plugins that misbehave: SystemExit at import, a clashing entry-point name, a
    clashing implementation name.  The CLI's cached registry is rebuilt with them."""
    from resp_core import registry

    site = tmp_path / "hostile-site"
    _fake_distribution(site, "exits-at-import", "0.3", {"exiter": "mod_exiter"},
                       {"mod_exiter": "raise SystemExit(3)\n"})
    _fake_distribution(site, "first-dist", "1.0", {"clash": "mod_first"},
                       {"mod_first": SCORER_MODULE.format(name="first_scorer")})
    _fake_distribution(site, "second-dist", "2.0", {"clash": "mod_second"},
                       {"mod_second": SCORER_MODULE.format(name="second_scorer")})
    _fake_distribution(site, "shadow-dist", "0.9", {"shadow": "mod_shadow"},
                       {"mod_shadow": SCORER_MODULE.format(name="resp")})
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setattr(registry, "_REGISTRY", None)
    yield registry.get_registry()
    monkeypatch.setattr(registry, "_REGISTRY", None)


def test_plugin_isolation_and_clashes(hostile_plugins):
    reg = hostile_plugins
    lines = reg.failure_lines()
    text = "\n".join(lines)
    assert "exiter" in text and "SystemExit" in text and "exits-at-import 0.3" in text
    clash = next(ln for ln in lines if "'clash'" in ln)
    assert "first-dist 1.0" in clash and "second-dist 2.0" in clash
    shadow = next(ln for ln in lines if "scorer 'resp'" in ln)
    assert "shadow-dist 0.9" in shadow and "resp-pruning" in shadow
    assert "first_scorer" in reg.names("scorer") and "second_scorer" not in reg.names("scorer")
    assert reg.get("scorer", "resp").distribution == "resp-pruning"  # the built-in wins


def test_broken_plugins_are_reported_by_run_and_validate(tmp_path, tiny_model_dir, hostile_plugins):
    good = write(tmp_path, small_recipe(tiny_model_dir))
    result = runner.invoke(app, ["validate", str(good)])
    assert result.exit_code == 0, result.output
    warnings = [ln for ln in result.output.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 3 and any("exiter" in w for w in warnings), result.output
    unknown = write(tmp_path, small_recipe(tiny_model_dir, **{"scorer": {"name": "exiter_scorer"}}), "u.yaml")
    out = tmp_path / "run"
    for cmd in (["validate", str(unknown)], ["run", str(unknown), "--out", str(out)]):
        result = runner.invoke(app, cmd)
        assert result.exit_code == 2, result.output
        error = next(ln for ln in result.output.splitlines() if ln.startswith("error:"))
        assert "unknown scorer 'exiter_scorer'" in error and "exiter" in error.split("note:")[1]
        assert "failed to load" in error
        assert not out.exists()


def test_testbed_train_bad_inputs(tmp_path):
    assert_user_error(runner.invoke(app, ["testbed", "train", "--out", str(tmp_path / "m"), "--cycles", "1500-3e-3"]),
                      "--cycles", "STEPS@LR")
    (tmp_path / "exists").mkdir()
    assert_user_error(runner.invoke(app, ["testbed", "train", "--out", str(tmp_path / "exists")]), "already exists")
    assert not (tmp_path / "m").exists()
