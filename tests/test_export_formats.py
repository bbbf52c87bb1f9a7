"""Export formats (masked, compacted, uniform), the registered compacted model type, compaction
without copies, ``respctl export`` from any saved mask, and the pruned-folder validation.

Each format is loaded the way its users load it (plain transformers for masked and uniform, the
Auto classes for compacted) and must give the masked model's logits within 1e-5.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from conftest import tiny_qwen3
from resp_core.cli import app
from resp_core.errors import RespError
from resp_core.export import check_uniform, write_format
from resp_core.model.adapter import DecoderAdapter, adapter_for
from resp_core.model.compaction import compacted_copy, compacted_state
from resp_core.model.masks import MaskSet, apply_mask
from resp_core.model.pruned_model import PRUNING_FILE, load_pruned
from resp_core.model.saving import save_compacted
from test_masks_compaction import MODELS, _inputs, _logits, _mask

TOL = 1e-5
runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]


def _uniform_mask(g) -> MaskSet:
    """Every layer loses the same KV group and the same number of MLP channels: even GQA, same widths."""
    m = MaskSet.full(g)
    m.kv_group[:, 0] = False
    m.mlp_channel[:, ::4] = False
    return m


def _masked(dense, mask):
    masked = copy.deepcopy(dense)
    apply_mask(adapter_for(masked), mask)
    return masked


def _load_plain(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


FAMILIES = ["qwen3_h6_kv3", "llama_gqa", "qwen2_bias", "mistral_sliding", "gemma3_sliding"]


@pytest.mark.parametrize("model_name", FAMILIES)
def test_every_format_loads_and_matches_the_masked_model(model_name, tmp_path):
    from transformers import AutoModelForCausalLM

    dense = MODELS[model_name]()
    g = adapter_for(dense).geometry
    ids, att = _inputs()
    for label, mask in (("mixed", _mask(g, "mixed")), ("uniform", _uniform_mask(g))):
        masked = _masked(dense, mask)
        ref = _logits(masked, ids, att)
        assert (ref - _logits(dense, ids, att)).abs().max() > 20 * TOL
        formats = ["masked", "compacted"] + (["uniform"] if label == "uniform" else [])
        for fmt in formats:
            out = tmp_path / f"{label}-{fmt}"
            write_format(fmt, masked, mask, out)
            cfg = json.loads((out / "config.json").read_text())
            model = AutoModelForCausalLM.from_pretrained(out).eval()
            torch.testing.assert_close(_logits(model, ids, att), ref, atol=TOL, rtol=0)
            base = adapter_for(dense).family
            if fmt == "compacted":
                assert cfg["model_type"] == f"resp_pruned_{base}" and (out / PRUNING_FILE).is_file()
                assert type(model).__name__.startswith("RespPruned")
            else:
                assert cfg["model_type"] == base and "resp_pruning" not in cfg
                assert type(model) is type(dense)
        if label == "mixed":
            why = check_uniform(masked, mask)
            assert why.startswith("uniform: layer ") and "\n" not in why
    # the uniform folder is smaller and says so in a standard config
    cfg = json.loads((tmp_path / "uniform-uniform" / "config.json").read_text())
    assert cfg["num_key_value_heads"] == g.num_kv_heads - 1
    assert cfg["num_attention_heads"] == g.num_heads - g.heads_per_group
    assert cfg["intermediate_size"] == g.intermediate_size - len(range(0, g.intermediate_size, 4))
    assert (tmp_path / "uniform-uniform" / "model.safetensors").stat().st_size < \
        (tmp_path / "uniform-masked" / "model.safetensors").stat().st_size


def test_plain_transformers_without_resp(tmp_path):
    """In a Python that never imports resp_core: masked and uniform load, compacted is refused
    by transformers itself (unknown model type), not loaded with wrong shapes."""
    dense = MODELS["qwen3_h6_kv3"]()
    mask = _uniform_mask(adapter_for(dense).geometry)
    masked = _masked(dense, mask)
    for fmt in ("masked", "uniform", "compacted"):
        write_format(fmt, masked, mask, tmp_path / fmt)
    ids, att = _inputs()
    torch.save({"ids": ids, "att": att}, tmp_path / "inputs.pt")
    ref = _logits(masked, ids, att)
    script = f"""
