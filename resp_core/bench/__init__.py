"""``respctl bench``: side-by-side measurements, printed as ratios from one run (never asserted).

1. **Scoring pass against its floors** on a random-init ~56M Qwen3 (32k vocabulary, 8 layers,
   GQA; 16 traces of 128 tokens, labels on the last 64, like a decode-only loss):

   * RESP's scoring pass (``TaylorScorer.score``: decode-only loss, gradients into the prunable
     projections, aggregation onto structures) over the same batches as
   * the **fair floor**: transformers' own forward with ``labels`` (the same label positions) and
     backward with gradients only on the projection weights — the least a gradient-based scorer
     has to compute.  Goal: scoring / floor <= 1.02;
   * RESP's own gradient pass alone (the output head only on labelled positions, as scoring
     runs it), without the reduction onto structures: scoring / this isolates what scoring adds
     to its backward; the fair floor above also pays for logits at unlabelled positions;
   * a plain forward + backward with every parameter trainable (what ``respctl bench`` compared
     against before; flattering, kept for reference);
   * Torch-Pruning's ``GroupTaylorImportance`` (when ``torch-pruning`` is installed): the same
     forward + backward with every parameter trainable, as its LLM example runs it, then the
     importance of every group (``MetaPruner.step(interactive=True)``, nothing pruned).  Its
     dependency graph is built once, outside the timing, with transformers' rotary embedding
     replaced by its precomputed (cos, sin) and its application by the identity, for graph
     building only (Torch-Pruning's tracer hangs on both, VainF/Torch-Pruning#527; heads are
     pruned whole, so the rotation couples no channels).  Torch-Pruning couples GQA query rows to K/V rows by
     index (its attention group holds the first num_kv_heads·head_dim query rows), so its groups
     are not RESP's; what is compared is the cost of its pass, not its ranking.  Graph building runs in a child process with a time limit; when it
     does not finish, the bench says so and prints no Torch-Pruning ratio.  Goals: scoring /
     Torch-Pruning <= 0.75, peak RSS / Torch-Pruning <= 0.8;
   * peak RSS of each pass, each in a fresh child process (:func:`peak_rss_added`: the peak
     minus the RSS just before the pass, freed heap handed back first; after a warm-up on a
     tiny model).

2. **Compaction speedup**: a model pruned to a sparsity of its prunable blocks' parameters by
   random scores (which units go does not change the speed) and compacted; dense time /
   compacted time for batch-1 greedy decoding with KV cache and for batched prefill, against the
   ideal dense / compacted parameter count.  By default a random ~100M Qwen3; ``--model`` times a
   real model (a folder, hub id or GGUF file, e.g. SmolLM2-135M), ``--device cuda`` on a GPU.

Timings alternate the contenders and report medians, so drift hits all alike.

Here: the scoring pass and its floors (:mod:`.overhead`), the child-process measurements
(:mod:`.child`), the compaction speedup (:mod:`.speedup`), the GPU check (:mod:`.gpu`), and what
each mode of ``respctl bench`` measures, as table rows (:mod:`.modes`).
"""

from .child import (_child, build_torch_pruning, peak_rss_added, torch_pruning_available,
                    torch_pruning_comparison)
from .gpu import PEAK_BF16_FLOPS, QWEN3_8B, gpu_check
from .modes import bench_rows, check_device, speedup_rows
from .overhead import (QUICK_SCORING_MODEL, SCORING_MODEL, random_calibration, random_qwen3, scoring_contenders,
                       scoring_overhead)
from .speedup import SpeedupConfig, compaction_speedup

__all__ = ["PEAK_BF16_FLOPS", "QUICK_SCORING_MODEL", "QWEN3_8B", "SCORING_MODEL", "SpeedupConfig", "bench_rows",
           "build_torch_pruning", "check_device", "compaction_speedup", "gpu_check", "peak_rss_added",
           "random_calibration", "random_qwen3", "scoring_contenders", "scoring_overhead", "speedup_rows",
           "torch_pruning_available", "torch_pruning_comparison"]
