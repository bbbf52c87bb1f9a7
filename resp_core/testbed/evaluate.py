"""Sampled accuracy of a (dense or pruned) testbed model on held-out problems."""

from __future__ import annotations

from pathlib import Path

from ..interfaces import Progress, SamplingParams


def load_any(model: str):
    """'testbed', a pruned RESP folder, or a plain transformers folder -> (model, tokenizer)."""
    from transformers import AutoTokenizer

    from ..loading import load_model_and_tokenizer, model_dir
    from ..model.compaction import is_pruned_dir, load_pruned
    from ..recipe import ModelSection

    if model != "testbed" and is_pruned_dir(Path(model)):
        tok = AutoTokenizer.from_pretrained(model)
        tok.padding_side = "left"
        return load_pruned(model), tok
    model_dir(model)
    return load_model_and_tokenizer(ModelSection(path=model))


def evaluate_testbed(model: str, num: int, temperature: float, seed: int, progress: Progress | None = None,
                     batch_size: int = 250) -> dict:
    from resp_plugins.generators.hf import HFGenerator
    from resp_plugins.tasks.testbed_arith import TestbedArithmetic

    m, tok = load_any(model)
    gen = HFGenerator(HFGenerator.Params(batch_size=batch_size))
    gen.bind(m, tok)
    task = TestbedArithmetic()
    items = task.items("test", num, seed)
    sampling = SamplingParams(temperature=temperature, do_sample=temperature > 0, max_new_tokens=200, seed=seed)
    comps = gen.generate([it.messages for it in items], sampling, progress, "Evaluating testbed")
    correct = [task.is_correct(c.text, it) for c, it in zip(comps, items)]
    return {
        "accuracy": sum(correct) / len(items),
        "finished": sum(c.finished for c in comps) / len(items),
        "mean_tokens": sum(len(c.completion_ids) for c in comps) / len(items),
        "completions": [c.text for c in comps],
    }
