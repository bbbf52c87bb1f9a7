"""``respctl``: the command-line interface.

Every user error (bad recipe, unknown plugin, missing path, existing run folder) is printed as
one line on stderr with exit code 2 and no traceback; nothing is written in that case.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Optional

_ON_TERMINAL = sys.stdout.isatty() and sys.stderr.isatty()
if not _ON_TERMINAL:
    # tqdm reads TQDM_DISABLE once, when it is first imported (torch imports it): set it before
    # anything imports torch, so that third-party bars (e.g. transformers' GGUF de-quantizing)
    # stay out of piped output.
    import os

    os.environ.setdefault("TQDM_DISABLE", "1")

import typer
from rich.table import Table

from .errors import RespError
from .option_bounds import Bound, bounded
from .progress import make_console
from .validation import MAX_SEED

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

DEFAULT_RECIPE = "testbed-resp.yaml"


def user_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RespError as exc:
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(getattr(exc, "exit_code", 2)) from None
    return wrapper


def _recipe_document(recipe: Optional[Path]):
    """The recipe file parsed once (size, encoding, nesting and duplicate keys checked)."""
    from .recipe import decode_recipe_bytes, load_yaml_document, read_recipe_file

    if recipe is None:
        source = f"(built-in) {DEFAULT_RECIPE}"
        text = decode_recipe_bytes(resources.files("resp_recipes").joinpath(DEFAULT_RECIPE).read_bytes(), source)
    else:
        source = str(recipe)
        text = read_recipe_file(recipe)
    return load_yaml_document(text, source), source


def print_json(obj) -> None:
    """``obj`` as JSON on stdout (NaN and infinities as null), nothing else on that line."""
    from .stats import json_safe

    sys.stdout.write(json.dumps(json_safe(obj), indent=2, allow_nan=False) + "\n")
    sys.stdout.flush()


def _protocol_line(parsed, out=None) -> None:
    """``mode: paper``: how many settings were the authors', and the recipe's own that differ."""
    if getattr(parsed, "mode", "default") != "paper":
        return
    proto = parsed.protocol()
    kept = "; ".join(f"{k} = {v['recipe']} (authors': {v['paper']})" for k, v in proto.get("kept", {}).items())
    (out or console).print(f"mode paper: {len(proto.get('applied', {}))} settings set to the authors' protocol"
                           + (f"; kept from the recipe: {kept}" if kept else ""), highlight=False, soft_wrap=True)


def _warn_plugin_failures() -> None:
    from .registry import get_registry

    for line in get_registry().failure_lines():
        err_console.print(f"[yellow]warning:[/] {line}", highlight=False, soft_wrap=True)


def _load(recipe: Optional[Path], document=None):
    from .recipe import parse_recipe, resolve

    data, source = document or _recipe_document(recipe)
    _warn_plugin_failures()
    parsed = parse_recipe(data, source)
    return resolve(parsed, source=source), source


def _default_run_dir(name: str) -> Path:
    return Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def main_metrics(rows: list[dict], chosen: list[str] | None = None) -> list[str]:
    """The metric columns of a run table: ``chosen`` when given, else one main metric per task —
    the one an evaluator reports per seed (``<metric>@seed<s>``: ``task_accuracy``'s accuracy,
    the ``lm_eval`` evaluator's ``main_metric``), else ``<task>/accuracy``.  Every other metric
    stays in ``metrics.json`` (and ``run --json``)."""
    from .compare import SEED_KEY

    keys = list(dict.fromkeys(k for r in rows for k in r))
    if chosen:
        unknown = [c for c in chosen if c not in keys]
        if unknown:
            raise RespError(f"--metric: {unknown[0]!r} is not a metric of this run; it has "
                            f"{', '.join(k for k in keys if '/' in k) or 'none'}")
        return list(chosen)
    mains = [m.group("metric") for k in keys if (m := SEED_KEY.match(k))]
    mains = list(dict.fromkeys(mains)) or [k for k in keys if k.endswith("/accuracy")]
    per_task: dict[str, str] = {}
    for k in mains:
        per_task.setdefault(k.split("/", 1)[0], k)
    return list(per_task.values())


def results_table(rows: list[dict], title: str, metrics: list[str] | None = None) -> Table:
    """Sparsity, parameter count and one main metric per task for each evaluated point."""
    from .report import format_run_metric

    metric_keys = main_metrics(rows, metrics)
    table = Table(title=title)
    table.add_column("step", justify="right")
    table.add_column("sparsity", justify="right")
    table.add_column("parameters", justify="right")
    for k in metric_keys:
        table.add_column(k.replace("/", " "), justify="right")
    table.add_column("traces correct", justify="right")
    for r in rows:
        cells = [str(r.get("step", "")), f"{r['sparsity']:.1%}", f"{r['parameters'] / 1e6:.3f}M"]
        for k in metric_keys:
            cells.append(format_run_metric(k, r.get(k), r.get(f"{k}_ci95")))
        c = r.get("calibration_correct_fraction")
        cells.append("" if c is None else f"{c:.1%}")
        table.add_row(*cells)
    return table


CI_OPTION = typer.Option("seeds", "--ci", help="Confidence intervals: 'seeds' (Student t over sampling seeds) "
                         "or 'items' (bootstrap over evaluated items).")


def _check_ci(ci: str) -> None:
    from .report import CI_CHOICES

    if ci not in CI_CHOICES:
        raise RespError(f"--ci: {ci!r} is not one of {', '.join(CI_CHOICES)}")


METRIC_OPTION = typer.Option(None, "--metric", "-m", help="Show this metric in the run table (repeatable; "
                             "default: one main metric per task).")


@app.command()
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
    from .pipeline import resume_run, run_recipe
    from .progress import RichProgressReporter
    from .rundir import RunDir

    console = err_console if as_json else globals()["console"]

    def on_row(row):
        from .report import format_run_metric

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
        resolved, source = _load(recipe)
        run_path = out or (Path(resolved.recipe.output.dir) if resolved.recipe.output.dir
                           else _default_run_dir(resolved.recipe.name))
        RunDir.check_new(run_path)
        from .plan import check_fits

        check_fits(resolved.recipe)  # on a GPU: stop before loading the model when the run cannot fit
        console.print(f"[bold]RESP[/] running [cyan]{source}[/] into [cyan]{run_path}[/]")
        _protocol_line(resolved.recipe)
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


@app.command()
@user_errors
def compare(recipe: Path = typer.Argument(..., help="Comparison recipe YAML (methods x sparsities x seeds)."),
            out: Optional[Path] = typer.Option(None, "--out", "-o",
                                               help="Comparison folder; an existing one is extended."),
            seeds: Optional[str] = typer.Option(None, help="Override the recipe's seeds, e.g. '0' or '0,1,2'."),
            ci: str = CI_OPTION,
            as_json: bool = typer.Option(False, "--json", help="Print the results (results.json) on stdout when "
                                         "done (progress goes to stderr)."),
            executor: str = typer.Option("serial", help="Where the pruning paths run: serial (here, one after the "
                                         "other) or ray (one Ray task each)."),
            address: Optional[str] = typer.Option(None, help="With --executor ray: the cluster to join ('auto', "
                                                  "host:port, ray://...); default: a local Ray instance.")):
    """Run methods side by side on the same model, prompts, structures and seeds; table, CSV/JSON, report, plot."""
    from .compare import parse_compare, resolve_compare, run_compare
    from .executors import make_executor
    from .progress import RichProgressReporter
    from .report import rich_table

    _check_ci(ci)
    runner = make_executor(executor, address)
    console = err_console if as_json else globals()["console"]

    data, source = _recipe_document(recipe)
    _warn_plugin_failures()
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
    folder = out or (Path(cmp.output.dir) if cmp.output.dir else _default_run_dir(cmp.name))
    if folder.exists():
        from .compare import check_extension

        check_extension(folder, cmp)
        console.print(f"[bold]RESP[/] extending comparison [cyan]{folder}[/]")
    else:
        console.print(f"[bold]RESP[/] comparing {len(cmp.methods)} methods into [cyan]{folder}[/]")
    _protocol_line(cmp, console)
    results = run_compare(cmp, str(recipe), folder, RichProgressReporter(console), console, executor=runner)
    if ci != "seeds":
        from .compare import write_results

        write_results(folder, results, ci=ci)
    if as_json:
        print_json(results)
        return
    console.print(rich_table(results, ci))
    console.print(f"results: {folder / 'results.csv'}, {folder / 'results.json'}; report: {folder / 'report.md'}; "
                  f"plot: {folder / 'accuracy.png'} (also .pdf, .svg)")


@app.command()
@user_errors
def report(run_dir: Path = typer.Argument(..., help="A finished comparison folder or run folder."),
           metric: Optional[list[str]] = METRIC_OPTION, ci: str = CI_OPTION,
           as_json: bool = typer.Option(False, "--json", help="Print the results (or the run's metrics) as JSON.")):
    """Re-render tables, report and plot of a finished comparison (or run) without recomputing."""
    from .compare import collect_results, write_results
    from .report import rich_table
    from .rundir import RunDir

    _check_ci(ci)
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


@app.command()
@user_errors
def validate(recipe: Path = typer.Argument(..., help="Recipe YAML to check."),
             portable: bool = typer.Option(False, "--portable", help="The recipe is for another machine: do not "
                                           "check the device, nor look up a hub model missing from the local cache.")):
    """Check a recipe or a comparison recipe (schema, plugin names, parameters, the model's config,
    tokenizer and weight headers, device, structures) without loading any weights."""
    from .recipe import is_comparison

    data, source = _recipe_document(recipe)
    if is_comparison(data):
        from .compare import parse_compare, resolve_compare

        _warn_plugin_failures()
        cmp = parse_compare(data, source)
        resolve_compare(cmp, source, portable=portable)
        console.print(f"[green]ok[/] {source}: comparison {cmp.name}; {len(cmp.methods)} methods at "
                      f"{[f'{s:.0%}' for s in cmp.sparsities]}, seeds {cmp.seeds}")
        _protocol_line(cmp)
        return
    if portable:
        from .recipe import parse_recipe, resolve

        _warn_plugin_failures()
        resolved = resolve(parse_recipe(data, source), source=source, portable=True)
    else:
        resolved, source = _load(recipe, (data, source))
        from .plan import check_fits

        check_fits(resolved.recipe)  # on a GPU: the memory plan must fit
    steps = resolved.schedule.steps()
    console.print(f"[green]ok[/] {source}: {resolved.recipe.name}; scorer {resolved.recipe.scorer.name}, "
                  f"calibration {resolved.recipe.calibration.name}, {len(steps)} steps to "
                  f"{steps[-1].sparsity:.0%} with milestones {[s.sparsity for s in steps if s.milestone]}")
    _protocol_line(resolved.recipe)
    if portable:
        console.print("(--portable: the device and a hub model missing from the local cache were not checked)")


@app.command()
@user_errors
def plugins(verbose: bool = typer.Option(False, "--verbose", "-v", help="Also show each one's summary."),
            as_json: bool = typer.Option(False, "--json", help="Print JSON (entries and problems) for scripts.")):
    """List every registered implementation and where it came from."""
    from .registry import get_registry

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
    _warn_plugin_failures()


@plugin_app.command("new")
@user_errors
def plugin_new(name: str = typer.Argument(..., help="The implementation's name, as recipes will use it (e.g. my_fisher)."),
               out: Optional[Path] = typer.Option(None, "--out", "-o", help="Package folder (must not exist; "
                                                  "default ./resp-NAME).")):
    """Write a plugin package: a scorer with bounded parameters, its entry point, and a test."""
    from .scaffold import scaffold_plugin

    folder = scaffold_plugin(name, out)
    console.print(f"wrote the plugin package {folder}: install it with `pip install -e {folder}`, check it with "
                  f"`respctl plugins | grep {name}` and `pytest {folder}/tests`", highlight=False, soft_wrap=True)


SHIPPED_CYCLES = "1500@3e-3,1000@2e-3,1000@1.5e-3"


def _parse_cycles(text: str) -> list[tuple[int, float]]:
    cycles = []
    for part in text.split(","):
        try:
            steps, lr = part.strip().split("@")
            cycles.append((int(steps), float(lr)))
        except ValueError:
            raise RespError(f"--cycles: {part.strip()!r} is not STEPS@LR (e.g. 1500@3e-3)") from None
    if not cycles or any(n < 1 or lr <= 0 for n, lr in cycles):
        raise RespError("--cycles: give at least one cycle with positive steps and learning rate")
    return cycles


@testbed_app.command("train")
@user_errors
@bounded(seed=Bound(0, MAX_SEED))
def testbed_train(out: Path = typer.Option(Path("testbed-model"), "--out", "-o", help="Output folder (must not exist)."),
                  cycles: str = typer.Option(SHIPPED_CYCLES, help="Cosine cycles STEPS@PEAK_LR, comma-separated."),
                  seed: int = typer.Option(0, help="Seed (cycle i uses seed + i)."),
                  init_from: Optional[Path] = typer.Option(None, help="Start from a saved testbed model.")):
    """Train the testbed reasoning model (the shipped weights: about 40 minutes on 2 idle cores).

    Batch 96, AdamW; the first cycle starts from random init (warm-up 100 steps), every later
    cycle is a warm restart with a fresh optimizer (warm-up 50) from the previous one's weights.
    The shipped weights were made by the default three cycles (1500 + 1000 + 1000 steps)."""
    from rich.progress import Progress

    from .testbed.train import TrainSettings, train

    plan = _parse_cycles(cycles)
    if seed + len(plan) - 1 > MAX_SEED:
        raise RespError(f"--seed: cycle {len(plan)} would use seed {seed + len(plan) - 1}, above {MAX_SEED}")
    if out.exists():
        raise RespError(f"{out} already exists (nothing was written)")
    if init_from is not None and not (init_from / "model.safetensors").is_file():
        raise RespError(f"--init-from: {init_from} holds no model.safetensors")
    previous = str(init_from) if init_from else None
    if not console.is_terminal:  # a log file: plain lines (progress and ETA every minute, one per cycle)
        from .progress import PlainProgressReporter

        reporter = PlainProgressReporter(console)
        for i, (steps, lr) in enumerate(plan):
            folder = out if i == len(plan) - 1 else out / f"cycle{i + 1}"
            settings = TrainSettings(seed=seed + i, steps=steps, lr=lr, warmup=100 if previous is None else 50,
                                     init_from=previous)
            with reporter.task(f"Training testbed, cycle {i + 1}/{len(plan)}", total=steps) as advance:
                done = [0]

                def tick(s, n, loss, advance=advance, done=done):
                    advance(s - done[0])
                    done[0] = s

                record = train(folder, settings, progress=tick)
            reporter.log(f"cycle {i + 1}/{len(plan)}: final loss {record['final_loss']:.4f}")
            previous = str(folder)
        console.print(f"trained {record['parameters']:,} parameters; final loss {record['final_loss']:.4f}; "
                      f"saved to {out}")
        return
    with Progress(console=console) as bar:
        for i, (steps, lr) in enumerate(plan):
            folder = out if i == len(plan) - 1 else out / f"cycle{i + 1}"
            settings = TrainSettings(seed=seed + i, steps=steps, lr=lr, warmup=100 if previous is None else 50,
                                     init_from=previous)
            tid = bar.add_task(f"Training testbed, cycle {i + 1}/{len(plan)}", total=steps)
            record = train(folder, settings, progress=lambda s, n, loss, tid=tid, i=i: bar.update(
                tid, completed=s, description=f"Training testbed, cycle {i + 1}/{len(plan)} (loss {loss:.3f})"))
            previous = str(folder)
    console.print(f"trained {record['parameters']:,} parameters; final loss {record['final_loss']:.4f}; saved to {out}")


@testbed_app.command("generic-text")
@user_errors
def testbed_generic_text(out: Path = typer.Argument(Path("runs/generic.txt"), help="Output .txt file.")):
    """Write an offline stand-in for generic text (stdlib documentation) for c4/wikitext local_path."""
    from .testbed.generic_text import write_generic_text

    n = write_generic_text(out)
    console.print(f"wrote {n:,} characters of generic English text to {out}")


@testbed_app.command("evaluate")
@user_errors
@bounded(num=Bound(1, 1_000_000), temperature=Bound(0, 100), seed=Bound(0, MAX_SEED))
def testbed_evaluate(model: str = typer.Option("testbed", help="'testbed' or a model folder (dense or pruned)."),
                     num: int = typer.Option(500, help="Held-out problems."),
                     temperature: float = typer.Option(0.6), seed: int = typer.Option(1234)):
    """Sampled accuracy of a testbed model on held-out problems."""
    from .testbed.evaluate import evaluate_testbed
    from .progress import RichProgressReporter

    res = evaluate_testbed(model, num, temperature, seed, RichProgressReporter(console))
    console.print(f"accuracy {res['accuracy']:.1%} on {num} problems at T={temperature} "
                  f"(finished {res['finished']:.1%}, mean {res['mean_tokens']:.0f} tokens)")


@app.command()
@user_errors
@bounded(sparsity=Bound(0, 1, low_open=True, high_open=True), tp_timeout=Bound(0, 86_400, low_open=True))
def bench(quick: bool = typer.Option(False, help="Smaller models and fewer repeats (a smoke run)."),
          model: Optional[str] = typer.Option(None, "--model", help="Time this model's dense vs compacted decode and "
                                              "prefill (a folder, hub id or GGUF file) instead of the random one."),
          sparsity: float = typer.Option(0.4, help="Sparsity of the compacted model (of its prunable blocks)."),
          device: str = typer.Option("cpu", help="cpu or cuda[:N]."),
          gpu_check: bool = typer.Option(False, "--gpu-check", help="The GPU check instead: a random Qwen3-8B-shaped "
                                         "bf16 model, one scoring pass on 8 x 2048 tokens, MFU, peak memory, "
                                         "compaction speedups (needs a GPU with ~80 GB)."),
          tp_timeout: float = typer.Option(300.0, help="Seconds allowed to each child process (Torch-Pruning's graph "
                                           "building included)."),
          json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the figures to this JSON file.")):
    """Measure side by side: scoring pass vs its fair floor, a plain fwd+bwd and Torch-Pruning's
    GroupTaylor pass (time and peak RSS); dense vs compacted decode and prefill.  Prints ratios
    next to their goals; asserts nothing."""
    import torch

    from . import bench as B

    if device != "cpu" and (not device.startswith("cuda") or not torch.cuda.is_available()):
        raise RespError(f"--device: {device!r} is not available here (this torch has no CUDA device); use cpu")
    console.print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}")
    table = Table(title="RESP benchmark (measured side by side in this run)")
    table.add_column("measurement")
    table.add_column("value", justify="right")
    table.add_column("goal", justify="right")
    figures: dict = {}
    if gpu_check:
        with console.status("GPU check: Qwen3-8B-shaped bf16 model"):
            r = figures["gpu_check"] = B.gpu_check(device if device != "cpu" else "cuda")
        mfu = f"{r['mfu_projection']:.1%} (all parameters: {r['mfu_all_parameters']:.1%})" if r["peak_flops"] else "n/a"
        table.add_row(f"scoring pass, {r['traces']} x {r['trace_len']} tokens, {r['device']}",
                      f"{r['scoring_s']:.2f} s = {r['tokens_per_s']:,.0f} tokens/s", "")
        table.add_row("model FLOPs utilization (6·N·tokens / time / peak)", mfu, "")
        table.add_row("peak memory (planned by respctl plan)",
                      f"{r['peak_memory_bytes'] / 2**30:.1f} GiB ({r['planned_peak_bytes'] / 2**30:.1f} GiB)", "")
        _speedup_rows(table, r["compaction"], "compacted Qwen3-8B shape")
    elif model is not None:
        from .loading import load_model_and_tokenizer, model_source
        from .recipe import ModelSection

        src = model_source(model, field="--model")
        section = ModelSection(path=src.location, gguf_file=src.gguf_file) if src.gguf_file else ModelSection(path=model)
        m, _ = load_model_and_tokenizer(section, device="cpu")
        cfg = B.SpeedupConfig(sparsity=sparsity, decode_tokens=16 if quick else 48,
                              prefill_len=64 if quick else 256)
        with console.status(f"Timing dense vs compacted decode and prefill of {model}"):
            sp = figures["compaction_speedup"] = B.compaction_speedup(cfg, repeats=2 if quick else 5, model=m,
                                                                     device=device)
        _speedup_rows(table, sp, model, cfg)
    else:
        shape = B.QUICK_SCORING_MODEL if quick else B.SCORING_MODEL
        n, prompt, target, bs = (4, 16, 16, 2) if quick else (16, 64, 64, 16)
        m = B.random_qwen3(shape, device=device)
        samples = B.random_calibration(shape["vocab_size"], n, prompt, target)
        label = f"random {sum(p.numel() for p in m.parameters()) / 1e6:.0f}M Qwen3, {n} x {prompt + target} tokens"
        with console.status("Timing scoring pass vs fair floor vs plain fwd+bwd"):
            so = figures["scoring_overhead"] = B.scoring_overhead(m, samples, 0, bs, repeats=2 if quick else 5)
        del m
        table.add_row(f"scoring pass / fair floor ({label}; floor: fwd+bwd, projection gradients, same labels)",
                      f"{so['ratio_floor']:.3f}  ({so['scoring_s']:.3f}s / {so['floor_s']:.3f}s)", "<= 1.02")
        table.add_row("scoring pass / its own gradient pass (reduction onto structures excluded)",
                      f"{so['ratio_gradient_pass']:.3f}  ({so['scoring_s']:.3f}s / {so['gradient_pass_s']:.3f}s)", "")
        table.add_row("scoring pass / plain fwd+bwd (every parameter trainable)",
                      f"{so['ratio_plain']:.3f}  ({so['scoring_s']:.3f}s / {so['plain_fwd_bwd_s']:.3f}s)", "")
        if device == "cpu":
            with console.status("Peak RSS and Torch-Pruning's GroupTaylor pass, in child processes"):
                tp = figures["torch_pruning"] = B.torch_pruning_comparison(shape, n, prompt, target, bs,
                                                                           2 if quick else 3, tp_timeout)
            rs, rf = tp["peak_rss"]["scoring"], tp["peak_rss"]["floor"]
            if "error" not in rs and "error" not in rf:
                table.add_row("peak RSS added: scoring pass / fair floor",
                              f"{rs['peak_rss_added'] / rf['peak_rss_added']:.3f}  ({rs['peak_rss_added'] / 2**20:.0f} / "
                              f"{rf['peak_rss_added'] / 2**20:.0f} MiB)", "")
            t = tp["torch_pruning"]
            if t is None:
                table.add_row("scoring pass / Torch-Pruning GroupTaylor", "torch-pruning not installed", "<= 0.75")
            elif "error" in t:
                table.add_row("scoring pass / Torch-Pruning GroupTaylor",
                              f"not measured: Torch-Pruning {t['error']} (graph building, rotary bypassed)", "<= 0.75")
            else:
                table.add_row("scoring pass / Torch-Pruning GroupTaylor (rotary bypassed for graph building only)",
                              f"{t['ratio']:.3f}  ({t['scoring_s']:.3f}s / {t['torch_pruning_s']:.3f}s)", "<= 0.75")
                if "error" not in rs:
                    table.add_row("peak RSS added: scoring pass / Torch-Pruning",
                                  f"{rs['peak_rss_added'] / t['peak_rss_added']:.3f}", "<= 0.8")
        cfg = B.SpeedupConfig(layers=4, hidden=256, intermediate=768, heads=4, kv_heads=2, vocab=8000,
                              decode_tokens=16, prefill_len=64, sparsity=sparsity) if quick \
            else B.SpeedupConfig(sparsity=sparsity)
        with console.status("Timing dense vs compacted decode and prefill"):
            sp = figures["compaction_speedup"] = B.compaction_speedup(cfg, repeats=2 if quick else 5, device=device)
        _speedup_rows(table, sp, "random Qwen3", cfg)
    console.print(table)
    if json_out:
        json_out.write_text(json.dumps(figures, indent=2, default=str))


def _speedup_rows(table, sp: dict, label: str, cfg=None) -> None:
    table.add_row(f"dense / compacted parameters ({label}, {sp['sparsity_of_prunable_blocks']:.0%} of prunable blocks)",
                  f"{sp['ideal_speedup']:.3f}  ({sp['dense_parameters'] / 1e6:.1f}M / "
                  f"{sp['compacted_parameters'] / 1e6:.1f}M)", "")
    table.add_row(f"decode speedup, batch 1, {sp['decode_tokens']} tokens (dense / compacted time)",
                  f"{sp['decode_speedup']:.3f}  = {sp['decode_fraction_of_ideal']:.2f} of ideal "
                  f"({sp['decode_tokens_per_s']['dense']:.1f} -> {sp['decode_tokens_per_s']['compact']:.1f} tokens/s)",
                  ">= 0.9 of ideal")
    shape = f", batch {cfg.prefill_batch} x {cfg.prefill_len}" if cfg is not None else ""
    table.add_row(f"prefill speedup{shape}",
                  f"{sp['prefill_speedup']:.3f}  = {sp['prefill_fraction_of_ideal']:.2f} of ideal", ">= 0.9 of ideal")
    yard = sp.get("max_abs_logit_diff_low_precision_vs_fp32")
    table.add_row("max |logit diff| masked vs compacted", f"{sp['max_abs_logit_diff']:.1e}"
                  + (f"  ({sp['dtype']} rounding: masked {sp['dtype']} vs float32 {yard:.1e})" if yard is not None
                     else ""), "")


@app.command()
@user_errors
@bounded(prompt_tokens=Bound(1, 1 << 20), mfu=Bound(0, 1, low_open=True))
def plan(recipe: Path = typer.Argument(..., help="Recipe YAML."),
         gpu_memory: Optional[str] = typer.Option(None, "--gpu-memory", help="GPU memory, e.g. 80GiB (default: the "
                                                  "--gpu's)."),
         gpu: str = typer.Option("h100", help="Peak FLOP/s, bandwidth and memory of: h100, h200, a100, l40s."),
         config: Optional[Path] = typer.Option(None, "--config", help="A config.json to read instead of the model's."),
         prompt_tokens: int = typer.Option(256, help="Prompt length assumed for traces and evaluation items."),
         mfu: float = typer.Option(0.4, help="Fraction of peak FLOP/s assumed for the time estimates."),
         as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON.")):
    """Peak memory of scoring and generation, and the time of each phase, from the model's config
    alone (no weights loaded).  Exit code 1 when the run does not fit."""
    from .plan import format_seconds, gib, make_plan, parse_size
    from .recipe import parse_recipe

    from .recipe import is_comparison

    data, source = _recipe_document(recipe)
    memory = parse_size(gpu_memory) if gpu_memory else None
    kw = dict(gpu=gpu, config_file=str(config) if config else None, prompt_tokens=prompt_tokens, mfu=mfu)
    if is_comparison(data):  # every method's run; the plan shown is the one with the largest scoring peak
        from .compare import is_oneshot, method_recipe, parse_compare
        from .registry import get_registry

        cmp = parse_compare(data, source)
        reg = get_registry()
        plans = [(m.label, make_plan(method_recipe(cmp, m, reg, cmp.sparsities[-1] if is_oneshot(m) else None), memory,
                                     **kw)) for m in cmp.methods]
        label, p = max(plans, key=lambda lp: lp[1].scoring_peak)
        parsed = method_recipe(cmp, next(m for m in cmp.methods if m.label == label), reg,
                               cmp.sparsities[-1] if is_oneshot(next(m for m in cmp.methods if m.label == label)) else None)
        if not as_json:
            console.print(f"comparison {cmp.name}: {len(plans)} methods, one run each (x sparsities for one-shot "
                          f"methods); scoring peaks: " + ", ".join(f"{lb} {gib(pl.scoring_peak)}" for lb, pl in plans)
                          + f"; the plan of {label}:", highlight=False, soft_wrap=True)
    else:
        parsed = parse_recipe(data, source)
        p = make_plan(parsed, memory, **kw)
    if as_json:
        print_json(p.to_json())
        raise typer.Exit(1 if p.problems else 0)
    s, c = p.settings, p.counts
    console.print(f"[bold]{parsed.name}[/]: {p.model} ({c.parameters / 1e9:.2f}B parameters, "
                  f"{c.projection / 1e9:.2f}B in projections; config: {p.config_source}), {p.dtype}, "
                  f"GPU memory {gib(p.gpu_memory)}", highlight=False, soft_wrap=True)
    table = Table(title="memory (peak)")
    table.add_column("phase")
    table.add_column("part")
    table.add_column("bytes", justify="right")
    seq = s["prompt_tokens"] + s["new_tokens"]
    ck = "on" if s["gradient_checkpointing"] else "off"
    for part, v in p.scoring.items():
        table.add_row(f"scoring (batch {s['scoring_batch_size']} x {seq} tokens, checkpointing {ck})",
                      part.replace("_", " "), gib(v))
    table.add_row("", "[bold]scoring peak[/]", f"[bold]{gib(p.scoring_peak)}[/]")
    other = p.scoring_checkpointed_peak if not s["gradient_checkpointing"] else None
    if other is not None:
        table.add_row("", "scoring peak with gradient_checkpointing: true", gib(other))
    g = p.generation
    if g["backend"] == "vllm":
        table.add_row("generation (vllm)", "HF model weights", gib(g["hf_weights_bytes"]))
        table.add_row("", "engine share (gpu_memory_utilization)", gib(g["engine_bytes"]))
        table.add_row("", f"KV cache: {g['concurrent_sequences']} sequences of {seq} tokens at once",
                      gib(g["kv_cache_bytes"]))
        table.add_row("", "[bold]generation peak[/]" + (" (engine asleep while scoring)" if g["sleep_during_scoring"]
                                                          else " (engine awake while scoring)"),
                      f"[bold]{gib(g['peak_bytes'])}[/]")
    else:
        table.add_row(f"generation ({g['backend']}, batch {g['concurrent_sequences']})", "weights", gib(g["weights"]))
        table.add_row("", f"KV cache ({seq} tokens)", gib(g["kv_cache"]))
        table.add_row("", "logits of one step", gib(g["step_logits"]))
        table.add_row("", "[bold]generation peak[/]", f"[bold]{gib(g['peak_bytes'])}[/]")
    console.print(table)
    t = p.times
    times = Table(title=f"time (estimates from FLOP counts at {mfu:.0%} of {gpu}'s peak)")
    times.add_column("phase")
    times.add_column("time", justify="right")
    times.add_row(f"one scoring pass ({s['calibration_samples']} traces)", format_seconds(t["scoring_pass"]))
    times.add_row(f"scoring, {s['steps']} steps", format_seconds(t["scoring_all_steps"]))
    times.add_row("calibration traces", format_seconds(t["calibration_generation"]))
    times.add_row(f"regeneration ({s['milestones']} milestones, {s['regenerated_fractions']:.2g} sets in all)",
                  format_seconds(t["regeneration"]))
    items = ", ".join(f"{e['name']} {e['items']} items x {e['seeds']} seeds" for e in s["evaluators"]) or "none"
    times.add_row(f"evaluation ({items}; {s['milestones'] + int(s['evaluate_dense'])} points)",
                  format_seconds(t["evaluation"]))
    times.add_row("[bold]total[/]", f"[bold]{format_seconds(t['total'])}[/]")
    console.print(times)
    if p.problems:
        for line in p.problems:
            err_console.print(f"[bold red]does not fit:[/] {line}", highlight=False, soft_wrap=True)
        raise typer.Exit(1)
    console.print(f"[green]fits[/] in {gib(p.gpu_memory)}", highlight=False)


@app.command("export")
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
    from .export import export_run

    with console.status(f"Exporting {run_dir} as {fmt}"):
        res = export_run(run_dir, fmt, milestone=milestone, mask_file=mask, out=out)
    for line in res["warnings"]:
        err_console.print(f"[yellow]warning:[/] {line}", highlight=False, soft_wrap=True)
    console.print(f"{res['format']} model of {res['mask']} (weights: {res['weights_from']}) written to "
                  f"{res['out']} ({res['bytes'] / 1e6:.1f} MB)", highlight=False, soft_wrap=True)


@app.command("convert")
@user_errors
def convert_model(source: str = typer.Argument(..., help="A GGUF file, a model folder or a hub id."),
                  out: Path = typer.Argument(..., help="Output folder (must not exist)."),
                  gguf_file: Optional[str] = typer.Option(None, "--gguf-file", help="The GGUF file inside SOURCE "
                                                          "(a folder or hub id)."),
                  dtype: str = typer.Option("float32", "--dtype", help="float32 | bfloat16 | float16 (GGUF weights "
                                            "are dequantized to this)."),
                  revision: Optional[str] = typer.Option(None, "--revision", help="Hub revision.")):
    """Write a model as a normal safetensors Hugging Face folder (e.g. a GGUF file, dequantized)."""
    from pydantic import ValidationError

    from .loading import convert
    from .recipe import ModelSection

    try:
        section = ModelSection(path=source, gguf_file=gguf_file, dtype=dtype, revision=revision)
    except ValidationError as exc:
        from .validation import error_message

        err = exc.errors()[0]
        raise RespError(f"--{'-'.join(str(x) for x in err['loc']).replace('_', '-')}: {error_message(err)}") from None
    with console.status(f"Loading {source}"):
        res = convert(section, out)
    console.print(f"{res['model_type']} model, {res['parameters'] / 1e6:.1f}M parameters ({res['dtype']}), loaded "
                  f"in {res['load_seconds']:.1f}s, written to {res['out']} ({res['bytes'] / 1e6:.1f} MB)",
                  highlight=False, soft_wrap=True)


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
        from .progress import quiet_third_party_bars

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


if __name__ == "__main__":
    main()
