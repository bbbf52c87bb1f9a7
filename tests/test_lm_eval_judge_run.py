"""The `lm_eval` evaluator with the authors' LLM judge, end to end: a pruning run of the shipped
testbed model (`respctl run`), lm-eval's real harness and RESP's GSM8K task configs on the local
GSM8K files, and a second tiny model as the judge, loaded from a folder like any side model.

The judge models are built so that their greedy reply is known in advance (a one-layer Qwen3
whose attention and MLP add nothing, so each next token depends on the current token only: a
bigram table that spells out a fixed reply and then ends the turn).  That makes every verdict
checkable: "ANSWER: true" must count as correct, "ANSWER: false", a bare "true" (no ANSWER line)
and an empty reply as wrong, as the authors' ``ask_true_false`` reads them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from resp_plugins.evaluators import lm_eval_judge as judge_mod
from resp_plugins.evaluators.lm_eval_tasks import utils as task_utils
from resp_plugins.generators.hf import HFGenerator

GSM_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"

pytestmark = pytest.mark.skipif(
    not ((GSM_DIR / "train.jsonl").is_file() and (GSM_DIR / "test.jsonl").is_file()),
    reason="shared GSM8K data not present",
)

# The authors' GSM8K judge instructions, as their script sends them (uncc-efficient-ai/RESP,
# modules/eval/answer_extract_gsm8k.py: SYSTEM_INSTRUCTIONS.strip() and ask_true_false's user message).
AUTHORS_GSM8K_SYSTEM = """You are an answer checker.
Return your answer in this EXACT format:
ANSWER: true/false
REASON: [your reasoning]

Task:
Given a JSON payload with `target` (string) and `resps` (list of strings),
return true if ANY element of `resps` contains a representation of the value as `target` in their final answer. Otherwise return false. You do not have to be very restrict. Treat matching in a commonsense manner (do not need to check format and unit)."""
AUTHORS_USER_HEAD = "Return answer and reasoning in the specified format.\nDATA:\n"

REPLIES = {"ANSWER: true": True, "ANSWER: false": False, "true": False, "": False}


def forced_judge(folder: Path, tok, reply: str) -> Path:
    """A tiny Qwen3 (saved with ``tok`` to ``folder``) whose greedy continuation of any prompt is
    ``reply`` followed by the end of the turn."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    chain = tok(reply, add_special_tokens=False)["input_ids"] if reply else []
    assert len(set(chain)) == len(chain), f"{reply!r}: a bigram table needs distinct tokens"
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    d = len(chain) + 1  # one direction per chain token, one shared by every other token
    cfg = Qwen3Config(vocab_size=len(tok), hidden_size=d, intermediate_size=4, num_hidden_layers=1,
                      num_attention_heads=1, num_key_value_heads=1, head_dim=4, max_position_embeddings=4096,
                      tie_word_embeddings=False, eos_token_id=eos, pad_token_id=tok.pad_token_id)
    model = Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.model.norm.weight.fill_(1.0)
        layer = model.model.layers[0]
        layer.input_layernorm.weight.fill_(1.0)
        layer.post_attention_layernorm.weight.fill_(1.0)
        emb, head = model.model.embed_tokens.weight, model.lm_head.weight
        emb[:, d - 1] = 1.0  # every token not in the chain ...
        head[chain[0] if chain else eos, d - 1] = 10.0  # ... is followed by the reply's first token
        for i, t in enumerate(chain):
            emb[t] = 0.0
            emb[t, i] = 1.0
            head[chain[i + 1] if i + 1 < len(chain) else eos, i] = 10.0
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def judges(tmp_path_factory, testbed_tokenizer):
    root = tmp_path_factory.mktemp("judges")
    return {reply: forced_judge(root / f"judge{i}", testbed_tokenizer, reply) for i, reply in enumerate(REPLIES)}


@pytest.fixture
def judge_calls(monkeypatch):
    """Every conversation the judge's backend is given (the run's own generation is left alone)."""
    calls = []
    generate = HFGenerator.generate

    def spy(self, conversations, sampling, progress=None, description="Generating"):
        if description == "LLM judge":
            calls.append({"model": self.model, "conversations": conversations, "sampling": sampling})
        return generate(self, conversations, sampling, progress, description)

    monkeypatch.setattr(HFGenerator, "generate", spy)
    return calls


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_forced_judges_reply_as_built_and_verdicts_are_read_as_the_authors(judges, testbed_tokenizer):
    """Each judge model, loaded and driven the way the evaluator does it, replies exactly its
    text; RESP's verdicts and accuracy follow the authors' reading of that text."""
    row = json.loads((GSM_DIR / "test.jsonl").read_text(encoding="utf-8").splitlines()[0])
    recs = [{"task": "t", "kind": "gsm8k", "_doc": row, "target": None, "finished": True,
             "completion": c, "exact_match": score}
            for c, score in (("So she makes 18 dollars. The answer is 18.", 1.0), ("The answer is 7.", 0.0))]
    for reply, verdict in REPLIES.items():
        cfg = judge_mod.LLMJudge(model_path=str(judges[reply]), max_new_tokens=24)
        gen = judge_mod.load_side_generator(cfg, "judge", "cpu")
        batch = [dict(r) for r in recs]
        metrics = judge_mod.run_llm_judge(cfg, batch, lambda: gen, None, regex_metric={"t": "exact_match"})
        assert [r["judge_reply"] for r in batch] == [reply, reply]
        assert [r["judge_verdict"] for r in batch] == [verdict, verdict]
        assert metrics["t/judge_accuracy"] == float(verdict)
        # the verdict agrees with the regex score on exactly one of the two items
        assert [r["judge_agrees_regex"] for r in batch] == [verdict, not verdict]
        assert metrics["t/judge_regex_agreement"] == 0.5
        assert batch[0]["judge_target"] == "18"
        assert batch[0]["judge_prompt"] == AUTHORS_USER_HEAD + json.dumps(
            {"target": "18", "resps": [recs[0]["completion"]]}, ensure_ascii=False)


