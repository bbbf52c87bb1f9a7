"""Loading the model and tokenizer a recipe names.

``model.path`` is one of:

* ``testbed`` — the shipped testbed model;
* a local Hugging Face folder (``config.json``, tokenizer files, ``*.safetensors``);
* a hub id (``org/name``), read through the local cache or the hub;
* a GGUF file (``path/to/model.gguf``), or a folder / hub id together with ``model.gguf_file``.
  GGUF weights are dequantized by transformers' own GGUF support
  (``from_pretrained(folder, gguf_file=NAME)``; needs the ``gguf`` and ``accelerate`` packages,
  ``pip install 'resp-pruning[gguf]'``), to ``model.dtype``.  ``respctl convert`` writes such a model as a
  normal safetensors folder, which loads faster and anywhere.

Every problem is one :class:`RespError` line naming the field: a missing or empty folder, one
without tokenizer files, a random-byte or truncated ``model.safetensors``, a GGUF file that is
truncated or of an architecture transformers or the adapter does not know, a missing ``gguf``
package.  The cheap checks (no weight read) run first; a failure of transformers' own loading is
reported with its first line.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import RespError
from .model_source import TESTBED_MODEL, ModelSource, first_line, model_source
from .preflight import already_checked, check_model
from .recipe import ModelSection

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _preflight(section: ModelSection, source: ModelSource) -> None:
    """The checks ``respctl validate`` runs (config, tokenizer files, safetensors headers of a
    folder; a hub id in the cache or on the hub), and, where the hub cannot be reached, the hub
    libraries switched to the local cache so that nothing waits on retries."""
    if Path(source.location).is_dir():
        if not source.gguf_file and not already_checked(section):
            check_model(section.model_copy(update={"path": source.location}) if section.path != TESTBED_MODEL
                        else section)
        return
    if not source.gguf_file and not already_checked(section):
        check_model(section)  # a hub id: cached, or offline in one line, or looked up once
    from .hub import offline_reason, use_cache_only

    if offline_reason():
        use_cache_only()


def load_model_and_tokenizer(section: ModelSection, device: str | None = None):
    """The recipe's model (eval mode, on ``device`` or ``section.device``) and its tokenizer
    (left padding, a pad token)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .model.adapter import check_supported

    source = model_source(section.path, getattr(section, "gguf_file", None))
    _preflight(section, source)
    kwargs = {"revision": section.revision}
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.location, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source.location, dtype=DTYPES[section.dtype], **kwargs)
    except RespError:
        raise
    except Exception as exc:  # transformers, safetensors, gguf and tokenizers each raise their own types
        raise RespError(f"model.path: cannot load {source.label!r}: {first_line(exc)}") from None
    check_supported(getattr(model.config, "model_type", None), f"model.path: {source.label}")
    check_finite_weights(model, f"model.path: {source.label}")
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device or section.device)
    model.eval()
    return model, tokenizer


def check_finite_weights(model, where: str) -> None:
    """Every floating-point parameter and buffer is finite; else one line naming the first tensor
    that is not (found at load, before generation samples from NaN probabilities)."""
    import torch

    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise RespError(f"{where}: tensor {name!r} holds {bad:,} NaN or infinite value{'s' if bad > 1 else ''}; "
                            "the weights are corrupt")


def convert(section: ModelSection, out: Path) -> dict:
    """Write the model ``section`` names (a GGUF file, a hub id, a folder) as a normal safetensors
    Hugging Face folder at ``out`` (which must not exist).  Returns what was written."""
    import time

    from .model.saving import config_json, write_model_folder

    out = Path(out)
    if out.exists():
        raise RespError(f"{out} already exists; choose another output folder (nothing was written)")
    started = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer(section, device="cpu")
    loaded = time.perf_counter() - started
    # transformers marks a GGUF-loaded model as quantized and will not save_pretrained it; the
    # dequantized tensors are written as they are, with a plain config
    write_model_folder(out, config_json(model.config, type(model).__name__), model.state_dict(), tokenizer,
                       model.generation_config)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    return {"out": str(out), "bytes": size, "load_seconds": loaded,
            "parameters": sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()),
            "model_type": model.config.model_type, "dtype": section.dtype}
