"""The `lm_eval` evaluator: RESP's model wrapped as an lm-eval LM, RESP's shipped task YAMLs,
offline on the local GSM8K / MathQA files, with a tiny random model or a scripted generator."""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path

import pytest
import torch

from resp_core.errors import RespError
from resp_core.interfaces import Completion, Generator, RunContext
from resp_plugins.evaluators import lm_eval_harness as leh
from resp_plugins.evaluators.lm_eval_tasks import utils as task_utils
from resp_plugins.generators.hf import HFGenerator
from resp_plugins.tasks.mathqa import parse_options

from conftest import tiny_qwen3

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
GSM_DIR = SHARED_DATA / "gsm8k"
MQA_DIR = SHARED_DATA / "mathqa"

pytestmark = pytest.mark.skipif(
    not all((GSM_DIR / "train.jsonl").is_file() and (GSM_DIR / "test.jsonl").is_file()
            and (MQA_DIR / n).is_file() for n in ("dev.json", "test.json")),
    reason="shared GSM8K / MathQA data not present",
)

DATA_DIRS = {"resp_gsm8k_cot": str(GSM_DIR), "resp_mathqa_gen": str(MQA_DIR)}
BOTH = ["resp_gsm8k_cot", "resp_mathqa_gen"]


# --------------------------------------------------------------------------------------------------
# Fixtures and helpers
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gsm_rows():
    with open(GSM_DIR / "test.jsonl", encoding="utf-8") as f:
        test = [json.loads(line) for line in f if line.strip()]
    with open(GSM_DIR / "train.jsonl", encoding="utf-8") as f:
        train = [json.loads(line) for line in f if line.strip()]
    return {"test": test, "train": train}


