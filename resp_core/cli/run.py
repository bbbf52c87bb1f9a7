"""``respctl run``, ``report``, ``validate`` and ``export``: prune by a recipe, show or check it,
write the pruned model."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import RespError
from ..option_bounds import Bound, bounded
from .common import (CI_OPTION, METRIC_OPTION, check_ci, console, default_run_dir, err_console, load_recipe,
                     print_json, protocol_line, recipe_document, user_errors, warn_plugin_failures)


@user_errors
def run(recipe: Optional[Path] = typer.Argument(None, help="Recipe YAML (default: the built-in testbed demo)."),
        out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run folder (must not exist)."),
        resume: Optional[Path] = typer.Option(None, "--resume", metavar="RUN_DIR",
                                              help="Continue an interrupted, failed or stale run from its last "
                                                   "completed step (its own recipe.yaml is used)."),
        metric: Optional[list[str]] = METRIC_OPTION,
        as_json: bool = typer.Option(False, "--json", help="Print the metrics and run record as JSON on stdout "
                                     "when done (progress goes to stderr).")):
    """Prune a model as a recipe says; write everything to a new run folder."""
    from ..pipeline import resume_run, run_recipe
    from ..progress import RichProgressReporter
    from ..report import results_table
    from ..rundir import RunDir

    console = err_console if as_json else globals()["console"]

    def on_row(row):
        from ..report import format_run_metric, main_metrics

        shown = ", ".join(f"{k} {format_run_metric(k, row[k])}" for k in main_metrics([row])
                          if isinstance(row.get(k), float))
        console.print(f"  sparsity {row['sparsity']:.1%}: {row['parameters'] / 1e6:.3f}M parameters {shown}",
                      highlight=False)

    if resume is not None:
        if recipe is not None or out is not None:
            raise RespError("--resume: give only the run folder (its recipe.yaml is used; no RECIPE or --out)")
        RunDir.open_resumable(resume)
        console.print(f"[bold]RESP[/] resuming [cyan]{resume}[/]")
        result = resume_run(resume, RichProgressReporter(console), on_row=on_row)
        name = result.run_dir.read_json("run.json").get("name", resume.name)
    else:
        resolved, source = load_recipe(recipe)
        run_path = out or (Path(resolved.recipe.output.dir) if resolved.recipe.output.dir
                           else default_run_dir(resolved.recipe.name))
        RunDir.check_new(run_path)
        from ..plan import check_fits

        check_fits(resolved.recipe)  # on a GPU: stop before loading the model when the run cannot fit
        console.print(f"[bold]RESP[/] running [cyan]{source}[/] into [cyan]{run_path}[/]")
        protocol_line(resolved.recipe)
        result = run_recipe(resolved, run_path, RichProgressReporter(console), on_row=on_row)
        name = resolved.recipe.name
    if as_json:
        print_json({"run_dir": str(result.run_dir.path), "run": result.run_dir.read_json("run.json"),
                    "metrics": result.rows})
        return
    console.print(results_table(result.rows, f"{name}: accuracy per milestone", metric))
    if result.compaction_max_abs_diff is not None:
        console.print(f"compacted model: {result.run_dir.file('model')} "
                      f"(max |logit diff| vs masked model: {result.compaction_max_abs_diff:.2e})")
    console.print(f"run folder: {result.run_dir.path}")


@user_errors
def report(run_dir: Path = typer.Argument(..., help="A finished comparison folder or run folder."),
           metric: Optional[list[str]] = METRIC_OPTION, ci: str = CI_OPTION,
           as_json: bool = typer.Option(False, "--json", help="Print the results (or the run's metrics) as JSON.")):
    """Re-render tables, report and plot of a finished comparison (or run) without recomputing."""
    from ..compare import collect_results, write_results
    from ..report import results_table, rich_table
    from ..rundir import RunDir

    check_ci(ci)
    if (run_dir / "compare.yaml").is_file():
        results = collect_results(run_dir)
        if not results["rows"]:
            raise RespError(f"{run_dir} has no finished runs yet")
        write_results(run_dir, results, ci=ci)
        if as_json:
            print_json(results)
            return
        console.print(rich_table(results, ci))
        console.print(f"re-rendered {run_dir / 'report.md'}, {run_dir / 'accuracy.png'} (.pdf, .svg), "
                      f"{run_dir / 'results.csv'}")
        return
    rd = RunDir.open_finished(run_dir)
    rows = rd.read_json("metrics.json")
    if as_json:
        print_json({"run_dir": str(run_dir), "run": rd.read_json("run.json"), "metrics": rows})
        return
    console.print(results_table(rows, f"{rd.read_json('run.json')['name']}: accuracy per milestone", metric))


@user_errors
def validate(recipe: Path = typer.Argument(..., help="Recipe YAML to check."),
             portable: bool = typer.Option(False, "--portable", help="The recipe is for another machine: do not "
                                           "check the device, nor look up a hub model missing from the local cache.")):
    """Check a recipe or a comparison recipe (schema, plugin names, parameters, the model's config,
    tokenizer and weight headers, device, structures) without loading any weights."""
    from ..recipe import is_comparison

    data, source = recipe_document(recipe)
    if is_comparison(data):
        from ..compare import parse_compare, resolve_compare

        warn_plugin_failures()
        cmp = parse_compare(data, source)
        resolve_compare(cmp, source, portable=portable)
        console.print(f"[green]ok[/] {source}: comparison {cmp.name}; {len(cmp.methods)} methods at "
                      f"{[f'{s:.0%}' for s in cmp.sparsities]}, "
                      + (f"path seeds {cmp.path_seeds}, evaluation seeds {cmp.seeds}" if cmp.path_seeds
                         else f"seeds {cmp.seeds}"))
        protocol_line(cmp)
        return
    if portable:
        from ..recipe import parse_recipe
        from ..resolve import resolve

        warn_plugin_failures()
        resolved = resolve(parse_recipe(data, source), source=source, portable=True)
    else:
        resolved, source = load_recipe(recipe, (data, source))
        from ..plan import check_fits

        check_fits(resolved.recipe)  # on a GPU: the memory plan must fit
    steps = resolved.schedule.steps()
    stop = getattr(resolved.schedule, "stop_at", None)  # a fixed grid that the run leaves at its target
    extent = (f"a grid of {len(steps)} steps to {steps[-1].sparsity:.0%}, left once {stop:.0%} is reached"
              if stop is not None else f"{len(steps)} steps to {steps[-1].sparsity:.0%}")
    console.print(f"[green]ok[/] {source}: {resolved.recipe.name}; scorer {resolved.recipe.scorer.name}, "
                  f"calibration {resolved.recipe.calibration.name}, {extent} "
                  f"with milestones {_milestones(steps)}")
    protocol_line(resolved.recipe)
    if portable:
        console.print("(--portable: the device and a hub model missing from the local cache were not checked)")


@user_errors
@bounded(milestone=Bound(0, 1, low_open=True, high_open=True))
def export_model(run_dir: Path = typer.Argument(..., help="A run folder (finished or not: any saved mask works)."),
                 fmt: str = typer.Option("compacted", "--format", "-f",
                                         help="masked (dense shape, loads anywhere) | compacted (per-layer widths, "
                                              "RESP's loader) | uniform (smaller standard config, when every layer "
                                              "kept the same widths)."),
                 milestone: Optional[float] = typer.Option(None, "--milestone", help="Export this milestone's mask "
                                                           "(masks/milestone_S.safetensors)."),
                 mask: Optional[Path] = typer.Option(None, "--mask", help="Export this mask file (e.g. "
                                                     "masks/step_03.safetensors; relative to the run folder)."),
                 out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder (must not exist; "
                                                    "default RUN/export/<mask>-<format>).")):
    """Write a run's pruned model (the final mask, a milestone or any step) in an export format."""
    from ..export import export_run

    with console.status(f"Exporting {run_dir} as {fmt}"):
        res = export_run(run_dir, fmt, milestone=milestone, mask_file=mask, out=out)
    for line in res["warnings"]:
        err_console.print(f"[yellow]warning:[/] {line}", highlight=False, soft_wrap=True)
    console.print(f"{res['format']} model of {res['mask']} (weights: {res['weights_from']}) written to "
                  f"{res['out']} ({res['bytes'] / 1e6:.1f} MB)", highlight=False, soft_wrap=True)


def _milestones(steps) -> list[float]:
    """The milestones a schedule names: steps that are milestones, or those judged on the measured
    sparsity (``milestones_on: reached``), which a step carries without being one."""
    measured = sorted({m for s in steps for m in s.measured_milestones})
    return measured or [s.sparsity for s in steps if s.milestone]
