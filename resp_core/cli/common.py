"""What every ``respctl`` command shares: the Typer apps, the consoles, the one-line user-error
handling, the recipe reading and the options used by more than one command."""

from __future__ import annotations

import functools
import json
import sys
import time
from pathlib import Path
from typing import Optional

import typer

from ..errors import RespError
from ..progress import make_console

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="RESP: structured pruning for reasoning language models.")
testbed_app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                          help="The shipped reasoning testbed: train or evaluate it.")
app.add_typer(testbed_app, name="testbed")
plugin_app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                         help="Write a new third-party plugin package.")
app.add_typer(plugin_app, name="plugin")

console = make_console()
err_console = make_console(stderr=True)


def user_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RespError as exc:
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(getattr(exc, "exit_code", 2)) from None
    return wrapper


def recipe_document(recipe: Optional[Path]):
    """The recipe file (or, where no such file exists, the shipped recipe of that name) parsed
    once (size, encoding, nesting and duplicate keys checked)."""
    from ..recipe import decode_recipe_bytes, load_yaml_document, read_recipe_file
    from ..shipped_recipes import DEFAULT, require_shipped, shipped_recipe

    if recipe is None:  # the demo
        shipped = require_shipped(DEFAULT)
    else:  # a shipped recipe's name only where no such file exists here
        shipped = shipped_recipe(str(recipe)) if not Path(recipe).exists() else None
    if shipped is not None:
        source = shipped.source
        text = decode_recipe_bytes(shipped.data(), source)
    else:
        source = str(recipe)
        text = read_recipe_file(recipe)
    return load_yaml_document(text, source), source


def print_json(obj) -> None:
    """``obj`` as JSON on stdout (NaN and infinities as null), nothing else on that line."""
    from ..stats import json_safe

    sys.stdout.write(json.dumps(json_safe(obj), indent=2, allow_nan=False) + "\n")
    sys.stdout.flush()


def protocol_line(parsed, out=None) -> None:
    """``mode: paper``: how many settings were the authors', and the recipe's own that differ."""
    if getattr(parsed, "mode", "default") != "paper":
        return
    proto = parsed.protocol()
    kept = "; ".join(f"{k} = {v['recipe']} (authors': {v['paper']})" for k, v in proto.get("kept", {}).items())
    (out or console).print(f"mode paper: {len(proto.get('applied', {}))} settings set to the authors' protocol"
                           + (f"; kept from the recipe: {kept}" if kept else ""), highlight=False, soft_wrap=True)


def warn_plugin_failures() -> None:
    from ..registry import get_registry

    for line in get_registry().failure_lines():
        err_console.print(f"[yellow]warning:[/] {line}", highlight=False, soft_wrap=True)


def load_recipe(recipe: Optional[Path], document=None):
    from ..recipe import parse_recipe
    from ..resolve import resolve

    data, source = document or recipe_document(recipe)
    warn_plugin_failures()
    parsed = parse_recipe(data, source)
    return resolve(parsed, source=source), source


def default_run_dir(name: str) -> Path:
    return Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


CI_OPTION = typer.Option("seeds", "--ci", help="Confidence intervals: 'seeds' (Student t over sampling seeds) "
                         "or 'items' (bootstrap over evaluated items).")


def check_ci(ci: str) -> None:
    from ..report import CI_CHOICES

    if ci not in CI_CHOICES:
        raise RespError(f"--ci: {ci!r} is not one of {', '.join(CI_CHOICES)}")


METRIC_OPTION = typer.Option(None, "--metric", "-m", help="Show this metric in the run table (repeatable; "
                             "default: one main metric per task).")