@pytest.fixture(scope="module")
def mqa_rows():
    return json.loads((MQA_DIR / "test.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def tiny(testbed_tokenizer):
    tok = testbed_tokenizer
    model = tiny_qwen3(vocab=len(tok))
    model.config.eos_token_id = tok.eos_token_id
    model.config.pad_token_id = tok.pad_token_id
    return model, tok


class RecordingGenerator(HFGenerator):
    """The real backend, recording every call (lm-eval's prompts arrive as rendered text)."""

    def __init__(self):
        super().__init__(HFGenerator.Params(batch_size=8))
        self.calls = []
        self.text_calls = []

    def generate(self, conversations, sampling, progress=None, description="Generating"):
        self.calls.append({"conversations": conversations, "sampling": sampling})
        return super().generate(conversations, sampling, progress, description)

    def generate_text(self, prompts, sampling, progress=None, description="Generating", add_special_tokens=False):
        self.text_calls.append({"prompts": prompts, "sampling": sampling, "add_special_tokens": add_special_tokens})
        return super().generate_text(prompts, sampling, progress, description, add_special_tokens)


class ScriptedGenerator(Generator):
    """Answers each conversation with ``respond(last user message)``; records every call.  Takes
    conversations only (as a third-party backend may), so lm-eval's chat prompts reach it as the
    conversations they were rendered from."""

    def __init__(self, respond):
        self.respond = respond
        self.calls = []

    def generate(self, conversations, sampling, progress=None, description="Generating"):
        self.calls.append({"conversations": conversations, "sampling": sampling})
        out = []
        for conv in conversations:
            text = self.respond(conv[-1]["content"])
            out.append(Completion([1], [2] * 5, text, True))
        return out


def _turns(tok, prompt: str) -> list[dict]:
    """The chat turns of a prompt rendered with the testbed's ChatML template."""
    turns = []
    for part in prompt.split("<|im_start|>")[1:]:
        role, _, content = part.partition("\n")
        turns.append({"role": role, "content": content.split("<|im_end|>")[0]})
    return turns[:-1]  # the last is the open assistant turn


def _ctx(model, tok, generator) -> RunContext:
    generator.bind(model, tok)
    return RunContext(model=model, tokenizer=tok, adapter=None, structures=None, generator=generator,
                      tasks=lambda name: None)


def _evaluator(**params) -> leh.LmEvalHarness:
    params.setdefault("data_dir", DATA_DIRS)
    params.setdefault("bootstrap_iters", 0)
    return leh.LmEvalHarness(leh.LmEvalHarness.Params(**params))


def _finite(metrics: dict) -> None:
    assert metrics
    for k, v in metrics.items():
        assert isinstance(v, float) and math.isfinite(v), (k, v)


def _gold_responder(gsm_rows, mqa_rows, wrong: bool = False, think: str = ""):
    """Maps each prompt to its item's gold reference solution (or a wrong final answer)."""
    table = {}
    for row in gsm_rows["test"]:
        gold = task_utils.gsm8k_gold(row)
        text = task_utils.gsm8k_doc_to_target(row)
        if wrong:
            text = f"I think it is {float(gold) + 1:g}.\nThe answer is \\boxed{{{float(gold) + 1:g}}}."
        table[task_utils.gsm8k_doc_to_text(row)] = think + text
    for row in mqa_rows:
        gold = row["correct"].strip().lower()
        text = task_utils.mathqa_doc_to_target(row)
        if wrong:
            text = f"The answer is \\boxed{{{'b' if gold == 'a' else 'a'}}}."
        table[task_utils.mathqa_doc_to_text(row)] = think + text
    return lambda prompt: table[prompt]


# --------------------------------------------------------------------------------------------------
# The tiny random model end to end
# --------------------------------------------------------------------------------------------------

def test_tiny_model_both_tasks(tiny, gsm_rows, mqa_rows):
    model, tok = tiny
    gen = RecordingGenerator()
    ev = _evaluator(tasks=BOTH, limit=3, sampling={"max_new_tokens": 12}, seeds=[0])
    state = random.getstate()
    res = ev.evaluate(_ctx(model, tok, gen))
    assert random.getstate() == state  # lm-eval's global reseeding is undone

    m = res.metrics
    _finite(m)
    for key in ("resp_gsm8k_cot/exact_match_strict", "resp_gsm8k_cot/exact_match_flexible",
                "resp_gsm8k_cot/exact_match_math_verify", "resp_mathqa_gen/acc", "resp_mathqa_gen/acc_flexible"):
        assert 0.0 <= m[key] <= 1.0
    assert m["resp_gsm8k_cot/n"] == 3 and m["resp_mathqa_gen/n"] == 3
    assert m["resp_gsm8k_cot/mean_tokens"] <= 12

    # the backend did the sampling from lm-eval's rendered prompts: one call per task (their stop
    # strings differ), with the paper's decoding
    assert len(gen.text_calls) == 2 and gen.calls == []
    for call in gen.text_calls:
        s = call["sampling"]
        assert s.do_sample is True and s.temperature == 0.6 and s.top_p == 0.95 and s.top_k == 20
        assert s.max_new_tokens == 12 and s.enable_thinking is True
        assert len(call["prompts"]) == 3

    recs = {t: [r for r in res.records if r["task"] == t] for t in BOTH}
    assert len(recs["resp_gsm8k_cot"]) == 3 and len(recs["resp_mathqa_gen"]) == 3

    # GSM8K: 8 few-shot examples, human solutions from the train split, as chat turns
    train_q = {row["question"].strip() for row in gsm_rows["train"]}
    test_q = {row["question"].strip(): row for row in gsm_rows["test"]}
    prompts = [p for call in gen.text_calls for p in call["prompts"]]
    convs = [_turns(tok, p) for p in prompts]
    assert all(p.endswith("<|im_start|>assistant\n") for p in prompts)
    gsm_convs = [c for c in convs if c[-1]["content"].startswith("Question:")]
    assert len(gsm_convs) == 3
    for conv in gsm_convs:
        users = [m for m in conv if m["role"] == "user"]
        assistants = [m for m in conv if m["role"] == "assistant"]
        assert len(users) == 9 and len(assistants) == 8
        for u, a in zip(users[:8], assistants):
            q = re.match(r"Question: (.*)\nAnswer:$", u["content"], re.S).group(1)
            assert q in train_q
            assert re.search(r"#### -?[\d,.]+$", a["content"]) and "<<" not in a["content"]
        last = re.match(r"Question: (.*)\nAnswer:$", users[-1]["content"], re.S).group(1)
        assert last in test_q
    for r in recs["resp_gsm8k_cot"]:
        assert r["prompt"].count("Question:") == 9 and r["prompt"].endswith("<|im_start|>assistant\n")
        assert r["gold"] == task_utils.gsm8k_gold(r["doc"])

    # MathQA: zero-shot, the five options listed
    mqa_convs = [c for c in convs if "Options:" in c[-1]["content"]]
    assert len(mqa_convs) == 3
    by_problem = {row["Problem"].strip(): row for row in mqa_rows}
    for conv in mqa_convs:
        assert len(conv) == 1 and conv[0]["role"] == "user"
        content = conv[0]["content"]
        row = by_problem[content.split("\n\nOptions:")[0]]
        for letter, text in parse_options(row["options"]).items():
            assert f"\n({letter}) {text}\n" in content + "\n"
        assert "\\boxed{a}" in content  # the answer instruction


# --------------------------------------------------------------------------------------------------
# Scoring with scripted completions
# --------------------------------------------------------------------------------------------------

def test_gold_completions_score_one_and_defaults_reach_generator(tiny, gsm_rows, mqa_rows):
    model, tok = tiny
    gen = ScriptedGenerator(_gold_responder(gsm_rows, mqa_rows))
    res = _evaluator(tasks=BOTH, limit=5).evaluate(_ctx(model, tok, gen))
    m = res.metrics
    _finite(m)
    assert m["resp_gsm8k_cot/exact_match_strict"] == 1.0
    assert m["resp_gsm8k_cot/exact_match_flexible"] == 1.0
    assert m["resp_gsm8k_cot/exact_match_math_verify"] == 1.0
    assert m["resp_mathqa_gen/acc"] == 1.0 and m["resp_mathqa_gen/acc_flexible"] == 1.0
    # the per-task budgets of the paper, sampled (not lm-eval's greedy default)
    budgets = {}
    for call in gen.calls:
        s = call["sampling"]
        assert s.do_sample is True and s.temperature == 0.6 and s.enable_thinking is True
        kind = "mathqa" if "Options:" in call["conversations"][0][-1]["content"] else "gsm8k"
        budgets[kind] = s.max_new_tokens
    assert budgets == {"gsm8k": 2048, "mathqa": 4096}
    # extraction on items with known answers (GSM8K test[0] is Janet's ducks: 18)
    first = next(r for r in res.records if r["task"] == "resp_gsm8k_cot" and r["doc_id"] == 0)
    assert first["gold"] == "18" and first["extracted_strict"] == "18"
    for r in res.records:
        if r["task"] == "resp_mathqa_gen":
            assert r["extracted_letter"] == r["gold"] == r["doc"]["correct"]


def test_wrong_completions_score_zero(tiny, gsm_rows, mqa_rows):
    model, tok = tiny
    gen = ScriptedGenerator(_gold_responder(gsm_rows, mqa_rows, wrong=True))
    m = _evaluator(tasks=BOTH, limit=4).evaluate(_ctx(model, tok, gen)).metrics
    for key in ("resp_gsm8k_cot/exact_match_strict", "resp_gsm8k_cot/exact_match_flexible",
                "resp_gsm8k_cot/exact_match_math_verify", "resp_mathqa_gen/acc", "resp_mathqa_gen/acc_flexible"):
        assert m[key] == 0.0, key


def test_stop_strings_only_after_think(tiny, gsm_rows, mqa_rows):
    """"Question:" (a GSM8K stop string) inside the thinking trace must not cut it; after
    </think> it cuts a hallucinated next question (whose '#### 7' would otherwise win)."""
    model, tok = tiny
    gold = _gold_responder(gsm_rows, mqa_rows)
    think = "<think>\nQuestion: is it 7?\n\nLet me check. #### 7\n\n</think>\n\n"

    def respond(prompt):
        return think + gold(prompt) + "\n\nQuestion: And how many? Answer: #### 7"

    gen = ScriptedGenerator(respond)
    res = _evaluator(tasks=["resp_gsm8k_cot"], limit=3).evaluate(_ctx(model, tok, gen))
    assert res.metrics["resp_gsm8k_cot/exact_match_strict"] == 1.0
    for r in res.records:
        assert r["completion"].startswith(think)  # the trace is intact
        assert not r["completion"].rstrip().endswith("#### 7") and r["stopped"] is True
        assert r["raw_completion"].endswith("#### 7")


def test_apply_stop_sequences():
    f = leh.apply_stop_sequences
    assert f("<think>a\n\nQuestion: b</think> x\n\ny", ["Question:", "\n\n"], True) == "<think>a\n\nQuestion: b</think> x"
    assert f("<think>still thinking\n\nQuestion: b", ["\n\n", "Question:"], True) == "<think>still thinking\n\nQuestion: b"
    assert f("no thinking\n\nQuestion: b", ["Question:", "\n\n"], False) == "no thinking"
    assert f("text", [], False) == "text"


def test_sampling_from_gen_kwargs(tiny):
    model, tok = tiny
    lm = leh.make_lm(model, tok, HFGenerator(), sampling=leh.SamplingParams(max_new_tokens=99), seed=3)
    s, until = lm.sampling_for({"until": "Q:", "do_sample": True, "temperature": 0.6, "max_gen_toks": 2048})
    assert (s.do_sample, s.temperature, s.max_new_tokens, s.seed) == (True, 0.6, 2048, 3)
    assert until == ["Q:", tok.eos_token]  # lm-eval adds the EOS text
    s, _ = lm.sampling_for({"temperature": 0.6})  # no do_sample: sampled, not silently greedy
    assert s.do_sample is True and s.max_new_tokens == 99
    s, _ = lm.sampling_for({"do_sample": False, "temperature": 0.0})
    assert s.do_sample is False


def test_num_fewshot_override_and_seeds(tiny, gsm_rows, mqa_rows):
    model, tok = tiny
    gen = ScriptedGenerator(_gold_responder(gsm_rows, mqa_rows))
    ev = _evaluator(tasks=["resp_gsm8k_cot"], limit=2, num_fewshot={"resp_gsm8k_cot": 2}, seeds=[0, 1])
    res = ev.evaluate(_ctx(model, tok, gen))
    assert len(gen.calls) == 2
    assert [c["sampling"].seed for c in gen.calls] == [0, 1]
    for call in gen.calls:
        for conv in call["conversations"]:
            assert len(conv) == 5  # 2 shots (user+assistant) and the question
    m = res.metrics
    assert m["resp_gsm8k_cot/exact_match_strict"] == 1.0
    assert m["resp_gsm8k_cot/exact_match_strict@seed0"] == m["resp_gsm8k_cot/exact_match_strict@seed1"] == 1.0
    assert m["resp_gsm8k_cot/exact_match_strict/std"] == 0.0
    assert {r["seed"] for r in res.records} == {0, 1}


def test_plain_text_prompts_without_chat_template(tiny):
    model, tok = tiny
    gen = RecordingGenerator()
    ev = _evaluator(tasks=["resp_gsm8k_cot"], limit=1, apply_chat_template=False, num_fewshot=1,
                    sampling={"max_new_tokens": 4, "enable_thinking": False})
    res = ev.evaluate(_ctx(model, tok, gen))
    _finite(res.metrics)
    (rec,) = res.records
    assert rec["prompt"].startswith("Question: ") and rec["prompt"].count("Question:") == 2
    assert "<|im_start|>" not in rec["prompt"]
    (call,) = gen.text_calls  # the plain text went through the backend as it is
    assert call["prompts"] == [rec["prompt"]] and call["sampling"].do_sample is True


# --------------------------------------------------------------------------------------------------
# Loglikelihood requests (multiple choice, perplexity) on the model directly
# --------------------------------------------------------------------------------------------------

def test_loglikelihood_matches_direct_computation(tiny):
    from lm_eval.api.instance import Instance

    model, tok = tiny
    lm = leh.make_lm(model, tok, HFGenerator(), sampling=leh.SamplingParams())
    reqs = [Instance("loglikelihood", {}, ("The answer is", " 42"), 0),
            Instance("loglikelihood", {}, ("", "hello world"), 0)]
    out = lm.loglikelihood(reqs)
    ctx_ids = tok("The answer is", add_special_tokens=False)["input_ids"]
    whole = tok("The answer is 42", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), -1)
    want = sum(logp[i - 1, whole[i]].item() for i in range(len(ctx_ids), len(whole)))
    assert out[0][0] == pytest.approx(want, abs=1e-4)
    assert isinstance(out[0][1], bool) and math.isfinite(out[1][0])
    (rolling,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, ("hello world",), 0)])
    assert rolling == pytest.approx(out[1][0], abs=1e-4)  # same tokens after the prefix token


