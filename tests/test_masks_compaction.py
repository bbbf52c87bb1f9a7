"""Masks are exact: masked model == compacted model == saved-and-reloaded model.

Tiny random GQA decoders (Qwen3 with head_dim != hidden/heads, Qwen3 with attention biases,
Llama with GQA, Qwen2 with q/k/v biases) are pruned unevenly: single query heads (uneven
groups, ``kv_index`` path), whole KV groups, MLP channels, a whole MLP (``EmptyMLP``), a whole
attention (``EmptyAttention``) and whole layers.  Logits on left-padded inputs, greedy
generation with a KV cache and parameter counts must agree.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from conftest import tiny_qwen3
from resp_core.errors import RespError
from resp_core.model.adapter import DecoderAdapter, Geometry, adapter_for
from resp_core.model.compaction import compacted_copy
from resp_core.model.masks import MaskSet, apply_mask, kept_parameter_count, sparsity_of
from resp_core.model.pruned_layers import EmptyAttention, EmptyMLP
from resp_core.model.pruned_model import PRUNING_FILE, load_pruned
from resp_core.model.saving import save_pruned
from resp_core.model.structures import StructureSpec, build_structures, unit_costs

TOL = 1e-5


# --------------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------------

def _perturb(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Random biases and norm weights, so that slicing them wrongly shows in the logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
            elif "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
    return model


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(3)
    cfg = LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=2, head_dim=8, max_position_embeddings=512,
                      tie_word_embeddings=False, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def _qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(4)
    cfg = Qwen2Config(vocab_size=512, hidden_size=48, intermediate_size=40, num_hidden_layers=4,
                      num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, eos_token_id=2, pad_token_id=0)
    return Qwen2ForCausalLM(cfg).eval()


def _mistral():
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(5)
    cfg = MistralConfig(vocab_size=512, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                        num_attention_heads=8, num_key_value_heads=2, head_dim=8, max_position_embeddings=512,
                        sliding_window=5, tie_word_embeddings=False, eos_token_id=2, pad_token_id=0)
    return MistralForCausalLM(cfg).eval()


def _gemma3():
    """Gemma 3 text model: q/k norms, sandwich norms, query_pre_attn_scalar scaling, scaled
    embeddings, and sliding-window layers (window 4 < the 9-token inputs) next to full ones."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(6)
    cfg = Gemma3TextConfig(vocab_size=512, hidden_size=48, intermediate_size=40, num_hidden_layers=4,
                           num_attention_heads=6, num_key_value_heads=3, head_dim=8, max_position_embeddings=512,
                           sliding_window=4, query_pre_attn_scalar=8,
                           layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
                           eos_token_id=2, pad_token_id=0, bos_token_id=1)
    return Gemma3ForCausalLM(cfg).eval()


MODELS = {
    "qwen3_h6_kv3": lambda: _perturb(tiny_qwen3(seed=0, heads=6, kv=3, head_dim=8, hidden=32)),
    "qwen3_h8_kv2": lambda: _perturb(tiny_qwen3(seed=1, heads=8, kv=2, head_dim=8, hidden=32)),
    "qwen3_bias": lambda: _perturb(tiny_qwen3(seed=2, heads=6, kv=3, head_dim=8, hidden=32, bias=True)),
    "llama_gqa": lambda: _perturb(_llama()),
    "qwen2_bias": lambda: _perturb(_qwen2()),
    "mistral_sliding": lambda: _perturb(_mistral()),
    "gemma3_sliding": lambda: _perturb(_gemma3()),
}


