"""``respctl bench`` pieces on tiny models (the measurements themselves are printed, never asserted)."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from resp_core import bench as B
from resp_core.cli import app

runner = CliRunner()


def test_floor_differentiates_only_the_projections_on_the_same_labels():
    model = B.random_qwen3(B.QUICK_SCORING_MODEL)
    samples = B.random_calibration(B.QUICK_SCORING_MODEL["vocab_size"], 4, 8, 8)
    fns = B.scoring_contenders(model, samples, 0, 2)
    seen = {}
    hooks = [p.register_hook(lambda g, n=n: seen.__setitem__(n, True)) for n, p in model.named_parameters()]
    try:
        fns["floor"]()
    finally:
        for h in hooks:
            h.remove()
    assert seen and all(n.split(".")[-2].endswith("_proj") for n in seen)
    assert {n for n in seen} == {n for n, _ in model.named_parameters() if n.split(".")[-2].endswith("_proj")}
    fns["scoring"]()
    fns["plain"]()
    fns["gradient_pass"]()
    assert all(p.grad is None for p in model.parameters())  # every contender leaves no gradients behind


def test_compaction_speedup_on_a_given_model():
    model = B.random_qwen3({**B.QUICK_SCORING_MODEL, "num_hidden_layers": 4})  # layers 0 and 3 protected
    cfg = B.SpeedupConfig(decode_tokens=2, prompt_tokens=4, prefill_batch=2, prefill_len=16, sparsity=0.3)
    r = B.compaction_speedup(cfg, repeats=1, model=model)
    assert r["compacted_parameters"] < r["dense_parameters"] and r["max_abs_logit_diff"] < 1e-4
    assert set(r["decode_tokens_per_s"]) == {"dense", "compact"}


def test_low_precision_compaction_difference_comes_with_its_rounding_yardstick():
    """In bf16 the compacted model's logits differ from the masked model's by rounding (other
    matmul shapes, other accumulation order): the bench reports that next to the masked bf16
    model's own distance from float32, which it must not exceed by much."""
    model = B.random_qwen3({**B.QUICK_SCORING_MODEL, "num_hidden_layers": 4}, dtype=torch.bfloat16)
    before = {n: p.clone() for n, p in model.state_dict().items()}
    cfg = B.SpeedupConfig(decode_tokens=2, prompt_tokens=4, prefill_batch=2, prefill_len=64, sparsity=0.3)
    r = B.compaction_speedup(cfg, repeats=1, model=model)
    assert r["dtype"] == "bfloat16" and 0 < r["max_abs_logit_diff_low_precision_vs_fp32"]
    assert r["max_abs_logit_diff"] <= 3 * r["max_abs_logit_diff_low_precision_vs_fp32"]
    assert next(model.parameters()).dtype == torch.bfloat16
    masked = {n for n, p in model.state_dict().items() if not torch.equal(p, before[n])}
    assert masked and all(n.split(".")[-2].endswith("_proj") for n in masked)  # only the mask changed weights


def test_child_process_reports_its_failure_in_one_line():
    out = B._child("no_such_kind", B.QUICK_SCORING_MODEL, 2, 4, 4, 2, 1, timeout=120)
    assert "error" in out and "no_such_kind" in out["error"]


def test_bad_options_are_one_line():
    r = runner.invoke(app, ["bench", "--sparsity", "1.5"])
    assert r.exit_code == 2 and "--sparsity" in r.output
    if not torch.cuda.is_available():
        r = runner.invoke(app, ["bench", "--device", "cuda"])
        assert r.exit_code == 2 and "--device" in r.output


def test_torch_pruning_graph_builds_on_qwen3_and_restores_the_rotary():
    """Torch-Pruning's tracer loops forever on the rotary embedding's application; the bench
    leaves it out for graph building only, and the model computes the same logits after."""
    pytest.importorskip("torch_pruning")
    import sys

    model = B.random_qwen3(B.QUICK_SCORING_MODEL)
    ids = torch.randint(5, B.QUICK_SCORING_MODEL["vocab_size"], (1, 12))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    modeling = sys.modules[type(model).__module__]
    original = modeling.apply_rotary_pos_emb
    pruner = B.build_torch_pruning(model, ids)
    assert modeling.apply_rotary_pos_emb is original and "forward" not in model.model.rotary_emb.__dict__
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)
    for p in model.parameters():
        p.requires_grad_(True)
    model(input_ids=ids, labels=ids).loss.backward()
    groups = list(pruner.DG.get_all_groups(ignored_layers=pruner.ignored_layers,
                                          root_module_types=pruner.root_module_types))
    layers = B.QUICK_SCORING_MODEL["num_hidden_layers"]
    assert len(groups) == 1 + 2 * layers  # the hidden size, then heads and MLP channels of each layer
    assert len(list(pruner.step(interactive=True))) >= 1  # importance of every group, nothing pruned
    assert list(pruner.step(interactive=True)) == []  # a second step scores nothing: the bench builds one per pass


def test_peak_rss_added_sees_a_temporary_allocation():
    """An allocation made and freed inside the pass counts; the memory a previous step freed does not."""
    junk = torch.ones(64 * 2**20 // 4)  # 64 MiB touched, then freed before the pass
    del junk

    def work():
        t = torch.ones(96 * 2**20 // 4)  # 96 MiB, freed before the pass returns
        t.add_(1)

    added, seconds = B.peak_rss_added(work)
    assert 80 * 2**20 <= added <= 160 * 2**20 and seconds >= 0
