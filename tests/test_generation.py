"""The shared sampling loop (resp_core.generation): tokenizer left padding, batching, seeding."""

from __future__ import annotations

import copy

import pytest

from resp_core.generation import left_pad, length_sorted_batches, sample
from resp_core.interfaces import SamplingParams
from resp_plugins.generators.hf import HFGenerator

from conftest import tiny_qwen3


def _model(tok):
    m = tiny_qwen3(vocab=len(tok))
    m.config.eos_token_id = m.generation_config.eos_token_id = tok.eos_token_id
    m.config.pad_token_id = m.generation_config.pad_token_id = tok.pad_token_id
    return m


def test_left_pad_is_the_tokenizers_own(testbed_tokenizer):
    tok = copy.deepcopy(testbed_tokenizer)
    tok.padding_side = "right"  # the helper pads left whatever the tokenizer's default
    ids, att = left_pad(tok, [[5, 6, 7], [8]])
    assert ids.tolist() == [[5, 6, 7], [tok.pad_token_id, tok.pad_token_id, 8]]
    assert att.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert tok.padding_side == "right"
    # no pad token: EOS pads, and the tokenizer is left as it was
    tok.pad_token = None
    ids, att = left_pad(tok, [[5, 6], [8]])
    assert ids.tolist() == [[5, 6], [tok.eos_token_id, 8]] and att.tolist() == [[1, 1], [0, 1]]
    assert tok.pad_token is None


def test_length_sorted_batches():
    assert length_sorted_batches([3, 1, 2, 1], 2) == [[1, 3], [2, 0]]
    assert length_sorted_batches([], 4) == []
    with pytest.raises(ValueError):
        length_sorted_batches([1], 0)


def test_generate_text_equals_generate_on_the_rendered_prompt(testbed_tokenizer):
    tok = testbed_tokenizer
    model = _model(tok)
    gen = HFGenerator(HFGenerator.Params(batch_size=2))
    gen.bind(model, tok)
    convs = [[{"role": "user", "content": f"What is {k} + {k}?" + " 1" * k}] for k in range(5)]
    s = SamplingParams(temperature=0.7, max_new_tokens=5, seed=3)
    a = gen.generate(convs, s)
    texts = [gen.prompt_text(c, True) for c in convs]
    b = gen.generate_text(texts, s)
    assert [(x.prompt_ids, x.completion_ids, x.text) for x in a] == [(x.prompt_ids, x.completion_ids, x.text) for x in b]
    # the loop itself, on token ids: same completions, input order kept
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    c = sample(model, tok, ids, s, batch_size=2)
    assert [x.completion_ids for x in c] == [x.completion_ids for x in a]
    assert all(x.prompt_ids == p for x, p in zip(c, ids))
    assert model.training is False


def test_sample_restores_training_mode(testbed_tokenizer):
    tok = testbed_tokenizer
    model = _model(tok).train()
    sample(model, tok, [[5, 6]], SamplingParams(do_sample=False, max_new_tokens=2), batch_size=1)
    assert model.training is True
