"""Every bad input: one line on stderr naming the field, exit code 2, no traceback, no run folder —
found by ``validate`` and by ``run`` before any weight is loaded.  A parametrized list of hostile
recipes and model folders, and hypothesis-generated mutations of a good recipe."""

from __future__ import annotations

import codecs
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from resp_core.cli import app
from test_cli import assert_user_error, small_recipe, write

runner = CliRunner()


def _set(recipe: dict, dotted: str, value) -> dict:
    node = recipe
    keys = dotted.split(".")
    for k in keys[:-1]:
        node = node.setdefault(k, {})
    node[keys[-1]] = value
    return recipe


def _sub(**pairs):
    """A mutation setting dotted fields (``__`` in a keyword stands for a dot)."""
    def mutate(r, model):
        for k, v in pairs.items():
            _set(r, k.replace("__", "."), v)
        return r
    return mutate


def _text(text: str | bytes):
    return lambda r, model: text


def _yaml_with(extra: str):
    """The good recipe as YAML text with ``extra`` appended (e.g. a second top-level key)."""
    return lambda r, model: yaml.safe_dump(r) + extra


def _model(corrupt):
    """A mutation that copies the tiny model, corrupts the copy, and points the recipe at it."""
    def mutate(r, model):
        copy = Path(r["_tmp"]) / "model-copy"
        shutil.copytree(model, copy)
        corrupt(copy)
        r["model"]["path"] = str(copy)
        return r
    return mutate


def _random_bytes(folder: Path):
    (folder / "model.safetensors").write_bytes(os.urandom(4096))


def _truncate(folder: Path):
    f = folder / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])


def _empty(folder: Path):
    for p in folder.iterdir():
        p.unlink()


def _no_tokenizer(folder: Path):
    for name in ("tokenizer.json", "tokenizer.model", "vocab.json"):
        if (folder / name).exists():
            (folder / name).unlink()


def _bad_config(folder: Path):
    (folder / "config.json").write_text('{"model_type": "bert", "num_hidden_layers": 2, "hidden_size": 8, '
                                        '"num_attention_heads": 2, "intermediate_size": 8}')


def _config_not_json(folder: Path):
    (folder / "config.json").write_bytes(b"\xff\xfe not json")


NESTED = "name: x\nscorer: " + "[" * 20000 + "]" * 20000 + "\n"

