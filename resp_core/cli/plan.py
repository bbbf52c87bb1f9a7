"""``respctl plan``: print the memory and time plan of a recipe (or of a comparison's largest run)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from ..option_bounds import Bound, bounded
from .common import console, err_console, print_json, recipe_document, user_errors


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
    from ..plan import format_seconds, gib, make_plan, parse_size
    from ..plan.comparison import plan_comparison
    from ..recipe import is_comparison, parse_recipe

    data, source = recipe_document(recipe)
    memory = parse_size(gpu_memory) if gpu_memory else None
    kw = dict(gpu=gpu, config_file=str(config) if config else None, prompt_tokens=prompt_tokens, mfu=mfu)
    if is_comparison(data):  # every method's run; the plan shown is the one with the largest scoring peak
        cp = plan_comparison(data, source, memory, **kw)
        parsed, p = cp.recipe, cp.plan
        if not as_json:
            peaks = ", ".join(f"{lb} {gib(pl.scoring_peak)}" for lb, pl in cp.plans)
            console.print(f"comparison {cp.name}: {len(cp.plans)} methods, one run each (x sparsities for one-shot "
                          f"methods); scoring peaks: " + peaks + f"; the plan of {cp.label}:",
                          highlight=False, soft_wrap=True)
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
    if p.recovery is not None:  # resp_core/plan/recovery.py
        from ..plan.recovery import recovery_rows

        for phase, part, v in recovery_rows(p.recovery):
            table.add_row(phase, part, gib(v))
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
    if p.recovery is not None:
        r = p.recovery
        times.add_row(f"recovery ({r['settings']['steps']} steps x {r['points']} points)", format_seconds(t["recovery"]))
    times.add_row("[bold]total[/]", f"[bold]{format_seconds(t['total'])}[/]")
    console.print(times)
    if p.problems:
        for line in p.problems:
            err_console.print(f"[bold red]does not fit:[/] {line}", highlight=False, soft_wrap=True)
        raise typer.Exit(1)
    console.print(f"[green]fits[/] in {gib(p.gpu_memory)}", highlight=False)
