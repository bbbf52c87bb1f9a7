"""The one reader of local and hub text shared by calibration sources and evaluators."""

from __future__ import annotations

import json

import pytest

from resp_core.errors import RespError
from resp_core.text_source import TextLocation, read_rows
from resp_plugins.calibration.generic_text import C4
from resp_plugins.evaluators.perplexity import Perplexity


def test_txt_jsonl_and_json_rows(tmp_path):
    (tmp_path / "a.txt").write_text("first doc\nline two\n\n  \n\nsecond doc\n")
    rows = read_rows(TextLocation(local_path=str(tmp_path / "a.txt")), "text", "calibration")
    assert rows == [{"text": "first doc\nline two"}, {"text": "second doc"}]
    (tmp_path / "a.jsonl").write_text(json.dumps({"q": "Q1", "a": "A1"}) + "\n\n" + json.dumps({"a": 3}) + "\n")
    rows = read_rows(TextLocation(local_path=str(tmp_path / "a.jsonl")), "a", "ev", {"q": "prompt_field"})
    assert rows == [{"a": "A1", "q": "Q1"}, {"a": None, "q": None}]  # a non-string text is None
    (tmp_path / "a.json").write_text(json.dumps(["plain", {"text": "obj"}]))
    assert [r["text"] for r in read_rows(TextLocation(local_path=str(tmp_path / "a.json")), "text", "c")] == \
        ["plain", "obj"]


@pytest.mark.parametrize("name, content, match", [
    ("b.jsonl", '{"text": "ok"}\n{broken\n', r"b.jsonl:2: not valid JSON"),
    ("b.jsonl", '{"body": "x"}\n', r"b.jsonl:1: no field 'text' \(got fields \['body'\]\); set ev.params.text_field"),
    ("b.json", '{"text": "x"}', r"expected a JSON list"),
    ("b.json", '[{"text": "x"}, 4]', r"b.json\[1\]: no field 'text' \(got a int\)"),
    ("b.csv", "x", r"must be a .txt, .jsonl or .json file"),
])
def test_bad_local_files_are_one_line(tmp_path, name, content, match):
    (tmp_path / name).write_text(content)
    with pytest.raises(RespError, match=match) as info:
        read_rows(TextLocation(local_path=str(tmp_path / name)), "text", "ev")
    assert "\n" not in str(info.value) and str(info.value).startswith("ev")


def test_calibration_and_perplexity_read_the_same_documents(tmp_path):
    docs = [{"text": f"document number {i} " * 3} for i in range(4)] + [{"text": ""}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    src = C4(C4.Params(local_path=str(tmp_path / "d.jsonl")))
    ppl = Perplexity(Perplexity.Params(local_path=str(tmp_path / "d.jsonl"), loss="full"))
    assert [d for d in src._documents() if d] == [d["text"] for d in ppl._documents()]
