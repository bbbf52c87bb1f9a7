"""``respctl bench``: print the side-by-side measurements of :mod:`resp_core.bench` as one table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from ..option_bounds import Bound, bounded
from .common import console, user_errors


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

    from ..bench import bench_rows, check_device

    check_device(device)
    console.print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}")
    rows, figures = bench_rows(quick, model, sparsity, device, gpu_check, tp_timeout, status=console.status)
    table = Table(title="RESP benchmark (measured side by side in this run)")
    table.add_column("measurement")
    table.add_column("value", justify="right")
    table.add_column("goal", justify="right")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    if json_out:
        json_out.write_text(json.dumps(figures, indent=2, default=str))
