"""``respctl recipes``: the recipes shipped with RESP, listed, shown and copied by name."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from .common import console, print_json, user_errors

recipes_app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, invoke_without_command=True,
                          help="The recipes shipped with RESP: list them, show or copy one by name.")


@recipes_app.callback()
@user_errors
def recipes_list(ctx: typer.Context,
                 names: bool = typer.Option(False, "--names", help="Only the names, one per line (for scripts)."),
                 as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts.")):
    """List the shipped recipes (``respctl run NAME`` runs one from any folder)."""
    if ctx.invoked_subcommand is not None:
        return
    from ..shipped_recipes import shipped_recipes

    found = shipped_recipes()
    if as_json:
        print_json([{"name": r.name, "kind": r.kind, "summary": r.summary} for r in found])
        return
    if names:
        for r in found:
            console.print(r.name, highlight=False, soft_wrap=True)
        return
    table = Table(title="Shipped recipes (respctl run NAME / compare NAME / validate NAME)")
    for col in ("name", "kind"):
        table.add_column(col, no_wrap=True, overflow="ignore" if not console.is_terminal else "ellipsis")
    table.add_column("what it is")
    for r in found:
        table.add_row(r.name, r.kind, r.summary)
    console.print(table)


@user_errors
def recipes_show(name: str = typer.Argument(..., help="A shipped recipe's name (see `respctl recipes`).")):
    """Print a shipped recipe."""
    from ..shipped_recipes import require_shipped

    recipe = require_shipped(name)
    console.print(recipe.data().decode("utf-8"), highlight=False, markup=False, soft_wrap=True, end="")


@user_errors
def recipes_copy(name: str = typer.Argument(..., help="A shipped recipe's name (see `respctl recipes`)."),
                 dest: Optional[Path] = typer.Argument(None, help="File or folder to write (default: "
                                                       "./NAME.yaml; never overwritten).")):
    """Copy a shipped recipe to a file to edit."""
    from ..shipped_recipes import copy_shipped

    out = copy_shipped(name, dest)
    console.print(f"wrote {out}", highlight=False, soft_wrap=True)
