"""The testbed: task generator, tokenizer/chat template, and the shipped model (integration)."""

from __future__ import annotations

import json
import random

import pytest

from resp_core.testbed import task


def test_problems_are_seeded_and_splits_disjoint():
    a = task.problems(0, 200, "train")
    assert a == task.problems(0, 200, "train")
    test = task.problems(0, 200, "test")
    assert set(a).isdisjoint(test)
    for p in a + test:
        assert task.MIN_STEPS <= len(p.operands) <= task.MAX_STEPS
        assert all(10 <= abs(b) <= 99 for b in p.operands)
        total = p.start
        for b in p.operands:
            total += b
            assert 0 <= total <= 99
        assert total == p.answer
        # additions first, then subtractions, is just as valid: no intermediate leaves [0, 99]
        adds = p.start + sum(b for b in p.operands if b > 0)
        assert adds <= 99 and adds + sum(b for b in p.operands if b < 0) == p.answer


def test_thinking_traces_vary_and_are_correct():
    p = task.Problem(17, (23, -15, 38))
    rng = random.Random(0)
    traces = {task.thinking_response(p, rng) for _ in range(50)}
    assert len(traces) > 10  # several orders, phrasings and optional checks
    for t in traces:
        assert t.startswith("<think>\n") and "</think>" in t
        assert task.extract_answer(t) == 63
    assert any("additions" in t or "add everything" in t for t in traces)
    assert any("Check:" in t for t in traces)
    ref = task.reference_solution(p)
    assert ref == "17+23=40, 40-15=25, 25+38=63 #### 63"
    assert task.extract_answer(ref) == 63


def test_answer_extraction():
    assert task.extract_answer("<think>\n1 + 2 = 3.\nThe answer is 5\n</think>\n\nThe answer is 3.") == 3
    assert task.extract_answer("<think>The answer is 3</think> nothing") is None
    assert task.extract_answer("12+3=15 #### 15") == 15
    assert task.extract_answer("") is None


def test_tokenizer_specials_and_chat_template(testbed_tokenizer):
    tok = testbed_tokenizer
    for special in ("<|im_start|>", "<|im_end|>", "<think>", "</think>", "<|endoftext|>"):
        ids = tok(special, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1, special
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    msgs = [{"role": "user", "content": "What is 12 + 30?"}]
    thinking = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, enable_thinking=True)
    plain = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert thinking == "<|im_start|>user\nWhat is 12 + 30?<|im_end|>\n<|im_start|>assistant\n"
    assert plain == thinking + "<think>\n\n</think>\n\n"
    # digits are single tokens; any text round-trips (byte-level fallback)
    pieces = tok.convert_ids_to_tokens(tok("1234", add_special_tokens=False)["input_ids"])
    assert len(pieces) == 4
    text = "Janet’s ducks lay 16 eggs — 3/4 of them π"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


def test_shipped_model_is_a_capable_reasoner(testbed_available):
    """The shipped weights answer held-out problems at temperature 0.6 (full bar: docs/testbed.md)."""
    from resp_core.testbed.evaluate import evaluate_testbed

    res = evaluate_testbed("testbed", num=100, temperature=0.6, seed=7)
    assert res["accuracy"] >= 0.9, res["accuracy"]
    assert res["finished"] >= 0.95
    thinking = [c for c in res["completions"] if c.startswith("<think>")]
    assert len(thinking) >= 90  # it reasons in thinking mode
    assert len(set(res["completions"])) > 80  # sampled traces differ


def test_shipped_model_metadata(testbed_available):
    record = json.loads((testbed_available / "training.json").read_text())
    assert record["settings"]["num_kv_heads"] < record["settings"]["num_heads"]  # GQA
    assert record["settings"]["num_layers"] >= 6
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(testbed_available)
    assert cfg.model_type == "qwen3" and cfg.head_dim == record["settings"]["head_dim"]


def test_masked_compacted_reloaded_testbed_agree(testbed_available, tmp_path):
    """Exactness on the shipped model: masked == compacted == reloaded logits (<= 1e-5)."""
    import torch

    from resp_core import load_pruned
    from resp_core.loading import load_model_and_tokenizer
    from resp_core.model.adapter import adapter_for
    from resp_core.model.compaction import compacted_copy
    from resp_core.model.saving import save_pruned
    from resp_core.model.masks import MaskSet, apply_mask
    from resp_core.recipe import ModelSection

    model, tok = load_model_and_tokenizer(ModelSection(path="testbed"))
    adapter = adapter_for(model)
    g = adapter.geometry
    mask = MaskSet.full(g)
    gen = torch.Generator().manual_seed(0)
    mask.mlp_channel[1:5] = torch.rand(4, g.intermediate_size, generator=gen) > 0.4
    mask.q_head[2, 0] = False  # uneven GQA grouping in layer 2
    mask.kv_group[3, 1] = False
    apply_mask(adapter, mask)
    compact, record = compacted_copy(model, mask)
    save_pruned(compact, record, tmp_path / "m", tok)
    reloaded = load_pruned(tmp_path / "m")
    texts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
             for q in ("What is 12 + 30 - 7?", "Compute 55 - 21 + 64 + 18.")]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        a = model(**enc).logits
        b = compact(**enc).logits
        c = reloaded(**enc).logits
    keep = enc["attention_mask"].bool()
    assert (a - b).abs()[keep].max() <= 1e-5
    assert (a - c).abs()[keep].max() <= 1e-5
    assert sum(p.numel() for p in reloaded.parameters()) < sum(p.numel() for p in model.parameters())
