"""Loading the model and tokenizer a recipe names: the shipped testbed, a local folder, or a hub id."""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import RespError
from .recipe import TESTBED_MODEL, ModelSection

TESTBED_DIR = Path(__file__).parent / "testbed" / "assets"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def model_dir(path: str) -> str:
    if path == TESTBED_MODEL:
        if not (TESTBED_DIR / "model.safetensors").is_file():
            raise RespError("the testbed model is missing; train it with `respctl testbed train`")
        return str(TESTBED_DIR)
    return path


def load_model_and_tokenizer(section: ModelSection):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = model_dir(section.path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, revision=section.revision)
        model = AutoModelForCausalLM.from_pretrained(path, revision=section.revision, dtype=DTYPES[section.dtype])
    except OSError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RespError(f"model.path: cannot load {section.path!r}: {first}") from None
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(section.device)
    model.eval()
    return model, tokenizer
