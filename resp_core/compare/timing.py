"""Timing a comparison's milestone models against the dense model (the recipe's ``speedup``
section; the statistics are in :mod:`.speedup`).

Every finished milestone keeps its compacted model (``runs/<method>[/path<s>]/models/milestone_<t>``,
heads and channels physically removed).  Each is loaded next to the dense model, in this process,
and both decode the same ``prompts`` (the first of the task's test split, chat template applied,
in batches of ``batch_size``, left-padded) for exactly ``new_tokens`` greedy tokens (end of
sequence suppressed), once each untimed, then in ``repeats`` rounds, the order swapped every other
round (:func:`resp_core.decode_timing.alternating_times`, the decoder ``respctl bench`` uses too:
:func:`resp_core.decode_timing.fixed_length_decoder`).  A round's time covers the prompts' prefill
and the decoding; divided by ``prompts · new_tokens`` it is the time per generated token.

The record of each milestone is ``speedup/<method>[/path<s>][/<one-shot target>]/milestone_<t>.json``
in the comparison folder (seconds of every round, the settings, the device and thread count).
It is written atomically once measured, so an interrupted or extended comparison measures only
the milestones it lacks (or those measured with other settings).  Timings are the one part of a
comparison folder that differs between two runs of the same recipe.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..atomic_io import write_json
from .paths import is_finished
from .schema import CompareRecipe, method_runs

RECORD_VERSION = 1


def timing_file(folder: Path, sub: str, target: float) -> Path:
    """Where the timing of the milestone ``target`` of run ``sub`` (``runs/...``) is kept."""
    return folder / "speedup" / Path(sub).relative_to("runs") / f"milestone_{target:.2f}.json"


def milestones(cmp: CompareRecipe, folder: Path) -> list[tuple[str, str, float, int | None, Path]]:
    """``(method, run folder, target, path seed, model folder)`` of every saved milestone model of
    the finished runs."""
    out = []
    for m in cmp.methods:
        for sub, _, path_seed in method_runs(cmp, m):
            run = folder / sub
            if not is_finished(run):
                continue
            for row in json.loads((run / "metrics.json").read_text()):
                model = run / "models" / f"milestone_{row['target']:.2f}"
                if model.is_dir():
                    out.append((m.label, sub, row["target"], path_seed, model))
    return out


def _current(path: Path, params: dict) -> bool:
    if not path.is_file():
        return False
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return record.get("version") == RECORD_VERSION and record.get("params") == params


def _prompt_batches(cmp: CompareRecipe, task, tokenizer, device: str) -> tuple[list, list[int]]:
    from ..generation import encode, left_pad

    sp = cmp.speedup
    items = task.items("test", sp.prompts, cmp.seed)
    texts = [tokenizer.apply_chat_template(it.messages, tokenize=False, add_generation_prompt=True,
                                           enable_thinking=True) for it in items]
    ids = encode(tokenizer, texts)
    batches = []
    for s in range(0, len(ids), sp.batch_size):
        x, att = left_pad(tokenizer, ids[s: s + sp.batch_size])
        batches.append((x.to(device), att.to(device)))
    return batches, [len(i) for i in ids]


def measure_speedups(cmp: CompareRecipe, folder: Path, say=lambda msg: None) -> int:
    """Time every milestone model of ``folder`` that has no current timing record against the dense
    model; the number of milestones timed."""
    if cmp.speedup is None:
        return 0
    params = cmp.speedup.model_dump()
    todo = [m for m in milestones(cmp, folder) if not _current(timing_file(folder, m[1], m[2]), params)]
    if not todo:
        return 0
    import torch

    from ..decode_timing import alternating_times, fixed_length_decoder, unique_parameter_count
    from ..generation import pad_token_id
    from ..loading import DTYPES, load_model_and_tokenizer
    from ..model.pruned_model import load_pruned
    from ..registry import get_registry
    from ..resolve import resolve
    from .schema import dense_recipe

    reg = get_registry()
    task = resolve(dense_recipe(cmp, reg), reg).task
    device = cmp.model.device
    dense, tok = load_model_and_tokenizer(cmp.model)
    batches, prompt_tokens = _prompt_batches(cmp, task, tok, device)
    sp, pad = cmp.speedup, pad_token_id(tok)
    n_dense = unique_parameter_count(dense)
    dense_run = fixed_length_decoder(dense, batches, sp.new_tokens, pad, device)
    dense_run()  # warm-up
    for label, sub, target, path_seed, model_dir in todo:
        who = label + ("" if path_seed is None else f" (path seed {path_seed})")
        say(f"[bold]speedup[/]: timing {who} at {target:.0%} against the dense model "
            f"({sp.repeats} rounds × {sp.prompts} prompts × {sp.new_tokens} tokens)")
        pruned = load_pruned(model_dir, dtype=DTYPES[cmp.model.dtype], device=device)
        pruned_run = fixed_length_decoder(pruned, batches, sp.new_tokens, pad, device)
        pruned_run()  # warm-up
        times = alternating_times({"dense": dense_run, "pruned": pruned_run}, sp.repeats, swap=True)
        n_pruned = unique_parameter_count(pruned)
        del pruned, pruned_run
        write_json(timing_file(folder, sub, target), {
            "version": RECORD_VERSION, "params": params, "method": label, "path_seed": path_seed,
            "target": target, "model": str(Path(sub) / "models" / model_dir.name),
            "device": device, "dtype": cmp.model.dtype, "threads": torch.get_num_threads(),
            "prompt_tokens": prompt_tokens, "tokens_per_round": sp.prompts * sp.new_tokens,
            "dense_parameters": n_dense, "pruned_parameters": n_pruned,
            "order": "dense, pruned; swapped every other round",
            "dense_s": times["dense"], "pruned_s": times["pruned"]})
    return len(todo)


def read_timings(cmp: CompareRecipe, folder: Path) -> dict:
    """``{(method, target, path seed as str): timing record}`` of the milestones timed with the
    recipe's current ``speedup`` settings."""
    if cmp.speedup is None:
        return {}
    params = cmp.speedup.model_dump()
    out = {}
    for label, sub, target, path_seed, _ in milestones(cmp, folder):
        f = timing_file(folder, sub, target)
        if _current(f, params):
            out[(label, target, str(0 if path_seed is None else path_seed))] = json.loads(f.read_text())
    return out
