"""``respctl plan``: predicted peak memory of a scoring pass against the measured one on CPU, the
activation coefficients against autograd, the Qwen3-8B plan, and runs that cannot fit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from resp_core.errors import RespError
from resp_core.plan import (ACTIVATION_COEFFICIENTS, activation_elements_per_token_layer, check_fits,
                            count_parameters, make_plan, parse_size, scoring_memory)
from resp_core.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]

# One scoring pass in a fresh process: peak RSS minus the RSS just before the pass (freed heap handed
# back first: resp_core.bench.peak_rss_added), after a warm-up on a tiny model so that autograd's
# code pages are already resident.
MEASURE = r"""
import json, sys
import torch
torch.set_num_threads(1)
from transformers import Qwen3Config, Qwen3ForCausalLM
from resp_core.bench import peak_rss_added, random_calibration
from resp_core.interfaces import CalibrationSet
from resp_core.model.adapter import adapter_for
from resp_core.scoring import gradient_pass, release_gradients, taylor_unit_scores

cfg, batch, prompt, target, modes = json.loads(sys.argv[1])
def one_pass(model, samples, batch, ckpt):
    adapter = adapter_for(model)
    gp = gradient_pass(model, adapter, CalibrationSet(samples, 0), batch_size=batch, gradient_checkpointing=ckpt)
    taylor_unit_scores(adapter, gp)
    gp.release()
    release_gradients(adapter)
tiny = Qwen3ForCausalLM(Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                    num_attention_heads=2, num_key_value_heads=1, head_dim=16)).eval()
for ckpt in modes:
    one_pass(tiny, random_calibration(64, 4, 4, 12), 2, ckpt)