def test_pruning_run_with_lm_eval_and_the_llm_judge(tmp_path, judges, judge_calls, testbed_available, monkeypatch):
    """`respctl run` on the testbed with two `lm_eval` evaluators (the paper's GSM8K task and
    RESP's variant), each judged by its own tiny judge model, at the dense point and one milestone."""
    import yaml
    from typer.testing import CliRunner

    from resp_core.cli import app
    from resp_plugins.evaluators import lm_eval_harness

    loads, released = [], []
    load, release = lm_eval_harness.load_side_generator, lm_eval_harness.release_side_generator
    monkeypatch.setattr(lm_eval_harness, "load_side_generator",
                        lambda cfg, *a, **k: loads.append(Path(cfg.model_path).name) or load(cfg, *a, **k))
    monkeypatch.setattr(lm_eval_harness, "release_side_generator",
                        lambda gen: released.append(gen.model.config.hidden_size) or release(gen))

    limit = 3
    common = {"data_dir": None, "limit": limit, "num_fewshot": 1, "bootstrap_iters": 0,
              "sampling": {"max_new_tokens": 8}}
    evaluators = [
        {"name": "lm_eval", "params": {**common, "tasks": ["resp_gsm8k_cot_paper"],
                                       "data_dir": {"resp_gsm8k_cot_paper": str(GSM_DIR)},
                                       "llm_judge": {"model_path": str(judges["ANSWER: true"]), "max_new_tokens": 24}}},
        {"name": "lm_eval", "params": {**common, "tasks": ["resp_gsm8k_cot"],
                                       "data_dir": {"resp_gsm8k_cot": str(GSM_DIR)},
                                       "llm_judge": {"model_path": str(judges["true"]), "max_new_tokens": 24,
                                                     "keep_loaded": False}}},
    ]
    recipe = {
        "name": "judge-run", "seed": 0, "model": {"path": "testbed", "dtype": "float32", "device": "cpu"},
        "task": {"name": "testbed_arith"},
        "structures": {"attention": "q_head", "mlp": "channel", "protect_first": 0.1, "protect_last": 1},
        "generator": {"name": "hf", "params": {"batch_size": 16}},
        "calibration": {"name": "self_generated", "params": {
            "num_samples": 4, "split": "train", "sampling": {"temperature": 0.6, "max_new_tokens": 12}}},
        "scorer": {"name": "resp"},
        "schedule": {"name": "progressive", "params": {"target": 0.2, "steps": 1, "milestones": [0.2]}},
        "allocator": {"name": "global"},
        "evaluation": {"evaluate_dense": True, "evaluators": evaluators},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", str(path), "--out", str(out)])
    assert result.exit_code == 0, result.output

    rows = json.loads((out / "metrics.json").read_text())
    assert [r["target"] for r in rows] == [0.0, 0.2]
    gold = {json.loads(line)["question"]: task_utils.gsm8k_gold(json.loads(line))
            for line in (GSM_DIR / "test.jsonl").read_text(encoding="utf-8").splitlines()[:limit]}
    points = ("dense", "milestone_0.20")
    for task, own, index, verdict in (("resp_gsm8k_cot_paper", "exact_match/strict-match", 0, True),
                                      ("resp_gsm8k_cot", "exact_match_strict", 1, False)):
        for row, point in zip(rows, points):
            for key in (own, "judge_accuracy", "judge_regex_agreement", "finished"):
                assert 0.0 <= row[f"{task}/{key}"] <= 1.0, (task, key)
            assert row[f"{task}/n"] == limit and 0 < row[f"{task}/mean_tokens"] <= 8
            # the judge is each task's main metric: its per-seed key, and no other
            assert [k for k in row if k.startswith(task + "/") and "@seed" in k] == [f"{task}/judge_accuracy@seed0"]
            assert row[f"{task}/judge_accuracy"] == row[f"{task}/judge_accuracy@seed0"] == float(verdict)

            recs = _read_jsonl(out / "eval" / f"{point}_{index}_lm_eval.jsonl")
            assert len(recs) == limit and sorted(r["doc_id"] for r in recs) == list(range(limit))
            for r in recs:
                assert r["task"] == task and r["seed"] == 0
                assert r["judge_target"] == gold[r["doc"]["question"]] == r["gold"]
                assert r["judge_reply"] == ("ANSWER: true" if verdict else "true")
                assert r["judge_verdict"] is verdict
                assert r["judge_agrees_regex"] is ((r[own] == 1.0) is verdict)
                payload = {"target": r["judge_target"], "resps": [r["completion"].strip()]}
                assert r["judge_prompt"] == AUTHORS_USER_HEAD + json.dumps(payload, ensure_ascii=False)
            agree = sum(r["judge_agrees_regex"] for r in recs) / limit
            assert row[f"{task}/judge_regex_agreement"] == pytest.approx(agree)
            assert row[f"{task}/{own}"] == pytest.approx(sum(r[own] for r in recs) / limit)

    # the kept judge is loaded once for the run, the other one for each evaluation and released after it
    kept, fresh = Path(judges["ANSWER: true"]).name, Path(judges["true"]).name
    assert sorted(loads) == sorted([kept, fresh, fresh]) and len(released) == 2

    # what each judge model was given: the authors' system instructions and DATA payload, greedy,
    # thinking off; one call per evaluator and evaluation point, each on its own judge model
    assert len(judge_calls) == 4
    assert all(c["model"].config.hidden_size <= 16 for c in judge_calls)  # the judges, not the run's model
    for call in judge_calls:
        s = call["sampling"]
        assert (s.do_sample, s.max_new_tokens, s.enable_thinking) == (False, 24, False)
        assert len(call["conversations"]) == limit
        for conv in call["conversations"]:
            assert [m["role"] for m in conv] == ["system", "user"]
            assert conv[0]["content"] == AUTHORS_GSM8K_SYSTEM
            assert conv[1]["content"].startswith(AUTHORS_USER_HEAD)
    first = json.loads(judge_calls[0]["conversations"][0][1]["content"][len(AUTHORS_USER_HEAD):])
    dense_paper = _read_jsonl(out / "eval" / "dense_0_lm_eval.jsonl")
    assert first == {"target": "18", "resps": [dense_paper[0]["completion"].strip()]}


@pytest.mark.parametrize("change,fragments", [
    ({"llm_judge": {"model_path": "/nonexistent/judge"}},
     ("evaluation.evaluators[0].params.llm_judge.model_path", "does not exist")),
    ({"llm_judge": {"model_path": "testbed", "device": "gpu"}}, ("evaluation.evaluators[0].params.llm_judge.device",)),
    ({"llm_judge": {"model_path": "testbed", "dtype": "bf16"}}, ("evaluation.evaluators[0].params.llm_judge.dtype",)),
    ({"llm_judge": {"model_path": "testbed", "max_new_tokens": 0}}, ("llm_judge.max_new_tokens",)),
    ({"limit": 0}, ("evaluation.evaluators[0].params.limit", "fraction between 0 and 1")),
    ({"limit": 2.5}, ("evaluation.evaluators[0].params.limit",)),
    ({"sampling": {"max_new_tokens": 0}}, ("evaluation.evaluators[0].params.sampling",)),
])
def test_judge_and_limits_are_checked_by_validate(tmp_path, change, fragments):
    """A judge that cannot load, or a bad bound, is one line at `respctl validate`, naming the
    field, before any weights are read."""
    import yaml
    from typer.testing import CliRunner

    from resp_core.cli import app
    from test_cli import assert_user_error

    params = {"tasks": ["resp_gsm8k_cot_paper"], "data_dir": {"resp_gsm8k_cot_paper": str(GSM_DIR)}, **change}
    recipe = {"name": "bad", "model": {"path": "testbed"}, "task": {"name": "testbed_arith"},
              "calibration": {"name": "self_generated"},
              "scorer": {"name": "resp"}, "schedule": {"name": "progressive", "params": {"target": 0.2, "steps": 1}},
              "evaluation": {"evaluators": [{"name": "lm_eval", "params": params}]}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert_user_error(CliRunner().invoke(app, ["validate", str(path)]), *fragments)


def test_a_local_judge_folder_passes_validate(tmp_path, judges):
    import yaml
    from typer.testing import CliRunner

    from resp_core.cli import app

    recipe = {"name": "ok", "model": {"path": "testbed"}, "task": {"name": "testbed_arith"},
              "calibration": {"name": "self_generated"},
              "scorer": {"name": "resp"}, "schedule": {"name": "progressive", "params": {"target": 0.2, "steps": 1}},
              "evaluation": {"evaluators": [{"name": "lm_eval", "params": {
                  "tasks": ["resp_gsm8k_cot_paper"], "limit": 0.5,
                  "llm_judge": {"model_path": str(judges["ANSWER: true"])}}}]}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 0, result.output
