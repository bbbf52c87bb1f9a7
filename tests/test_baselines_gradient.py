"""Baseline scorers (magnitude, random, LLM-Pruner Taylor, ShortGPT) and calibration sources
(generic text, mixed, task data): formulas checked by hand on tiny tensors, end-to-end runs
through the CLI, and every bad input as one line with exit code 2."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from conftest import tiny_qwen3
from test_cli import assert_user_error, write
from resp_core.cli import app
from resp_core.errors import RespError
from resp_core.interfaces import CalibrationSample, CalibrationSet, RunContext
from resp_core.model.adapter import adapter_for
from resp_core.model.structures import StructureSpec, build_structures
from resp_core.registry import get_registry

runner = CliRunner()
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

PARAGRAPH = ("The committee met on Tuesday to discuss the budget for the coming year. Several members "
             "argued that the library needed new books, while others wanted to repair the old bridge "
             "near the river before the winter storms arrived. After a long debate they agreed to "
             "split the money between both projects and to meet again in the spring. ")


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------

def make_ctx(model, spec: StructureSpec | None = None, tokenizer=None, seed: int = 0, tasks=None) -> RunContext:
    adapter = adapter_for(model)
    return RunContext(model=model, tokenizer=tokenizer, adapter=adapter,
                      structures=build_structures(adapter, spec or StructureSpec()), generator=None,
                      tasks=tasks, seed=seed)


def create(kind: str, name: str, params: dict | None = None):
    return get_registry().create(kind, name, params or {}, kind)


def random_calibration(vocab: int = 512, seed: int = 0) -> CalibrationSet:
    g = torch.Generator().manual_seed(seed)
    samples = []
    for n_prompt, n_target in ((3, 5), (0, 7), (4, 2)):
        ids = torch.randint(3, vocab, (n_prompt + n_target,), generator=g).tolist()
        samples.append(CalibrationSample(ids[:n_prompt], ids[n_prompt:]))
    return CalibrationSet(samples, pad_id=0)


def prunable_weights(adapter):
    keys, weights = [], []
    for i in range(adapter.geometry.num_layers):
        a, m = adapter.attention_parts(i), adapter.mlp_parts(i)
        for name, lin in (("q", a.q), ("k", a.k), ("v", a.v), ("o", a.o), ("gate", m.gate), ("up", m.up),
                          ("down", m.down)):
            keys.append((i, name))
            weights.append(lin.weight)
    return keys, weights


def sample_nll(model, s: CalibrationSample, loss: str) -> tuple[torch.Tensor, int]:
    """Summed token NLL of one unpadded sample and its token count (independent of the batching code)."""
    ids = torch.tensor([s.prompt_ids + s.target_ids])
    logits = model(input_ids=ids).logits[0, :-1]
    labels = ids[0, 1:].clone()
    if loss == "decode":
        labels[: max(0, len(s.prompt_ids) - 1)] = -100
    nll = torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")
    return nll, int((labels != -100).sum())


def grads_by_hand(model, adapter, calib: CalibrationSet, loss: str):
    """(g, F): gradient of the set-level mean token loss, and the mean of squared per-sample gradients
    of per-sample mean losses (LLM-Pruner's acc_grad), both by autograd on unpadded samples."""
    keys, weights = prunable_weights(adapter)
    for p in model.parameters():
        p.requires_grad_(False)
    for w in weights:
        w.requires_grad_(True)
    parts = [sample_nll(model, s, loss) for s in calib.samples]
    total_tokens = sum(n for _, n in parts)
    g = torch.autograd.grad(sum(nll for nll, _ in parts) / total_tokens, weights)
    fisher = [torch.zeros_like(w) for w in weights]
    for s in calib.samples:
        nll, n = sample_nll(model, s, loss)
        for f, gs in zip(fisher, torch.autograd.grad(nll / n, weights)):
            f += gs ** 2 / len(calib.samples)
    for w in weights:
        w.requires_grad_(False)
    return dict(zip(keys, g)), dict(zip(keys, fisher))


# --------------------------------------------------------------------------------------------------
# magnitude and random
# --------------------------------------------------------------------------------------------------

def micro_model():
    """2 layers, 2 query heads sharing 1 KV head, head_dim 2, hidden 4, 3 MLP channels; all weights 1."""
    model = tiny_qwen3(vocab=16, layers=2, heads=2, kv=1, head_dim=2, hidden=4, inter=3)
    with torch.no_grad():
        for w in prunable_weights(adapter_for(model))[1]:
            w.fill_(1.0)
    return model


def test_magnitude_by_hand_on_unit_weights():
    model = micro_model()
    a = adapter_for(model)
    with torch.no_grad():
        a.mlp_parts(1).gate.weight[2] = -2.0  # channel 2 of layer 1: gate row |-2|*4 + up 4 + down 4
        a.attention_parts(0).o.weight[:, 3] = 3.0  # head 1 of layer 0 (o columns 2,3): column 3 is 3s
    ctx = make_ctx(model)
    l1 = create("scorer", "magnitude", {"norm": "l1", "normalize": "none"}).score(ctx, None).values
    # head: q rows 2x4 + o columns 4x2 = 16 ones; KV group: both heads + k and v rows (2x4 each)
    assert l1["q_head"].tolist() == [[16.0, 16.0 - 4 + 12], [16.0, 16.0]]
    assert l1["kv_group"].tolist() == [[16 + 24 + 16.0], [16 + 16 + 16.0]]
    assert l1["mlp_channel"].tolist() == [[12.0, 12.0, 12.0], [12.0, 12.0, 8 + 4 + 4.0]]
    assert l1["layer"][0, 0] == 56 + 36  # kv group (q, k, v, o) + 3 channels
    l2 = create("scorer", "magnitude", {"norm": "l2", "normalize": "none"}).score(ctx, None).values
    assert torch.allclose(l2["q_head"], torch.tensor([[4.0, math.sqrt(12 + 4 * 9)], [4.0, 4.0]]))
    assert torch.allclose(l2["kv_group"], torch.tensor([[math.sqrt(16 + 48 + 16)], [math.sqrt(48)]]))
    assert torch.allclose(l2["mlp_channel"], torch.tensor([[math.sqrt(12)] * 3, [math.sqrt(12)] * 2 + [math.sqrt(24)]]))
    # default normalization divides by each unit's parameter count
    per = create("scorer", "magnitude", {}).score(ctx, None).values
    assert torch.allclose(per["mlp_channel"], l1["mlp_channel"] / 12)
    assert torch.allclose(per["q_head"], l1["q_head"] / 16)


def test_magnitude_matches_loops_on_random_model():
    model = tiny_qwen3()
    a = adapter_for(model)
    g = a.geometry
    hd = g.head_dim
    l1 = create("scorer", "magnitude", {"normalize": "none"}).score(make_ctx(model), None).values
    l2 = create("scorer", "magnitude", {"norm": "l2", "normalize": "none"}).score(make_ctx(model), None).values
    for i in range(g.num_layers):
        at, m = a.attention_parts(i), a.mlp_parts(i)
        for h in range(g.num_heads):
            rows = slice(h * hd, (h + 1) * hd)
            w = torch.cat([at.q.weight[rows].flatten(), at.o.weight[:, rows].flatten()]).detach()
            assert l1["q_head"][i, h] == pytest.approx(float(w.abs().sum()), rel=1e-5)
            assert l2["q_head"][i, h] == pytest.approx(float(w.norm()), rel=1e-5)
        for c in (0, 7, g.intermediate_size - 1):
            w = torch.cat([m.gate.weight[c], m.up.weight[c], m.down.weight[:, c]]).detach()
            assert l1["mlp_channel"][i, c] == pytest.approx(float(w.abs().sum()), rel=1e-5)
            assert l2["mlp_channel"][i, c] == pytest.approx(float(w.norm()), rel=1e-5)


def test_random_is_seeded_uniform():
    ctx = make_ctx(tiny_qwen3())
    a = create("scorer", "random", {"seed": 3}).score(ctx, None).values
    b = create("scorer", "random", {"seed": 3}).score(ctx, None).values
    c = create("scorer", "random", {"seed": 4}).score(ctx, None).values
    for kind, shape in (("q_head", (4, 6)), ("kv_group", (4, 3)), ("mlp_channel", (4, 48)), ("layer", (4, 1))):
        assert a[kind].shape == shape
        assert torch.equal(a[kind], b[kind])
        assert ((a[kind] >= 0) & (a[kind] < 1)).all()
    assert not torch.equal(a["mlp_channel"], c["mlp_channel"])
    ctx.step = 5  # the same ranking at every step
    assert torch.equal(create("scorer", "random", {"seed": 3}).score(ctx, None).values["q_head"], a["q_head"])


# --------------------------------------------------------------------------------------------------
# LLM-Pruner
# --------------------------------------------------------------------------------------------------

def _reduce(values: list[float], how: str) -> float:
    t = torch.tensor(values, dtype=torch.float64)
    return float({"sum": t.sum(), "mean": t.mean(), "max": t.max(), "prod": t.prod()}[how])


def expected_llm_pruner(adapter, g_, f_, taylor: str, reduction: str) -> dict[str, torch.Tensor]:
    """LLM-Pruner's group importance by explicit loops over units, vectors and weights."""
    geo = adapter.geometry
    hd, hpg = geo.head_dim, geo.heads_per_group
    out = {"q_head": torch.zeros(geo.num_layers, geo.num_heads), "kv_group": torch.zeros(geo.num_layers, geo.num_kv_heads),
           "mlp_channel": torch.zeros(geo.num_layers, geo.intermediate_size)}
    for i in range(geo.num_layers):
        at, m = adapter.attention_parts(i), adapter.mlp_parts(i)
        lins = {"q": at.q, "k": at.k, "v": at.v, "o": at.o, "gate": m.gate, "up": m.up, "down": m.down}
        s = {}
        for name, lin in lins.items():
            w = lin.weight.detach().double()
            first = w * g_[(i, name)].double()
            second = 0.5 * w * w * f_[(i, name)].double()
            s[name] = {"vectorize": first, "param_first": first, "param_second": second,
                       "param_mix": first - second}[taylor]

        def imp(vector: torch.Tensor) -> float:
            return float(vector.sum().abs()) if taylor == "vectorize" else float(vector.abs().sum())

        for c in range(geo.intermediate_size):
            out["mlp_channel"][i, c] = _reduce([imp(s["gate"][c]), imp(s["up"][c]), imp(s["down"][:, c])], reduction)
        for h in range(geo.num_heads):
            out["q_head"][i, h] = sum(_reduce([imp(s["q"][h * hd + r]), imp(s["o"][:, h * hd + r])], reduction)
                                      for r in range(hd))
        for kv in range(geo.num_kv_heads):
            total = 0.0
            for r in range(hd):
                heads = range(kv * hpg, (kv + 1) * hpg)
                vecs = [imp(s["q"][h * hd + r]) for h in heads] + [imp(s["o"][:, h * hd + r]) for h in heads]
                vecs += [imp(s["k"][kv * hd + r]), imp(s["v"][kv * hd + r])]
                total += _reduce(vecs, reduction)
            out["kv_group"][i, kv] = total
    return out


@pytest.fixture(scope="module")
def llm_setup():
    model = tiny_qwen3(layers=2)
    calib = random_calibration()
    adapter = adapter_for(model)
    g_, f_ = grads_by_hand(model, adapter, calib, "full")
    return model, calib, g_, f_


@pytest.mark.parametrize("taylor", ["vectorize", "param_first", "param_second", "param_mix"])
@pytest.mark.parametrize("reduction", ["sum", "mean", "max", "prod"])
def test_llm_pruner_formulas_against_autograd(llm_setup, taylor, reduction):
    model, calib, g_, f_ = llm_setup
    ctx = make_ctx(model)
    got = create("scorer", "llm_pruner", {"taylor": taylor, "reduction": reduction, "batch_size": 2}).score(ctx, calib)
    want = expected_llm_pruner(ctx.adapter, g_, f_, taylor, reduction)
    for kind, w in want.items():
        assert torch.allclose(got.values[kind], w, rtol=2e-3, atol=1e-12), (kind, got.values[kind], w)
    assert torch.allclose(got.values["layer"][:, 0], want["kv_group"].sum(1) + want["mlp_channel"].sum(1), rtol=1e-4)
    assert all(lin.weight.grad is None for lin in ctx.adapter.prunable_linears().values())


def test_llm_pruner_second_order_uses_accumulated_squared_gradients(llm_setup):
    """param_second with one batch holding the whole set: F = g² of the set-level mean loss."""
    model, calib, g_, _ = llm_setup
    ctx = make_ctx(model)
    got = create("scorer", "llm_pruner", {"taylor": "param_second", "fisher_batch_size": 3}).score(ctx, calib)
    want = expected_llm_pruner(ctx.adapter, g_, {k: v ** 2 for k, v in g_.items()}, "param_second", "sum")
    assert torch.allclose(got.values["mlp_channel"], want["mlp_channel"], rtol=2e-3)
    per_sample = create("scorer", "llm_pruner", {"taylor": "param_second"}).score(ctx, calib)
    assert not torch.allclose(per_sample.values["mlp_channel"], got.values["mlp_channel"], rtol=1e-2)


def test_llm_pruner_param_first_sum_is_the_element_taylor_score(llm_setup):
    model, calib, _, _ = llm_setup
    ctx = make_ctx(model)
    ours = create("scorer", "llm_pruner", {"taylor": "param_first"}).score(ctx, calib).values
    resp = create("scorer", "resp", {"loss": "full", "reduction": "token_mean", "normalize": "none"}).score(ctx, calib).values
    for kind in ("q_head", "kv_group", "mlp_channel"):
        assert torch.allclose(ours[kind], resp[kind], rtol=1e-5)


def test_llm_pruner_decode_loss_masks_the_prompt(llm_setup):
    model, calib, _, _ = llm_setup
    ctx = make_ctx(model)
    g_dec, _ = grads_by_hand(model, ctx.adapter, calib, "decode")
    got = create("scorer", "llm_pruner", {"taylor": "vectorize", "loss": "decode"}).score(ctx, calib)
    want = expected_llm_pruner(ctx.adapter, g_dec, g_dec, "vectorize", "sum")
    assert torch.allclose(got.values["kv_group"], want["kv_group"], rtol=2e-3)


# --------------------------------------------------------------------------------------------------
# ShortGPT
# --------------------------------------------------------------------------------------------------

def test_shortgpt_block_influence_by_hand():
    model = tiny_qwen3()
    calib = random_calibration()
    L = adapter_for(model).geometry.num_layers
    sums, count = torch.zeros(L, dtype=torch.float64), 0
    norm = model.model.norm
    model.model.norm = torch.nn.Identity()  # so the last hidden state is the last layer's raw output
    try:
        with torch.no_grad():
            for s in calib.samples:
                hs = model(input_ids=torch.tensor([s.prompt_ids + s.target_ids]), output_hidden_states=True).hidden_states
                assert len(hs) == L + 1
                for i in range(L):
                    a, b = hs[i][0].double(), hs[i + 1][0].double()
                    cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))
                    sums[i] += cos.sum()
                count += len(s.prompt_ids) + len(s.target_ids)
    finally:
        model.model.norm = norm
    want = 1 - sums / count
    ctx = make_ctx(model, StructureSpec(layers=True))
    got = create("scorer", "shortgpt", {"batch_size": 2}).score(ctx, calib)
    assert set(got.values) == {"layer"}
    assert torch.allclose(got.values["layer"][:, 0].double(), want, atol=1e-5)


