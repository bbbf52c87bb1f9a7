"""Generation backend and calibration sources (self-generated traces, task data)."""

from __future__ import annotations

import json

import torch

from resp_core.interfaces import CalibrationSample, CalibrationSet, Completion, Generator, Progress, RunContext, SamplingParams
from resp_core.model.adapter import adapter_for
from resp_core.model.structures import StructureSpec, build_structures
from resp_plugins.calibration.self_generated import SelfGenerated
from resp_plugins.calibration.task_data import TaskData
from resp_plugins.generators.hf import HFGenerator
from resp_plugins.tasks import testbed_arith

from conftest import tiny_generation_model


def test_hf_generator_is_seeded_batched_and_ordered(testbed_tokenizer):
    tok = testbed_tokenizer
    tok.padding_side = "left"
    model = tiny_generation_model(tok)
    gen = HFGenerator(HFGenerator.Params(batch_size=3))
    gen.bind(model, tok)
    convs = [[{"role": "user", "content": "What is " + "1 + " * k + "2?"}] for k in range(7)]
    s = SamplingParams(temperature=0.8, max_new_tokens=6, seed=11)
    a = gen.generate(convs, s)
    b = gen.generate(convs, s)
    assert [c.completion_ids for c in a] == [c.completion_ids for c in b]
    c = gen.generate(convs, SamplingParams(temperature=0.8, max_new_tokens=6, seed=12))
    assert [x.completion_ids for x in a] != [x.completion_ids for x in c]
    # results are in input order: prompt ids match each conversation's own chat-template encoding
    for conv, comp in zip(convs, a):
        text = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True, enable_thinking=True)
        assert comp.prompt_ids == tok(text, add_special_tokens=False)["input_ids"]
        assert len(comp.completion_ids) <= 6
    # greedy batched == greedy one by one (left padding handled)
    g = SamplingParams(do_sample=False, max_new_tokens=5)
    batched = gen.generate(convs, g)
    single = HFGenerator(HFGenerator.Params(batch_size=1))
    single.bind(model, tok)
    alone = single.generate(convs, g)
    assert [x.completion_ids for x in batched] == [x.completion_ids for x in alone]
    # thinking switch reaches the template
    off = gen.generate(convs[:1], SamplingParams(max_new_tokens=2, enable_thinking=False))
    assert tok.decode(off[0].prompt_ids).endswith("<think>\n\n</think>\n\n")


class ScriptedGenerator(Generator):
    """Answers from a script: a list of answers per call, in prompt order."""

    def __init__(self, tok, script):
        self.tok, self.script, self.calls = tok, list(script), []

    def generate(self, conversations, sampling, progress=None, description=""):
        answers = self.script.pop(0)
        self.calls.append((len(conversations), sampling.seed))
        out = []
        for conv, ans in zip(conversations, answers):
            text = f"<think>\nsteps\n</think>\n\nThe answer is {ans}."
            out.append(Completion(self.tok(conv[0]["content"])["input_ids"], self.tok(text)["input_ids"], text, True))
        return out


def _ctx(tok, generator, seed=0):
    model = tiny_generation_model(tok)
    adapter = adapter_for(model)
    task = testbed_arith.TestbedArithmetic()
    return RunContext(model=model, tokenizer=tok, adapter=adapter, structures=build_structures(adapter, StructureSpec()),
                      generator=generator, tasks=lambda name=None, params=None: task, seed=seed, progress=Progress()), task


def test_self_generated_require_correct_resamples_and_falls_back(testbed_tokenizer):
    tok = testbed_tokenizer
    src = SelfGenerated(SelfGenerated.Params(num_samples=3, require_correct=True, max_attempts=2))
    gen = ScriptedGenerator(tok, [])
    ctx, task = _ctx(tok, gen)
    items = task.items("train", 3, 0)
    gold = [int(it.answer) for it in items]
    # first generation: item 0 right, 1 wrong then right, 2 wrong twice (no previous trace)
    gen.script = [[gold[0], -1, -1], [gold[1], -2]]
    samples = src.build(ctx)
    assert gen.calls[0][0] == 3 and gen.calls[1][0] == 2  # only wrong ones are resampled
    assert [s.meta["correct"] for s in samples] == [True, True, False]
    assert samples[1].meta["attempts"] == 2
    assert samples[2].meta["fallback"] == "kept_wrong_trace"
    # regeneration of everything: item 0 now wrong twice -> falls back to its last good trace
    gen.script = [[-5, gold[1], gold[2]], [-6]]
    regen = src.regenerate(ctx, samples, 1.0)
    assert regen[0].meta["fallback"] == "previous_correct_trace"
    assert regen[0].target_ids == samples[0].target_ids
    assert regen[1].meta["correct"] and regen[2].meta["correct"]
    assert regen[1].meta["generation"] == 1


def test_regenerate_fraction_replaces_that_many(testbed_tokenizer):
    tok = testbed_tokenizer
    src = SelfGenerated(SelfGenerated.Params(num_samples=10))
    gen = ScriptedGenerator(tok, [[1] * 10])
    ctx, _ = _ctx(tok, gen)
    samples = src.build(ctx)
    gen.script = [[2] * 10]
    regen = src.regenerate(ctx, samples, 0.4)
    changed = [a.target_ids != b.target_ids for a, b in zip(samples, regen)]
    assert sum(changed) == 4 and gen.calls[-1][0] == 4
    assert src.regenerate(ctx, regen, 0.0) is regen


def test_trace_cache_roundtrip(testbed_tokenizer, tmp_path):
    tok = testbed_tokenizer
    params = SelfGenerated.Params(num_samples=4, cache_dir=str(tmp_path))
    gen = ScriptedGenerator(tok, [[7, 8, 9, 10]])
    ctx, _ = _ctx(tok, gen)
    first = SelfGenerated(params).build(ctx)
    files = list(tmp_path.glob("traces-*.jsonl"))
    assert len(files) == 1
    header = json.loads(files[0].read_text().splitlines()[0])
    assert {"fingerprint", "sampling", "seed", "prompts"} <= set(header)
    gen2 = ScriptedGenerator(tok, [])  # must not be called
    ctx.generator = gen2
    second = SelfGenerated(params).build(ctx)
    assert [s.target_ids for s in second] == [s.target_ids for s in first] and gen2.calls == []


def test_task_data_masks_prompt_for_decode_loss(testbed_tokenizer):
    tok = testbed_tokenizer
    ctx, task = _ctx(tok, None)
    samples = TaskData(TaskData.Params(num_samples=3)).build(ctx)
    items = task.items("train", 3, 0)
    for s, it in zip(samples, items):
        assert tok.decode(s.target_ids) == it.reference + "<|im_end|>"
        assert tok.decode(s.prompt_ids).endswith("<|im_start|>assistant\n")  # thinking mode (gold-thinking)
    calib = CalibrationSet(samples, tok.pad_token_id)
    batch = next(calib.batches(3, "decode"))
    for row, s in zip(range(3), samples):
        labels = batch.labels[row]
        assert (labels[: len(s.prompt_ids)] == -100).all()
        assert labels[len(s.prompt_ids): len(s.prompt_ids) + len(s.target_ids)].tolist() == s.target_ids
    full = next(calib.batches(3, "full"))
    assert (full.labels[0, : len(samples[0].prompt_ids)] != -100).all()
    assert calib.target_token_count("decode") == sum(len(s.target_ids) for s in samples)
