"""The GPU check (run by scripts/gpu-check.sh): writes gpu-check.json and prints a summary.

1. A random Qwen3-8B-shaped model in bf16, one scoring pass (warm-up) then timed passes on
   8 x 2048-token traces (labels on the last 1920): tokens/s, model FLOPs utilization
   (6·N·tokens / time / peak bf16 FLOP/s), peak memory against ``respctl plan``'s prediction;
   dense vs 40%-compacted decode and prefill speed (``resp_core.bench.gpu_check``).
2. ``respctl plan`` of the shipped Qwen3-8B recipe for this GPU's memory.
3. The vLLM generator's API test when vllm is installed (tests/test_vllm_generator.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def main(out: Path) -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: the GPU check needs one", file=sys.stderr)
        return 2
    from resp_core.bench import gpu_check

    result = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": torch.cuda.get_device_name(0)}
    result["check"] = r = gpu_check("cuda")
    c = r["compaction"]
    print(f"{r['device']}: scoring pass on {r['traces']} x {r['trace_len']} tokens: {r['scoring_s']:.2f} s, "
          f"{r['tokens_per_s']:,.0f} tokens/s, MFU {r['mfu_projection'] or float('nan'):.1%} "
          f"(all parameters {r['mfu_all_parameters'] or float('nan'):.1%}), peak memory "
          f"{r['peak_memory_bytes'] / 2**30:.1f} GiB (planned {r['planned_peak_bytes'] / 2**30:.1f} GiB)")
    print(f"40%-compacted: decode {c['decode_speedup']:.2f}x, prefill {c['prefill_speedup']:.2f}x "
          f"(ideal {c['ideal_speedup']:.2f}x); max |logit diff| {c['max_abs_logit_diff']:.2e}")
    memory = torch.cuda.get_device_properties(0).total_memory
    plan = subprocess.run([sys.executable, "-m", "resp_core.cli", "plan", str(REPO / "recipes/qwen3-8b-gsm8k-resp.yaml"),
                           "--gpu-memory", str(memory), "--json"], capture_output=True, text=True, cwd=REPO)
    result["plan_exit_code"] = plan.returncode
    result["plan"] = json.loads(plan.stdout) if plan.stdout.strip().startswith("{") else plan.stderr[-2000:]
    api = subprocess.run([sys.executable, "-m", "pytest", "-q", "tests/test_vllm_generator.py"], capture_output=True,
                         text=True, cwd=REPO)
    result["vllm_tests"] = {"exit_code": api.returncode, "tail": api.stdout[-1500:]}
    print("vLLM generator tests:", api.stdout.strip().splitlines()[-1] if api.stdout.strip() else api.returncode)
    out.write_text(json.dumps(result, indent=2, default=str))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("gpu-check.json")))