CASES = {
    # reading the file
    "random bytes": (_text(bytes(range(256)) * 8), ["not UTF-8"]),
    "utf-16": (_text(codecs.BOM_UTF16_LE + "name: x\n".encode("utf-16-le")), ["UTF-16"]),
    "latin-1": (_text("name: caf\u00e9\n".encode("latin-1")), ["not UTF-8", "line 1"]),
    "deep nesting": (_text(NESTED), ["nested more than"]),
    "unbalanced deep nesting": (_text("a: " + "[" * 20000), ["nested more than"]),
    "huge file": (_text("# padding\n" * 200_000 + "name: x\n"), ["bytes"]),
    "billion laughs": (_text("a: &a [1,1,1,1,1,1,1,1,1,1]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a]\n"
                             "c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b]\nd: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c]\n"
                             "e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d,*d]\nf: [*e,*e]\n"), ["more than"]),
    "empty file": (_text(""), ["must be a YAML mapping"]),
    "duplicate key in a mapping": (_yaml_with(""), None),  # replaced below (needs the text)
    "duplicate top-level key": (_yaml_with("scorer: {name: gisp}\n"), ["'scorer'", "given twice"]),
    # model and device
    "device banana": (_sub(model__device="banana"), ["model.device", "banana"]),
    "device gpu": (_sub(model__device="gpu"), ["model.device", "did you mean 'cuda'"]),
    "device cuda:7": (_sub(model__device="cuda:7"), ["model.device", "cuda:7"]),
    "device cuda": (_sub(model__device="cuda"), ["model.device"]),
    "empty path": (_sub(model__path=""), ["model.path"]),
    "blank path": (_sub(model__path="  "), ["model.path"]),
    "missing hub model": (_sub(model__path="no-such-org-xyz/no-such-model"), ["model.path", "no-such-org-xyz"]),
    "random-byte weights": (_model(_random_bytes), ["model.path", "safetensors"]),
    "truncated weights": (_model(_truncate), ["model.path", "truncated"]),
    "empty model folder": (_model(_empty), ["model.path", "empty folder"]),
    "no tokenizer files": (_model(_no_tokenizer), ["model.path", "tokenizer"]),
    "unsupported architecture": (_model(_bad_config), ["model.path", "'bert'", "not supported"]),
    "config not JSON": (_model(_config_not_json), ["model.path", "config.json"]),
    # counts and bounds
    "scorer batch_size 0": (_sub(scorer__params__batch_size=0), ["scorer.params.batch_size"]),
    "generator batch_size -4": (_sub(generator={"name": "hf", "params": {"batch_size": -4}}),
                                ["generator.params.batch_size"]),
    "max_new_tokens 0": (_sub(calibration__params__sampling__max_new_tokens=0),
                         ["calibration.params.sampling.max_new_tokens"]),
    "max_new_tokens -5": (lambda r, m: _set(r, "evaluation.evaluators", [
        {"name": "task_accuracy", "params": {"sampling": {"max_new_tokens": -5}}}]),
        ["evaluation.evaluators[0].params.sampling.max_new_tokens"]),
    "calibration split the task lacks": (_sub(calibration__params__split="validation"),
                                         ["calibration.params.split", "'validation'"]),
    "evaluator split the task lacks": (lambda r, m: _set(r, "evaluation.evaluators", [
        {"name": "task_accuracy", "params": {"split": "dev", "num_items": 4}}]),
        ["evaluation.evaluators[0].params.split", "'dev'"]),
    "prompt_forms 0": (_sub(task={"name": "testbed_arith", "params": {"prompt_forms": 0}}),
                       ["task.params.prompt_forms"]),
    "30-digit seed": (_sub(seed=10**30), ["seed"]),
    "negative seed": (_sub(seed=-1), ["seed"]),
    "evaluator seed 30 digits": (lambda r, m: _set(r, "evaluation.evaluators", [
        {"name": "task_accuracy", "params": {"seeds": [0, 10**30]}}]), ["evaluators[0].params.seeds"]),
    "steps 1e9": (_sub(schedule__params__steps=1_000_000_000), ["schedule.params.steps", "prunable units"]),
    "num_samples 1e12": (_sub(calibration__params__num_samples=10**12), ["calibration.params.num_samples"]),
    "num_items 0": (lambda r, m: _set(r, "evaluation.evaluators", [
        {"name": "task_accuracy", "params": {"num_items": 0}}]), ["evaluation.evaluators[0].params.num_items"]),
    "temperature -1": (_sub(calibration__params__sampling__temperature=-1),
                       ["calibration.params.sampling.temperature"]),
    "top_p 5": (_sub(calibration__params__sampling__top_p=5), ["calibration.params.sampling.top_p"]),
    "top_p 0": (_sub(calibration__params__sampling__top_p=0), ["calibration.params.sampling.top_p"]),
    "max_attempts 0": (_sub(calibration__params__max_attempts=0), ["calibration.params.max_attempts"]),
    # structures (reachability is checked against the model's config)
    "every layer protected": (_sub(structures__protected_layers=[0, 1, 2, 3]), ["structures.protected_layers"]),
    "protect_last 100": (_sub(structures__protect_last=100), ["structures.protect_last"]),
    "no unit kinds": (_sub(structures__attention="none", structures__mlp="none"), ["structures"]),
    "min_keep huge": (_sub(structures__min_keep=1_000_000), ["structures.min_keep"]),
    "protected_layers out of range": (_sub(structures__protected_layers=[99]), ["structures.protected_layers", "99"]),
    "protected_layers negative": (_sub(structures__protected_layers=[-1, 99]), ["structures.protected_layers"]),
    "protect_last negative": (_sub(structures__protect_last=-1), ["structures.protect_last"]),
    "min_keep negative": (_sub(structures__min_keep=-2), ["structures.min_keep"]),
    "unreachable target": (_sub(schedule__params__target=0.99, schedule__params__milestones=[0.5]),
                           ["schedule.params.target", "cannot be reached"]),
    # message style
    "target true": (_sub(schedule__params__target=True), ["schedule.params.target", "boolean"]),
    "steps true": (_sub(schedule__params__steps=True), ["schedule.params.steps", "boolean"]),
    "seed true": (_sub(seed=True), ["seed", "boolean"]),
    "schedule validator message": (_sub(schedule__params__milestones=[0.3, 0.1]), ["milestones must be strictly"]),
    "run name with a slash": (_sub(name="../escape"), ["name", "run name"]),
    "params not a mapping": (_sub(scorer={"name": "resp", "params": [1, 2]}), ["scorer.params"]),
    # generation backend this machine cannot run (vllm missing here, or the model on the CPU)
    "generator vllm on this machine": (_sub(generator={"name": "vllm"}), ["generator", "vllm"]),
    # nesting just past the limit (the parser's own depth) and far past it (the textual bound)
    "nesting 40 levels": (_text("name: x\nscorer: " + "[" * 40 + "]" * 40 + "\n"), ["nested more than 32"]),
    "nesting 700 levels": (_text("name: x\nscorer: " + "[" * 700 + "]" * 700 + "\n"), ["nested more than 32"]),
}
CASES["duplicate key in a mapping"] = (
    lambda r, m: yaml.safe_dump(r).replace("scorer:\n  name: resp", "scorer:\n  name: resp\n  name: gisp"),
    ["'name'", "given twice"])