def test_model_zoo_geometry():
    """The zoo really has what the other tests rely on."""
    g = adapter_for(MODELS["qwen3_h6_kv3"]()).geometry
    assert (g.num_heads, g.num_kv_heads, g.head_dim) == (6, 3, 8) and g.hidden_size // g.num_heads != g.head_dim
    g = adapter_for(MODELS["qwen3_h8_kv2"]()).geometry
    assert (g.num_heads, g.num_kv_heads, g.head_dim) == (8, 2, 8) and g.hidden_size // g.num_heads != g.head_dim
    a = adapter_for(MODELS["qwen3_bias"]()).attention_parts(0)
    assert all(x.bias is not None for x in (a.q, a.k, a.v, a.o))
    a = adapter_for(MODELS["qwen2_bias"]())
    assert a.family == "qwen2" and a.attention_parts(0).q.bias is not None and a.attention_parts(0).o.bias is None
    assert a.geometry.heads_per_group == 3
    a = adapter_for(MODELS["llama_gqa"]())
    assert a.family == "llama" and a.geometry.heads_per_group == 4
    a = adapter_for(MODELS["mistral_sliding"]())
    assert a.family == "mistral" and a.model.config.sliding_window == 5
    a = adapter_for(MODELS["gemma3_sliding"]())
    assert a.family == "gemma3_text" and a.geometry.heads_per_group == 2
    assert a.model.config.layer_types[:2] == ["sliding_attention", "full_attention"]
    assert all(hasattr(layer, "pre_feedforward_layernorm") for layer in a.layers)  # sandwich norms


# --------------------------------------------------------------------------------------------------
# masks
# --------------------------------------------------------------------------------------------------

def _mask(g: Geometry, name: str) -> MaskSet:
    m = MaskSet.full(g)
    hpg, nq, nkv = g.heads_per_group, g.num_heads, g.num_kv_heads
    gen = torch.Generator().manual_seed(7)
    if name == "q_uneven":
        m.q_head[0, 0] = False  # group 0 loses one head
        m.q_head[1, [1, hpg]] = False  # one head from each of two groups
        m.q_head[2, :hpg] = False  # all heads of group 0 -> KV head 0 dies with them
        m.q_head[3, nq - 1] = False
    elif name == "kv_group":
        m.kv_group[1, 0] = False
        m.kv_group[2, nkv - 1] = False
        m.kv_group[3, : nkv - 1] = False
    elif name == "mlp":
        m.mlp_channel[:] = torch.rand(m.mlp_channel.shape, generator=gen) > 0.35
    elif name == "mlp_all":
        m.mlp_channel[1, :] = False
        m.mlp_channel[2, ::3] = False
    elif name == "attn_all":
        m.q_head[2, :] = False  # EmptyAttention via the query heads
        m.kv_group[0, :] = False  # ... and via the KV groups
    elif name == "layer":
        m.layer[1] = False
    elif name == "layer_ends":
        m.layer[0] = False
        m.layer[3] = False
    elif name == "mixed":
        m.q_head[0, 0] = False
        m.mlp_channel[0, 1::2] = False
        m.q_head[1, :] = False
        m.layer[2] = False
        m.mlp_channel[3, :] = False
        m.kv_group[3, 0] = False
    else:
        raise KeyError(name)
    return m


MASKS = ["q_uneven", "kv_group", "mlp", "mlp_all", "attn_all", "layer", "layer_ends", "mixed"]


def _inputs():
    ids = torch.tensor([[0, 0, 0, 17, 93, 5, 250, 11, 42],
                        [7, 300, 12, 9, 81, 64, 3, 499, 100]])
    att = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1],
                        [1, 1, 1, 1, 1, 1, 1, 1, 1]])
    return ids, att


@torch.no_grad()
def _logits(model, ids, att):
    out = model(input_ids=ids, attention_mask=att).logits
    valid = out[att.bool()]
    assert torch.isfinite(valid).all()
    return valid


_CACHE: dict = {}


def _prepared(model_name: str, mask_name: str, tmp_path_factory):
    key = (model_name, mask_name)
    if key not in _CACHE:
        dense = MODELS[model_name]()
        mask = _mask(adapter_for(dense).geometry, mask_name)
        masked = copy.deepcopy(dense)
        apply_mask(adapter_for(masked), mask)
        compacted, record = compacted_copy(dense, mask)
        out = tmp_path_factory.mktemp(f"{model_name}-{mask_name}")
        save_pruned(compacted, record, out)
        reloaded = load_pruned(out)
        _CACHE.clear()  # keep at most one entry alive
        _CACHE[key] = (dense, mask, masked, compacted, record, reloaded)
    return _CACHE[key]