del tiny
torch.manual_seed(0)
model = Qwen3ForCausalLM(Qwen3Config(**cfg)).eval()
samples = random_calibration(cfg["vocab_size"], 2 * batch, prompt, target)
deltas = [peak_rss_added(lambda: one_pass(model, samples, batch, ckpt))[0] for ckpt in modes]
print(json.dumps({"deltas": deltas}))
"""

TESTBED = dict(vocab_size=471, hidden_size=96, intermediate_size=256, num_hidden_layers=6, num_attention_heads=6,
               num_key_value_heads=3, head_dim=16, max_position_embeddings=512, tie_word_embeddings=True)
QWEN3_100M = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                  num_attention_heads=12, num_key_value_heads=4, head_dim=64, max_position_embeddings=2048,
                  tie_word_embeddings=True)


def _measured_deltas(cfg, batch, prompt, target, modes) -> list[int]:
    out = subprocess.run([sys.executable, "-c", MEASURE, json.dumps([cfg, batch, prompt, target, modes])],
                         capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])["deltas"]


# Measured with ru_maxrss against a baseline that still held the warm-up's freed heap, the
# testbed-shaped pass once came out at 862 MiB instead of ~550 MiB inside the whole suite; with
# the heap handed back before the baseline and a polled peak (peak_rss_added) it agrees alone and
# in the suite.
@pytest.mark.parametrize("cfg,batch,prompt,target,modes", [
    (TESTBED, 16, 64, 448, [False]),  # the testbed's shape (random weights), traces of 512 tokens
    (QWEN3_100M, 4, 32, 224, [True, False]),  # a ~100M Qwen3, with then without gradient checkpointing
], ids=["testbed", "qwen3-100m"])
def test_predicted_scoring_peak_within_25_percent_of_measured(cfg, batch, prompt, target, modes):
    """One process per model (fresh RSS); each mode's peak measured on its own."""
    from transformers import Qwen3Config

    counts = count_parameters(Qwen3Config(**cfg))
    for ckpt, measured in zip(modes, _measured_deltas(cfg, batch, prompt, target, modes)):
        pred = scoring_memory(counts, "float32", batch, prompt + target, target, ckpt)
        predicted = sum(pred.values()) - pred["weights"]  # what the pass adds on top of the loaded weights
        assert abs(predicted - measured) <= 0.25 * measured, (ckpt, predicted / 2**20, measured / 2**20, pred)
        total_pred, total_meas = sum(pred.values()), measured + pred["weights"]  # weights: exact by construction
        assert abs(total_pred - total_meas) <= 0.25 * total_meas


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activation_coefficients_match_what_autograd_saves(dtype):
    """Bytes autograd saves per layer (projections requiring gradients, parameters excluded) on a
    2-layer minus 1-layer Qwen3 of odd widths, against the formula."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from resp_core.plan import ModelCounts

    def saved_bytes(layers, T=96, B=2):
        cfg = Qwen3Config(vocab_size=128, hidden_size=160, intermediate_size=416, num_hidden_layers=layers,
                          num_attention_heads=5, num_key_value_heads=1, head_dim=32)
        torch.manual_seed(0)
        m = Qwen3ForCausalLM(cfg).to(dtype).eval()
        for n, p in m.named_parameters():
            p.requires_grad_(n.rsplit(".", 2)[-2].endswith("_proj"))
        params = {p.untyped_storage().data_ptr() for p in m.parameters()}
        seen: dict = {}

        def pack(t):
            key = t.untyped_storage().data_ptr()
            if key not in params:
                seen[key] = max(seen.get(key, 0), t.untyped_storage().nbytes())
            return t

        ids = torch.randint(0, 128, (B, T))
        att = torch.ones(B, T, dtype=torch.long)
        att[0, -7:] = 0
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            m.model(input_ids=ids, attention_mask=att, use_cache=False)
        return sum(seen.values()), cfg

    two, cfg = saved_bytes(2)
    one, _ = saved_bytes(1)
    measured = (two - one) / (2 * 96)
    c = ModelCounts(parameters=0, projection=0, largest_projection=0, embedding=0, layers=1, hidden=160,
                    intermediate=416, heads=5, kv_heads=1, head_dim=32, vocab=128)
    name = "float32" if dtype == torch.float32 else "bfloat16"
    predicted = activation_elements_per_token_layer(c, name, 96) * dtype.itemsize
    assert abs(predicted - measured) <= 0.1 * measured, (predicted, measured, ACTIVATION_COEFFICIENTS)


def test_qwen3_8b_plan_for_an_80gb_gpu():
    recipe = load_recipe(REPO / "recipes" / "qwen3-8b-gsm8k-resp.yaml")
    plan = make_plan(recipe, parse_size("80GiB"))
    c = plan.counts
    assert 8.1e9 < c.parameters < 8.3e9 and (c.layers, c.hidden, c.kv_heads, c.head_dim) == (36, 4096, 8, 128)
    assert plan.scoring["weights"] == c.parameters * 2
    assert plan.scoring["projection_gradients"] >= c.projection * 4  # float32 buffers
    assert plan.scoring_checkpointed_peak < plan.scoring_peak
    assert not plan.problems, plan.problems
    assert plan.times["total"] > plan.times["scoring_pass"] > 0


def test_a_run_that_cannot_fit_names_what_to_change():
    recipe = load_recipe(REPO / "recipes" / "qwen3-8b-gsm8k-resp.yaml")
    plan = make_plan(recipe, parse_size("40GiB"))
    assert plan.problems and "gradient_checkpointing: true" in plan.problems[0]
    with pytest.raises(RespError, match=r"plan: scoring needs .* GiB .*scorer.params.gradient_checkpointing"):
        check_fits(recipe, parse_size("40GiB"))
    assert check_fits(load_recipe(REPO / "recipes" / "testbed-resp.yaml")) is None  # CPU: nothing to check


def test_sizes_parse_and_bad_ones_are_one_line():
    assert parse_size("80GiB") == 80 << 30 and parse_size("141 GB") == 141 * 10**9 and parse_size("1024") == 1024
    for bad in ("lots", "-3GB", "0"):
        with pytest.raises(RespError, match="--gpu-memory"):
            parse_size(bad)


def test_cli_plan(tmp_path):
    from typer.testing import CliRunner

    from resp_core.cli import app

    r = CliRunner().invoke(app, ["plan", str(REPO / "recipes" / "qwen3-8b-gsm8k-resp.yaml"), "--gpu-memory", "80GiB"])
    assert r.exit_code == 0, r.output
    assert "scoring peak" in r.output and "fits in 80.0 GiB" in r.output and "8.19B parameters" in r.output
    r = CliRunner().invoke(app, ["plan", str(REPO / "recipes" / "qwen3-8b-gsm8k-resp.yaml"), "--gpu-memory", "24GiB",
                                 "--json"])
    assert r.exit_code == 1
    data = json.loads(r.stdout)
    assert data["problems"] and data["scoring_peak_bytes"] > 24 * 2**30


def test_comparison_plan_takes_the_heaviest_method_and_forward_only_scorers():
    from typer.testing import CliRunner

    from resp_core.cli import app

    r = CliRunner().invoke(app, ["plan", str(REPO / "recipes" / "qwen3-8b-table1-gsm8k.yaml"), "--gpu-memory", "80GiB"])
    assert r.exit_code == 0, r.output
    assert "4 methods" in r.output and "the plan of RESP" in r.output
    from resp_core.recipe import PluginRef

    resp = load_recipe(REPO / "recipes" / "qwen3-8b-gsm8k-resp.yaml")
    wanda = resp.model_copy(update={"scorer": PluginRef(name="wanda_sp", params={"batch_size": 1})})
    plan = make_plan(wanda, parse_size("80GiB"))
    assert plan.scoring["projection_gradients"] == 0
    assert plan.scoring_peak < make_plan(resp, parse_size("80GiB")).scoring_peak / 2