@pytest.mark.parametrize("case", list(CASES))
def test_every_bad_input_is_one_line(tmp_path, tiny_model_dir, case):
    mutate, fragments = CASES[case]
    if case.startswith("device cuda"):
        import torch

        if torch.cuda.is_available() and torch.cuda.device_count() > (7 if ":" in case else 0):
            pytest.skip("this machine has that device")
    recipe = small_recipe(tiny_model_dir)
    recipe["_tmp"] = str(tmp_path)
    mutated = mutate(recipe, tiny_model_dir)
    if isinstance(mutated, dict):
        mutated.pop("_tmp", None)
    path = tmp_path / "recipe.yaml"
    if isinstance(mutated, bytes):
        path.write_bytes(mutated)
    else:
        write(tmp_path, mutated)
    out = tmp_path / "run"
    for cmd in (["validate", str(path)], ["run", str(path), "--out", str(out)]):
        result = runner.invoke(app, cmd)
        assert_user_error(result, *fragments)
        assert len(result.output.strip().splitlines()) == 1, result.output
        if case in ("huge file",) or "weights" in case or "model" in case or "config" in case or "tokenizer" in case:
            pass
        else:
            assert str(path) in result.output, result.output  # the file is named
        assert not out.exists()


def test_plugin_parameter_errors_name_the_file(tmp_path, tiny_model_dir):
    path = write(tmp_path, small_recipe(tiny_model_dir, **{"scorer.params.lr": 1}))
    result = runner.invoke(app, ["validate", str(path)])
    assert_user_error(result, f"{path}: scorer.params.lr: unknown field")
    result = runner.invoke(app, ["validate", str(write(tmp_path, small_recipe(
        tiny_model_dir, **{"schedule.params.milestones": [0.3, 0.1]})))])
    assert "Value error" not in result.output


@pytest.mark.parametrize("content", [bytes(range(256)) * 4, NESTED.encode(), b"model: {device: banana}\nname: x\n"])
def test_bad_inputs_in_a_real_process_are_one_line(tmp_path, content):
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(content)
    proc = subprocess.run([sys.executable, "-m", "resp_core.cli", "validate", str(bad)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("error:")
    assert list(tmp_path.iterdir()) == [bad]


def test_validate_reads_the_model_config_without_loading_weights(tmp_path, tiny_model_dir, monkeypatch):
    """validate checks the model folder but never calls from_pretrained."""
    import transformers

    def boom(*a, **k):
        raise AssertionError("weights loaded during validate")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", boom)
    result = runner.invoke(app, ["validate", str(write(tmp_path, small_recipe(tiny_model_dir)))])
    assert result.exit_code == 0, result.output


# --------------------------------------------------------------------------------------------------
# Hypothesis: mutations of a good recipe
# --------------------------------------------------------------------------------------------------

def _leaves(node, prefix=()):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _leaves(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _leaves(v, prefix + (i,))
    yield prefix


def _put(node, path, value):
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value


HOSTILE = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-10**40, max_value=10**40),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30),
    st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)

