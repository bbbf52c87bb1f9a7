"""LoRA through peft on a compacted model, and its merge back into the weights.

Adapters are injected with peft's ``LoraModel`` (``r``, ``lora_alpha``, ``lora_dropout``, the
projections named in ``target_modules``; no bias), as LLM-Pruner's post-training does
(horseee/LLM-Pruner, ``post_training.py``, ``main``: ``LoraConfig(r=8, lora_alpha=16,
lora_dropout=0.05, target_modules=q,k,v,o,gate,down,up)`` through ``get_peft_model``).  Unlike
LLM-Pruner, which saves the adapter beside the pruned model, RESP merges it: every export is a
plain model without adapters.

**The merge** is computed here, not by peft: for each adapted projection
W' = round_dtype(W_fp32 + s · B_fp32 @ A_fp32) with s = α / r, one rounding to the weights' dtype.
It is then checked:

* float32 models: the logits of the merged model and of the unmerged one (base + adapters) on the
  first calibration sequences differ by at most ``tolerance`` (default 1e-5) times the largest
  |logit| (at least 1), else the run stops with one line naming the largest difference.  The
  scale is float32's own: W·x + s·B(A·x) and (W + s·BA)·x round differently (on the testbed,
  2e-5 for logits of about 20), while an adapter left out or scaled wrongly moves logits by the
  size of its update;
* bfloat16 / float16 models (where the stored weight cannot hold the float32 sum): every merged
  weight must equal the float32 sum rounded once, bit for bit; the logit difference is recorded.
"""

from __future__ import annotations

import importlib.util

import torch

from ..errors import RespError, RunFailed

INSTALL_HINT = "pip install 'resp-pruning[recovery]' (or pip install 'peft>=0.21.2')"
ADAPTER = "default"


def peft_available() -> bool:
    return importlib.util.find_spec("peft") is not None


def require_peft(field: str) -> None:
    """One line when LoRA is asked for and peft is not installed."""
    if not peft_available():
        raise RespError(f"{field}: LoRA needs the peft package, which is not installed; {INSTALL_HINT}")


def add_lora(model, rank: int, alpha: float, dropout: float, targets: list[str]):
    """Inject LoRA adapters into ``model`` in place (peft's ``LoraModel``); returns the peft object.
    The caller seeds torch first (A is drawn at random, B starts at zero)."""
    require_peft("recovery.params.mode")
    from peft import LoraConfig, LoraModel

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets), bias="none")
    return LoraModel(model, config, ADAPTER)


def lora_layers(model) -> list[tuple[str, torch.nn.Module]]:
    from peft.tuners.lora import LoraLayer

    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]


def adapter_parameters(model) -> dict[str, torch.nn.Parameter]:
    """The adapters' parameters by name (what is trained and checkpointed)."""
    return {n: p for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n}


@torch.no_grad()
def _merged_weights(model) -> dict[str, torch.Tensor]:
    """name -> the merged weight (the weights' dtype) of every adapted projection."""
    out = {}
    for name, layer in lora_layers(model):
        base = layer.get_base_layer()
        a = layer.lora_A[ADAPTER].weight.float()
        b = layer.lora_B[ADAPTER].weight.float()
        delta = (b @ a) * float(layer.scaling[ADAPTER])
        out[name] = (base.weight.float() + delta.to(base.weight.device)).to(base.weight.dtype)
    return out


@torch.no_grad()
def _probe_logits(model, batch) -> torch.Tensor:
    device = next(model.parameters()).device
    logits = model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device)).logits
    return logits.float()[batch.attention_mask.to(device).bool()]


@torch.no_grad()
def merge_lora(peft_model, model, probe, tolerance: float) -> float:
    """Merge the adapters into ``model``'s weights, remove them, and check the merge (see the
    module docstring).  ``probe``: a batch of calibration sequences.  Returns the max |logit
    difference| between the merged and unmerged model."""
    was_training = model.training
    model.eval()
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    before = _probe_logits(model, probe)
    merged = _merged_weights(model)
    expected = {name: w.clone() for name, w in merged.items()} if dtype != torch.float32 else None
    peft_model.unload()  # the base projections back in place, adapters dropped
    for name, weight in merged.items():
        model.get_submodule(name).weight.data.copy_(weight)
    after = _probe_logits(model, probe)
    model.train(was_training)
    diff = float((before - after).abs().max())
    scale = max(1.0, float(before.abs().max()))
    if expected is not None:
        for name, w in expected.items():
            if not torch.equal(model.get_submodule(name).weight, w):
                raise RunFailed(f"recovery: the LoRA merge of {name} is not the float32 sum rounded once to {dtype}")
    elif not diff <= tolerance * scale:
        raise RunFailed(f"recovery: the merged model's logits differ from the unmerged model's by {diff:.3g} "
                        f"(more than merge_tolerance {tolerance:g} x the largest |logit| {scale:.3g}); the "
                        "adapters were not merged exactly")
    return diff


__all__ = ["INSTALL_HINT", "adapter_parameters", "add_lora", "lora_layers", "merge_lora", "peft_available",
           "require_peft"]
