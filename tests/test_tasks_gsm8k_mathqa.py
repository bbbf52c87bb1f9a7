"""The GSM8K and MathQA task plugins, checked against the real benchmark files in shared/data."""

from __future__ import annotations

import json
import math
import sys
import types
from pathlib import Path

import pytest

from resp_core.errors import RespError
from resp_core.interfaces import TaskItem
from resp_plugins.tasks import gsm8k as g
from resp_plugins.tasks import mathqa as mq

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
GSM8K_DIR = DATA / "gsm8k"
MATHQA_DIR = DATA / "mathqa"

needs_gsm8k = pytest.mark.skipif(
    not (GSM8K_DIR / "train.jsonl").is_file() or not (GSM8K_DIR / "test.jsonl").is_file(),
    reason=f"GSM8K files not found under {GSM8K_DIR} (shared/ must sit beside the checkout)",
)
needs_mathqa = pytest.mark.skipif(
    not (MATHQA_DIR / "dev.json").is_file() or not (MATHQA_DIR / "test.json").is_file(),
    reason=f"MathQA files not found under {MATHQA_DIR} (shared/ must sit beside the checkout)",
)


@pytest.fixture(scope="module")
def gsm():
    return g.GSM8K(g.GSM8K.Params(data_dir=str(GSM8K_DIR)))


@pytest.fixture(scope="module")
def gsm_test(gsm):
    return gsm.items("test", None, 0)


@pytest.fixture(scope="module")
def mqa():
    return mq.MathQA(mq.MathQA.Params(data_dir=str(MATHQA_DIR)))


def _item(answer: str) -> TaskItem:
    return TaskItem(id="x", messages=[], answer=answer)


# --------------------------------------------------------------------------------------------------
# registration
# --------------------------------------------------------------------------------------------------

def test_register_tasks_hooks():
    got = {}
    g.register_tasks(register=lambda name, factory: got.setdefault(name, factory))
    mq.register_tasks(register=lambda name, factory: got.setdefault(name, factory))
    assert got == {"gsm8k": g.GSM8K, "mathqa": mq.MathQA}
    assert g.GSM8K().params.prompt_suffix == g.DEFAULT_SUFFIX
    with pytest.raises(Exception):
        g.GSM8K.Params(bogus=1)


# --------------------------------------------------------------------------------------------------
# GSM8K on the real files
# --------------------------------------------------------------------------------------------------

@needs_gsm8k
def test_gsm8k_counts(gsm, gsm_test):
    assert len(gsm.items("train", None, 0)) == 7473
    assert len(gsm_test) == 1319


@needs_gsm8k
def test_gsm8k_first_item(gsm_test):
    it = gsm_test[0]
    assert it.id == "gsm8k-test-0"
    assert it.answer == "18"
    assert len(it.messages) == 1 and it.messages[0]["role"] == "user"
    content = it.messages[0]["content"]
    assert content.startswith("Janet\u2019s ducks lay 16 eggs per day.")
    assert content.endswith("\nPlease reason step by step, and put your final answer within \\boxed{}.")
    # the human solution as published, calculator annotations kept (the authors' gold calibration)
    assert it.reference == (
        "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\n"
        "She makes 9 * 2 = $<<9*2=18>>18 every day at the farmer\u2019s market.\n#### 18"
    )
    stripped = g.GSM8K(g.GSM8K.Params(data_dir=str(GSM8K_DIR), reference_annotations="strip")).items("test", None, 0)[0]
    assert stripped.id == it.id and stripped.reference == (
        "Janet sells 16 - 3 - 4 = 9 duck eggs a day.\n"
        "She makes 9 * 2 = $18 every day at the farmer\u2019s market.\n#### 18"
    )