def test_shortgpt_refuses_heads_and_channels(tmp_path, tiny_model_dir):
    recipe = write(tmp_path, run_recipe_dict(tiny_model_dir, tmp_path, "shortgpt"))
    for cmd in (["validate", str(recipe)], ["run", str(recipe), "--out", str(tmp_path / "run")]):
        assert_user_error(runner.invoke(app, cmd), "scorer", "structures.layers")
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------------------------------
# End to end: every scorer from a recipe to 40%, compacted model reloads with equal logits
# --------------------------------------------------------------------------------------------------

def write_text_corpus(tmp_path: Path, n_docs: int = 12) -> Path:
    path = tmp_path / "corpus.txt"
    docs = [f"Document {k}. " + PARAGRAPH * (1 + k % 2) for k in range(n_docs)]
    path.write_text("\n\n".join(docs) + "\n")
    return path


def run_recipe_dict(model_dir: Path, tmp_path: Path, scorer: str, scorer_params: dict | None = None,
                    calibration: dict | None = None, structures: dict | None = None) -> dict:
    calibration = calibration or {"name": "c4", "params": {"local_path": str(write_text_corpus(tmp_path)),
                                                           "num_samples": 4, "seq_len": 24}}
    return {
        "name": f"baseline-{scorer}",
        "seed": 0,
        "model": {"path": str(model_dir)},
        "task": {"name": "testbed_arith"},
        "structures": structures or {"attention": "kv_group", "mlp": "channel"},
        "calibration": calibration,
        "scorer": {"name": scorer, "params": scorer_params or {}},
        "allocator": {"name": "global"},
        "schedule": {"name": "progressive",
                     "params": {"target": 0.4, "steps": 4, "milestones": [0.2, 0.4], "regenerate_fraction": 0.0}},
        "evaluation": {"evaluate_dense": False, "evaluators": []},
    }


