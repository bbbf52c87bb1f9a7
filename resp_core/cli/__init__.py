"""``respctl``: the command-line interface.

Every user error (bad recipe, unknown plugin, missing path, existing run folder) is printed as
one line on stderr with exit code 2 and no traceback; nothing is written in that case.

Here: the shared apps, consoles and options (:mod:`.common`) and one module per command group;
this module registers the commands, in the order ``respctl --help`` lists them.
"""

from __future__ import annotations

import sys

_ON_TERMINAL = sys.stdout.isatty() and sys.stderr.isatty()
if not _ON_TERMINAL:
    # tqdm reads TQDM_DISABLE once, when it is first imported (torch imports it): set it before
    # anything imports torch, so that third-party bars (e.g. transformers' GGUF de-quantizing)
    # stay out of piped output.
    import os

    os.environ.setdefault("TQDM_DISABLE", "1")

from . import bench, compare, convert, plan, plugins, recipes, run, testbed  # noqa: E402
from .common import app, console, err_console, plugin_app, testbed_app  # noqa: E402

for _command in (run.run, compare.compare, run.report, run.validate, plugins.plugins, bench.bench, plan.plan):
    app.command()(_command)
app.command("export")(run.export_model)
app.command("convert")(convert.convert_model)
plugin_app.command("new")(plugins.plugin_new)
testbed_app.command("train")(testbed.testbed_train)
testbed_app.command("generic-text")(testbed.testbed_generic_text)
testbed_app.command("evaluate")(testbed.testbed_evaluate)
recipes.recipes_app.command("show")(recipes.recipes_show)
recipes.recipes_app.command("copy")(recipes.recipes_copy)
app.add_typer(recipes.recipes_app, name="recipes")

__all__ = ["app", "main", "run_app"]


def main():
    import os

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass
    if not _ON_TERMINAL:
        from ..progress import quiet_third_party_bars

        quiet_third_party_bars()  # datasets' and the hub's bars
    sys.exit(run_app(app))


def _click_exceptions(name: str) -> tuple[type, ...]:
    """Click's exception class ``name`` from every Click in use: recent Typer carries its own
    copy (``typer._click``), older Typer uses ``click`` itself."""
    import importlib

    found = []
    for module in ("typer._click.exceptions", "click.exceptions"):
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(found)


def run_app(command, args: list[str] | None = None) -> int:
    """Run the Typer app and return its exit code; a command-line mistake Click finds itself (an
    option that is not a number, an unknown option, a missing argument) is one line on stderr,
    exit code 2, like every other bad input."""
    try:
        code = command(args=args, standalone_mode=False)
    except _click_exceptions("NoArgsIsHelpError") as exc:  # `respctl` alone: the help, as before
        console.print(exc.ctx.get_help(), highlight=False, markup=False)
        return 2
    except _click_exceptions("ClickException") as exc:
        hint = f" (see `{exc.ctx.command_path} --help`)" if getattr(exc, "ctx", None) is not None else ""
        err_console.print(f"[bold red]error:[/] {exc.format_message()}{hint}", highlight=False, soft_wrap=True)
        return exc.exit_code
    except _click_exceptions("Abort"):
        return 130
    return code if isinstance(code, int) else 0