@needs_gsm8k
@pytest.mark.parametrize("split", ["train", "test"])
def test_gsm8k_gold_answers_are_numbers(gsm, split):
    items = gsm.items(split, None, 0)
    for it in items:
        assert "," not in it.answer, it.id
        assert math.isfinite(float(it.answer)), it.id
        assert g.normalize_number(it.answer) == it.answer, it.id
        assert "<<" not in g._reference(it.reference, "strip"), it.id
        assert it.reference.splitlines()[-1].startswith("#### "), it.id
    # the comma-separated golds of the file are normalized
    raw = [json.loads(line)["answer"] for line in open(GSM8K_DIR / f"{split}.jsonl", encoding="utf-8")]
    with_commas = [i for i, a in enumerate(raw) if "," in a.rsplit("####", 1)[1]]
    assert with_commas, "the files hold golds such as '1,080'"
    for i in with_commas:
        assert items[i].answer == raw[i].rsplit("####", 1)[1].strip().replace(",", ""), items[i].id


@needs_gsm8k
def test_gsm8k_gold_extracted_from_every_test_reference(gsm, gsm_test):
    for it in gsm_test:
        assert g.extract_strict(it.reference) == it.answer, it.id
        assert g.extract_flexible(it.reference) == it.answer, it.id
        assert gsm.extract_answer(it.reference) == it.answer, it.id
        assert gsm.is_correct(it.reference, it), it.id


@needs_gsm8k
def test_gsm8k_subset_reproducible(gsm, gsm_test):
    a = gsm.items("test", 50, 3)
    b = gsm.items("test", 50, 3)
    c = gsm.items("test", 50, 4)
    assert [x.id for x in a] == [x.id for x in b]
    assert [x.id for x in a] != [x.id for x in c]
    assert len(a) == 50 and len({x.id for x in a}) == 50
    idx = [x.meta["index"] for x in a]
    assert idx == sorted(idx)  # file order among the chosen
    assert all(x.id == f"gsm8k-test-{x.meta['index']}" for x in a)
    assert all(gsm_test[x.meta["index"]].answer == x.answer for x in a)
    assert len(gsm.items("test", 10_000, 0)) == 1319
    assert gsm.items("test", 0, 0) == []


@needs_gsm8k
def test_gsm8k_unknown_split(gsm):
    with pytest.raises(RespError, match="validation"):
        gsm.items("validation", 5, 0)


# --------------------------------------------------------------------------------------------------
# GSM8K answer handling (no data needed)
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,want", [
    ("18", "18"), ("$18.", "18"), ("1,234", "1234"), ("18.00", "18"), ("3.50", "3.5"),
    ("-3", "-3"), ("\u22123", "-3"), ("3/4", "0.75"), ("\\frac{3}{4}", "0.75"), ("\\dfrac{-1}{4}", "-0.25"),
    ("1 1/2", "1.5"), ("20%", "20"), ("\\$1,000", "1000"), ("18 dollars", "18"),
    ("\\text{18 apples}", "18"), ("x = 5", "5"), ("12 + 6 = 18", "18"), (".5", "0.5"),
    ("1,000,000", "1000000"), ("abc", None), ("", None), (None, None), ("1/0", None),
])
def test_normalize_number(text, want):
    assert g.normalize_number(text) == want


@pytest.mark.parametrize("completion,strict,flexible", [
    ("<think>Maybe 5? \\boxed{5}</think>\nSo the total is \\boxed{18}.", "18", "18"),
    ("<think>2 + 2 = 4</think>The result: 7 apples.", None, "7"),
    ("She earns 9 * 2 = 18 dollars.\n#### 1,234", "1234", "1234"),
    ("The answer is $18.", "18", "18"),
    ("The answer is: **42**", "42", "42"),
    ("Final answer: \\boxed{\\frac{7}{2}}", "3.5", "2"),
    ("\\boxed{1,080}", "1080", "1080"),
    ("answer is -5", "-5", "-5"),
    ("10-3 = 7", None, "7"),
    ("#### Step 1: add the eggs\n16 - 3 = 13", None, "13"),  # a markdown heading, not '#### N'
    ("<think>the answer is 4</think>", None, None),  # nothing after </think>
    ("no numbers here", None, None),
    ("", None, None),
])
def test_gsm8k_extraction(completion, strict, flexible):
    assert g.extract_strict(completion) == strict
    assert g.extract_flexible(completion) == flexible
    assert g.GSM8K().extract_answer(completion) == (strict if strict is not None else flexible)


