"""Recovery inside runs and comparisons, on a tiny random model: a recipe with ``recovery:`` runs end
to end and exports plain models (compacted, masked, uniform) holding the recovered weights; a run
killed during its recovery resumes to the same bytes; a comparison method with recovery is a row
beside the one without."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from typer.testing import CliRunner

from resp_core.cli import app
from resp_core.rundir import CHECKPOINT_DIR
from test_resume import digest, run_in_child

runner = CliRunner()


def recipe(model_dir: Path, recovery: dict, **over) -> dict:
    data = {
        "name": "tiny-recovery", "seed": 0, "model": {"path": str(model_dir)}, "task": {"name": "testbed_arith"},
        "structures": {"attention": "kv_group", "mlp": "channel", "protect_first": 0.0, "protect_last": 0},
        "generator": {"name": "hf", "params": {"batch_size": 8}},
        "calibration": {"name": "self_generated", "params": {"num_samples": 6, "sampling": {"max_new_tokens": 10}}},
        "scorer": {"name": "resp"}, "allocator": {"name": "uniform"},
        "schedule": {"name": "progressive", "params": {"target": 0.4, "steps": 2, "milestones": [0.2, 0.4]}},
        "evaluation": {"evaluate_dense": False, "evaluators": [
            {"name": "task_accuracy", "params": {"num_items": 4, "sampling": {"max_new_tokens": 8}}}]},
        "output": {"formats": ["compacted", "masked", "uniform"]},
        "recovery": recovery,
    }
    data.update(over)
    return data


def write(tmp_path: Path, data: dict, name: str = "r.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return p


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_recipe_with_recovery_runs_and_exports_plain_recovered_models(tmp_path, tiny_model_dir):
    pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from resp_core import load_pruned
    from resp_core.model.compaction import compacted_copy
    from resp_core.model.masks import MaskSet, apply_mask
    from resp_core.model.adapter import adapter_for

    rec = {"name": "self_distill", "params": {"steps": 4, "batch_size": 2, "lr": 0.05, "top_k": 8}}
    out = tmp_path / "run"
    res = runner.invoke(app, ["run", str(write(tmp_path, recipe(tiny_model_dir, rec))), "--out", str(out)])
    assert res.exit_code == 0, res.output
    rows = json.loads((out / "metrics.json").read_text())
    assert [r["target"] for r in rows] == [0.2, 0.4]
    assert "recovery" not in rows[0] and "pre_recovery" not in rows[0]  # at: final
    last = rows[-1]
    assert last["recovery"]["steps"] == 4 and last["recovery"]["mode"] == "lora"
    assert "testbed_arith/accuracy" in last["pre_recovery"] and "testbed_arith/accuracy" in last
    info = json.loads((out / "run.json").read_text())
    assert info["recovery"]["final"] == last["recovery"] and info["recovery"]["teacher"]["top_k"] == "8"
    assert {"kind": "recovery", "name": "self_distill"}.items() <= next(
        p for p in info["plugins"] if p["kind"] == "recovery").items()
    losses = json.loads((out / "recovery" / "step_02.json").read_text())["losses"]
    assert len(losses) == 4 and losses[-1] == last["recovery"]["final_loss"]
    assert (out / "recovery" / "teacher_topk.safetensors").is_file()
    assert sorted(p.name for p in (out / "eval" / "pre_recovery").iterdir()) == ["milestone_0.40_0_task_accuracy.jsonl"]
    assert not (out / CHECKPOINT_DIR).exists()
    # every export is a plain model (no adapter tensors) with the same (recovered) function
    folders = [out / "model", out / "export" / "final-masked", out / "export" / "final-uniform"]
    for folder in folders:
        with safe_open(str(folder / "model.safetensors"), framework="pt") as fh:
            assert not [k for k in fh.keys() if "lora" in k], folder
    compacted = load_pruned(out / "model")
    masked = AutoModelForCausalLM.from_pretrained(folders[1])
    uniform = AutoModelForCausalLM.from_pretrained(folders[2])
    assert masked.config.model_type == uniform.config.model_type == "qwen3"
    ids = torch.tensor([[5, 9, 11, 3, 7, 21, 4]])
    ref = _logits(compacted, ids)
    assert float((ref - _logits(masked, ids)).abs().max()) < 1e-4
    assert float((ref - _logits(uniform, ids)).abs().max()) < 1e-4
    # ... and it is not the pruned model without recovery
    dense = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    mask = MaskSet.load(out / "masks" / "step_02.safetensors", adapter_for(dense).geometry)
    apply_mask(adapter_for(dense), mask)
    plain, _ = compacted_copy(dense, mask)
    assert float((ref - _logits(plain, ids)).abs().max()) > 1e-4
    # `respctl export` later: the final mask's weights are the recovered ones, an earlier mask's are not
    res = runner.invoke(app, ["export", str(out), "--format", "masked", "--out", str(tmp_path / "again")])
    assert res.exit_code == 0, res.output
    assert float((ref - _logits(AutoModelForCausalLM.from_pretrained(tmp_path / "again"), ids)).abs().max()) < 1e-4
    res = runner.invoke(app, ["export", str(out), "--format", "masked", "--mask", "masks/step_01.safetensors",
                              "--out", str(tmp_path / "first")])
    assert res.exit_code == 0, res.output
    first = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    apply_mask(adapter_for(first), MaskSet.load(out / "masks" / "step_01.safetensors", adapter_for(first).geometry))
    got = _logits(AutoModelForCausalLM.from_pretrained(tmp_path / "first"), ids)
    assert torch.equal(got, _logits(first, ids))


@pytest.fixture(scope="module")
def resume_recipe(tmp_path_factory, tiny_model_dir) -> Path:
    rec = {"name": "self_distill", "at": "milestones",
           "params": {"steps": 3, "batch_size": 2, "lr": 0.05, "top_k": 8, "checkpoint_every": 1,
                      "divergence": "js", "mode": "full"}}
    tmp = tmp_path_factory.mktemp("rr")
    return write(tmp, recipe(tiny_model_dir, rec, output={"formats": ["compacted", "masked"],
                                                          "save_milestone_models": True}))


@pytest.mark.parametrize("kill_at", ["recovery:2", "recovery:5", "recovery:6"])
def test_killed_recovery_resumes_to_the_same_bytes(tmp_path, resume_recipe, kill_at):
    """recovery:2: mid-way through the first milestone's recovery; recovery:5: in the second's;
    recovery:6: right after the last recovery step (the run resumes without training again)."""
    code, log = run_in_child(["run", str(resume_recipe), "--out", str(tmp_path / "whole")], tmp_path, name="whole")
    assert code == 0, log
    code, log = run_in_child(["run", str(resume_recipe), "--out", str(tmp_path / "cut")], tmp_path,
                             {"RESP_TEST_KILL_AT": kill_at}, name="cut")
    assert code == -9, log
    assert (tmp_path / "cut" / CHECKPOINT_DIR / "recovery").is_dir()
    code, log = run_in_child(["run", "--resume", str(tmp_path / "cut")], tmp_path, name="resume")
    assert code == 0, log
    assert "resuming after step" in log
    whole = digest(tmp_path / "whole")
    assert digest(tmp_path / "cut") == whole
    assert {"models/milestone_0.20/model.safetensors", "models/milestone_0.40/model.safetensors",
            "recovery/step_01.json", "recovery/step_02.json"} <= set(whole)


def test_comparison_method_with_recovery(tmp_path, tiny_model_dir):
    pytest.importorskip("peft")
    from resp_core.compare import parse_compare
    from resp_core.compare.schema import method_recipe
    from resp_core.registry import get_registry

    cmp = {
        "name": "tiny-rec-compare", "model": {"path": str(tiny_model_dir)}, "task": {"name": "testbed_arith"},
        "structures": {"attention": "kv_group", "mlp": "channel"},
        "generator": {"name": "hf", "params": {"batch_size": 8}},
        "calibration": {"name": "task_data", "params": {"num_samples": 4}},
        "sparsities": [0.2, 0.4], "steps": 2, "seeds": [0],
        "evaluators": [{"name": "task_accuracy", "params": {"num_items": 4, "sampling": {"max_new_tokens": 8}}}],
        "methods": [
            {"label": "RESP", "scorer": {"name": "resp"}},
            {"label": "RESP + lora_sft", "scorer": {"name": "resp"},
             "recovery": {"name": "lora_sft", "params": {"steps": 2, "batch_size": 2, "data": "gold",
                                                         "num_samples": 4}}},
        ],
    }
    parsed = parse_compare(cmp, "cmp")
    run_recipe = method_recipe(parsed, parsed.methods[1], get_registry())
    assert run_recipe.recovery.at == "milestones" and method_recipe(parsed, parsed.methods[0], get_registry()).recovery is None
    out = tmp_path / "cmp"
    res = runner.invoke(app, ["compare", str(write(tmp_path, cmp)), "--out", str(out)])
    assert res.exit_code == 0, res.output
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert {r["method"] for r in rows} == {"dense", "RESP", "RESP + lora_sft"}
    assert sorted({r["target"] for r in rows if r["method"] == "RESP + lora_sft"}) == [0.2, 0.4]
    run = out / "runs" / "resp-lora-sft"
    metrics = json.loads((run / "metrics.json").read_text())
    assert all(r["recovery"]["data"] == "gold" and "pre_recovery" in r for r in metrics)
    assert (run / "models" / "milestone_0.40" / "model.safetensors").is_file()
