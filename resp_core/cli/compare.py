"""``respctl compare``: methods side by side on the same model, prompts, structures and seeds."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import RespError
from ..validation import MAX_SEED
from .common import (CI_OPTION, check_ci, console, default_run_dir, err_console, print_json, protocol_line,
                     recipe_document, user_errors, warn_plugin_failures)


@user_errors
def compare(recipe: Path = typer.Argument(..., help="Comparison recipe YAML (methods x sparsities x path seeds x "
                                         "evaluation seeds)."),
            out: Optional[Path] = typer.Option(None, "--out", "-o",
                                               help="Comparison folder; an existing one is extended."),
            seeds: Optional[str] = typer.Option(None, help="Override the recipe's evaluation seeds, e.g. '0' or "
                                                "'0,1,2'."),
            ci: str = CI_OPTION,
            as_json: bool = typer.Option(False, "--json", help="Print the results (results.json) on stdout when "
                                         "done (progress goes to stderr)."),
            executor: str = typer.Option("serial", help="Where the pruning paths run: serial (here, one after the "
                                         "other) or ray (one Ray task each)."),
            address: Optional[str] = typer.Option(None, help="With --executor ray: the cluster to join ('auto', "
                                                  "host:port, ray://...); default: a local Ray instance.")):
    """Run methods side by side on the same model, prompts, structures and seeds; table, CSV/JSON, report, plot."""
    from ..compare import parse_compare, resolve_compare, run_compare
    from ..executors import make_executor
    from ..progress import RichProgressReporter
    from ..report import rich_table

    check_ci(ci)
    runner = make_executor(executor, address)
    console = err_console if as_json else globals()["console"]

    data, source = recipe_document(recipe)
    warn_plugin_failures()
    cmp = parse_compare(data, source)
    if seeds is not None:
        try:
            cmp = cmp.model_copy(update={"seeds": [int(x) for x in seeds.split(",") if x.strip()]})
        except ValueError:
            raise RespError(f"--seeds: {seeds!r} is not a comma-separated list of integers") from None
        if not cmp.seeds:
            raise RespError("--seeds: give at least one seed")
        if any(not 0 <= s <= MAX_SEED for s in cmp.seeds):
            raise RespError(f"--seeds: every seed must be in [0, {MAX_SEED}]")
    resolve_compare(cmp, str(recipe))
    folder = out or (Path(cmp.output.dir) if cmp.output.dir else default_run_dir(cmp.name))
    if folder.exists():
        from ..compare import check_extension

        check_extension(folder, cmp)
        console.print(f"[bold]RESP[/] extending comparison [cyan]{folder}[/]")
    else:
        console.print(f"[bold]RESP[/] comparing {len(cmp.methods)} methods into [cyan]{folder}[/]")
    protocol_line(cmp, console)
    results = run_compare(cmp, str(recipe), folder, RichProgressReporter(console), console, executor=runner)
    if ci != "seeds":
        from ..compare import write_results

        write_results(folder, results, ci=ci)
    if as_json:
        print_json(results)
        return
    console.print(rich_table(results, ci))
    console.print(f"results: {folder / 'results.csv'}, {folder / 'results.json'}; report: {folder / 'report.md'}; "
                  f"plot: {folder / 'accuracy.png'} (also .pdf, .svg)")
    if "differences" in results:
        from ..report_paths import reference_words

        console.print(f"paired differences against {reference_words(results)} (by path seed): "
                      f"{folder / 'differences.csv'} and the report"
                      + (f"; plot: {folder / 'differences.png'}" if (folder / "differences.png").is_file() else ""))
