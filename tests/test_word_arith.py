"""The word_arith task: disjoint splits by construction, reproducible items, few-shot turns from the
train split only, answer extraction on the way a small chat model writes its answers."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from resp_core.errors import RespError
from resp_plugins.tasks.word_arith import WordArithmetic, split_of


def task(**kw) -> WordArithmetic:
    return WordArithmetic(WordArithmetic.Params(**kw))


def triples(items):
    return {(it.meta["op"], it.meta["a"], it.meta["b"]) for it in items}


@pytest.mark.parametrize("kw", [{}, {"ops": ["add", "sub"], "max_operand": 30}, {"style": "word", "ops": ["sub"]},
                                {"test_fraction": 0.6, "min_operand": 0, "max_operand": 5}])
def test_splits_disjoint_and_complete(kw):
    t = task(**kw)
    train, test = triples(t.items("train", None, 0)), triples(t.items("test", None, 0))
    assert train and test and not train & test
    p = t.params
    r = range(p.min_operand, p.max_operand + 1)
    every = {(op, a, b) for op in p.ops for a in r for b in r if op == "add" or a >= b}
    assert train | test == every
    assert (t.split_size("train"), t.split_size("test")) == (len(train), len(test))
    # roughly the asked fraction, and a triple's split is the same whatever the operand range
    assert abs(len(test) / len(every) - p.test_fraction) < 0.15
    wider = task(**{**kw, "max_operand": p.max_operand + 7})
    assert test <= triples(wider.items("test", None, 0))
    assert train <= triples(wider.items("train", None, 0))


def test_default_split_sizes_and_answers():
    t = task()
    assert (t.split_size("train"), t.split_size("test")) == (107, 37)
    for it in t.items("test", None, 0):
        a, b = it.meta["a"], it.meta["b"]
        assert it.answer == str(a + b)
        assert it.messages[-1] == {"role": "user", "content": f"What is {a} + {b}?"}
        assert it.reference == f"{a} + {b} = {a + b}. The answer is {a + b}."
        assert t.is_correct(it.reference, it)


def test_items_reproducible_and_seeded():
    t = task(ops=["add", "sub"], style="word")
    a, b, c = t.items("train", 20, 3), t.items("train", 20, 3), t.items("train", 20, 4)
    assert [x.messages for x in a] == [x.messages for x in b]
    assert [x.id for x in a] != [x.id for x in c]
    assert len({x.id for x in a}) == 20
    # the wording of one triple does not depend on the seed that drew it
    by_id = {x.id: x.messages for x in t.items("train", None, 0)}
    assert all(by_id[x.id] == x.messages for x in a + c)


def test_fewshot_examples_come_from_train_and_never_the_item():
    t = task(fewshot=3, ops=["add", "sub"])
    train = triples(t.items("train", None, 0))
    for split in ("train", "test"):
        for it in t.items(split, None, 0):
            msgs = it.messages
            assert [m["role"] for m in msgs] == ["user", "assistant"] * 3 + ["user"]
            shown = set()
            for q, ans in zip(msgs[0:-1:2], msgs[1:-1:2]):
                a, sym, b = q["content"].removeprefix("What is ").removesuffix("?").split()
                shown.add(("add" if sym == "+" else "sub", int(a), int(b)))
                assert ans["content"] == WordArithmetic.solution("add" if sym == "+" else "sub", int(a), int(b))
            assert len(shown) == 3 and shown <= train
            assert (it.meta["op"], it.meta["a"], it.meta["b"]) not in shown
    assert task(fewshot=0).items("test", 1, 0)[0].messages[0]["role"] == "user"
    assert len(task(fewshot=0).items("test", 1, 0)[0].messages) == 1


def test_fewshot_answers_are_the_reference_solutions():
    t = task(fewshot=2)
    it = t.items("test", 1, 0)[0]
    for q, ans in zip(it.messages[0:-1:2], it.messages[1:-1:2]):
        a, _, b = q["content"].removeprefix("What is ").removesuffix("?").split()
        assert ans["content"] == f"{a} + {b} = {int(a) + int(b)}. The answer is {int(a) + int(b)}."


def test_word_style_and_suffix():
    t = task(style="word", ops=["sub"], prompt_suffix=" Answer with a number.", fewshot=0)
    for it in t.items("test", 10, 0):
        q = it.messages[-1]["content"]
        assert str(it.meta["a"]) in q and str(it.meta["b"]) in q and q.endswith("? Answer with a number.")
        assert int(it.answer) == it.meta["a"] - it.meta["b"] >= 0


@pytest.mark.parametrize("completion, want", [
    ("7 + 5 = 12. The answer is 12.", "12"),
    ("To add 7 and 5, you simply add them together: 7 + 5 = 12.", "12"),
    ("2 + 8 = 10\n\nIn mathematics, 2 + 8 equals 10.", "10"),
    ("Jack has 2 + 18 = 20 stickers.\n#### 20\nThe answer is: 2", "20"),
    ("The answer is 12 because 7 + 5 makes 12 and not 13.", "12"),
    ("<think>7 + 5 is 13? no</think>The answer is \\boxed{12}.", "12"),
    ("I cannot tell.", None),
])
def test_extraction_in_a_small_chat_models_style(completion, want):
    assert task().extract_answer(completion) == want


def test_is_correct_numeric():
    t = task()
    it = t.items("test", 1, 0)[0]
    n = int(it.answer)
    assert t.is_correct(f"{n}.0", it)
    assert not t.is_correct(f"{n + 1}", it)
    assert not t.is_correct("no number", it)


def test_split_of_is_fixed():
    # membership is a function of the triple alone (sha256), stable across runs and machines
    assert [split_of("add", a, 3, 0.25) for a in range(1, 9)] == [split_of("add", a, 3, 0.25) for a in range(1, 9)]
    assert split_of("add", 3, 4, 0.999999) == "test" and split_of("add", 3, 4, 1e-12) == "train"


@pytest.mark.parametrize("kw, field", [
    ({"ops": []}, "ops"), ({"ops": ["mul"]}, "ops"), ({"ops": ["add", "add"]}, "once"),
    ({"max_operand": 3, "min_operand": 5}, "max_operand"), ({"test_fraction": 1.0}, "test_fraction"),
    ({"fewshot": -1}, "fewshot"), ({"style": "story"}, "style"), ({"bogus": 1}, "bogus"),
    ({"max_operand": True}, "max_operand"),
])
def test_bad_params(kw, field):
    with pytest.raises(ValidationError, match=field):
        WordArithmetic.Params(**kw)


def test_errors_are_resp_errors():
    with pytest.raises(RespError, match="splits"):
        task().items("validation", 1, 0)
    with pytest.raises(RespError, match="fewshot 3 needs"):
        task(min_operand=1, max_operand=1, fewshot=3, test_fraction=0.01).items("train", 1, 0)
    with pytest.raises(RespError, match="2,000,000"):
        task(max_operand=10_000).split_size("test")
    # a split left empty by a tiny range is one line too
    t = task(min_operand=1, max_operand=1, fewshot=0, test_fraction=0.01)
    empty = [s for s in ("train", "test") if t.split_size(s) == 0]
    for s in empty:
        with pytest.raises(RespError, match="empty"):
            t.items(s, 1, 0)


def test_registered_as_a_builtin():
    from resp_core.registry import get_registry

    entry = get_registry().get("task", "word_arith", "task")
    assert entry.factory is WordArithmetic