def check_run(out: Path, model_dir: Path):
    """Finished run; the reloaded compacted model equals the dense model under the final mask."""
    from transformers import AutoModelForCausalLM

    from resp_core import load_pruned
    from resp_core.model.masks import MaskSet, apply_mask

    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "finished"
    assert info["compaction_max_abs_logit_diff"] <= 1e-5
    dense = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    adapter = adapter_for(dense)
    mask = MaskSet.load(out / "masks" / "milestone_0.40.safetensors", adapter.geometry)
    apply_mask(adapter, mask)
    reloaded = load_pruned(out / "model")
    ids = torch.randint(3, dense.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (dense(input_ids=ids).logits - reloaded(input_ids=ids).logits).abs().max()
    assert float(diff) <= 1e-5
    assert sum(p.numel() for p in reloaded.parameters()) == info["compacted_parameters"]
    rows = json.loads((out / "metrics.json").read_text())
    return info, rows, mask, reloaded


@pytest.mark.parametrize("scorer, params", [
    ("magnitude", {"norm": "l2"}),
    ("random", {"seed": 1}),
    ("llm_pruner", {"taylor": "param_mix", "reduction": "sum"}),
])
def test_scorers_end_to_end(tmp_path, tiny_model_dir, scorer, params):
    recipe = write(tmp_path, run_recipe_dict(tiny_model_dir, tmp_path, scorer, params))
    out = tmp_path / "run"
    result = runner.invoke(app, ["run", str(recipe), "--out", str(out)])
    assert result.exit_code == 0, result.output
    info, rows, mask, _ = check_run(out, tiny_model_dir)
    assert rows[-1]["sparsity"] == pytest.approx(0.4, abs=0.05)
    assert info["compacted_parameters"] < info["dense_parameters"]
    first = json.loads((out / "calibration" / "generation_00.jsonl").read_text().splitlines()[0])
    assert first["prompt_ids"] == [] and len(first["target_ids"]) == 24 and first["meta"]["source"] == "c4"


def test_llm_pruner_uniform_allocation_end_to_end(tmp_path, tiny_model_dir):
    """LLM-Pruner's own setting: the same fraction of each unit kind removed in every pruned layer."""
    recipe = run_recipe_dict(tiny_model_dir, tmp_path, "llm_pruner", {"taylor": "param_first"})
    recipe["allocator"] = {"name": "uniform"}
    out = tmp_path / "run"
    result = runner.invoke(app, ["run", str(write(tmp_path, recipe)), "--out", str(out)])
    assert result.exit_code == 0, result.output
    _, _, mask, _ = check_run(out, tiny_model_dir)
    kept = mask.effective().mlp_channel.sum(1).tolist()
    assert kept[0] == kept[-1] == 48 and len(set(kept[1:-1])) == 1 and kept[1] < 48


def test_shortgpt_removes_whole_layers_end_to_end(tmp_path, tiny_model_dir):
    structures = {"layers": True, "protect_first": 0.0, "protect_last": 0}
    recipe = write(tmp_path, run_recipe_dict(tiny_model_dir, tmp_path, "shortgpt", structures=structures))
    out = tmp_path / "run"
    result = runner.invoke(app, ["run", str(recipe), "--out", str(out)])
    assert result.exit_code == 0, result.output
    info, rows, mask, reloaded = check_run(out, tiny_model_dir)
    kept = mask.effective().layer[:, 0]
    assert int((~kept).sum()) == 2  # 4 equal layers: 40% of the parameters -> 2 layers (50%)
    assert reloaded.config.num_hidden_layers == 2 and len(reloaded.model.layers) == 2
    assert rows[-1]["sparsity"] == pytest.approx(0.5)
    # the saved model keeps exactly the surviving layers, in order
    record = json.loads((out / "model" / "resp_pruning.json").read_text())
    assert [r["source_layer"] for r in record["layers"]] == kept.nonzero().flatten().tolist()


# --------------------------------------------------------------------------------------------------
# Generic text calibration
# --------------------------------------------------------------------------------------------------

def test_c4_windows_from_local_txt(tmp_path, testbed_tokenizer):
    path = write_text_corpus(tmp_path)
    docs = [d.strip() for d in path.read_text().split("\n\n") if d.strip()]
    src = create("calibration", "c4", {"local_path": str(path), "num_samples": 5, "seq_len": 16, "seed": 7})
    samples = src.build(make_ctx(tiny_qwen3(), tokenizer=testbed_tokenizer))
    assert len(samples) == 5
    assert len({s.meta["document"] for s in samples}) == 5  # one window per document
    for s in samples:
        assert s.prompt_ids == [] and len(s.target_ids) == 16
        assert s.meta["source"] == "c4" and s.meta["origin"] == str(path)
        ids = testbed_tokenizer(docs[s.meta["document"]], add_special_tokens=False)["input_ids"]
        assert ids[s.meta["offset"]: s.meta["offset"] + 16] == s.target_ids
    again = create("calibration", "c4", {"local_path": str(path), "num_samples": 5, "seq_len": 16, "seed": 7})
    assert [s.target_ids for s in again.build(make_ctx(tiny_qwen3(), tokenizer=testbed_tokenizer))] == \
        [s.target_ids for s in samples]
    other = create("calibration", "c4", {"local_path": str(path), "num_samples": 5, "seq_len": 16, "seed": 8})
    assert [s.target_ids for s in other.build(make_ctx(tiny_qwen3(), tokenizer=testbed_tokenizer))] != \
        [s.target_ids for s in samples]


@pytest.mark.parametrize("fmt", ["jsonl", "json"])
def test_wikitext_windows_from_local_json(tmp_path, testbed_tokenizer, fmt):
    rows = [{"text": f" = Section {k} = \n" + PARAGRAPH, "id": k} for k in range(4)]
    path = tmp_path / f"wiki.{fmt}"
    path.write_text("\n".join(json.dumps(r) for r in rows) if fmt == "jsonl" else json.dumps(rows))
    src = create("calibration", "wikitext", {"local_path": str(path), "num_samples": 6, "seq_len": 20})
    samples = src.build(make_ctx(tiny_qwen3(), tokenizer=testbed_tokenizer, seed=3))
    stream = testbed_tokenizer("\n\n".join(r["text"] for r in rows), add_special_tokens=False)["input_ids"]
    offsets = sorted(s.meta["offset"] for s in samples)
    assert all(b - a >= 20 for a, b in zip(offsets, offsets[1:]))  # non-overlapping
    for s in samples:
        assert s.meta["source"] == "wikitext" and s.prompt_ids == []
        assert stream[s.meta["offset"]: s.meta["offset"] + 20] == s.target_ids


def test_generic_text_bad_inputs_are_one_line_errors(tmp_path, tiny_model_dir):
    base = run_recipe_dict(tiny_model_dir, tmp_path, "magnitude")
    out = tmp_path / "run"
    # missing local file
    recipe = dict(base, calibration={"name": "c4", "params": {"local_path": str(tmp_path / "nope.txt")}})
    for cmd in (["validate", str(write(tmp_path, recipe))], ["run", str(write(tmp_path, recipe)), "--out", str(out)]):
        assert_user_error(runner.invoke(app, cmd), "calibration.params.local_path", "nope.txt")
    assert not out.exists()
    # wrong field
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"content": PARAGRAPH}) + "\n")
    recipe = dict(base, calibration={"name": "wikitext", "params": {"local_path": str(bad)}})
    for cmd in (["validate", str(write(tmp_path, recipe))], ["run", str(write(tmp_path, recipe)), "--out", str(out)]):
        assert_user_error(runner.invoke(app, cmd), "calibration.params", "'text'", "bad.jsonl:1")
    assert not out.exists()
    recipe = dict(base, calibration={"name": "wikitext", "params": {"local_path": str(bad), "text_field": "content",
                                                                     "num_samples": 1, "seq_len": 8}})
    assert runner.invoke(app, ["validate", str(write(tmp_path, recipe))]).exit_code == 0
    # too few samples: 12 documents, 50 requested
    recipe = dict(base, calibration={"name": "c4", "params": {"local_path": str(write_text_corpus(tmp_path)),
                                                               "num_samples": 50, "seq_len": 24}})
    result = runner.invoke(app, ["run", str(write(tmp_path, recipe)), "--out", str(out)])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    error = [ln for ln in result.output.splitlines() if ln.startswith("error:")]  # found once tokenized
    assert len(error) == 1 and "calibration.params.num_samples" in error[0] and "50 requested" in error[0]
    assert not out.exists()  # found only while running, yet nothing is left behind
    # bad parameter values
    recipe = dict(base, calibration={"name": "c4", "params": {"local_path": str(bad), "seq_len": 1}})
    assert_user_error(runner.invoke(app, ["validate", str(write(tmp_path, recipe))]), "calibration.params.seq_len")