@pytest.mark.parametrize("mask_name", MASKS)
@pytest.mark.parametrize("model_name", list(MODELS))
def test_masked_compacted_reloaded_logits(model_name, mask_name, tmp_path_factory):
    dense, mask, masked, compacted, record, reloaded = _prepared(model_name, mask_name, tmp_path_factory)
    ids, att = _inputs()
    ref = _logits(masked, ids, att)
    assert (ref - _logits(dense, ids, att)).abs().max() > 20 * TOL, "the mask changed nothing"
    torch.testing.assert_close(_logits(compacted, ids, att), ref, atol=TOL, rtol=0)
    torch.testing.assert_close(_logits(reloaded, ids, att), ref, atol=TOL, rtol=0)

    # the compacted structure is what the mask says
    e = mask.effective()
    kept_layers = e.layer[:, 0].nonzero().flatten().tolist()
    assert len(reloaded.model.layers) == len(kept_layers) == reloaded.config.num_hidden_layers
    assert [r["source_layer"] for r in record["layers"]] == kept_layers
    hd = adapter_for(dense).geometry.head_dim
    for new_idx, src in enumerate(kept_layers):
        for model in (compacted, reloaded):
            layer = model.model.layers[new_idx]
            nq, nkv, nc = int(e.q_head[src].sum()), int(e.kv_group[src].sum()), int(e.mlp_channel[src].sum())
            if nq == 0:
                assert isinstance(layer.self_attn, EmptyAttention)
            else:
                assert layer.self_attn.q_proj.out_features == nq * hd
                assert layer.self_attn.k_proj.out_features == nkv * hd
                assert layer.self_attn.o_proj.in_features == nq * hd
                assert layer.self_attn.layer_idx == new_idx
            if nc == 0:
                assert isinstance(layer.mlp, EmptyMLP)
            else:
                assert layer.mlp.down_proj.in_features == nc


# When every head of a kept layer is removed, compaction swaps in EmptyAttention and Qwen3's
# q_norm/k_norm go with the attention module; kept_parameter_count must not count them.
def _count_cases():
    for model_name in MODELS:
        for mask_name in MASKS:
            yield pytest.param(model_name, mask_name, id=f"{model_name}-{mask_name}")


@pytest.mark.parametrize("model_name,mask_name", list(_count_cases()))
def test_kept_parameter_count_matches_compacted(model_name, mask_name, tmp_path_factory):
    dense, mask, masked, compacted, record, reloaded = _prepared(model_name, mask_name, tmp_path_factory)
    adapter = adapter_for(dense)
    expected = kept_parameter_count(adapter, mask, unit_costs(adapter))
    assert adapter_for(compacted).parameter_count() == expected
    assert adapter_for(reloaded).parameter_count() == expected
    assert expected < adapter.parameter_count()


@pytest.mark.parametrize("mask_name", ["q_uneven", "attn_all", "layer_ends", "mixed"])
@pytest.mark.parametrize("model_name", ["qwen3_h6_kv3", "qwen3_h8_kv2", "qwen2_bias", "llama_gqa", "gemma3_sliding"])
def test_greedy_generation_with_cache(model_name, mask_name, tmp_path_factory):
    """Cached decoding of the reloaded model (kv_index gathers, EmptyAttention in the cache -- in
    'attn_all' the *first* layer has no heads, so it is the cache layer transformers reads lengths
    from) gives the masked model's tokens and per-step logits, with a left-padded row."""
    dense, mask, masked, compacted, record, reloaded = _prepared(model_name, mask_name, tmp_path_factory)
    ids, att = _inputs()
    kw = dict(input_ids=ids, attention_mask=att, max_new_tokens=6, min_new_tokens=6, do_sample=False,
              pad_token_id=0, return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        ref = masked.generate(**kw, use_cache=True)
        got = reloaded.generate(**kw, use_cache=True)
        nocache = reloaded.generate(**kw, use_cache=False)
    assert ref.sequences.shape == (2, ids.shape[1] + 6)
    assert torch.equal(got.sequences, ref.sequences)
    assert torch.equal(nocache.sequences, ref.sequences)
    for a, b, c in zip(ref.logits, got.logits, nocache.logits):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=0)
        torch.testing.assert_close(c, a, atol=1e-4, rtol=0)


# --------------------------------------------------------------------------------------------------
# FLAP-style bias compensation
# --------------------------------------------------------------------------------------------------

