"""The authors' protocol behind RESP's named options: GISP's gold-thinking data, Wanda-sp's
sequential statistics and packed windows, one-shot-per-target comparisons, ``init_from`` and
``mode: paper``.  Tiny random models and hand-checkable tensors."""

from __future__ import annotations

import torch

from resp_core.interfaces import CalibrationSample, CalibrationSet, Progress, RunContext
from resp_core.model.adapter import adapter_for
from resp_core.model.structures import StructureSpec, build_structures
from resp_plugins.calibration.self_generated import SelfGenerated
from resp_plugins.calibration.task_data import TaskData, pack_windows
from resp_plugins.generators.hf import HFGenerator
from resp_plugins.scorers.taylor import GISPScorer, TaylorScorer
from resp_plugins.tasks import testbed_arith

from conftest import tiny_qwen3


def _model(tok, seed=0):
    m = tiny_qwen3(seed=seed, vocab=len(tok))
    for cfg in (m.config, m.generation_config):
        cfg.eos_token_id, cfg.pad_token_id = tok.eos_token_id, tok.pad_token_id
    return m


def _ctx(tok, model=None, spec=None, generator=None):
    model = model or _model(tok)
    adapter = adapter_for(model)
    task = testbed_arith.TestbedArithmetic()
    if generator is not None:
        generator.bind(model, tok)
    return RunContext(model=model, tokenizer=tok, adapter=adapter,
                      structures=build_structures(adapter, spec or StructureSpec(attention="q_head")),
                      generator=generator, tasks=lambda name=None, params=None: task, seed=0, progress=Progress())


# --------------------------------------------------------------------------------------------------
# GISP = RESP's scorer on gold-thinking data
# --------------------------------------------------------------------------------------------------


def test_gisp_loss_mask_equals_resp_on_the_same_prompt_and_target(testbed_tokenizer):
    tok = testbed_tokenizer
    ctx = _ctx(tok, generator=HFGenerator(HFGenerator.Params(batch_size=4)))
    gold = TaskData(TaskData.Params(num_samples=4)).build(ctx)
    traces = SelfGenerated(SelfGenerated.Params(num_samples=4, sampling={"max_new_tokens": 4})).build(ctx)
    # the same prompts, token for token: thinking-mode chat template, generation prompt added
    assert [s.prompt_ids for s in gold] == [s.prompt_ids for s in traces]
    assert all(tok.decode(s.prompt_ids).endswith("<|im_start|>assistant\n") for s in gold)
    # the gold target is the task's reference solution plus EOS
    items = ctx.tasks().items("train", 4, 0)
    assert [tok.decode(s.target_ids) for s in gold] == [it.reference + tok.eos_token for it in items]
    # same prompt and target: GISP's and RESP's labels agree position by position
    same = [CalibrationSample(t.prompt_ids, g.target_ids) for t, g in zip(traces, gold)]
    gisp_loss, resp_loss = GISPScorer().params.loss, TaylorScorer().params.loss
    a = next(CalibrationSet(gold, tok.pad_token_id).batches(4, gisp_loss))
    b = next(CalibrationSet(same, tok.pad_token_id).batches(4, resp_loss))
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
    for row, s in enumerate(gold):  # prompt masked, target labelled
        n = len(s.prompt_ids)
        assert (a.labels[row, :n] == -100).all()
        assert a.labels[row, n: n + len(s.target_ids)].tolist() == s.target_ids
    # so the two scorers give the same scores on the same data
    calib = CalibrationSet(gold, tok.pad_token_id)
    sg = GISPScorer().score(ctx, calib).values
    sr = TaylorScorer().score(ctx, calib).values
    for kind in ("q_head", "mlp_channel"):
        assert torch.equal(sg[kind], sr[kind])


def test_task_data_keeps_the_previous_gisp_reachable(testbed_tokenizer):
    tok = testbed_tokenizer
    ctx = _ctx(tok)
    old = TaskData(TaskData.Params(num_samples=2, enable_thinking=False)).build(ctx)
    assert all(tok.decode(s.prompt_ids).endswith("<think>\n\n</think>\n\n") for s in old)
    full = next(CalibrationSet(old, tok.pad_token_id).batches(2, GISPScorer(GISPScorer.Params(loss="full")).params.loss))
    assert (full.labels[0, : len(old[0].prompt_ids)] != -100).all()


def test_gsm8k_reference_annotations_keep_or_strip():
    from resp_plugins.tasks.gsm8k import GSM8K

    row = {"question": "q?", "answer": "He has 2*3=<<2*3=6>>6 apples.\n#### 6"}
    for annotations, want in (("keep", row["answer"]), ("strip", "He has 2*3=6 apples.\n#### 6")):
        task = GSM8K(GSM8K.Params(reference_annotations=annotations))
        task._rows["train"] = [row]
        assert task.items("train", 1, 0)[0].reference == want


def test_pack_windows_cuts_the_token_stream():
    samples = [CalibrationSample([1, 2], [3, 4, 5]), CalibrationSample([6], [7, 8, 9, 10, 11])]
    windows = pack_windows(samples, 4)
    assert [w.target_ids for w in windows] == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11]]
    assert all(w.prompt_ids == [] for w in windows)
    calib = CalibrationSet(windows, 0)
    assert calib.target_token_count("decode") == 3 + 3 + 2  # every token after the first is a target
