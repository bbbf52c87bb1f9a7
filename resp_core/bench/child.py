"""Measurements made in a fresh child process each (``python -m resp_core.bench``): the peak RSS
a pass adds, and Torch-Pruning's ``GroupTaylorImportance`` pass timed against RESP's scoring."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

import torch

from ..interfaces import CalibrationSet
from .overhead import QUICK_SCORING_MODEL, random_calibration, random_qwen3, scoring_contenders


def torch_pruning_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("torch_pruning") is not None


def build_torch_pruning(model, example_ids: torch.Tensor):
    """Torch-Pruning's ``MetaPruner`` with ``GroupTaylorImportance`` over the model's heads and
    channels (output head ignored).  The rotary embedding is replaced by its precomputed
    (cos, sin) and its application by the identity while the graph is traced
    (VainF/Torch-Pruning#527; see below), then both are restored."""
    import torch_pruning as tp

    rot = model.model.rotary_emb
    pos = torch.arange(example_ids.shape[1], device=example_ids.device)[None]
    cos, sin = rot(torch.zeros(1, device=example_ids.device), pos)
    rot.forward = lambda x, position_ids, *a, **k: (cos.to(x.dtype), sin.to(x.dtype))
    # Applying the rotary embedding (rotate_half's concatenation of the two halves of each head)
    # sends Torch-Pruning's index mapping around a cycle that never closes: every pass through the
    # concatenation shifts the indices, so its dependency search never revisits the same ones.
    # Heads are pruned whole and head dims are not pruned, so the rotation does not change which
    # channels are coupled: it is left out while the graph is traced, and restored after.
    modeling = sys.modules[type(model).__module__]
    apply_rotary = modeling.apply_rotary_pos_emb
    modeling.apply_rotary_pos_emb = lambda q, k, *a, **kw: (q, k)
    cfg = model.config
    # Torch-Pruning couples q_proj's rows to k_proj's / v_proj's by index, so its attention group
    # holds only num_kv_heads·head_dim query rows; told num_attention_heads for q_proj, its head
    # grouping fails (a [num_heads, -1] view of num_kv_heads·head_dim scores).  It is told
    # num_kv_heads for all three so that the pass runs: its groups are neither RESP's nor right
    # for GQA, and only the cost of its pass is compared.
    num_heads = {}
    for layer in model.model.layers:
        a = layer.self_attn
        num_heads[a.q_proj] = num_heads[a.k_proj] = num_heads[a.v_proj] = cfg.num_key_value_heads
    try:
        imp = tp.importance.GroupTaylorImportance()
        pruner = tp.pruner.MetaPruner(model, example_inputs=example_ids, importance=imp, global_pruning=True,
                                      pruning_ratio=0.4, ignored_layers=[model.lm_head], num_heads=num_heads,
                                      prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=0.4,
                                      output_transform=lambda out: out.logits)
    finally:
        del rot.forward
        modeling.apply_rotary_pos_emb = apply_rotary
    return pruner


def _child(kind: str, config: dict, n: int, prompt: int, target: int, batch: int, repeats: int,
           timeout: float) -> dict:
    """Run ``python -m resp_core.bench KIND …`` and return its JSON line (or the reason it failed)."""
    args = json.dumps({"kind": kind, "config": config, "n": n, "prompt": prompt, "target": target,
                       "batch": batch, "repeats": repeats})
    try:
        out = subprocess.run([sys.executable, "-m", "resp_core.bench", args], capture_output=True, text=True,
                             timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"did not finish within {timeout:.0f} s"}
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["exit code %d" % out.returncode])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _rss() -> int:
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:  # Linux without psutil
        import os

        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_added(fn) -> tuple[int, float]:
    """(peak RSS while ``fn()`` runs − RSS just before it, seconds).  Before the baseline, freed
    heap memory is handed back to the system (glibc ``malloc_trim``, where there is one), so that
    memory a previous step freed but kept does not hide what this pass needs; the peak is a 2 ms
    RSS poll, or ``ru_maxrss`` when the process's lifetime peak rose during ``fn``."""
    import ctypes
    import gc
    import resource
    import threading
    import time as _time

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the baseline may include freed memory
        pass
    base = _rss()
    lifetime_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    peak, done = [base], threading.Event()

    def poll():
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            done.wait(0.002)

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    t0 = _time.perf_counter()
    try:
        fn()
    finally:
        seconds = _time.perf_counter() - t0
        done.set()
        watcher.join()
    lifetime = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    top = max(peak[0], lifetime) if lifetime > lifetime_before else peak[0]  # a new lifetime peak: reached in fn
    return top - base, seconds


