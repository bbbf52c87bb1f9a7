"""``respctl bench`` pieces on tiny models (the measurements themselves are printed, never asserted)."""

from __future__ import annotations

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
    assert all(p.grad is None for p in model.parameters())  # every contender leaves no gradients behind


def test_compaction_speedup_on_a_given_model():
    model = B.random_qwen3({**B.QUICK_SCORING_MODEL, "num_hidden_layers": 4})  # layers 0 and 3 protected
    cfg = B.SpeedupConfig(decode_tokens=2, prompt_tokens=4, prefill_batch=2, prefill_len=16, sparsity=0.3)
    r = B.compaction_speedup(cfg, repeats=1, model=model)
    assert r["compacted_parameters"] < r["dense_parameters"] and r["max_abs_logit_diff"] < 1e-4
    assert set(r["decode_tokens_per_s"]) == {"dense", "compact"}


def test_child_process_reports_its_failure_in_one_line():
    out = B._child("no_such_kind", B.QUICK_SCORING_MODEL, 2, 4, 4, 2, 1, timeout=120)
    assert "error" in out and "no_such_kind" in out["error"]


def test_bad_options_are_one_line():
    r = runner.invoke(app, ["bench", "--sparsity", "1.5"])
    assert r.exit_code == 2 and "--sparsity" in r.output
    if not torch.cuda.is_available():
        r = runner.invoke(app, ["bench", "--device", "cuda"])
        assert r.exit_code == 2 and "--device" in r.output
