"""Sampled accuracy of a (dense or pruned) testbed model on held-out problems."""

from __future__ import annotations

from pathlib import Path

from ..interfaces import Progress


def load_any(model: str, dtype: str = "float32", device: str | None = None):
    """'testbed', a pruned RESP folder, or a plain transformers folder -> (model, tokenizer)."""
    from transformers import AutoTokenizer

    from ..loading import load_model_and_tokenizer
    from ..model_source import model_dir
    from ..model.pruned_model import is_pruned_dir, load_pruned
    from ..recipe import ModelSection

    if model != "testbed" and is_pruned_dir(Path(model)):
        tok = AutoTokenizer.from_pretrained(model)
        tok.padding_side = "left"
        import torch

        m = load_pruned(model).to(dtype=getattr(torch, dtype))
        return (m.to(device) if device else m), tok
    model_dir(model)
    return load_model_and_tokenizer(ModelSection(path=model, dtype=dtype, **({"device": device} if device else {})))


def evaluate_testbed(model: str, num: int, temperature: float, seed: int, progress: Progress | None = None,
                     batch_size: int = 250) -> dict:
    """``task_accuracy``'s loop on the testbed task: ``num`` test problems chosen by ``seed``,
    sampled once with ``seed`` at ``temperature`` (200 new tokens)."""
    from resp_plugins.calibration.self_generated import SamplingSettings
    from resp_plugins.evaluators.task_accuracy import measure
    from resp_plugins.generators.hf import HFGenerator
    from resp_plugins.tasks.testbed_arith import TestbedArithmetic

    m, tok = load_any(model)
    gen = HFGenerator(HFGenerator.Params(batch_size=batch_size))
    gen.bind(m, tok)
    task = TestbedArithmetic()
    res = measure(task, gen, "test", num, seed, [seed],
                  SamplingSettings(temperature=temperature, max_new_tokens=200), progress, ci=False)
    name = task.name
    return {
        "accuracy": res.metrics[f"{name}/accuracy"],
        "finished": res.metrics[f"{name}/finished"],
        "mean_tokens": res.metrics[f"{name}/mean_tokens"],
        "completions": [r["completion"] for r in res.records],
    }
