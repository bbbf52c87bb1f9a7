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
"""

from __future__ import annotations

import statistics
import time
import json
import subprocess
import sys
from dataclasses import dataclass

import torch

from .interfaces import CalibrationSample, CalibrationSet, Progress, RunContext, Scores
from .model.adapter import adapter_for
from .model.compaction import compacted_copy
from .model.masks import MaskSet, apply_mask, sparsity_of
from .model.structures import StructureSpec, build_structures


def _alternating(fns: dict, repeats: int) -> dict[str, float]:
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def random_calibration(vocab: int, n: int, prompt_len: int, target_len: int, seed: int = 0) -> list[CalibrationSample]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(5, vocab, (prompt_len + target_len,), generator=g).tolist()
        out.append(CalibrationSample(ids[:prompt_len], ids[prompt_len:]))
    return out


SCORING_MODEL = dict(vocab_size=32000, hidden_size=640, intermediate_size=1792, num_hidden_layers=8,
                     num_attention_heads=10, num_key_value_heads=2, head_dim=64, max_position_embeddings=2048,
                     tie_word_embeddings=True)
QUICK_SCORING_MODEL = dict(vocab_size=4000, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
                           tie_word_embeddings=True)


def random_qwen3(config: dict, seed: int = 0, dtype=torch.float32, device: str = "cpu"):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    return Qwen3ForCausalLM(Qwen3Config(**config)).to(dtype=dtype, device=device).eval()


def _projection_weights(model):
    return [lin.weight for lin in adapter_for(model).prunable_linears().values()]


def scoring_contenders(model, samples: list[CalibrationSample], pad_id: int, batch_size: int) -> dict:
    """name -> a callable running one pass over the same batches: ``scoring`` (RESP), ``floor``
    (transformers' loss on the same labels, gradients on the projections only), ``plain`` (every
    parameter trainable), ``gradient_pass`` (RESP's own gradient pass alone, without reducing
    saliency onto structures: what the scorer adds on top of its backward)."""
    from resp_plugins.scorers.taylor import TaylorScorer

    from .scoring import gradient_pass, release_gradients

    adapter = adapter_for(model)
    structures = build_structures(adapter, StructureSpec())
    calib = CalibrationSet(samples, pad_id)
    ctx = RunContext(model=model, tokenizer=None, adapter=adapter, structures=structures, generator=None,
                     tasks=lambda n: None, progress=Progress())
    scorer = TaylorScorer(TaylorScorer.Params(batch_size=batch_size))
    device = next(model.parameters()).device
    batches = [(b.input_ids.to(device), b.attention_mask.to(device), b.labels.to(device))
               for b in calib.batches(batch_size, "decode")]
    projections = _projection_weights(model)

    def hf_pass(trainable):
        def run():
            for p in model.parameters():
                p.requires_grad_(False)
            for p in trainable():
                p.requires_grad_(True)
            model.zero_grad(set_to_none=True)
            for ids, att, lab in batches:
                model(input_ids=ids, attention_mask=att, labels=lab).loss.backward()
            model.zero_grad(set_to_none=True)
        return run

    def own_gradient_pass():
        gp = gradient_pass(model, adapter, calib, loss=scorer.params.loss, reduction=scorer.params.reduction,
                           batch_size=batch_size)
        gp.release()
        release_gradients(adapter)

    return {"scoring": lambda: scorer.score(ctx, calib),
            "floor": hf_pass(lambda: projections),
            "plain": hf_pass(lambda: list(model.parameters())),
            "gradient_pass": own_gradient_pass}


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def scoring_overhead(model, samples: list[CalibrationSample], pad_id: int, batch_size: int, repeats: int = 3) -> dict:
    """Scoring pass / fair floor / plain forward+backward / its own gradient pass on the same
    batches (medians)."""
    fns = scoring_contenders(model, samples, pad_id, batch_size)
    device = next(model.parameters()).device
    timed = {k: (lambda f=f: (f(), _sync(device))) for k, f in fns.items()}
    for f in timed.values():
        f()  # warm-up
    t = _alternating(timed, repeats)
    tokens = sum(len(s.prompt_ids) + len(s.target_ids) for s in samples)
    return {"tokens": tokens, "scoring_s": t["scoring"], "floor_s": t["floor"], "plain_fwd_bwd_s": t["plain"],
            "gradient_pass_s": t["gradient_pass"], "ratio_gradient_pass": t["scoring"] / t["gradient_pass"],
            "ratio_floor": t["scoring"] / t["floor"], "ratio_plain": t["scoring"] / t["plain"],
            "ratio": t["scoring"] / t["plain"]}


# --------------------------------------------------------------------------------------------------
# Torch-Pruning's GroupTaylorImportance, and peak RSS, each in a child process
# --------------------------------------------------------------------------------------------------

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


@dataclass
class SpeedupConfig:
    vocab: int = 32000
    hidden: int = 768
    layers: int = 12
    heads: int = 12
    kv_heads: int = 4
    head_dim: int = 64
    intermediate: int = 2048
    sparsity: float = 0.4
    decode_tokens: int = 48
    prompt_tokens: int = 32
    prefill_batch: int = 8
    prefill_len: int = 256


def _unique_params(model) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


@torch.no_grad()
def compaction_speedup(cfg: SpeedupConfig, repeats: int = 5, attention: str = "kv_group", model=None,
                       device: str = "cpu") -> dict:
    """Dense vs compacted decode and prefill times.  ``model``: a loaded model to prune (default:
    a random Qwen3 of ``cfg``'s shape)."""
    from resp_plugins.allocators.global_rank import GlobalRank

    if model is None:
        dense = random_qwen3(dict(vocab_size=cfg.vocab, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
                                  num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                                  num_key_value_heads=cfg.kv_heads, head_dim=cfg.head_dim, tie_word_embeddings=True,
                                  max_position_embeddings=4096), device=device)
    else:
        dense = model.to(device).eval()
    vocab = dense.config.vocab_size
    adapter = adapter_for(dense)
    structures = build_structures(adapter, StructureSpec(attention=attention))
    g = torch.Generator().manual_seed(1)
    scores = Scores({k: torch.rand(v.shape, generator=g) for k, v in structures.costs.items()})
    mask = GlobalRank().allocate(scores, structures, MaskSet.full(adapter.geometry), cfg.sparsity)
    apply_mask(adapter, mask)
    compact, _ = compacted_copy(dense, mask)
    compact.eval()
    n_dense, n_compact = _unique_params(dense), _unique_params(compact)

    prompt = torch.randint(5, vocab, (1, cfg.prompt_tokens), generator=g).to(device)
    prefill = torch.randint(5, vocab, (cfg.prefill_batch, cfg.prefill_len), generator=g).to(device)

    def decoder(m):
        def run():
            m.generate(prompt, max_new_tokens=cfg.decode_tokens, min_new_tokens=cfg.decode_tokens,
                       do_sample=False, use_cache=True, pad_token_id=0)
            _sync(device)
        return run

    def prefiller(m):
        def run():
            m(input_ids=prefill, use_cache=False)
            _sync(device)
        return run

    # equal output check before timing
    a = dense(input_ids=prefill[:2, :64]).logits.float()
    b = compact(input_ids=prefill[:2, :64]).logits.float()
    max_diff = float((a - b).abs().max())
    rounding = None
    dtype = next(dense.parameters()).dtype
    if dtype in (torch.bfloat16, torch.float16):
        # the yardstick for a low-precision model: the same masked model computed in float32
        # (bf16 -> fp32 -> bf16 is exact, so the dense model is restored bit for bit)
        dense.float()
        ref = dense(input_ids=prefill[:2, :64]).logits.float()
        dense.to(dtype)
        rounding = float((a - ref).abs().max())
    for fn in (decoder(dense), decoder(compact), prefiller(dense), prefiller(compact)):
        fn()  # warm-up
    dec = _alternating({"dense": decoder(dense), "compact": decoder(compact)}, repeats)
    pre = _alternating({"dense": prefiller(dense), "compact": prefiller(compact)}, repeats)
    ideal = n_dense / n_compact
    return {
        "dense_parameters": n_dense, "compacted_parameters": n_compact,
        "sparsity_of_prunable_blocks": sparsity_of(mask, structures), "ideal_speedup": ideal,
        "decode_s": dec, "prefill_s": pre, "decode_tokens": cfg.decode_tokens,
        "decode_tokens_per_s": {k: cfg.decode_tokens / v for k, v in dec.items()},
        "prefill_tokens_per_s": {k: cfg.prefill_batch * cfg.prefill_len / v for k, v in pre.items()},
        "decode_speedup": dec["dense"] / dec["compact"], "prefill_speedup": pre["dense"] / pre["compact"],
        "decode_fraction_of_ideal": dec["dense"] / dec["compact"] / ideal,
        "prefill_fraction_of_ideal": pre["dense"] / pre["compact"] / ideal,
        "max_abs_logit_diff": max_diff, "dtype": str(dtype).replace("torch.", ""),
        "max_abs_logit_diff_low_precision_vs_fp32": rounding,
    }


# --------------------------------------------------------------------------------------------------
# The GPU check: a Qwen3-8B-shaped model in bf16
# --------------------------------------------------------------------------------------------------

QWEN3_8B = dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                tie_word_embeddings=False, rope_theta=1000000.0)
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12}