def test_gsm8k_is_correct():
    task = g.GSM8K()
    assert task.is_correct("<think>hmm 17</think>\\boxed{18}", _item("18"))
    assert task.is_correct("The answer is 18.00", _item("18"))
    assert task.is_correct("#### 1,234", _item("1234"))
    assert task.is_correct("\\boxed{3/4}", _item("0.75"))
    assert task.is_correct("The answer is $18.", _item("18"))
    assert not task.is_correct("<think>\\boxed{18}</think>So \\boxed{17}", _item("18"))
    assert not task.is_correct("The answer is 18.1", _item("18"))
    assert not task.is_correct("I don't know.", _item("18"))


# --------------------------------------------------------------------------------------------------
# GSM8K data errors
# --------------------------------------------------------------------------------------------------

def test_gsm8k_bad_data_dir(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(RespError, match="nope"):
        g.GSM8K(g.GSM8K.Params(data_dir=str(missing))).items("test", 5, 0)
    with pytest.raises(RespError, match="test.jsonl"):
        g.GSM8K(g.GSM8K.Params(data_dir=str(tmp_path))).items("test", 5, 0)


def test_gsm8k_wrong_fields(tmp_path):
    (tmp_path / "test.jsonl").write_text(json.dumps({"problem": "1+1?", "solution": "#### 2"}) + "\n")
    with pytest.raises(RespError, match="'question', 'answer'"):
        g.GSM8K(g.GSM8K.Params(data_dir=str(tmp_path))).items("test", None, 0)
    (tmp_path / "train.jsonl").write_text("{not json\n")
    with pytest.raises(RespError, match="train.jsonl:1"):
        g.GSM8K(g.GSM8K.Params(data_dir=str(tmp_path))).items("train", None, 0)


def test_gsm8k_missing_gold_line(tmp_path):
    (tmp_path / "test.jsonl").write_text(json.dumps({"question": "1+1?", "answer": "it is 2"}) + "\n")
    with pytest.raises(RespError, match="####"):
        g.GSM8K(g.GSM8K.Params(data_dir=str(tmp_path))).items("test", None, 0)


def test_gsm8k_small_local_folder(tmp_path):
    rows = [{"question": f"What is {i}+1?", "answer": f"{i}+1=<<{i}+1={i + 1}>>{i + 1}\n#### {i + 1}"}
            for i in range(5)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    items = g.GSM8K(g.GSM8K.Params(data_dir=str(tmp_path), prompt_suffix=" Go.")).items("train", None, 0)
    assert [it.answer for it in items] == ["1", "2", "3", "4", "5"]
    assert items[2].messages[0]["content"] == "What is 2+1? Go."
    assert items[2].reference == "2+1=<<2+1=3>>3\n#### 3"


def test_gsm8k_hub_failure_is_one_line_resp_error(monkeypatch):
    calls = []

    def load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        raise ConnectionError("no network\nsecond line")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    with pytest.raises(RespError) as exc:
        g.GSM8K().items("test", 5, 0)
    assert calls == [(("openai/gsm8k", "main"), {"split": "test"})]
    assert "\n" not in str(exc.value) and "no network" in str(exc.value)


def test_gsm8k_hub_rows(monkeypatch):
    rows = [{"question": "Q?", "answer": "x <<1+1=2>>2\n#### 2"}]
    monkeypatch.setitem(sys.modules, "datasets",
                        types.SimpleNamespace(load_dataset=lambda *a, **k: rows))
    (it,) = g.GSM8K().items("train", None, 0)
    assert (it.id, it.answer, it.reference) == ("gsm8k-train-0", "2", "x <<1+1=2>>2\n#### 2")


# --------------------------------------------------------------------------------------------------
# MathQA on the real files
# --------------------------------------------------------------------------------------------------

@needs_mathqa
def test_mathqa_counts(mqa):
    assert len(mqa.items("validation", None, 0)) == 4475
    assert len(mqa.items("dev", None, 0)) == 4475
    assert len(mqa.items("test", None, 0)) == 2985


@needs_mathqa
def test_mathqa_train_missing_locally(mqa):
    with pytest.raises(RespError, match="train.json"):
        mqa.items("train", 5, 0)


@needs_mathqa
@pytest.mark.parametrize("name", ["dev.json", "test.json"])
def test_mathqa_every_options_string_parses_to_five(name):
    rows = json.loads((MATHQA_DIR / name).read_text(encoding="utf-8"))
    list_like = 0
    for i, row in enumerate(rows):
        opts = mq.parse_options(row["options"])
        assert list(opts) == list("abcde"), (i, row["options"], opts)
        assert all(v and v == v.strip() for v in opts.values()), (i, row["options"], opts)
        # no label or list syntax leaks into an option
        assert not any(v.startswith(("a )", "b )", "c )", "d )", "e )", "'")) for v in opts.values()), (i, opts)
        list_like += row["options"].lstrip().startswith("[")
    assert list_like == {"dev.json": 115, "test.json": 66}[name]


@needs_mathqa
def test_mathqa_items(mqa):
    items = mqa.items("test", None, 0)
    for it in items:
        assert it.answer in "abcde" and len(it.answer) == 1, it.id
        assert it.reference.endswith(f"\n#### {it.answer}"), it.id
        assert not it.reference.startswith('"'), it.id
        content = it.messages[0]["content"]
        assert "\nOptions:\n(a) " in content and "\n(e) " in content, it.id
        assert content.endswith("Answer with the letter of the correct option, e.g. \\boxed{a}."), it.id
    first = items[0]
    assert first.id == "mathqa-test-0"
    assert first.answer == "a"
    assert first.meta["options"] == {"a": "38", "b": "27.675", "c": "30", "d": "data inadequate",
                                     "e": "none of these"}
    assert first.messages[0]["content"].startswith("a shopkeeper sold an article offering a discount of 5 %")
    assert "(a) 38\n(b) 27.675\n(c) 30\n(d) data inadequate\n(e) none of these\n" in first.messages[0]["content"]


@needs_mathqa
def test_mathqa_dev_reference_strips_quotes(mqa):
    it = mqa.items("validation", None, 0)[0]
    assert it.id == "mathqa-validation-0"
    assert it.reference == (
        "5 choices for each of the 4 questions , thus total r of 5 * 5 * 5 * 5 = 5 ^ 4 = 625 ways to "
        "answer all of them . answer : c .\n#### c"
    )
    assert mqa.extract_answer(it.reference) == "c"


@needs_mathqa
def test_mathqa_subset_reproducible(mqa):
    a = [x.id for x in mqa.items("validation", 40, 7)]
    assert a == [x.id for x in mqa.items("validation", 40, 7)]
    assert a != [x.id for x in mqa.items("validation", 40, 8)]
    idx = [int(x.rsplit("-", 1)[1]) for x in a]
    assert idx == sorted(idx) and len(set(idx)) == 40


# --------------------------------------------------------------------------------------------------
# MathQA parsing and extraction (no data needed)
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("raw,want", [
    ("a ) 38 , b ) 27.675 , c ) 30 , d ) data inadequate , e ) none of these",
     {"a": "38", "b": "27.675", "c": "30", "d": "data inadequate", "e": "none of these"}),
    ("['a ) 4', 'b ) 4 π', 'c ) 16', 'd ) 8 π', 'e ) 16']",
     {"a": "4", "b": "4 π", "c": "16", "d": "8 π", "e": "16"}),
    ("a ) 1,200 , b ) $ 15,750 , c ) 3 / 40,000 , d ) 2 , e ) 1,001",
     {"a": "1,200", "b": "$ 15,750", "c": "3 / 40,000", "d": "2", "e": "1,001"}),
    ("a ) a ) 10,700 , b ) b ) 16,000 , c ) c ) 10,900 , d ) d ) 11,000 , e ) e ) 11,100",
     {"a": "10,700", "b": "16,000", "c": "10,900", "d": "11,000", "e": "11,100"}),
    ("a ) a ) 11 , b ) b ) 18 , c ) c ) 24 , d ) d ) 29 , e ) d ) 36",  # dev[723], as given
     {"a": "11", "b": "18", "c": "24", "d": "29", "e": "36"}),
    ("a ) [ 22 ] , b ) [ 44 ] , c ) [ 45 ] , d ) [ 28 ] , e ) [ 10 ]",
     {"a": "[ 22 ]", "b": "[ 44 ]", "c": "[ 45 ]", "d": "[ 28 ]", "e": "[ 10 ]"}),
    ("a ) 3 / 4 , b ) 1 [ 1 / 5 ] , c ) 2 , d ) ( a + b ) , e ) ca n ' t be determined",
     {"a": "3 / 4", "b": "1 [ 1 / 5 ]", "c": "2", "d": "( a + b )", "e": "ca n ' t be determined"}),
    # a list-like string literal_eval cannot read falls back to the label scan
    ("['a ) 4', 'b ) 5', 'c ) 6', 'd ) 7', 'e ) 8'",
     {"a": "4", "b": "5", "c": "6", "d": "7", "e": "8"}),
    ("['a ) __import__(\"os\")', 'b ) 1', 'c ) 2', 'd ) 3', 'e ) 4']",
     {"a": '__import__("os")', "b": "1", "c": "2", "d": "3", "e": "4"}),
    ("", {}),
])
def test_parse_options(raw, want):
    assert mq.parse_options(raw) == want


@pytest.mark.parametrize("completion,want", [
    ("<think>Maybe \\boxed{a}.</think>\nSo the answer is \\boxed{C}.", "c"),
    ("\\boxed{(d)}", "d"),
    ("\\boxed{\\text{(B) } 625}", "b"),
    ("\\boxed{625}\nThe answer is (e).", "e"),
    ("The answer is b.", "b"),
    ("Answer: c", "c"),
    ("**Answer:** (D)", "d"),
    ("The answer is option (E)", "e"),
    ("The correct answer is **B**", "b"),
    ("answer : c .", "c"),
    ("(a) is too small, so it must be (c)", "c"),
    ("the answer is a bit larger than 5", None),
    ("f(a) = 3", None),
    ("\\boxed{e^2}", None),
    ("<think>The answer is (b)</think>I am not sure.", None),
    ("", None),
])
def test_mathqa_letter_extraction(completion, want):
    assert mq.MathQA().extract_answer(completion) == want


def test_mathqa_is_correct():
    task = mq.MathQA()
    assert task.is_correct("<think>(a)?</think>\\boxed{C}", _item("c"))
    assert not task.is_correct("\\boxed{b}", _item("c"))
    assert not task.is_correct("no idea", _item("c"))


def test_mathqa_bad_data(tmp_path):
    with pytest.raises(RespError, match="nope"):
        mq.MathQA(mq.MathQA.Params(data_dir=str(tmp_path / "nope"))).items("test", 5, 0)
    with pytest.raises(RespError, match="dev.json"):
        mq.MathQA(mq.MathQA.Params(data_dir=str(tmp_path))).items("validation", 5, 0)
    (tmp_path / "test.json").write_text(json.dumps([{"question": "q", "answer": "a"}]))
    with pytest.raises(RespError, match="'Problem'"):
        mq.MathQA(mq.MathQA.Params(data_dir=str(tmp_path))).items("test", None, 0)
    with pytest.raises(RespError, match="splits"):
        mq.MathQA(mq.MathQA.Params(data_dir=str(tmp_path))).items("valid", None, 0)


def test_mathqa_hub_failure_is_one_line_resp_error(monkeypatch):
    def load_dataset(*args, **kwargs):
        raise FileNotFoundError("Dataset 'regisss/math_qa' doesn't exist\nmore")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    with pytest.raises(RespError) as exc:
        mq.MathQA().items("validation", 5, 0)
    assert "\n" not in str(exc.value) and "regisss/math_qa" in str(exc.value)