def test_hub_failure_is_one_line_error(monkeypatch, testbed_tokenizer):
    datasets = pytest.importorskip("datasets")

    def boom(*args, **kwargs):
        raise ConnectionError("no network here\nsecond line")

    monkeypatch.setattr(datasets, "load_dataset", boom)
    src = create("calibration", "c4", {"num_samples": 1})
    with pytest.raises(RespError) as err:
        src.build(make_ctx(tiny_qwen3(), tokenizer=testbed_tokenizer))
    msg = str(err.value)
    assert "\n" not in msg and "allenai/c4" in msg and "local_path" in msg and "ConnectionError" in msg


# --------------------------------------------------------------------------------------------------
# Mixed
# --------------------------------------------------------------------------------------------------

def test_mixed_blends_counts(tmp_path, testbed_tokenizer):
    corpus = write_text_corpus(tmp_path)
    wiki = tmp_path / "wiki.txt"
    wiki.write_text(PARAGRAPH * 6)
    params = {"num_samples": 8, "sources": [
        {"name": "c4", "params": {"local_path": str(corpus), "seq_len": 12}, "weight": 3},
        {"name": "wikitext", "params": {"local_path": str(wiki), "seq_len": 10}, "weight": 1},
        {"name": "wikitext", "params": {"local_path": str(wiki), "seq_len": 10}, "weight": 0.01},  # rounds to 0
    ]}
    mixed = create("calibration", "mixed", params)
    assert mixed.counts() == [6, 2, 0] and not mixed.regenerable
    samples = mixed.build(make_ctx(tiny_qwen3(), tokenizer=testbed_tokenizer))
    assert [s.meta["source"] for s in samples].count("c4") == 6
    assert [s.meta["source"] for s in samples].count("wikitext") == 2
    assert sorted(len(s.target_ids) for s in samples) == [10, 10] + [12] * 6
    assert {s.meta["mixed_component"] for s in samples} == {0, 1}
    again = create("calibration", "mixed", params).build(make_ctx(tiny_qwen3(), tokenizer=testbed_tokenizer))
    assert [s.target_ids for s in again] == [s.target_ids for s in samples]  # seeded


