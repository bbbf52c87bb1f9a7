"""Writing a compacted model as a Hugging Face folder (``config.json``, ``model.safetensors``,
``resp_pruning.json``, generation config, tokenizer), atomically and one tensor at a time."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..safetensors_io import write_safetensors_streaming
from .compaction import compacted_state
from .masks import MaskSet
from .pruned_model import PRUNING_FILE, WEIGHTS_FILE, pruned_config


def _dedup_tied(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop later names of tensors that share storage (a tied output head), as transformers saves them."""
    seen, out = set(), {}
    for name, t in state.items():
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)) if t.numel() else None
        if key is not None and key in seen:
            continue
        if key is not None:
            seen.add(key)
        out[name] = t
    return out


def write_model_folder(out_dir: Path, config_dict: dict, state: dict[str, torch.Tensor], tokenizer=None,
                       generation_config=None, extra_json: dict[str, dict] | None = None) -> None:
    """A Hugging Face model folder from a config dict and a state dict, written atomically (the
    folder appears whole or not at all); tied tensors are stored once, as transformers does."""
    from ..atomic_io import atomic_dir

    with atomic_dir(Path(out_dir)) as tmp:
        (tmp / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True, default=str) + "\n")
        for name, obj in (extra_json or {}).items():
            (tmp / name).write_text(json.dumps(obj, indent=2) + "\n")
        write_safetensors_streaming(tmp / WEIGHTS_FILE, _dedup_tied(state), {"format": "pt"})
        if generation_config is not None:
            generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)


def config_json(cfg, architecture: str | None = None) -> dict:
    """``cfg`` as config.json content: no load-time fields (path, attention choice, GGUF quantizer)."""
    d = cfg.to_dict()
    for k in ("_attn_implementation_autoset", "_name_or_path", "_attn_implementation", "quantization_config"):
        d.pop(k, None)
    if architecture:
        d["architectures"] = [architecture]
    return d


def save_state(out_dir: Path, base_config, record: dict, state: dict[str, torch.Tensor], tokenizer=None,
               generation_config=None) -> None:
    """Write a compacted state dict (from :func:`compacted_state`) as a ``resp_pruned_*`` folder."""
    cfg = pruned_config(base_config, record)
    write_model_folder(out_dir, config_json(cfg), state, tokenizer, generation_config, {PRUNING_FILE: record})


def save_pruned(model: nn.Module, record: dict, out_dir: Path, tokenizer=None) -> None:
    """Save a compacted model (from :func:`compact` or :func:`compacted_copy`) with its record."""
    save_state(out_dir, model.config, record, model.state_dict(), tokenizer, getattr(model, "generation_config", None))


def save_compacted(model: nn.Module, mask: MaskSet, out_dir: Path, tokenizer=None) -> dict:
    """Compact the masked ``model`` on the host and write it to ``out_dir``; ``model`` is untouched
    and no compacted model is built.  Returns the record."""
    state, record = compacted_state(model, mask, device="cpu")
    save_state(out_dir, model.config, record, state, tokenizer, getattr(model, "generation_config", None))
    return record
