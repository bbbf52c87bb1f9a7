"""Shared fixtures: tiny random GQA models (fast) and the shipped testbed (integration)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests never touch the network: hub look-ups fail at once instead of retrying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def tiny_qwen3(seed: int = 0, vocab: int = 512, layers: int = 4, heads: int = 6, kv: int = 3, head_dim: int = 8,
               hidden: int = 32, inter: int = 48, bias: bool = False):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim,
                      max_position_embeddings=512, attention_bias=bias, tie_word_embeddings=True,
                      eos_token_id=2, pad_token_id=0)
    return Qwen3ForCausalLM(cfg).eval()


def tiny_generation_model(tok):
    """:func:`tiny_qwen3` sized to ``tok``'s vocabulary, with its EOS and pad ids in the config
    and generation config (what generate() reads)."""
    m = tiny_qwen3(vocab=len(tok))
    m.config.eos_token_id = tok.eos_token_id
    m.config.pad_token_id = tok.pad_token_id
    m.generation_config.eos_token_id = tok.eos_token_id
    m.generation_config.pad_token_id = tok.pad_token_id
    return m


@pytest.fixture(scope="session")
def testbed_tokenizer():
    from resp_core.testbed.tokenizer import build_tokenizer

    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, testbed_tokenizer):
    """A random-init 4-layer GQA Qwen3 with the testbed tokenizer, saved like a hub model."""
    out = tmp_path_factory.mktemp("tiny-model")
    model = tiny_qwen3(vocab=len(testbed_tokenizer))
    model.config.eos_token_id = testbed_tokenizer.eos_token_id
    model.config.pad_token_id = testbed_tokenizer.pad_token_id
    model.save_pretrained(out)
    testbed_tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def testbed_available():
    from resp_core.model_source import TESTBED_DIR

    if not (TESTBED_DIR / "model.safetensors").is_file():
        pytest.skip("testbed weights not present")
    return TESTBED_DIR