def test_mixed_errors_name_the_component(tmp_path, tiny_model_dir):
    base = run_recipe_dict(tiny_model_dir, tmp_path, "magnitude")
    recipe = dict(base, calibration={"name": "mixed", "params": {"num_samples": 4, "sources": [
        {"name": "c4", "params": {"local_path": str(tmp_path / "missing.txt")}}]}})
    assert_user_error(runner.invoke(app, ["validate", str(write(tmp_path, recipe))]),
                      "calibration.params.sources[0].params.local_path")
    recipe = dict(base, calibration={"name": "mixed", "params": {"num_samples": 4, "sources": [
        {"name": "c5", "params": {}}]}})
    assert_user_error(runner.invoke(app, ["validate", str(write(tmp_path, recipe))]),
                      "calibration.params.sources[0].name", "did you mean 'c4'")


def test_mixed_regeneration_is_delegated(testbed_tokenizer):
    from resp_core.interfaces import CalibrationSource

    class Fixed(CalibrationSource):
        def __init__(self, tag):
            self.tag = tag

        def build(self, ctx):
            return [CalibrationSample([], [k], {"tag": self.tag}) for k in range(4)]

    class Regen(Fixed):
        regenerable = True
        seen = None

        def regenerate(self, ctx, samples, fraction):
            Regen.seen = [s.target_ids[0] for s in samples]
            return [CalibrationSample([], [100 + s.target_ids[0]], {"tag": "new"}) for s in samples]

    mixed = create("calibration", "mixed", {"num_samples": 8, "sources": [
        {"name": "task_data", "weight": 1}, {"name": "self_generated", "weight": 1}]})
    mixed._built = [(0, Fixed("fixed")), (1, Regen("regen"))]
    assert mixed.regenerable
    ctx = make_ctx(tiny_qwen3(), tokenizer=testbed_tokenizer)
    samples = mixed.build(ctx)
    fresh = mixed.regenerate(ctx, samples, 1.0)
    assert Regen.seen == [0, 1, 2, 3]  # the component sees its own samples in its own order
    for old, new in zip(samples, fresh):
        if old.meta["tag"] == "fixed":
            assert new is old
        else:
            assert new.target_ids == [100 + old.target_ids[0]] and new.meta["mixed_component"] == 1


