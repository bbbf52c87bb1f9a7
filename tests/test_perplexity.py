"""The perplexity evaluator against lm-eval's own computation (HFLM's rolling loglikelihood, the
wikitext task's word / byte perplexity) on a tiny random model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from resp_core.errors import RespError
from resp_core.interfaces import RunContext
from resp_plugins.evaluators.perplexity import Perplexity, windows

from conftest import tiny_qwen3

GSM_TEST = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "test.jsonl"

# WikiText-style raw pages (tokenization artifacts that lm-eval's detokenizer undoes)
PAGES = [
    " = Valkyria Chronicles III = \n Senjō no Valkyria 3 : Unrecorded Chronicles is a tactical role @-@ playing "
    "game developed by Sega and Media.Vision for the PlayStation Portable . Released in January 2011 in Japan , "
    "it is the third game in the Valkyria series . \n",
    " = Tower Building of the Little Rock Arsenal = \n The Tower Building is a building in Little Rock , "
    "Arkansas . It was built in 1840 , and is 1 @,@ 200 feet from the river ( see below ) . \n",
    " = Short page = \n It is short . \n",
]


@pytest.fixture(scope="module")
def tiny(testbed_tokenizer):
    tok = testbed_tokenizer
    model = tiny_qwen3(seed=5, vocab=len(tok))
    model.config.eos_token_id = tok.eos_token_id
    model.config.pad_token_id = tok.pad_token_id
    return model, tok


def _ctx(model, tok) -> RunContext:
    return RunContext(model=model, tokenizer=tok, adapter=None, structures=None, generator=None,
                      tasks=lambda name=None: None)


def _pages_file(tmp_path) -> Path:
    path = tmp_path / "pages.jsonl"
    path.write_text("".join(json.dumps({"page": p}) + "\n" for p in PAGES))
    return path


def _hflm(model, tok, max_length):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tok, max_length=max_length, batch_size=2)


@pytest.mark.parametrize("window", [32, 512])
def test_wikitext_perplexities_equal_lm_evals_own(tiny, tmp_path, window):
    """lm-eval's wikitext task (its detokenizer, word and byte counts, aggregation) on HFLM with
    max_length = window, against the evaluator with the same window and the default stride."""
    import lm_eval
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._yaml_loader import load_yaml

    from resp_plugins.evaluators.lm_eval_tasks.utils import lm_eval_task_file

    model, tok = tiny
    path = _pages_file(tmp_path)
    cfg = load_yaml(lm_eval_task_file("wikitext/wikitext.yaml"), resolve_func=True)
    cfg.update(dataset_path="json", dataset_name=None,
               dataset_kwargs={"data_files": {s: str(path) for s in ("train", "validation", "test")}})
    tasks = TaskManager(include_defaults=False).load([cfg])["tasks"]
    res = lm_eval.simple_evaluate(model=_hflm(model, tok, window), tasks=list(tasks.values()), bootstrap_iters=0)
    theirs = res["results"]["wikitext"]

    ev = Perplexity(Perplexity.Params(label="wikitext", local_path=str(path), text_field="page",
                                      detokenize="wikitext", window=window, batch_size=3))
    ev.check_recipe(None, "evaluator")
    m = ev.evaluate(_ctx(model, tok)).metrics
    assert m["wikitext/word_perplexity"] == pytest.approx(theirs["word_perplexity,none"], rel=1e-5)
    assert m["wikitext/byte_perplexity"] == pytest.approx(theirs["byte_perplexity,none"], rel=1e-5)
    assert m["wikitext/bits_per_byte"] == pytest.approx(theirs["bits_per_byte,none"], rel=1e-5)
    assert m["wikitext/window"] == window and m["wikitext/stride"] == window and m["wikitext/documents"] == 3
    assert m["wikitext/perplexity@seed0"] == m["wikitext/perplexity"]
    if window == 32:
        assert m["wikitext/tokens"] > 3 * 32  # several windows per long page


def test_rolling_nll_equals_hflm_per_document(tiny, tmp_path):
    from lm_eval.api.instance import Instance

    model, tok = tiny
    path = tmp_path / "docs.txt"
    path.write_text("\n\n".join(PAGES) + "\n")
    res = Perplexity(Perplexity.Params(local_path=str(path), window=24, batch_size=2)).evaluate(_ctx(model, tok))
    lm = _hflm(model, tok, 24)
    docs = [p.strip() for p in PAGES]  # .txt paragraphs
    lls = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (d,), i) for i, d in enumerate(docs)])
    assert [r["nll"] for r in res.records] == pytest.approx([-x for x in lls], rel=1e-5)
    assert res.metrics["perplexity/perplexity"] == pytest.approx(
        math.exp(-sum(lls) / sum(r["tokens"] for r in res.records)), rel=1e-6)


def test_window_covering_the_document_is_one_full_forward(tiny, tmp_path):
    """With the whole document inside one window every stride gives the plain full-context NLL."""
    model, tok = tiny
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps({"text": PAGES[0]}) + "\n")
    ids = [tok.eos_token_id] + tok(PAGES[0], add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    want = torch.nn.functional.cross_entropy(logits[:-1].float(), torch.tensor(ids[1:]), reduction="sum").item()
    for stride in (1, 7, None):
        m = Perplexity(Perplexity.Params(local_path=str(path), window=len(ids), stride=stride)).evaluate(
            _ctx(model, tok)).metrics
        assert m["perplexity/nll"] * m["perplexity/tokens"] == pytest.approx(want, rel=1e-5)
        assert m["perplexity/tokens"] == len(ids) - 1


def test_windows_score_every_target_once_with_the_stated_context():
    for first, length, w, s in [(1, 100, 16, 16), (1, 100, 16, 5), (30, 100, 16, 4), (1, 10, 64, 8), (5, 6, 4, 1)]:
        seen = []
        for lo, a, b in windows(first, length, w, s):
            assert b - 1 - lo <= w  # input length
            assert a - 1 >= lo  # every target has its preceding token in the input
            if a > max(first, w + 1):  # after the first pass: at least w - s tokens of context
                assert a - 1 - lo >= w - s
            seen += list(range(a, b))
        assert seen == list(range(first, length))


@pytest.mark.skipif(not GSM_TEST.is_file(), reason="shared GSM8K data not present")
def test_decode_only_equals_lm_eval_loglikelihood_of_the_solution(tiny):
    """GSM8K test solutions given their question: the decode-only NLL is lm-eval's
    loglikelihood(question + newline, solution)."""
    from lm_eval.api.instance import Instance

    model, tok = tiny
    ev = Perplexity(Perplexity.Params(label="gsm8k_solutions", local_path=str(GSM_TEST), text_field="answer",
                                      prompt_field="question", loss="decode", num_documents=3, seed=1,
                                      window=512))
    res = ev.evaluate(_ctx(model, tok))
    rows = [json.loads(line) for line in GSM_TEST.read_text().splitlines()]
    picked = [rows[r["index"]] for r in res.records]
    lm = _hflm(model, tok, 512)
    out = lm.loglikelihood([Instance("loglikelihood", {}, (row["question"] + "\n", row["answer"]), i)
                            for i, row in enumerate(picked)])
    assert [r["nll"] for r in res.records] == pytest.approx([-ll for ll, _ in out], rel=1e-5)
    m = res.metrics
    assert m["gsm8k_solutions/documents"] == 3
    assert m["gsm8k_solutions/words"] == sum(len(__import__("re").split(r"\s+", row["answer"])) for row in picked)
    # the full-sequence loss scores the question too: more tokens
    full = Perplexity(Perplexity.Params(local_path=str(GSM_TEST), text_field="answer", prompt_field="question",
                                        loss="full", num_documents=3, seed=1, window=512)).evaluate(_ctx(model, tok))
    assert full.metrics["perplexity/tokens"] > m["gsm8k_solutions/tokens"]


def test_bad_inputs_are_one_line(tmp_path):
    def check(match, **params):
        with pytest.raises(RespError, match=match):
            Perplexity(Perplexity.Params(**params)).check_recipe(None, "evaluation.evaluators[0]")

    check("exactly one of local_path and hub_id")
    check("does not exist", local_path=str(tmp_path / "nope.jsonl"))
    (tmp_path / "a.csv").write_text("x")
    check("must be a .txt, .jsonl or .json", local_path=str(tmp_path / "a.csv"))
    (tmp_path / "a.jsonl").write_text(json.dumps({"body": "text"}) + "\n")
    check("no field 'text'", local_path=str(tmp_path / "a.jsonl"))
    check("set prompt_field", local_path=str(tmp_path / "a.jsonl"), text_field="body", loss="decode")
    check("larger than window", local_path=str(tmp_path / "a.jsonl"), text_field="body", window=8, stride=9)
    with pytest.raises(Exception):
        Perplexity.Params(window=1)


def test_milestone_lines_and_the_table_show_perplexity_alike(tmp_path, tiny_model_dir):
    """``respctl run`` prints a perplexity the same way at each milestone and in the final table
    (as it is, never as a percentage)."""
    from typer.testing import CliRunner

    from resp_core.cli import app
    from resp_core.report import format_run_metric
    from test_cli import small_recipe, write

    recipe = small_recipe(tiny_model_dir, **{"schedule.params.steps": 2,
                                             "schedule.params.milestones": [0.2], "schedule.params.target": 0.2})
    recipe["evaluation"]["evaluators"] = [{"name": "perplexity", "params": {
        "local_path": str(_pages_file(tmp_path)), "text_field": "page", "window": 32}}]
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", str(write(tmp_path, recipe)), "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "metrics.json").read_text())
    key = next(k for k in rows[-1] if k.endswith("perplexity"))
    shown = format_run_metric(key, rows[-1][key])
    assert "%" not in shown and float(shown) == pytest.approx(rows[-1][key], rel=1e-3)
    milestone_line = next(ln for ln in result.output.splitlines() if ln.strip().startswith("sparsity")
                          and f"{rows[-1]['sparsity']:.1%}" in ln)
    assert f"{key} {shown}" in milestone_line, milestone_line