def gpu_check(device: str = "cuda", traces: int = 8, trace_len: int = 2048, prompt_len: int = 128,
              batch_size: int = 1, config: dict | None = None, repeats: int = 3, sparsity: float = 0.4) -> dict:
    """One scoring pass of a random Qwen3-8B-shaped bf16 model on ``traces`` x ``trace_len`` tokens:
    tokens/s, model FLOPs utilization (6·N·tokens / time / peak, N = projection parameters, and
    with every parameter), peak memory against ``respctl plan``'s prediction; then decode and
    prefill speedups of the ``sparsity``-compacted model."""
    import time as _time

    from transformers import Qwen3Config, Qwen3ForCausalLM

    from .plan import count_parameters, scoring_memory

    config = config or QWEN3_8B
    cfg = Qwen3Config(**config)
    name = torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else "cpu"
    peak_flops = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name.upper()), None)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = Qwen3ForCausalLM(cfg)
    model = model.to_empty(device=device).to(torch.bfloat16)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    rot = type(model.model.rotary_emb)(cfg)  # its inv_freq buffers (non-persistent) built on the host
    model.model.rotary_emb = rot.to(device)
    model.eval()
    samples = random_calibration(cfg.vocab_size, traces, prompt_len, trace_len - prompt_len)
    fns = scoring_contenders(model, samples, 0, batch_size)
    counts = count_parameters(cfg)
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    fns["scoring"]()  # warm-up, and the peak
    _sync(device)
    peak = torch.cuda.max_memory_allocated(device) if torch.device(device).type == "cuda" else None
    times = []
    for _ in range(repeats):
        t0 = _time.perf_counter()
        fns["scoring"]()
        _sync(device)
        times.append(_time.perf_counter() - t0)
    t = statistics.median(times)
    tokens = traces * trace_len
    pred = scoring_memory(counts, "bfloat16", batch_size, trace_len, trace_len - prompt_len, False)
    out = {"device": name, "traces": traces, "trace_len": trace_len, "batch_size": batch_size,
           "parameters": counts.parameters, "projection_parameters": counts.projection,
           "scoring_s": t, "tokens_per_s": tokens / t,
           "mfu_projection": 6 * counts.projection * tokens / t / peak_flops if peak_flops else None,
           "mfu_all_parameters": 6 * counts.parameters * tokens / t / peak_flops if peak_flops else None,
           "peak_flops": peak_flops, "peak_memory_bytes": peak,
           "memory_before_pass_bytes": base if peak is not None else None,
           "planned_peak_bytes": sum(pred.values()), "planned": pred}
    del fns
    model.zero_grad(set_to_none=True)
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    sp = SpeedupConfig(sparsity=sparsity, decode_tokens=64, prompt_tokens=128, prefill_batch=8, prefill_len=2048)
    out["compaction"] = compaction_speedup(sp, repeats=repeats, model=model, device=device)
    return out


if __name__ == "__main__":  # the child process of the peak-RSS and Torch-Pruning measurements
    print(json.dumps(_child_main(json.loads(sys.argv[1]))))