import json, sys, torch
from transformers import AutoModelForCausalLM
inp = torch.load({str(tmp_path / 'inputs.pt')!r})
out = {{}}
for fmt in ("masked", "uniform"):
    m = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r} + "/" + fmt).eval()
    with torch.no_grad():
        out[fmt] = m(input_ids=inp["ids"], attention_mask=inp["att"]).logits[inp["att"].bool()].tolist()
try:
    AutoModelForCausalLM.from_pretrained({str(tmp_path)!r} + "/compacted")
    out["compacted"] = "loaded"
except Exception as exc:
    out["compacted"] = type(exc).__name__ + ": " + str(exc)
out["resp_imported"] = "resp_core" in sys.modules
print(json.dumps(out))
"""
    env = dict(os.environ, TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["resp_imported"] is False
    for fmt in ("masked", "uniform"):
        torch.testing.assert_close(torch.tensor(got[fmt]), ref, atol=TOL, rtol=0)
    assert got["compacted"].startswith("ValueError") and "resp_pruned_qwen3" in got["compacted"]

    # `import resp_core` first (it does not import transformers): the Auto classes know the type
    script = f"""
import json, sys, torch
import resp_core
assert "transformers" not in sys.modules
from transformers import AutoModelForCausalLM
inp = torch.load({str(tmp_path / 'inputs.pt')!r})
m = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r} + "/compacted").eval()
with torch.no_grad():
    out = m(input_ids=inp["ids"], attention_mask=inp["att"]).logits[inp["att"].bool()].tolist()
print(json.dumps({{"cls": type(m).__name__, "logits": out}}))
"""
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["cls"] == "RespPrunedQwen3ForCausalLM"
    torch.testing.assert_close(torch.tensor(got["logits"]), ref, atol=TOL, rtol=0)


def test_uniform_refusals_are_one_line():
    dense = MODELS["llama_gqa"]()
    g = adapter_for(dense).geometry
    cases = {"q_uneven": "unevenly", "mlp": "different widths", "attn_all": "no attention heads",
             "mlp_all": "no MLP channels"}
    for mask_name, fragment in cases.items():
        why = check_uniform(dense, _mask(g, mask_name))
        assert why is not None and fragment in why and "\n" not in why, why
        assert why.startswith("uniform:") and "'compacted'" in why
    assert check_uniform(dense, _uniform_mask(g)) is None
    with pytest.raises(RespError, match="unevenly"):
        write_format("uniform", dense, _mask(g, "q_uneven"), Path("/nonexistent/never-written"))


def test_gemma3_uniform_sizes_transformers_refuses_is_one_line(tmp_path):
    """Gemma 3's config requires hidden_size % num_attention_heads == 0: 48 % 4 != 0 is refused."""
    dense = MODELS["gemma3_sliding"]()
    g = adapter_for(dense).geometry
    mask = MaskSet.full(g)
    mask.kv_group[:, 0] = False  # 6 heads -> 4: 48 % 4 == 0, fine
    write_format("uniform", _masked(dense, mask), mask, tmp_path / "ok")
    mask = MaskSet.full(g)
    mask.q_head[:, [0, 2, 4]] = False  # one head per group: 3 heads, 3 KV heads, 48 % 3 == 0
    write_format("uniform", _masked(dense, mask), mask, tmp_path / "ok3")
    assert json.loads((tmp_path / "ok3" / "config.json").read_text())["num_attention_heads"] == 3


