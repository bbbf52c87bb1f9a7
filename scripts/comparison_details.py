"""What each method of a finished comparison removed and calibrated on, per milestone.

    python scripts/comparison_details.py runs/smollm2-study [--markdown]

For every method and milestone, averaged over its path seeds: query heads and MLP channels
removed (of the prunable ones), the layers that lost most MLP channels, the calibration set the
step before the milestone scored on (mean target tokens, share of correct traces, from the run's
metrics.json) and the path's wall time (run.json).  Reads masks (safetensors) and JSON only.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

from safetensors.torch import load_file


def path_folders(folder: Path) -> dict[str, list[Path]]:
    out: dict[str, list[Path]] = defaultdict(list)
    for run_json in sorted((folder / "runs").glob("*/path*/run.json")) + sorted((folder / "runs").glob("*/run.json")):
        out[run_json.parent.parent.name if run_json.parent.name.startswith("path") else run_json.parent.name].append(
            run_json.parent)
    return out


def milestone_rows(run: Path) -> dict[float, dict]:
    metrics = json.loads((run / "metrics.json").read_text())
    rows = {}
    for m in metrics:
        if not m.get("milestone") or m.get("target") in (None, 0):
            continue
        mask = load_file(str(run / "masks" / f"milestone_{m['target']:.2f}.safetensors"))
        q, ch = mask["q_head"].float(), mask["mlp_channel"].float()
        removed_per_layer = (1 - ch).sum(1)
        rows[m["target"]] = {
            "heads_removed": int((1 - q).sum()), "heads": q.numel(),
            "channels_removed": int((1 - ch).sum()), "channels": ch.numel(),
            "top_layers": [int(i) for i in removed_per_layer.argsort(descending=True)[:3]],
            "top_share": [float(removed_per_layer[i] / ch.shape[1]) for i in removed_per_layer.argsort(descending=True)[:3]],
            "trace_tokens": m.get("calibration_mean_target_tokens"),
            "trace_correct": m.get("calibration_correct_fraction"),
        }
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("folder", type=Path)
    args = ap.parse_args()
    print("| method | sparsity | query heads removed | MLP channels removed | layers losing most channels (share) "
          "| calibration target tokens | calibration correct | wall s per path |")
    print("|---|---|---|---|---|---|---|---|")
    for method, runs in path_folders(args.folder).items():
        per_run = [milestone_rows(r) for r in runs]
        seconds = [json.loads((r / "run.json").read_text())["process"]["seconds"] for r in runs]
        for target in sorted(per_run[0]):
            cells = [p[target] for p in per_run if target in p]
            mean = lambda k: statistics.mean(c[k] for c in cells if c[k] is not None) if any(
                c[k] is not None for c in cells) else float("nan")
            tops = "; ".join(",".join(f"{l}({s:.0%})" for l, s in zip(c["top_layers"], c["top_share"])) for c in cells)
            print(f"| {method} | {target:.0%} | {mean('heads_removed'):.1f} of {cells[0]['heads']} | "
                  f"{mean('channels_removed'):.0f} of {cells[0]['channels']} | {tops} | {mean('trace_tokens'):.1f} | "
                  f"{mean('trace_correct'):.2f} | {statistics.mean(seconds):.0f} |")


if __name__ == "__main__":
    main()