def test_custom_multiple_choice_task_via_include_path(tiny, tmp_path):
    model, tok = tiny
    data = tmp_path / "mc.jsonl"
    data.write_text("\n".join(json.dumps({"q": f"{a} + {b} =", "choices": [str(a + b), str(a + b + 1)], "label": 0})
                              for a, b in [(1, 2), (3, 4)]) + "\n")
    (tmp_path / "tiny_mc.yaml").write_text(
        "task: tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\n"
        "output_type: multiple_choice\ntest_split: test\ndoc_to_text: '{{q}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{label}}'\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    ev = _evaluator(tasks=["tiny_mc"], data_dir={}, include_path=[str(tmp_path)], apply_chat_template=False)
    res = ev.evaluate(_ctx(model, tok, RecordingGenerator()))
    assert 0.0 <= res.metrics["tiny_mc/acc"] <= 1.0 and res.metrics["tiny_mc/n"] == 2


# --------------------------------------------------------------------------------------------------
# LLM answer extraction, registration, parameters
# --------------------------------------------------------------------------------------------------

def test_llm_extractor_with_tiny_model(tiny, tiny_model_dir, gsm_rows, mqa_rows):
    model, tok = tiny
    gen = ScriptedGenerator(_gold_responder(gsm_rows, mqa_rows))
    ev = _evaluator(tasks=BOTH, limit=2, llm_extractor={"model_path": str(tiny_model_dir), "max_new_tokens": 6})
    res = ev.evaluate(_ctx(model, tok, gen))
    m = res.metrics
    _finite(m)
    for t in BOTH:
        assert 0.0 <= m[f"{t}/llm_extracted_accuracy"] <= 1.0
        assert 0.0 <= m[f"{t}/llm_regex_agreement"] <= 1.0
    for r in res.records:
        assert "llm_reply" in r and "llm_regex_agree" in r


def test_registered_as_lm_eval():
    from resp_core.registry import build_registry, get_registry

    reg = get_registry()
    if "lm_eval" not in reg.names("evaluator"):  # not (yet) listed among the built-in plugins
        reg = build_registry(extra_plugins=(leh,))
    assert reg.get("evaluator", "lm_eval").factory is leh.LmEvalHarness
    ev = reg.create("evaluator", "lm_eval", {"tasks": BOTH, "limit": 3})
    assert ev.params.sampling.budget("resp_gsm8k_cot") == 2048
    assert ev.params.sampling.budget("resp_mathqa_gen") == 4096
    assert ev.params.sampling.do_sample is True and ev.params.sampling.temperature == 0.6
    with pytest.raises(RespError):
        reg.create("evaluator", "lm_eval", {"bogus": 1})


def test_bad_data_dir(tiny, tmp_path):
    model, tok = tiny
    with pytest.raises(RespError, match="not a RESP"):
        _evaluator(tasks=["resp_gsm8k_cot"], data_dir={"gsm8k_cot": str(GSM_DIR)}).check_recipe(None, "evaluation")
    with pytest.raises(RespError, match="missing file"):
        _evaluator(tasks=["resp_gsm8k_cot"], data_dir={"resp_gsm8k_cot": str(tmp_path)}).evaluate(
            _ctx(model, tok, RecordingGenerator()))


def test_task_files_are_package_data():
    names = {p.name for p in leh.TASKS_DIR.iterdir()}
    assert {"resp_gsm8k_cot.yaml", "resp_mathqa_gen.yaml", "resp_gsm8k_cot_paper.yaml", "resp_mathqa_paper.yaml",
            "utils.py"} <= names


def test_unreachable_hub_is_one_line_resp_error(tiny, monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'openai/gsm8k' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    model, tok = tiny
    with pytest.raises(RespError, match="set data_dir"):
        leh.LmEvalHarness(leh.LmEvalHarness.Params(limit=1)).evaluate(_ctx(model, tok, RecordingGenerator()))


# --------------------------------------------------------------------------------------------------
# The paper's tasks: lm-eval's own gsm8k_cot, the authors' MathQA prompt, whole-output stops
# --------------------------------------------------------------------------------------------------

PAPER = ["resp_gsm8k_cot_paper", "resp_mathqa_paper"]
PAPER_DIRS = {"resp_gsm8k_cot_paper": str(GSM_DIR), "resp_mathqa_paper": str(MQA_DIR)}


def _lm_eval_gsm8k_cot() -> dict:
    from lm_eval.tasks._yaml_loader import load_yaml

    return load_yaml(task_utils.lm_eval_task_file("gsm8k/gsm8k-cot.yaml"), resolve_func=True)


def _paper_responder(gsm_rows, mqa_rows, think: str = "", wrong: bool = False):
    """Answers in the exemplars' style ("The answer is N.") / with the option letter."""
    from lm_eval.utils import apply_template

    template = _lm_eval_gsm8k_cot()["doc_to_text"]
    table = {}
    for row in gsm_rows["test"]:
        gold = task_utils.gsm8k_gold(row)
        answer = f"{float(gold) + wrong:g}"
        table[apply_template(template, row)] = think + f"So it is {answer}. The answer is {answer}."
    for row in mqa_rows:
        letter = row["correct"] if not wrong else ("b" if row["correct"] == "a" else "a")
        table[f"Question: {row['Problem']}\nOptions: {row['options']}\nAnswer:"] = think + f"The answer is ({letter})."
    return lambda prompt: table[prompt]


def test_paper_gsm8k_is_lm_evals_gsm8k_cot_as_chat_turns(tiny, gsm_rows, mqa_rows):
    from lm_eval.utils import apply_template

    model, tok = tiny
    base = _lm_eval_gsm8k_cot()
    shots = base["fewshot_config"]["samples"]
    assert base["fewshot_config"]["sampler"] == "first_n" and len(shots) == 8
    gen = ScriptedGenerator(_paper_responder(gsm_rows, mqa_rows))
    res = _evaluator(tasks=["resp_gsm8k_cot_paper"], data_dir=PAPER_DIRS, limit=3).evaluate(_ctx(model, tok, gen))
    (call,) = gen.calls
    s = call["sampling"]
    assert (s.do_sample, s.temperature, s.max_new_tokens, s.enable_thinking) == (True, 0.6, 2048, True)
    test_rows = gsm_rows["test"][:3]
    for conv, row in zip(call["conversations"], test_rows):
        # Wei et al.'s 8 exemplars in lm-eval's order, "Q: ...\nA:" as user turns, answers as assistant turns
        assert len(conv) == 17
        for k, shot in enumerate(shots):
            assert conv[2 * k] == {"role": "user", "content": apply_template(base["doc_to_text"], shot)}
            assert conv[2 * k + 1] == {"role": "assistant", "content": shot["target"]}
            assert shot["target"].endswith(f"The answer is {shot['target'].rsplit(' ', 1)[1]}")
        assert conv[-1] == {"role": "user", "content": f"Q: {row['question']}\nA:"}
    m = res.metrics
    assert m["resp_gsm8k_cot_paper/exact_match/strict-match"] == 1.0
    assert m["resp_gsm8k_cot_paper/exact_match/flexible-extract"] == 1.0
    # one main metric per task: the strict match carries the per-seed key, nothing else does
    assert m["resp_gsm8k_cot_paper/exact_match/strict-match@seed0"] == 1.0
    assert [k for k in m if "@seed" in k] == ["resp_gsm8k_cot_paper/exact_match/strict-match@seed0"]
    rec = res.records[0]
    assert rec["filtered/strict-match"] == "18" and rec["exact_match/strict-match"] == 1.0


def test_paper_stop_strings_cut_the_whole_output(tiny, gsm_rows, mqa_rows):
    """The authors' lm-eval cuts at the first "Q:" anywhere, a reasoning trace included;
    RESP's after_think mode leaves the trace alone."""
    model, tok = tiny
    think = "<think>\nQ: what is asked?\nLet me compute.\n</think>\n\n"
    gen = ScriptedGenerator(_paper_responder(gsm_rows, mqa_rows, think=think))
    res = _evaluator(tasks=PAPER, data_dir=PAPER_DIRS, limit=2).evaluate(_ctx(model, tok, gen))
    assert res.metrics["resp_gsm8k_cot_paper/exact_match/strict-match"] == 0.0
    assert res.metrics["resp_mathqa_paper/acc"] == 0.0
    for r in res.records:
        assert r["completion"] == "<think>\n" and r["stopped"] is True
    gen = ScriptedGenerator(_paper_responder(gsm_rows, mqa_rows, think=think))
    res = _evaluator(tasks=PAPER, data_dir=PAPER_DIRS, limit=2, stop_strings="after_think").evaluate(
        _ctx(model, tok, gen))
    assert res.metrics["resp_gsm8k_cot_paper/exact_match/strict-match"] == 1.0
    assert res.metrics["resp_mathqa_paper/acc"] == 1.0


def test_paper_mathqa_prompt_is_raw_options_zero_shot(tiny, gsm_rows, mqa_rows):
    model, tok = tiny
    gen = ScriptedGenerator(_paper_responder(gsm_rows, mqa_rows))
    res = _evaluator(tasks=["resp_mathqa_paper"], data_dir=PAPER_DIRS, limit=4).evaluate(_ctx(model, tok, gen))
    (call,) = gen.calls
    assert call["sampling"].max_new_tokens == 4096 and call["sampling"].enable_thinking is True
    for conv, row in zip(call["conversations"], mqa_rows[:4]):
        assert conv == [{"role": "user",
                         "content": f"Question: {row['Problem']}\nOptions: {row['options']}\nAnswer:"}]
    assert res.metrics["resp_mathqa_paper/acc"] == 1.0 and res.metrics["resp_mathqa_paper/acc@seed0"] == 1.0
    assert res.records[0]["target"] == f"Options: {mqa_rows[0]['options']}\n Correct: {mqa_rows[0]['correct']}"


# --------------------------------------------------------------------------------------------------
# The authors' LLM judge
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("reply,verdict", [
    ("ANSWER: true\nREASON: same value", True), ("answer: TRUE", True), ("ANSWER: false\nREASON: no", False),
    ("ANSWER: true.", False), ("The answer matches.", False), ("", False),
    ("<think>\nANSWER: false\n</think>\n\nANSWER: true", True),
])
def test_parse_judge_reply(reply, verdict):
    assert leh.parse_judge_reply(reply) is verdict


class JudgeScript(Generator):
    """A judge that reads the authors' payload and says true iff the target's answer appears."""

    def __init__(self):
        self.calls = []

    def generate(self, conversations, sampling, progress=None, description="Generating"):
        self.calls.append({"conversations": conversations, "sampling": sampling})
        out = []
        for conv in conversations:
            data = json.loads(conv[-1]["content"].split("DATA:\n", 1)[1])
            target = data["target"]
            want = f"({target.rsplit('Correct: ', 1)[1]})" if "Correct: " in target else f"is {target}."
            ok = any(want in r for r in data["resps"])
            out.append(Completion([1], [2], f"ANSWER: {str(ok).lower()}\nREASON: scripted", True))
        return out


def test_llm_judge_prompt_and_accuracy(tiny, gsm_rows, mqa_rows):
    model, tok = tiny
    for wrong, expected in ((False, 1.0), (True, 0.0)):
        ev = _evaluator(tasks=PAPER, data_dir=PAPER_DIRS, limit=3, llm_judge={"model_path": "unused"})
        judge = JudgeScript()
        ev._side["judge"] = judge
        gen = ScriptedGenerator(_paper_responder(gsm_rows, mqa_rows, wrong=wrong))
        res = ev.evaluate(_ctx(model, tok, gen))
        m = res.metrics
        for t in PAPER:
            assert m[f"{t}/judge_accuracy"] == expected
            assert m[f"{t}/judge_accuracy@seed0"] == expected  # the judge is the main metric
        assert not any(k.startswith(f"{t}/acc@") or "strict-match@" in k for k in m for t in PAPER)
        (call,) = judge.calls
        s = call["sampling"]
        assert s.do_sample is False and s.max_new_tokens == 150 and s.enable_thinking is False
        by_kind = {}
        for conv in call["conversations"]:
            assert conv[0]["role"] == "system" and conv[1]["content"].startswith(
                "Return answer and reasoning in the specified format.\nDATA:\n")
            by_kind.setdefault("mathqa" if "multiple-choice" in conv[0]["content"] else "gsm8k", []).append(conv)
        assert len(by_kind["gsm8k"]) == len(by_kind["mathqa"]) == 3
        assert by_kind["gsm8k"][0][0]["content"] == leh.JUDGE_SYSTEM["gsm8k"]
        first = json.loads(by_kind["gsm8k"][0][1]["content"].split("DATA:\n", 1)[1])
        assert first["target"] == "18" and len(first["resps"]) == 1
        recs = [r for r in res.records if r["task"] == "resp_mathqa_paper"]
        assert recs[0]["judge_target"] == f"Options: {mqa_rows[0]['options']}\n Correct: {mqa_rows[0]['correct']}"
        assert all(r["judge_verdict"] is (not wrong) for r in res.records)


def test_llm_judge_with_the_testbed_model_standing_in(tiny, gsm_rows, mqa_rows, testbed_available):
    model, tok = tiny
    gen = ScriptedGenerator(_paper_responder(gsm_rows, mqa_rows))
    ev = _evaluator(tasks=["resp_gsm8k_cot_paper"], data_dir=PAPER_DIRS, limit=2,
                    llm_judge={"model_path": "testbed", "max_new_tokens": 12})
    res = ev.evaluate(_ctx(model, tok, gen))
    assert 0.0 <= res.metrics["resp_gsm8k_cot_paper/judge_accuracy"] <= 1.0
    for r in res.records:
        assert isinstance(r["judge_reply"], str) and r["judge_verdict"] is leh.parse_judge_reply(r["judge_reply"])


# --------------------------------------------------------------------------------------------------
# Metric keys: one main metric per task, stderr kept apart
# --------------------------------------------------------------------------------------------------

def test_main_metric_is_configurable_and_checked(tiny, gsm_rows, mqa_rows):
    model, tok = tiny
    gen = ScriptedGenerator(_paper_responder(gsm_rows, mqa_rows))
    ev = _evaluator(tasks=PAPER, data_dir=PAPER_DIRS, limit=3, bootstrap_iters=10, seeds=[0, 1],
                    main_metric={"resp_gsm8k_cot_paper": "exact_match/flexible-extract"})
    m = ev.evaluate(_ctx(model, tok, gen)).metrics
    seeded = sorted(k for k in m if "@seed" in k)
    assert seeded == ["resp_gsm8k_cot_paper/exact_match/flexible-extract@seed0",
                      "resp_gsm8k_cot_paper/exact_match/flexible-extract@seed1",
                      "resp_mathqa_paper/acc@seed0", "resp_mathqa_paper/acc@seed1"]
    assert m["resp_gsm8k_cot_paper/exact_match/flexible-extract/std"] == 0.0
    assert "resp_gsm8k_cot_paper/exact_match/strict-match/stderr" in m
    assert not any("_stderr" in k or "," in k for k in m)
    with pytest.raises(RespError, match="reports no metric 'accuracy'.*exact_match/strict-match"):
        _evaluator(tasks=PAPER, data_dir=PAPER_DIRS, limit=1, main_metric="accuracy").evaluate(
            _ctx(model, tok, gen))
    with pytest.raises(RespError, match="main_metric: 'gsm8k' is not one of the tasks"):
        _evaluator(tasks=PAPER, main_metric={"gsm8k": "acc"}).check_recipe(None, "evaluator")


# --------------------------------------------------------------------------------------------------
# lm-eval's own command line: `--model resp --model_args path=RUN/model`
# --------------------------------------------------------------------------------------------------

def _tiny_tasks(folder: Path) -> None:
    folder.mkdir()
    mc = folder / "mc.jsonl"
    mc.write_text("\n".join(json.dumps({"q": f"{a} + {b} =", "choices": [str(a + b), str(a + b + 1)], "label": 0})
                            for a, b in [(1, 2), (3, 4), (5, 6)]) + "\n")
    (folder / "tiny_mc.yaml").write_text(
        "task: tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {mc}\n"
        "output_type: multiple_choice\ntest_split: test\ndoc_to_text: '{{q}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{label}}'\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    (folder / "tiny_gen.yaml").write_text(
        "task: tiny_gen\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {mc}\n"
        "output_type: generate_until\ntest_split: test\ndoc_to_text: '{{q}}'\ndoc_to_target: '{{choices[0]}}'\n"
        "generation_kwargs:\n  until: ['\\n']\n  do_sample: false\n  max_gen_toks: 4\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n")


def test_lm_eval_cli_with_model_resp_on_a_saved_pruned_model(testbed_tokenizer, tmp_path):
    """lm-eval's CLI loads a RESP run's model folder (load_pruned) as `--model resp`; its
    loglikelihoods equal the in-memory masked model's through the same HFLM code."""
    import os
    import subprocess
    import sys

    from lm_eval.api.instance import Instance

    from resp_core.model.adapter import adapter_for
    from resp_core.model.compaction import compacted_copy
    from resp_core.model.saving import save_pruned
    from resp_core.model.masks import MaskSet, apply_mask

    tok = testbed_tokenizer
    model = tiny_qwen3(seed=3, vocab=len(tok))
    model.config.eos_token_id = tok.eos_token_id
    model.config.pad_token_id = tok.pad_token_id
    adapter = adapter_for(model)
    mask = MaskSet.full(adapter.geometry)
    mask.mlp_channel[1, :20] = False
    mask.q_head[2, 0] = False
    apply_mask(adapter, mask)
    compact, record = compacted_copy(model, mask)
    save_pruned(compact, record, tmp_path / "model", tok)
    _tiny_tasks(tmp_path / "tasks")

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "resp_plugins.evaluators.lm_eval_cli", "--model", "resp", "--device", "cpu",
           "--model_args", f"path={tmp_path / 'model'},enable_thinking=false",
           "--tasks", "tiny_mc,tiny_gen", "--include_path", str(tmp_path / "tasks"), "--batch_size", "2",
           "--output_path", str(tmp_path / "out"), "--log_samples"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (results_file,) = list((tmp_path / "out").rglob("results_*.json"))
    results = json.loads(results_file.read_text())
    assert 0.0 <= results["results"]["tiny_mc"]["acc,none"] <= 1.0
    assert 0.0 <= results["results"]["tiny_gen"]["exact_match,none"] <= 1.0
    assert results["config"]["model"] == "resp"

    (mc_samples,) = list((tmp_path / "out").rglob("samples_tiny_mc_*.jsonl"))
    samples = [json.loads(line) for line in mc_samples.read_text().splitlines() if line.strip()]
    lm = leh.make_lm(model, tok, HFGenerator(), enable_thinking=False)
    for sample in samples:
        reqs = [Instance("loglikelihood", {}, (a["arg_0"], a["arg_1"]), 0) for a in sample["arguments"].values()]
        mine = [ll for ll, _ in lm.loglikelihood(reqs)]
        theirs = [float(r[0][0]) for r in sample["resps"]]
        assert mine == pytest.approx(theirs, abs=1e-4)
    (gen_samples,) = list((tmp_path / "out").rglob("samples_tiny_gen_*.jsonl"))
    for line in gen_samples.read_text().splitlines():
        resp = json.loads(line)["resps"][0][0]
        assert isinstance(resp, str) and "\n" not in resp