def test_added_output_biases_by_format(tmp_path):
    """FLAP-style o_proj/down_proj biases: llama holds them through its bias flags (q/k/v/gate/up
    biases then zero); qwen2 has no such flag: masked is refused with one line, compacted works."""
    ids, att = _inputs()
    for name, ok in (("llama_gqa", True), ("qwen2_bias", False)):
        dense = MODELS[name]()
        a = adapter_for(dense)
        gen = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for i in range(a.geometry.num_layers):
                for lin in (a.attention_parts(i).o, a.mlp_parts(i).down):
                    DecoderAdapter.ensure_bias(lin).copy_(0.3 * torch.randn(lin.out_features, generator=gen))
        mask = _uniform_mask(a.geometry)
        masked = _masked(dense, mask)
        ref = _logits(masked, ids, att)
        write_format("compacted", masked, mask, tmp_path / f"{name}-c")
        torch.testing.assert_close(_logits(_load_plain(tmp_path / f"{name}-c"), ids, att), ref, atol=TOL, rtol=0)
        for fmt in ("masked", "uniform"):
            out = tmp_path / f"{name}-{fmt}"
            if ok:
                write_format(fmt, masked, mask, out)
                cfg = json.loads((out / "config.json").read_text())
                assert cfg["attention_bias"] is True and cfg["mlp_bias"] is True
                torch.testing.assert_close(_logits(_load_plain(out), ids, att), ref, atol=TOL, rtol=0)
            else:
                with pytest.raises(RespError, match="o_proj biases .* standard qwen2 config cannot hold"):
                    write_format(fmt, masked, mask, out)
                assert not out.exists()


# --------------------------------------------------------------------------------------------------
# no copies
# --------------------------------------------------------------------------------------------------

def test_compaction_never_copies_the_whole_model(tmp_path, monkeypatch):
    dense = MODELS["llama_gqa"]()
    mask = _mask(adapter_for(dense).geometry, "mixed")
    masked = _masked(dense, mask)
    real_deepcopy = copy.deepcopy

    def no_module_copies(obj, *a, **k):
        if isinstance(obj, torch.nn.Module):
            pytest.fail("deepcopy of a model")
        return real_deepcopy(obj, *a, **k)

    monkeypatch.setattr(copy, "deepcopy", no_module_copies)
    compact, record = compacted_copy(masked, mask)
    # tensors compaction does not cut are the masked model's own storage, not copies
    assert compact.model.embed_tokens.weight.data_ptr() == masked.model.embed_tokens.weight.data_ptr()
    assert compact.lm_head.weight.data_ptr() == masked.lm_head.weight.data_ptr()
    assert compact.model.norm.weight.data_ptr() == masked.model.norm.weight.data_ptr()
    kept_src = record["layers"][0]["source_layer"]
    assert compact.model.layers[0].input_layernorm.weight.data_ptr() == \
        masked.model.layers[kept_src].input_layernorm.weight.data_ptr()
    # the masked model is unchanged and both compute the same function
    ids, att = _inputs()
    torch.testing.assert_close(_logits(compact, ids, att), _logits(masked, ids, att), atol=TOL, rtol=0)
    assert len(masked.model.layers) == 4
    # the host state holds only the kept rows of the cut projections
    state, _ = compacted_state(masked, mask)
    cut = sum(t.numel() for k, t in state.items() if "proj" in k)
    full = sum(p.numel() for n, p in masked.named_parameters() if "proj" in n)
    assert cut < full
    save_compacted(masked, mask, tmp_path / "m")
    torch.testing.assert_close(_logits(load_pruned(tmp_path / "m"), ids, att), _logits(masked, ids, att),
                               atol=TOL, rtol=0)


@pytest.mark.parametrize("model_name", ["gemma3_sliding", "qwen2_bias"])
def test_compact_in_place_then_save(model_name, tmp_path):
    """``compact`` removes units from the model itself (no copy); saved, it reloads through the Auto class."""
    from transformers import AutoModelForCausalLM

    from resp_core.model.compaction import compact
    from resp_core.model.saving import save_pruned

    dense = MODELS[model_name]()
    mask = _mask(adapter_for(dense).geometry, "mixed")
    masked = _masked(dense, mask)
    ids, att = _inputs()
    ref = _logits(masked, ids, att)
    embed = masked.model.embed_tokens.weight
    record = compact(masked, mask)
    assert masked.model.embed_tokens.weight is embed and len(masked.model.layers) == len(record["layers"]) == 3
    torch.testing.assert_close(_logits(masked, ids, att), ref, atol=TOL, rtol=0)
    save_pruned(masked, record, tmp_path)
    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(tmp_path), ids, att), ref, atol=TOL, rtol=0)