def _child_main(spec: dict) -> dict:
    """In a fresh process: a warm-up on a tiny model, then one pass of ``kind`` and the peak RSS
    it added (:func:`peak_rss_added`); for ``torch_pruning`` also both passes timed side by side."""
    import gc
    import time as _time

    torch.set_num_threads(1)
    kind = spec["kind"]
    tiny = random_qwen3(QUICK_SCORING_MODEL)
    model = random_qwen3(spec["config"])
    samples = random_calibration(spec["config"]["vocab_size"], spec["n"], spec["prompt"], spec["target"])
    warm = random_calibration(QUICK_SCORING_MODEL["vocab_size"], 4, 4, 12)
    if kind == "torch_pruning":
        built = _time.perf_counter()
        ids = torch.tensor([samples[0].prompt_ids + samples[0].target_ids])
        pruner = build_torch_pruning(model, ids)
        build_s = _time.perf_counter() - built
        tiny_pruner = build_torch_pruning(tiny, ids[:, :16] % QUICK_SCORING_MODEL["vocab_size"])
        calib = CalibrationSet(samples, 0)
        batches = list(calib.batches(spec["batch"], "decode"))
        groups = []

        def tp_pass(m, pr, bs):
            for p in m.parameters():
                p.requires_grad_(True)
            m.zero_grad(set_to_none=True)
            for b in bs:
                m(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=b.labels).loss.backward()
            groups[:] = list(pr.step(interactive=True))  # importance of every group; nothing is pruned
            m.zero_grad(set_to_none=True)

        tp_pass(tiny, tiny_pruner, list(CalibrationSet(warm, 0).batches(2, "decode")))
        del tiny, tiny_pruner
        peak, first = peak_rss_added(lambda: tp_pass(model, pruner, batches))
        n_groups = len(groups)
        # then side by side on the same model: RESP's scoring pass and Torch-Pruning's pass.  A
        # MetaPruner scores its groups once per step and, its groups left unpruned, cannot step
        # again (its bookkeeping assumes the yielded groups were pruned), so each timed pass gets
        # a freshly built one (building is not timed).
        scoring = scoring_contenders(model, samples, 0, spec["batch"])["scoring"]
        scoring()
        times = {"scoring": [], "torch_pruning": []}
        for _ in range(spec["repeats"]):
            t0 = _time.perf_counter()
            scoring()
            times["scoring"].append(_time.perf_counter() - t0)
            fresh = build_torch_pruning(model, ids)
            t0 = _time.perf_counter()
            tp_pass(model, fresh, batches)
            times["torch_pruning"].append(_time.perf_counter() - t0)
            if len(groups) != n_groups:
                raise RuntimeError(f"Torch-Pruning scored {len(groups)} groups, not {n_groups}")
        t = {k: statistics.median(v) for k, v in times.items()}
        return {"peak_rss_added": peak, "first_pass_s": first, "groups": n_groups, "graph_build_s": build_s,
                "scoring_s": t["scoring"], "torch_pruning_s": t["torch_pruning"],
                "ratio": t["scoring"] / t["torch_pruning"]}
    fns = scoring_contenders(tiny, warm, 0, 2)
    fns[kind]()
    del tiny, fns
    fn = scoring_contenders(model, samples, 0, spec["batch"])[kind]
    gc.collect()
    peak, first = peak_rss_added(fn)
    return {"peak_rss_added": peak, "first_pass_s": first}


def torch_pruning_comparison(config: dict, n: int, prompt: int, target: int, batch: int, repeats: int,
                             timeout: float = 300.0) -> dict:
    """Scoring pass vs Torch-Pruning's GroupTaylor pass: times measured side by side in one child
    process each (first pass, after a warm-up) and peak RSS added by each pass."""
    out = {"torch_pruning": None, "peak_rss": {}}
    for kind in ("scoring", "floor"):
        out["peak_rss"][kind] = _child(kind, config, n, prompt, target, batch, repeats, timeout)
    if torch_pruning_available():
        out["torch_pruning"] = _child("torch_pruning", config, n, prompt, target, batch, repeats, timeout)
    return out