_SETTINGS = settings(max_examples=40, deadline=None, derandomize=True,
                     suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@_SETTINGS
@given(data=st.data())
def test_mutated_recipes_never_trace_back(tmp_path, tiny_model_dir, data):
    """Any value anywhere: validate either accepts the recipe or says one line (never a traceback)."""
    recipe = small_recipe(tiny_model_dir)
    paths = [p for p in _leaves(recipe) if p and p != ("model", "path")]
    path = data.draw(st.sampled_from(paths))
    _put(recipe, path, data.draw(HOSTILE))
    result = runner.invoke(app, ["validate", str(write(tmp_path, recipe))])
    assert result.exit_code in (0, 2), (path, result.output, result.exception)
    assert "Traceback" not in result.output
    if result.exit_code == 2:
        assert result.output.startswith("error:") and len(result.output.strip().splitlines()) == 1, result.output


NUMERIC_FIELDS = [("seed",), ("schedule", "params", "target"), ("schedule", "params", "steps"),
                  ("calibration", "params", "num_samples"), ("calibration", "params", "sampling", "temperature"),
                  ("calibration", "params", "sampling", "max_new_tokens"), ("structures", "min_keep"),
                  ("structures", "protect_first"), ("structures", "protect_last")]
WRONG = st.one_of(st.booleans(), st.text(min_size=1, max_size=8).filter(lambda s: not s.strip().lstrip("-+").replace(".", "").isdigit()),
                  st.lists(st.integers(), min_size=1, max_size=3), st.integers(max_value=-1),
                  st.dictionaries(st.text(min_size=1, max_size=3), st.integers(), min_size=1, max_size=2))


@_SETTINGS
@given(data=st.data())
def test_invalid_mutations_are_refused_before_anything_is_written(tmp_path, tiny_model_dir, data):
    """Invalid by construction (a wrong type or a negative number for a numeric field, or an
    unknown key anywhere): exit 2, one line naming the field, no run folder."""
    recipe = small_recipe(tiny_model_dir)
    if data.draw(st.booleans()):
        path = data.draw(st.sampled_from(NUMERIC_FIELDS))
        _put(recipe, path, data.draw(WRONG))
        field = path[-1]
    else:
        mappings = [p for p in _leaves(recipe) if isinstance(_get(recipe, p), dict)]
        where = data.draw(st.sampled_from(mappings))
        field = data.draw(st.from_regex(r"\A[a-z][a-z_]{2,10}\Z"))
        target = _get(recipe, where)
        if field in target:
            return
        target[field] = 1
    out = tmp_path / "run"
    path_file = write(tmp_path, recipe)
    for cmd in (["validate", str(path_file)], ["run", str(path_file), "--out", str(out)]):
        result = runner.invoke(app, cmd)
        assert_user_error(result, str(field))
        assert len(result.output.strip().splitlines()) == 1, result.output
        assert not out.exists()


def _get(node, path):
    for k in path:
        node = node[k]
    return node


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_one_line_when_the_model_loads(tmp_path, tiny_model_dir, value):
    """A NaN or infinity in the weights is found when the model loads, before generation would
    sample from it: one line naming the tensor, exit 2, no run folder."""
    import torch
    from safetensors.torch import load_file, save_file

    copy = tmp_path / "model"
    shutil.copytree(tiny_model_dir, copy)
    weights = load_file(copy / "model.safetensors")
    name = next(n for n in sorted(weights) if n.endswith("mlp.down_proj.weight"))
    weights[name][0, 0] = value
    save_file(weights, copy / "model.safetensors", metadata={"format": "pt"})
    recipe = small_recipe(tiny_model_dir)
    recipe["model"]["path"] = str(copy)
    recipe["calibration"] = {"name": "self_generated", "params": {"num_samples": 2}}
    out = tmp_path / "run"
    result = runner.invoke(app, ["run", str(write(tmp_path, recipe)), "--out", str(out)])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    errors = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and result.output.strip().splitlines()[-1] == errors[0], result.output
    for fragment in ("model.path", repr(name), "NaN or infinite"):
        assert fragment in errors[0], (fragment, errors[0])
    assert not out.exists()