def test_saved_bytes_are_deterministic(tmp_path):
    dense = MODELS["qwen3_h8_kv2"]()
    mask = _mask(adapter_for(dense).geometry, "q_uneven")
    for k in ("a", "b"):
        save_compacted(_masked(dense, mask), mask, tmp_path / k)
    for f in ("model.safetensors", "config.json", PRUNING_FILE):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


# --------------------------------------------------------------------------------------------------
# load_pruned checks its record against the tensors
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    dense = MODELS["qwen3_h6_kv3"]()
    mask = _mask(adapter_for(dense).geometry, "q_uneven")
    out = tmp_path_factory.mktemp("pruned")
    save_compacted(_masked(dense, mask), mask, out)
    return out


def _corrupt(saved: Path, tmp_path: Path, edit_record=None, edit_tensors=None, raw=None) -> Path:
    import shutil

    from safetensors.torch import load_file, save_file

    out = tmp_path / "bad"
    shutil.copytree(saved, out)
    if edit_record is not None:
        rec = json.loads((out / PRUNING_FILE).read_text())
        edit_record(rec)
        (out / PRUNING_FILE).write_text(json.dumps(rec))
        cfg = json.loads((out / "config.json").read_text())
        cfg["resp_pruning"] = rec
        cfg["num_hidden_layers"] = len(rec["layers"])
        (out / "config.json").write_text(json.dumps(cfg))
    if edit_tensors is not None:
        t = load_file(str(out / "model.safetensors"))
        edit_tensors(t)
        save_file(t, str(out / "model.safetensors"))
    if raw is not None:
        f = out / "model.safetensors"
        f.write_bytes(raw(f.read_bytes()))
    return out


def _drop_layer(rec):
    rec["layers"].pop()


def _extra_layer(rec):
    rec["layers"].append(dict(rec["layers"][-1], source_layer=rec["layers"][-1]["source_layer"] + 1))


def _kv_out_of_range(rec):
    layer = next(r for r in rec["layers"] if r["kv_index"])
    layer["kv_index"][-1] = layer["num_kv_heads"]


def _kv_wrong_in_range(rec):
    layer = next(r for r in rec["layers"] if r["kv_index"])  # layer 0: [0, 1, 1, 2, 2] -> [0, 0, 1, 2, 2]
    layer["kv_index"][1] = 0


def _kv_swapped(rec):
    layer = next(r for r in rec["layers"] if r["kv_index"])
    layer["kv_index"] = list(reversed(layer["kv_index"]))


def _widths_without_tensors(rec):
    rec["layers"][1]["intermediate_size"] -= 1


def _missing_tensor(t):
    del t["model.layers.1.mlp.up_proj.weight"]


def _extra_tensor(t):
    t["model.layers.1.mlp.extra.weight"] = torch.zeros(2)


def _wrong_shape(t):
    t["model.layers.2.self_attn.q_proj.weight"] = t["model.layers.2.self_attn.q_proj.weight"][:-8].clone()