def test_added_output_biases_survive_compaction_and_reload(tmp_path):
    dense = _perturb(tiny_qwen3(seed=5, heads=6, kv=3, head_dim=8, hidden=32))
    adapter = adapter_for(dense)
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for i in range(4):
            for lin in (adapter.attention_parts(i).o, adapter.mlp_parts(i).down):
                assert lin.bias is None
                b = DecoderAdapter.ensure_bias(lin)
                assert b is lin.bias and torch.equal(b, torch.zeros(32))
                b.copy_(0.5 * torch.randn(32, generator=gen))
    assert DecoderAdapter.ensure_bias(adapter.attention_parts(0).o) is adapter.attention_parts(0).o.bias  # idempotent
    g = adapter.geometry
    mask = MaskSet.full(g)
    mask.q_head[0, [0, 3]] = False  # uneven groups, o_proj keeps its bias
    mask.q_head[1, :] = False  # EmptyAttention: only the o_proj bias remains
    mask.mlp_channel[2, :] = False  # EmptyMLP: only the down_proj bias remains
    mask.layer[3] = False  # removed layer: its biases go too

    masked = copy.deepcopy(dense)
    apply_mask(adapter_for(masked), mask)
    assert torch.count_nonzero(adapter_for(masked).attention_parts(3).o.bias) == 0
    assert torch.count_nonzero(adapter_for(masked).attention_parts(1).o.bias) == 32

    compacted, record = compacted_copy(dense, mask)
    save_pruned(compacted, record, tmp_path / "m")
    reloaded = load_pruned(tmp_path / "m")
    assert isinstance(reloaded.model.layers[1].self_attn, EmptyAttention)
    torch.testing.assert_close(reloaded.model.layers[1].self_attn.o_bias.detach(), adapter.attention_parts(1).o.bias.detach())
    assert isinstance(reloaded.model.layers[2].mlp, EmptyMLP)
    torch.testing.assert_close(reloaded.model.layers[2].mlp.down_bias.detach(), adapter.mlp_parts(2).down.bias.detach())
    torch.testing.assert_close(reloaded.model.layers[0].self_attn.o_proj.bias.detach(), adapter.attention_parts(0).o.bias.detach())

    ids, att = _inputs()
    ref = _logits(masked, ids, att)
    torch.testing.assert_close(_logits(compacted, ids, att), ref, atol=TOL, rtol=0)
    torch.testing.assert_close(_logits(reloaded, ids, att), ref, atol=TOL, rtol=0)

    # the biases matter: without them the pruned model computes something else
    nobias = copy.deepcopy(masked)
    with torch.no_grad():
        adapter_for(nobias).attention_parts(1).o.bias.zero_()
    assert (_logits(nobias, ids, att) - ref).abs().max() > 20 * TOL

    with torch.no_grad():
        kw = dict(input_ids=ids, attention_mask=att, max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
        assert torch.equal(reloaded.generate(**kw), masked.generate(**kw))


@pytest.mark.parametrize("empty_attention", [False, True])
def test_kept_parameter_count_with_added_output_biases(empty_attention):
    dense = tiny_qwen3(seed=5, heads=6, kv=3, head_dim=8, hidden=32)
    adapter = adapter_for(dense)
    for i in range(4):
        DecoderAdapter.ensure_bias(adapter.attention_parts(i).o)
        DecoderAdapter.ensure_bias(adapter.mlp_parts(i).down)
    mask = MaskSet.full(adapter.geometry)
    mask.q_head[0, [0, 3]] = False
    mask.mlp_channel[2, :] = False  # EmptyMLP keeps the down_proj bias
    mask.layer[3] = False  # both biases go with the layer
    if empty_attention:
        mask.q_head[1, :] = False  # EmptyAttention keeps the o_proj bias
    compacted, _ = compacted_copy(dense, mask)
    assert adapter_for(compacted).parameter_count() == kept_parameter_count(adapter, mask, unit_costs(adapter))


# --------------------------------------------------------------------------------------------------
# saved format
# --------------------------------------------------------------------------------------------------

def test_saved_folder_contents(tmp_path):
    dense = tiny_qwen3(seed=0)
    mask = _mask(adapter_for(dense).geometry, "mixed")
    compacted, record = compacted_copy(dense, mask)
    save_pruned(compacted, record, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} >= {"config.json", "model.safetensors", PRUNING_FILE}
    saved = json.loads((tmp_path / PRUNING_FILE).read_text())
    assert saved == json.loads(json.dumps(record))
    assert json.loads((tmp_path / "config.json").read_text())["num_hidden_layers"] == 3
    assert [r["source_layer"] for r in saved["layers"]] == [0, 1, 3]
    assert saved["layers"][0]["kv_index"] == [0, 1, 1, 2, 2]  # head 0 gone: uneven groups
    assert saved["layers"][1]["num_heads"] == 0
    assert saved["layers"][2]["intermediate_size"] == 0 and saved["layers"][2]["num_kv_heads"] == 2
    assert saved["layers"][2]["kv_index"] is None  # 4 heads over 2 KV heads, even


def test_load_pruned_requires_pruning_file(tmp_path):
    with pytest.raises(RespError):
        load_pruned(tmp_path)
    tiny_qwen3(seed=0).save_pretrained(tmp_path / "dense")  # a plain hub-style model is not a pruned one
    with pytest.raises(RespError):
        load_pruned(tmp_path / "dense")


def test_load_pruned_rejects_unknown_format(tmp_path):
    dense = tiny_qwen3(seed=0)
    compacted, record = compacted_copy(dense, MaskSet.full(adapter_for(dense).geometry))
    save_pruned(compacted, dict(record, format=999), tmp_path)
    with pytest.raises(RespError):
        load_pruned(tmp_path)


# --------------------------------------------------------------------------------------------------
# MaskSet semantics and io
# --------------------------------------------------------------------------------------------------

GEO = Geometry(num_layers=3, hidden_size=8, num_heads=6, num_kv_heads=3, head_dim=4, intermediate_size=5)


def test_full_mask_shapes():
    m = MaskSet.full(GEO)
    assert m.kv_group.shape == (3, 3) and m.q_head.shape == (3, 6)
    assert m.mlp_channel.shape == (3, 5) and m.layer.shape == (3, 1)
    assert all(t.dtype == torch.bool and bool(t.all()) for t in m.tensors().values())
    assert m.effective() == m


def test_effective_dead_kv_group_kills_its_query_heads():
    m = MaskSet.full(GEO)
    m.kv_group[0, 1] = False
    e = m.effective()
    assert e.q_head[0].tolist() == [True, True, False, False, True, True]
    assert e.kv_group[0].tolist() == [True, False, True]
    assert bool(e.q_head[1:].all()) and bool(e.kv_group[1:].all())
    assert m.q_head[0].all()  # effective() does not modify the mask itself


def test_effective_kv_head_without_query_heads_is_dead():
    m = MaskSet.full(GEO)
    m.q_head[1, [4, 5]] = False
    m.q_head[1, 0] = False  # group 0 still has head 1
    e = m.effective()
    assert e.kv_group[1].tolist() == [True, True, False]
    assert e.q_head[1].tolist() == [False, True, True, True, False, False]
    assert m.kv_group[1].all()


def test_effective_dead_layer_kills_everything_in_it():
    m = MaskSet.full(GEO)
    m.layer[2] = False
    e = m.effective()
    assert not e.q_head[2].any() and not e.kv_group[2].any() and not e.mlp_channel[2].any()
    assert e.q_head[:2].all() and e.mlp_channel[:2].all()
    assert e.summary() == {"q_heads_kept": [6, 6, 0], "kv_heads_kept": [3, 3, 0],
                           "mlp_channels_kept": [5, 5, 0], "layers_kept": [True, True, False]}


def test_is_subset_of():
    full = MaskSet.full(GEO)
    a = full.clone()
    a.q_head[0, 2] = False
    b = a.clone()
    b.mlp_channel[1, 3] = False
    assert b.is_subset_of(a) and a.is_subset_of(full) and b.is_subset_of(full)
    assert not a.is_subset_of(b) and not full.is_subset_of(a)
    assert a.is_subset_of(a)
    # removing a KV group and removing all its query heads are the same effective mask
    via_kv, via_q = full.clone(), full.clone()
    via_kv.kv_group[2, 0] = False
    via_q.q_head[2, [0, 1]] = False
    assert via_kv.is_subset_of(via_q) and via_q.is_subset_of(via_kv)
    assert via_kv != via_q  # ... although the raw masks differ
    # disjoint removals are not nested
    c = full.clone()
    c.mlp_channel[2, 0] = False
    assert not c.is_subset_of(a) and not a.is_subset_of(c)
    # a removed layer contains every removal inside it
    dead = full.clone()
    dead.layer[0] = False
    assert dead.is_subset_of(a)
    assert not a.is_subset_of(dead)


def test_clone_is_independent():
    a = MaskSet.full(GEO)
    b = a.clone()
    b.q_head[0, 0] = False
    b["mlp_channel"][1, 1] = False  # __getitem__ returns the live tensor
    assert bool(a.q_head.all()) and bool(a.mlp_channel.all())
    assert not bool(b.mlp_channel[1, 1])
    assert a != b


def test_maskset_save_load_roundtrip(tmp_path):
    gen = torch.Generator().manual_seed(0)
    m = MaskSet(GEO, {
        "kv_group": torch.rand(3, 3, generator=gen) > 0.3,
        "q_head": torch.rand(3, 6, generator=gen) > 0.3,
        "mlp_channel": torch.rand(3, 5, generator=gen) > 0.5,
        "layer": torch.tensor([True, False, True]),
    })
    path = tmp_path / "mask.safetensors"
    m.save(path, metadata={"step": 3, "sparsity": 0.25})
    back = MaskSet.load(path, GEO)
    assert back == m
    assert back.layer.shape == (3, 1)
    assert all(t.dtype == torch.bool for t in back.tensors().values())
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["step"] == "3" and meta["sparsity"] == "0.25" and meta["geometry.num_heads"] == "6"


# --------------------------------------------------------------------------------------------------
# costs and sparsity by hand
# --------------------------------------------------------------------------------------------------

def test_unit_costs_by_hand():
    model = tiny_qwen3(seed=0, heads=6, kv=3, head_dim=8, hidden=32, inter=48)
    c = unit_costs(adapter_for(model))
    per_q, kv_only, ch = 2 * 32 * 8, 2 * 32 * 8, 3 * 32
    assert torch.all(c["q_head"] == per_q)
    assert torch.all(c["kv_group"] == 2 * per_q + kv_only)
    assert torch.all(c["mlp_channel"] == ch)
    assert torch.all(c["layer"] == 6 * per_q + 3 * kv_only + 48 * ch)

    biased = adapter_for(_qwen2())  # q/k/v biases, hd = 8, hidden 48, 3 heads per group
    c = unit_costs(biased)
    per_q = 2 * 48 * 8 + 8
    assert torch.all(c["q_head"] == per_q)
    assert torch.all(c["kv_group"] == 3 * per_q + 2 * 48 * 8 + 2 * 8)
    layer = sum(p.numel() for n, p in biased.layers[0].named_parameters() if "norm" not in n)
    assert torch.all(c["layer"] == layer)


def test_sparsity_of_by_hand():
    model = tiny_qwen3(seed=0, layers=4, heads=6, kv=3, head_dim=8, hidden=32, inter=48)
    adapter = adapter_for(model)
    structures = build_structures(adapter, StructureSpec(protected_layers=(0,)))
    per_q = kv_only = 2 * 32 * 8
    layer = 6 * per_q + 3 * kv_only + 48 * 96
    assert structures.prunable_parameter_total() == 3 * layer
    mask = MaskSet.full(adapter.geometry)
    assert sparsity_of(mask, structures) == 0.0
    mask.q_head[1, 2] = False  # group 1 keeps head 3: one query head
    mask.q_head[1, [4, 5]] = False  # group 2 loses both heads: two query heads and its k/v rows
    mask.kv_group[2, 0] = False  # two query heads + k/v rows
    mask.mlp_channel[2, :10] = False
    mask.layer[3] = False
    removed = per_q + (2 * per_q + kv_only) + (2 * per_q + kv_only) + 10 * 96 + layer
    assert sparsity_of(mask, structures) == pytest.approx(removed / (3 * layer), rel=1e-9)
    # kept_parameter_count agrees with the same hand count (layer 3's norms go too)
    norms3 = sum(p.numel() for n, p in adapter.layers[3].named_parameters() if "norm" in n)
    assert kept_parameter_count(adapter, mask, unit_costs(adapter)) == adapter.parameter_count() - removed - norms3
