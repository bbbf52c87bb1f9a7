"""Side-by-side comparisons: methods × sparsities × path seeds × evaluation seeds on one model, task,
structures and prompts.

A comparison recipe names the shared parts once (model, task, structures, generator, default
calibration, evaluators, sparsities, seeds) and lists methods (scorer, and optionally their own
calibration source, allocator and schedule overrides).  Each method is one ordinary RESP run
whose progressive schedule has a milestone at every sparsity, so 20/30/40% cost one pruning
path, not three (masks are nested).  A method with ``schedule: {name: oneshot}`` is instead one
run per sparsity, each pruned in one shot from the dense model (the authors' Wanda-sp protocol:
uncc-efficient-ai/RESP ``configs/section5/main/wanda_gsm8k_{20,30,40}.yaml``, one
``baseline_uniform_wanda`` run per target).  Evaluators that accept ``seeds`` sample once per seed.

Two levels of replication.  ``path_seeds`` (optional): each method is pruned once per path
seed, the run's ``seed`` (calibration draw, trace sampling, regeneration), so that the 95% CI
covers what the pruning itself varies; ``seeds``: the evaluation seeds, nested in every path
(same seeds, same items), so that methods are paired by path seed and item.  Without
``path_seeds`` every method has one path, with the recipe's ``seed``.

Folder layout::

    <dir>/compare.yaml          the validated comparison recipe
    <dir>/dense/metrics.json    the dense model, evaluated once
    <dir>/runs/<slug>/          one run folder per method (models/ keeps each milestone's model)
    <dir>/runs/<slug>/<s>/      one run folder per sparsity s (0.20, ...) for a one-shot method
    <dir>/runs/<slug>/path<p>/  with path_seeds: one run folder per path seed p (a one-shot
                                method: runs/<slug>/path<p>/<s>/)
    <dir>/results.json|csv      one row per method × sparsity: mean, 95% CI, per-seed values (with
                                path_seeds: over paths, per-path and per-item values, and the
                                paired differences against the reference method)
    <dir>/report.md, accuracy.png (with path_seeds: differences.csv; differences.png from two)
    <dir>/speedup/<slug>/path<p>/milestone_<s>.json, <dir>/speedup.csv
                                with ``speedup``: each milestone model timed against the dense
                                model, and the per-token, length and effective speedups

Re-running ``respctl compare`` on an existing folder extends it: finished methods are kept,
new methods and new path seeds are run, and new seeds are evaluated on the saved milestone
models.  Changing what must be shared (model, task, structures, generator, seed, sparsities, and
whether there are path seeds) is refused.

Here: the recipe and its checks (:mod:`.schema`), running the cells (:mod:`.cells`), the
results (:mod:`.results`), the statistics over pruning paths (:mod:`.paths`), the effective
speedup (:mod:`.speedup`) and the timing behind it (:mod:`.timing`).
"""

from ..metric_keys import SEED_KEY
from .cells import path_resources, run_compare, run_path
from .results import collect_results, write_results
from .schema import (SCHEDULES, SHARED_FIELDS, CompareMethod, CompareRecipe, InitFromMethod, check_extension,
                     dense_recipe, init_from_path, is_oneshot, method_recipe, method_runs, parse_compare,
                     path_seed_list, resolve_compare, run_folder, saved_compare, slug)

__all__ = ["SCHEDULES", "SEED_KEY", "SHARED_FIELDS", "CompareMethod", "CompareRecipe", "InitFromMethod",
           "check_extension", "collect_results", "dense_recipe", "init_from_path", "is_oneshot", "method_recipe",
           "method_runs", "parse_compare", "path_resources", "path_seed_list", "resolve_compare", "run_compare",
           "run_folder", "run_path", "saved_compare", "slug", "write_results"]
