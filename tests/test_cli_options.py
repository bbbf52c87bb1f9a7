"""Every numeric option of every ``respctl`` command is bounded, and every value outside its bound
(or not finite, or not a number) is one line on stderr with exit code 2, before the command does
any work."""

from __future__ import annotations

import inspect
import math
import typing

import pytest
from typer.testing import CliRunner

from resp_core.cli import app, run_app
from resp_core.option_bounds import Bound
from test_cli import assert_user_error

runner = CliRunner()


def _commands(typer_app, prefix=()):
    """(command words, the function registered) for every command, sub-apps included."""
    for info in typer_app.registered_commands:
        fn = info.callback
        yield (*prefix, info.name or fn.__name__.replace("_", "-")), fn
    for group in typer_app.registered_groups:
        yield from _commands(group.typer_instance, (*prefix, group.name))


def _numeric_options(fn) -> dict[str, type]:
    hints = typing.get_type_hints(inspect.unwrap(fn))
    out = {}
    for name, hint in hints.items():
        args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
        if args[0] in (int, float) and name != "return":
            out[name] = args[0]
    return out


def _required_arguments(words) -> list[str]:
    """Placeholders for the command's required positional arguments."""
    import typer.main

    cmd = typer.main.get_command(app)
    for w in words:
        cmd = cmd.commands[w]
    return ["placeholder" for p in cmd.params if getattr(p, "param_type_name", "") == "argument" and p.required]


def _outside(bound: Bound, kind: type) -> list:
    step = 1 if kind is int else 1e-3
    low = bound.low if bound.low_open else bound.low - step
    high = bound.high if bound.high_open else bound.high + step
    values = [kind(low), kind(high)]
    if kind is float:
        values += [math.nan, math.inf, -math.inf]
    return values


CASES = []
for words, fn in _commands(app):
    bounds = getattr(fn, "__resp_bounds__", {})
    for name, kind in _numeric_options(fn).items():
        CASES.append((words, fn, name, kind, bounds.get(name)))


def test_the_commands_have_numeric_options():
    assert {" ".join(w) for w, *_ in CASES} >= {"plan", "bench", "export", "testbed train", "testbed evaluate"}


@pytest.mark.parametrize("case", CASES, ids=[f"{' '.join(c[0])} --{c[2]}" for c in CASES])
def test_every_numeric_option_is_bounded(case):
    words, fn, name, kind, bound = case
    assert bound is not None, f"respctl {' '.join(words)}: --{name} has no bound (add it to @bounded)"
    flag = "--" + name.replace("_", "-")
    for value in _outside(bound, kind):
        result = runner.invoke(app, [*words, *_required_arguments(words), flag, str(value)])
        assert_user_error(result, flag)
        assert len(result.output.strip().splitlines()) == 1, result.output


@pytest.mark.parametrize("case", CASES, ids=[f"{' '.join(c[0])} --{c[2]}" for c in CASES])
def test_a_word_for_a_number_is_one_line(case, capsys):
    words, fn, name, kind, bound = case
    flag = "--" + name.replace("_", "-")
    code = run_app(app, [*words, *_required_arguments(words), flag, "many"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("error:") and flag in err, err


def test_bound_ends():
    closed, half_open = Bound(1, 4), Bound(0, 1, low_open=True)
    assert closed.contains(1) and closed.contains(4) and not closed.contains(0.999) and not closed.contains(4.001)
    assert not half_open.contains(0) and half_open.contains(1e-9) and half_open.contains(1)
    assert half_open.describe() == "(0, 1]" and closed.describe() == "[1, 4]"


def test_unknown_options_and_missing_arguments_are_one_line(capsys):
    for args in (["plan", "placeholder", "--no-such-option"], ["plan", "--mfu", "0.5"], ["export", "--format", "masked"]):
        assert run_app(app, args) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("error:"), err
