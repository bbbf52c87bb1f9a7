"""``respctl testbed``: train the shipped reasoning testbed, evaluate it, write generic text."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import RespError
from ..option_bounds import Bound, bounded
from ..validation import MAX_SEED
from .common import console, user_errors

SHIPPED_CYCLES = "1500@3e-3,1000@2e-3,1000@1.5e-3"


def parse_cycles(text: str) -> list[tuple[int, float]]:
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

    from ..testbed.train import TrainSettings, train

    plan = parse_cycles(cycles)
    if seed + len(plan) - 1 > MAX_SEED:
        raise RespError(f"--seed: cycle {len(plan)} would use seed {seed + len(plan) - 1}, above {MAX_SEED}")
    if out.exists():
        raise RespError(f"{out} already exists (nothing was written)")
    if init_from is not None and not (init_from / "model.safetensors").is_file():
        raise RespError(f"--init-from: {init_from} holds no model.safetensors")
    previous = str(init_from) if init_from else None
    if not console.is_terminal:  # a log file: plain lines (progress and ETA every minute, one per cycle)
        from ..progress import PlainProgressReporter

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


@user_errors
def testbed_generic_text(out: Path = typer.Argument(Path("runs/generic.txt"), help="Output .txt file.")):
    """Write an offline stand-in for generic text (stdlib documentation) for c4/wikitext local_path."""
    from ..testbed.generic_text import write_generic_text

    n = write_generic_text(out)
    console.print(f"wrote {n:,} characters of generic English text to {out}")


@user_errors
@bounded(num=Bound(1, 1_000_000), temperature=Bound(0, 100), seed=Bound(0, MAX_SEED))
def testbed_evaluate(model: str = typer.Option("testbed", help="'testbed' or a model folder (dense or pruned)."),
                     num: int = typer.Option(500, help="Held-out problems."),
                     temperature: float = typer.Option(0.6), seed: int = typer.Option(1234)):
    """Sampled accuracy of a testbed model on held-out problems."""
    from ..progress import RichProgressReporter
    from ..testbed.evaluate import evaluate_testbed

    res = evaluate_testbed(model, num, temperature, seed, RichProgressReporter(console))
    console.print(f"accuracy {res['accuracy']:.1%} on {num} problems at T={temperature} "
                  f"(finished {res['finished']:.1%}, mean {res['mean_tokens']:.0f} tokens)")