# --------------------------------------------------------------------------------------------------
# Task data (GSM8K / MathQA) as calibration
# --------------------------------------------------------------------------------------------------

def resolved_context(tmp_path, model_dir, calibration: dict, tokenizer):
    from transformers import AutoModelForCausalLM

    from resp_core.interfaces import Progress
    from resp_core.pipeline import build_context
    from resp_core.recipe import parse_recipe
    from resp_core.resolve import resolve

    recipe = run_recipe_dict(model_dir, tmp_path, "magnitude", calibration=calibration)
    resolved = resolve(parse_recipe(yaml.safe_dump(recipe)))
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    return resolved, build_context(resolved, model, tokenizer, Progress())


@pytest.mark.skipif(not (SHARED_DATA / "gsm8k" / "train.jsonl").is_file(), reason="GSM8K files not present")
def test_task_data_gsm8k_targets_are_the_human_solutions(tmp_path, tiny_model_dir, testbed_tokenizer):
    calibration = {"name": "task_data", "params": {"task": "gsm8k", "num_samples": 5,
                                                   "task_params": {"data_dir": str(SHARED_DATA / "gsm8k")}}}
    resolved, ctx = resolved_context(tmp_path, tiny_model_dir, calibration, testbed_tokenizer)
    samples = resolved.calibration.build(ctx)
    lines = (SHARED_DATA / "gsm8k" / "train.jsonl").read_text().splitlines()
    assert len(samples) == 5
    for s in samples:
        index = int(s.meta["item_id"].rsplit("-", 1)[1])
        row = json.loads(lines[index])
        solution = row["answer"].rstrip()  # calculator annotations kept (the authors' gold data)
        target = testbed_tokenizer.decode(s.target_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        assert target == solution
        assert "####" in target and s.meta["source"] == "task_data"
        prompt = testbed_tokenizer.decode(s.prompt_ids, clean_up_tokenization_spaces=False)
        assert row["question"] in prompt
    # the same run context serves the recipe's own task unchanged
    assert ctx.tasks(None).name == "testbed_arith"
    assert ctx.tasks("gsm8k", {"data_dir": str(SHARED_DATA / "gsm8k")}) is ctx.tasks(
        "gsm8k", {"data_dir": str(SHARED_DATA / "gsm8k")})


@pytest.mark.skipif(not (SHARED_DATA / "mathqa" / "dev.json").is_file(), reason="MathQA files not present")
def test_task_data_mathqa_plain_format(tmp_path, tiny_model_dir, testbed_tokenizer):
    calibration = {"name": "task_data", "params": {"task": "mathqa", "split": "validation", "num_samples": 3,
                                                   "format": "plain",
                                                   "task_params": {"data_dir": str(SHARED_DATA / "mathqa")}}}
    resolved, ctx = resolved_context(tmp_path, tiny_model_dir, calibration, testbed_tokenizer)
    for s in resolved.calibration.build(ctx):
        target = testbed_tokenizer.decode(s.target_ids, clean_up_tokenization_spaces=False)
        assert re.search(r"\n#### [a-e]$", target)


def test_task_params_are_checked_up_front(tmp_path, tiny_model_dir):
    base = run_recipe_dict(tiny_model_dir, tmp_path, "magnitude")
    for name in ("task_data", "self_generated"):
        recipe = dict(base, calibration={"name": name, "params": {"task": "gsm8k", "task_params": {"data_dri": "x"}}})
        assert_user_error(runner.invoke(app, ["validate", str(write(tmp_path, recipe))]),
                          "calibration.params.task_params.data_dri", "unknown field")
        recipe = dict(base, calibration={"name": name, "params": {"task": "gsm8", "task_params": {}}})
        assert_user_error(runner.invoke(app, ["validate", str(write(tmp_path, recipe))]),
                          "calibration.params.task", "did you mean 'gsm8k'")


@pytest.mark.skipif(not (SHARED_DATA / "gsm8k" / "train.jsonl").is_file(), reason="GSM8K files not present")
def test_mixed_generic_and_gsm8k_end_to_end(tmp_path, tiny_model_dir):
    """C4-style text blended with GSM8K solutions, LLM-Pruner param_second, through the CLI."""
    calibration = {"name": "mixed", "params": {"num_samples": 4, "sources": [
        {"name": "c4", "params": {"local_path": str(write_text_corpus(tmp_path)), "seq_len": 24}, "weight": 1},
        {"name": "task_data", "params": {"task": "gsm8k", "max_length": 320,
                                         "task_params": {"data_dir": str(SHARED_DATA / "gsm8k")}}, "weight": 1},
    ]}}
    recipe = run_recipe_dict(tiny_model_dir, tmp_path, "llm_pruner", {"taylor": "param_second"},
                             calibration=calibration)
    out = tmp_path / "run"
    result = runner.invoke(app, ["run", str(write(tmp_path, recipe)), "--out", str(out)])
    assert result.exit_code == 0, result.output
    check_run(out, tiny_model_dir)
    rows = [json.loads(x) for x in (out / "calibration" / "generation_00.jsonl").read_text().splitlines()]
    assert sorted(r["meta"]["source"] for r in rows) == ["c4", "c4", "task_data", "task_data"]
