"""``respctl plugins`` and ``respctl plugin new``: list the registered implementations, write a
new plugin package."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from .common import console, print_json, user_errors, warn_plugin_failures


@user_errors
def plugins(verbose: bool = typer.Option(False, "--verbose", "-v", help="Also show each one's summary."),
            as_json: bool = typer.Option(False, "--json", help="Print JSON (entries and problems) for scripts.")):
    """List every registered implementation and where it came from."""
    from ..registry import get_registry

    reg = get_registry()
    if as_json:
        entries = [reg.entries[kind][name].to_json() for kind in reg.entries for name in reg.names(kind)]
        print_json({"plugins": entries, "problems": reg.failure_lines()})
        return
    table = Table(title="RESP plugins")
    for col in ("kind", "name", "origin", "plugin module"):
        table.add_column(col, no_wrap=True, overflow="ignore" if not console.is_terminal else "ellipsis")
    if verbose:
        table.add_column("summary")
    for kind in reg.entries:
        for name in reg.names(kind):
            e = reg.entries[kind][name]
            row = [kind, name, e.origin, e.plugin] + ([e.summary] if verbose else [])
            table.add_row(*row)
    console.print(table)
    warn_plugin_failures()


@user_errors
def plugin_new(name: str = typer.Argument(..., help="The implementation's name, as recipes will use it (e.g. my_fisher)."),
               out: Optional[Path] = typer.Option(None, "--out", "-o", help="Package folder (must not exist; "
                                                  "default ./resp-NAME).")):
    """Write a plugin package: a scorer with bounded parameters, its entry point, and a test."""
    from ..scaffold import scaffold_plugin

    folder = scaffold_plugin(name, out)
    console.print(f"wrote the plugin package {folder}: install it with `pip install -e {folder}`, check it with "
                  f"`respctl plugins | grep {name}` and `pytest {folder}/tests`", highlight=False, soft_wrap=True)