CORRUPTIONS = {
    "missing layer record": (dict(edit_record=_drop_layer), "model.safetensors: unexpected tensor"),
    "extra layer record": (dict(edit_record=_extra_layer), "resp_pruning.json"),
    "kv_index out of range": (dict(edit_record=_kv_out_of_range), "kv_index has entries outside"),
    "kv_index wrong but in range": (dict(edit_record=_kv_wrong_in_range), "does not match q_heads/kv_heads"),
    "kv_index not monotone": (dict(edit_record=_kv_swapped), "non-decreasing"),
    "width without tensors": (dict(edit_record=_widths_without_tensors), "has shape"),
    "missing tensor": (dict(edit_tensors=_missing_tensor), "tensor model.layers.1.mlp.up_proj.weight is missing"),
    "extra tensor": (dict(edit_tensors=_extra_tensor), "unexpected tensor model.layers.1.mlp.extra.weight"),
    "wrong shape": (dict(edit_tensors=_wrong_shape), "q_proj.weight has shape"),
    "truncated weights": (dict(raw=lambda b: b[: len(b) // 2]), "truncated"),
    "random-byte weights": (dict(raw=lambda b: os.urandom(len(b))), "not a readable safetensors file"),
    "format": (dict(edit_record=lambda r: r.update(format=999)), "unsupported format 999"),
    "not JSON": (dict(), "cannot read"),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_load_pruned_refuses_corruption_with_one_line(case, saved, tmp_path):
    from transformers import AutoModelForCausalLM

    kwargs, fragment = CORRUPTIONS[case]
    bad = _corrupt(saved, tmp_path, **kwargs)
    if case == "not JSON":
        (bad / PRUNING_FILE).write_text("{not json")
    for load in (load_pruned, AutoModelForCausalLM.from_pretrained):  # the Auto path validates too
        with pytest.raises(RespError) as exc:
            load(bad)
        msg = str(exc.value)
        assert "\n" not in msg and str(bad) in msg and fragment in msg, msg


def test_record_and_config_must_agree(saved, tmp_path):
    bad = _corrupt(saved, tmp_path)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["resp_pruning"]["layers"][0]["num_heads"] = 4
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(RespError, match="differs from resp_pruning.json"):
        load_pruned(bad)


def test_format_1_folders_still_load(tmp_path):
    """Folders written before the registered model type (base config + record file) load as before."""
    dense = MODELS["llama_gqa"]()
    mask = _mask(adapter_for(dense).geometry, "layer")
    masked = _masked(dense, mask)
    save_compacted(masked, mask, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    rec = json.loads((tmp_path / PRUNING_FILE).read_text())
    for r in rec["layers"]:
        r.pop("q_heads"), r.pop("kv_heads")
    rec["format"] = 1
    rec.pop("base_model_type")
    cfg.pop("resp_pruning")
    cfg["model_type"] = "llama"
    cfg["architectures"] = ["LlamaForCausalLM"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / PRUNING_FILE).write_text(json.dumps(rec))
    ids, att = _inputs()
    torch.testing.assert_close(_logits(load_pruned(tmp_path), ids, att), _logits(masked, ids, att), atol=TOL, rtol=0)


# --------------------------------------------------------------------------------------------------
# architectures the adapter refuses
# --------------------------------------------------------------------------------------------------

def test_phi3_and_multimodal_gemma3_are_refused_with_one_line():
    from transformers import Phi3Config, Phi3ForCausalLM

    phi = Phi3ForCausalLM(Phi3Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, pad_token_id=0))
    with pytest.raises(RespError, match="'phi3' is not supported: its fused qkv_proj and gate_up_proj"):
        adapter_for(phi)
    from resp_core.model.adapter import check_supported

    with pytest.raises(RespError, match="Gemma3ForCausalLM"):
        check_supported("gemma3")


# --------------------------------------------------------------------------------------------------
# runs: output.formats at the end, respctl export from any saved mask
# --------------------------------------------------------------------------------------------------

def _run_recipe(model_dir: Path, scorer: dict, formats: list[str]) -> dict:
    recipe = yaml.safe_load((REPO / "recipes" / "testbed-resp.yaml").read_text())
    recipe["model"]["path"] = str(model_dir)
    recipe["scorer"] = scorer
    recipe["calibration"]["params"].update(num_samples=4, sampling={"temperature": 0.6, "max_new_tokens": 8})
    recipe["evaluation"] = {"evaluate_dense": False, "evaluators": []}
    recipe["schedule"]["params"].update(steps=2)
    recipe.setdefault("output", {})["formats"] = formats
    return recipe


def _run(tmp_path, model_dir, scorer, formats, name="run"):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(_run_recipe(model_dir, scorer, formats)))
    out = tmp_path / name
    result = runner.invoke(app, ["run", str(path), "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


def _dense_masked(model_dir, mask_file):
    from transformers import AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    mask = MaskSet.load(mask_file, adapter_for(dense).geometry)
    apply_mask(adapter_for(dense), mask)
    return dense


def test_run_formats_and_export_from_any_mask(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    out = _run(tmp_path, tiny_model_dir, {"name": "magnitude"}, ["compacted", "masked", "uniform"])
    info = json.loads((out / "run.json").read_text())
    exports = info["exports"]
    assert exports["masked"] == "export/final-masked"
    assert exports["uniform"].startswith("not written: uniform:")  # protected layers keep their full width
    ids = torch.randint(3, 200, (2, 9), generator=torch.Generator().manual_seed(0))
    att = torch.ones_like(ids)
    final = sorted((out / "masks").glob("step_*.safetensors"))[-1]
    ref = _logits(_dense_masked(tiny_model_dir, final), ids, att)
    torch.testing.assert_close(_logits(_load_plain(out / "export" / "final-masked"), ids, att), ref, atol=TOL, rtol=0)
    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(out / "model"), ids, att), ref,
                               atol=TOL, rtol=0)
    assert (out / "export" / "final-masked" / "tokenizer.json").is_file()

    # a run whose final save failed: only masks/ survive -> every step is still exportable
    import shutil

    shutil.rmtree(out / "model")
    for step in ("step_01", "step_02"):
        for fmt in ("compacted", "masked"):
            result = runner.invoke(app, ["export", str(out), "--mask", f"masks/{step}.safetensors", "--format", fmt])
            assert result.exit_code == 0, result.output
            folder = out / "export" / f"{step}-{fmt}"
            ref = _logits(_dense_masked(tiny_model_dir, out / "masks" / f"{step}.safetensors"), ids, att)
            torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(folder), ids, att), ref,
                                       atol=TOL, rtol=0)
    result = runner.invoke(app, ["export", str(out), "--milestone", "0.2", "--format", "masked"])
    assert result.exit_code == 0, result.output
    assert (out / "export" / "milestone_0.20-masked" / "config.json").is_file()

    # bad input: one line, nothing written
    for args, fragment in ((["--milestone", "0.35"], "no mask for milestone 0.35"),
                           (["--format", "gguf"], "unknown export format"),
                           (["--mask", "masks/nope.safetensors"], "does not exist"),
                           (["--format", "uniform"], "uniform:"),
                           (["--mask", "masks/step_01.safetensors", "--format", "masked"], "already exists"),
                           (["--milestone", "0.2", "--mask", "masks/step_01.safetensors"], "not both")):
        before = sorted(p.name for p in (out / "export").iterdir())
        result = runner.invoke(app, ["export", str(out), *args])
        assert result.exit_code == 2 and fragment in result.output, (args, result.output)
        assert "Traceback" not in result.output
        assert sorted(p.name for p in (out / "export").iterdir()) == before


def test_export_of_weight_editing_scorer(tmp_path, tiny_model_dir):
    """FLAP edits the weights it keeps: the final mask exports from the saved compacted model
    (expanded back to the dense shape); a step with no saved weights is refused with one line."""
    out = _run(tmp_path, tiny_model_dir, {"name": "flap"}, ["compacted"])
    reference = load_pruned(out / "model")
    ids = torch.randint(3, 200, (2, 9), generator=torch.Generator().manual_seed(1))
    att = torch.ones_like(ids)
    ref = _logits(reference, ids, att)
    # the biases make a difference: the dense model with the mask alone is another function
    final = sorted((out / "masks").glob("step_*.safetensors"))[-1]
    assert (_logits(_dense_masked(tiny_model_dir, final), ids, att) - ref).abs().max() > 1e-3
    result = runner.invoke(app, ["export", str(out), "--format", "compacted", "--out", str(tmp_path / "c")])
    assert result.exit_code == 0, result.output
    assert "weights: model" in result.output.replace("\n", " ")
    torch.testing.assert_close(_logits(_load_plain(tmp_path / "c"), ids, att), ref, atol=TOL, rtol=0)
    # Qwen3 has no config flag for a down_proj bias: the dense-shape formats say so in one line
    result = runner.invoke(app, ["export", str(out), "--format", "masked", "--out", str(tmp_path / "m")])
    assert result.exit_code == 2 and "down_proj biases" in result.output and not (tmp_path / "m").exists()
    result = runner.invoke(app, ["export", str(out), "--mask", "masks/step_01.safetensors", "--format", "masked"])
    assert result.exit_code == 2 and "edits the weights it keeps" in result.output, result.output
