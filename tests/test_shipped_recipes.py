"""Shipped recipes are reachable by name from any folder: listed, shown, copied, run and
validated by name; a name that is not shipped is one line."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from resp_core.cli import app
from resp_core.shipped_recipes import shipped_recipes
from test_cli import assert_user_error

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]


def test_every_recipe_file_is_listed_by_name():
    on_disk = {p.relative_to(REPO / "recipes").with_suffix("").as_posix() for p in (REPO / "recipes").rglob("*.yaml")}
    listed = {r.name: r for r in shipped_recipes()}
    assert set(listed) == on_disk
    assert listed["testbed-resp"].kind == "run" and listed["paper/testbed-table1"].kind == "comparison"
    result = runner.invoke(app, ["recipes", "--names"])
    assert result.exit_code == 0 and result.output.split() == [r.name for r in shipped_recipes()]


def test_show_copy_and_validate_by_name_from_another_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shown = runner.invoke(app, ["recipes", "show", "testbed-table1"])
    assert shown.exit_code == 0 and shown.output == (REPO / "recipes" / "testbed-table1.yaml").read_text()
    assert runner.invoke(app, ["recipes", "copy", "paper/testbed-resp"]).exit_code == 0
    assert (tmp_path / "testbed-resp.yaml").read_bytes() == (REPO / "recipes" / "paper" / "testbed-resp.yaml").read_bytes()
    again = runner.invoke(app, ["recipes", "copy", "paper/testbed-resp"])
    assert_user_error(again, "already exists")
    valid = runner.invoke(app, ["validate", "testbed-table1"])
    assert valid.exit_code == 0 and "(built-in) testbed-table1.yaml" in valid.output, valid.output


def test_a_name_that_is_not_shipped_is_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for args in (["recipes", "show", "testbed-tabel1"], ["recipes", "copy", "nope"]):
        result = runner.invoke(app, args)
        assert_user_error(result, "not a shipped recipe")
        assert len(result.output.strip().splitlines()) == 1
    assert "did you mean 'testbed-table1'" in runner.invoke(app, ["recipes", "show", "testbed-tabel1"]).output
    assert not list(tmp_path.iterdir())
    result = runner.invoke(app, ["validate", "no-such-recipe"])
    assert result.exit_code == 2 and "no-such-recipe" in result.output
