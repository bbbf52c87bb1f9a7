"""Generation backend on vLLM (``vllm.LLM``): the same contract as ``hf``, served from a GPU.

What it does, and where each part comes from:

* **Prompts** are built exactly as the ``hf`` generator builds them (the tokenizer's chat template
  with ``enable_thinking`` on or off) and handed to the engine as token ids
  (``{"prompt_token_ids": …}``), so ``Completion.prompt_ids`` are the ids the scorer sees and are
  identical across backends.  Completions are decoded with the same tokenizer, not vLLM's.
* **Sampling** maps RESP's :class:`~resp_core.interfaces.SamplingParams` one to one onto
  ``vllm.SamplingParams``: ``temperature``, ``top_p``, ``top_k``, ``max_new_tokens`` ->
  ``max_tokens``; ``do_sample: false`` -> greedy (temperature 0, top-p 1, top-k off).  Every
  request carries its own seed, ``sampling.seed + i`` for the i-th conversation of the call, so a
  completion does not depend on which other prompts were in the batch (the ``hf`` backend seeds
  per batch instead).  ``finished`` is ``finish_reason == "stop"`` (EOS), and a finished
  completion ends with the EOS id, as with ``hf``; a cut one (``"length"``) does not.
* **In-place weight sync.**  The engine loads the checkpoint once.  Before every generation call
  the projection tensors of the HF model (q/k/v/o, gate/up/down weights and any biases) are
  fingerprinted (float64 sum and sum of squares) and those that changed since the last sync — the
  ones a new mask zeroed, or a scorer edited (FLAP's bias, SparseGPT's update) — are pushed to
  every worker with ``LLM.collective_rpc`` into :class:`RespWeightSync`, a worker extension
  (``worker_extension_cls``) that hands them to the model's own ``load_weights``.  vLLM's loader
  maps the Hugging Face names onto its fused parameters (q/k/v -> ``qkv_proj`` shards "q", "k",
  "v"; gate/up -> ``gate_up_proj`` shards 0, 1) and shards them for tensor parallelism;
  :func:`vllm_target` mirrors that mapping to check, before anything is sent, that every changed
  tensor has a home in the engine (an ``o_proj`` bias added by FLAP does not, in vLLM's Qwen3 or
  Llama: that is one clear error).  Then the prefix cache is reset, and the engine's greedy
  tokens on a probe prompt are checked against the HF model under the same mask (teacher-forced:
  at each of ``probe_tokens`` positions the HF argmax must be the engine's token, or a near tie
  within ``probe_logit_tolerance``).  The pattern is the one TRL (``trl/generation/
  vllm_generation.py`` ``VLLMGeneration.sync_weights``: ``load_weights`` per tensor, then
  ``reset_prefix_cache``), OpenRLHF (a vLLM worker extension with an ``update_weight`` RPC) and
  verl (sharding managers that wake the engine's weights, load, then wake its KV cache) use.
* **One GPU for both.**  The engine takes ``gpu_memory_utilization`` of the GPU; with
  ``enable_sleep_mode`` the pipeline's :meth:`before_scoring` puts it to sleep at level 1
  (weights offloaded to host memory, KV cache freed) while gradients are computed.  The next
  generation call wakes the weights, syncs, then wakes the KV cache
  (``wake_up(tags=["weights"])`` … ``wake_up(tags=["kv_cache"])``), the order TRL and verl use
  so that loaded weights land in mapped memory.

Transports: ``cpu`` (default) copies each changed tensor to host memory and lets vLLM's RPC carry
it (works for any ``tensor_parallel_size`` and with the engine in or out of process); ``cuda_ipc``
sends CUDA IPC handles instead (no host copy; the engine's workers must run in another process
on the same GPU, i.e. ``tensor_parallel_size: 1``).  Tensors go in buckets of at most
``bucket_mb``.

Nothing here imports vllm until the engine is started; its logic is tested against a fake engine
(tests/test_vllm_generator.py) and every vLLM name it calls is checked against the installed
package there.  See docs/gpu.md for what was and was not run.
"""

from __future__ import annotations

import gc
import time
from typing import Any, Callable, Literal

import torch
from pydantic import Field

from resp_core import hookimpl
from resp_core.errors import RespError, RunFailed
from resp_core.interfaces import Completion, Generator, Params, Progress, SamplingParams

WORKER_EXTENSION = f"{__name__}.RespWeightSync"

# Hugging Face projection -> (vLLM parameter, shard id), as vLLM's own loaders map them
# (vllm/model_executor/models/qwen2.py, qwen3.py, llama.py: ``stacked_params_mapping`` and
# ``packed_modules_mapping``).  Projections not listed keep their Hugging Face names.
PACKED = {
    "q_proj": ("qkv_proj", "q"),
    "k_proj": ("qkv_proj", "k"),
    "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

DEFAULT_PROBE = [{"role": "user", "content": "What is 17 + 25? Answer with the number."}]


def vllm_target(hf_name: str) -> tuple[str, str | int | None]:
    """The vLLM parameter a Hugging Face tensor lands in, and its shard id (None: not fused).

    ``model.layers.3.self_attn.k_proj.weight`` -> ``("model.layers.3.self_attn.qkv_proj.weight", "k")``."""
    parts = hf_name.split(".")
    for i, part in enumerate(parts):
        if part in PACKED:
            fused, shard = PACKED[part]
            return ".".join(parts[:i] + [fused] + parts[i + 1:]), shard
    return hf_name, None


def sampling_kwargs(sampling: SamplingParams, index: int = 0) -> dict:
    """Keyword arguments of ``vllm.SamplingParams`` for request ``index`` of a call."""
    kw: dict[str, Any] = {"max_tokens": int(sampling.max_new_tokens), "seed": int(sampling.seed) + int(index),
                          "n": 1, "detokenize": False}
    if sampling.do_sample:
        kw.update(temperature=float(sampling.temperature), top_p=float(sampling.top_p),
                  top_k=int(sampling.top_k) if sampling.top_k and sampling.top_k > 0 else 0)
    else:
        kw.update(temperature=0.0, top_p=1.0, top_k=0)
    return kw


def fingerprints(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[float, float]]:
    """(sum, sum of squares) of each tensor in float64: changes when a unit is zeroed or a weight
    is edited.  Computed on the tensors' device, one transfer to the host for all of them."""
    if not tensors:
        return {}
    with torch.no_grad():
        rows = [torch.stack([t.detach().sum(dtype=torch.float64), t.detach().double().square().sum()])
                for t in tensors.values()]
        values = torch.stack([r.cpu() for r in rows]).tolist()
    return {name: (v[0], v[1]) for name, v in zip(tensors, values)}


# --------------------------------------------------------------------------------------------------
# Inside the engine: the worker extension (methods run in every vLLM worker)
# --------------------------------------------------------------------------------------------------

def _materialize(obj):
    """A tensor sent by :func:`_pack`: a host tensor as is, or one rebuilt from a CUDA IPC handle
    on this worker's device."""
    if isinstance(obj, torch.Tensor):
        return obj
    kind, payload = obj
    if kind != "cuda_ipc":
        raise ValueError(f"unknown tensor transport {kind!r}")
    rebuild, args = payload
    args = list(args)
    args[6] = torch.cuda.current_device()  # the storage's device index, as seen by this process
    return rebuild(*args)


def _pack(tensor: torch.Tensor, transport: str):
    if transport == "cuda_ipc":
        from torch.multiprocessing.reductions import reduce_tensor

        return ("cuda_ipc", reduce_tensor(tensor.detach().contiguous()))
    return tensor.detach().to("cpu", copy=True).contiguous()


class RespWeightSync:
    """vLLM worker extension (``worker_extension_cls``): RPC targets for ``LLM.collective_rpc``.

    Method names carry a ``resp_`` prefix so that they never clash with the worker's own."""

    def resp_model(self):
        runner = self.model_runner  # type: ignore[attr-defined]
        get = getattr(runner, "get_model", None)
        return get() if callable(get) else runner.model

    def resp_parameter_names(self) -> list[str]:
        return [name for name, _ in self.resp_model().named_parameters()]

    def resp_load_weights(self, items: list) -> int:
        """Load ``[(hugging_face_name, tensor_or_handle), …]`` through the model's ``load_weights``
        (vLLM maps the names onto its fused parameters and shards them).  Returns the count."""
        weights = [(name, _materialize(obj)) for name, obj in items]
        self.resp_model().load_weights(weights=weights)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return len(weights)


# --------------------------------------------------------------------------------------------------
# The generator
# --------------------------------------------------------------------------------------------------

def _vllm_engine(**kwargs):
    from vllm import LLM

    return LLM(**kwargs)


def _vllm_sampling(**kwargs):
    from vllm import SamplingParams as VSamplingParams

    return VSamplingParams(**kwargs)


class VLLMGenerator(Generator):
    """vLLM engine: continuous batching, per-request seeds, in-place weight sync after every mask
    change (only changed tensors), probe check against the HF model, sleep during scoring."""

    class Params(Params):
        gpu_memory_utilization: float = Field(0.45, gt=0.0, le=1.0)  # of the whole GPU, for weights + KV cache
        tensor_parallel_size: int = Field(1, ge=1)
        enable_sleep_mode: bool = True  # sleep (level 1) while the scorer computes gradients
        dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
        max_model_len: int | None = Field(None, ge=16)
        max_num_seqs: int | None = Field(None, ge=1)
        enforce_eager: bool = False
        model: str | None = Field(None, min_length=1)  # what the engine loads (default: the HF model's own path)
        engine_kwargs: dict[str, Any] = Field(default_factory=dict)  # more vllm.LLM arguments, passed as they are
        weight_transport: Literal["cpu", "cuda_ipc"] = "cpu"
        sync: Literal["changed", "all"] = "changed"
        bucket_mb: int = Field(1024, ge=1)
        verify: bool = True
        probe_tokens: int = Field(16, ge=1)
        probe_logit_tolerance: float = Field(0.5, ge=0.0)
        chunk_size: int = Field(256, ge=1)  # prompts per engine call (progress granularity)

    def __init__(self, params: "VLLMGenerator.Params | None" = None,
                 engine_factory: Callable[..., Any] | None = None,
                 sampling_factory: Callable[..., Any] | None = None):
        self.params = params or self.Params()
        self._engine_factory = engine_factory or _vllm_engine
        self._sampling_factory = sampling_factory or _vllm_sampling
        self.llm = None
        self._engine_model = None
        self._engine_params: set[str] = set()
        self._synced: dict[str, tuple[float, float]] = {}
        self._asleep = False
        self.syncs: list[dict] = []  # one record per sync: tensors, bytes, seconds, probe agreement
        self.model = self.tokenizer = None

    # --- binding and engine life cycle ------------------------------------------------------------
    def bind(self, model, tokenizer) -> None:
        if self.llm is not None and model is not self._engine_model:
            self.close()  # another model (e.g. a comparison's next run): a fresh engine for it
        self.model, self.tokenizer = model, tokenizer

    def close(self) -> None:
        """Shut the engine down and free its GPU memory."""
        if self.llm is not None:
            shutdown = getattr(getattr(self.llm, "llm_engine", None), "shutdown", None)
            if callable(shutdown):
                shutdown()
        self.llm = None
        self._engine_model = None
        self._engine_params = set()
        self._synced = {}
        self._asleep = False
        gc.collect()

    def engine_path(self) -> str:
        path = self.params.model or getattr(getattr(self.model, "config", None), "_name_or_path", None) \
            or getattr(self.model, "name_or_path", None)
        if not path:
            raise RespError("generator.params.model: the HF model does not say where it was loaded from; "
                            "give the folder or hub id the vLLM engine should load")
        return str(path)

    def engine_kwargs(self) -> dict:
        p = self.params
        kw = dict(model=self.engine_path(), tokenizer=self.engine_path(), dtype=p.dtype,
                  tensor_parallel_size=p.tensor_parallel_size, gpu_memory_utilization=p.gpu_memory_utilization,
                  enable_sleep_mode=p.enable_sleep_mode, worker_extension_cls=WORKER_EXTENSION,
                  enforce_eager=p.enforce_eager, seed=0)
        if p.max_model_len is not None:
            kw["max_model_len"] = p.max_model_len
        if p.max_num_seqs is not None:
            kw["max_num_seqs"] = p.max_num_seqs
        kw.update(p.engine_kwargs)
        return kw

    def check_recipe(self, recipe, path: str) -> None:
        """``validate`` and the start of ``run`` (not ``--portable``): vLLM is installed here and
        the model is meant for a GPU."""
        if self._engine_factory is _vllm_engine:
            import importlib.util

            if importlib.util.find_spec("vllm") is None:
                raise RespError(f"{path}: vllm is not installed here (pip install 'resp-pruning[vllm]' on a "
                                "machine with a CUDA GPU; or use generator 'hf')")
        if not str(recipe.model.device).startswith("cuda"):
            raise RespError(f"{path}: vLLM serves from a GPU, but model.device is {recipe.model.device!r}; set "
                            "model.device: cuda (or use generator 'hf')")

    def _check_servable(self) -> None:
        config = getattr(self.model, "config", None)
        model_type = str(getattr(config, "model_type", ""))
        if model_type.startswith("resp_pruned_"):
            raise RespError("generator vllm: the model is a compacted RESP model with per-layer widths, which "
                            "vLLM cannot load; evaluate it with generator 'hf', or export the run as 'masked'")
        if self._engine_factory is _vllm_engine:
            import importlib.util

            if importlib.util.find_spec("vllm") is None:
                raise RespError("generator vllm: the vllm package is not installed "
                                "(pip install 'resp-pruning[vllm]' on a machine with a CUDA GPU)")
            device = next(self.model.parameters()).device
            if device.type != "cuda":
                raise RespError(f"generator vllm: the model is on {device}; vLLM serves from a GPU, "
                                "set model.device: cuda (or use generator 'hf')")

    def _start(self) -> None:
        self._check_servable()
        self.llm = self._engine_factory(**self.engine_kwargs())
        self._engine_model = self.model
        self._engine_params = set(self.llm.collective_rpc("resp_parameter_names")[0])
        self._synced = {}  # the engine holds the checkpoint; the first sync pushes every tracked tensor
        self._asleep = False

    # --- scoring hooks ------------------------------------------------------------------------------
    def before_scoring(self) -> None:
        """Free the engine's GPU memory (level-1 sleep) while the scorer computes gradients."""
        if self.llm is not None and self.params.enable_sleep_mode and not self._asleep:
            self.llm.sleep(level=1)
            self._asleep = True
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def after_scoring(self) -> None:
        """Nothing: the engine wakes at the next generation call, after the new mask is applied."""

    # --- weight sync ---------------------------------------------------------------------------------
    def tracked_tensors(self) -> dict[str, torch.Tensor]:
        """Hugging Face name -> tensor of every projection weight and bias pruning may change."""
        out = {}
        for name, module in self.model.named_modules():
            if name.rsplit(".", 1)[-1] not in PROJECTIONS:
                continue
            for pname, p in module.named_parameters(recurse=False):
                out[f"{name}.{pname}"] = p
        return out

    def changed_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, tuple[float, float]]]:
        tracked = self.tracked_tensors()
        fps = fingerprints(tracked)
        if self.params.sync == "all" or not self._synced:
            return tracked, fps
        return {n: t for n, t in tracked.items() if self._synced.get(n) != fps[n]}, fps

    def _push(self, tensors: dict[str, torch.Tensor]) -> int:
        missing = [n for n in tensors if vllm_target(n)[0] not in self._engine_params]
        if missing:
            raise RunFailed(f"generator vllm: the engine's model has no parameter for {missing[0]} "
                            f"(-> {vllm_target(missing[0])[0]}){f' and {len(missing) - 1} more' if len(missing) > 1 else ''}; "
                            "a scorer added a tensor vLLM's model does not hold (e.g. FLAP's output bias): "
                            "use generator 'hf' for this method")
        transport = self.params.weight_transport
        limit = self.params.bucket_mb * (1 << 20)
        sent, bucket, size = 0, [], 0
        for name, t in tensors.items():
            bucket.append((name, _pack(t, transport)))
            size += t.numel() * t.element_size()
            sent += t.numel() * t.element_size()
            if size >= limit:
                self.llm.collective_rpc("resp_load_weights", args=(bucket,))
                bucket, size = [], 0
        if bucket:
            self.llm.collective_rpc("resp_load_weights", args=(bucket,))
        return sent

    def sync_weights(self) -> dict:
        """Push changed tensors, reset the prefix cache, verify on the probe; wakes a sleeping engine
        in the order weights -> load -> KV cache.  Returns the sync's record."""
        started = time.perf_counter()
        changed, fps = self.changed_tensors()
        was_asleep = self._asleep
        if was_asleep:
            self.llm.wake_up(tags=["weights"])
        sent = self._push(changed) if changed else 0
        if was_asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self._asleep = False
        record = {"sync": len(self.syncs) + 1, "tensors": len(changed), "bytes": sent}
        if changed:
            self.llm.reset_prefix_cache()
            self._synced = fps
            if self.params.verify:
                record["probe_agreement"] = self.verify(record["sync"])
        record["seconds"] = round(time.perf_counter() - started, 3)
        self.syncs.append(record)
        return record

    def verify(self, sync_no: int = 0) -> str:
        """The engine's greedy tokens on the probe prompt against the HF model (teacher-forced)."""
        p = self.params
        ids = self.encode(DEFAULT_PROBE, enable_thinking=False)
        sp = self._sampling_factory(**sampling_kwargs(SamplingParams(do_sample=False, max_new_tokens=p.probe_tokens,
                                                                     seed=0)))
        out = self.llm.generate([{"prompt_token_ids": ids}], sp, use_tqdm=False)
        got = [int(t) for t in out[0].outputs[0].token_ids]
        if not got:
            return "0/0"
        device = next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()
        with torch.no_grad():
            logits = self.model(input_ids=torch.tensor([ids + got], device=device)).logits[0]
        self.model.train(was_training)
        logits = logits[len(ids) - 1: len(ids) - 1 + len(got)].float()
        for j, tok in enumerate(got):
            best = int(logits[j].argmax())
            if best == tok:
                continue
            margin = float(logits[j, best] - logits[j, tok])
            if margin <= p.probe_logit_tolerance:
                return f"{j}/{len(got)} then a near tie (margin {margin:.3f})"
            raise RunFailed(f"generator vllm: after weight sync {sync_no} the engine's greedy token {j} on the "
                            f"probe prompt is {tok}, the HF model's is {best} (logit margin {margin:.3f} > "
                            f"probe_logit_tolerance {p.probe_logit_tolerance}); the engine is not serving "
                            "the current masked model")
        return f"{len(got)}/{len(got)}"

    # --- generation ----------------------------------------------------------------------------------
    def encode(self, messages: list[dict], enable_thinking: bool) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                  enable_thinking=enable_thinking)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def ready(self) -> None:
        """Start the engine on first use; otherwise wake it and sync the current weights."""
        if self.llm is None:
            self._start()
        self.sync_weights()

    def completion(self, prompt_ids: list[int], output) -> Completion:
        tok = self.tokenizer
        o = output.outputs[0]
        seq = [int(t) for t in o.token_ids]
        finished = o.finish_reason == "stop"
        eos = tok.eos_token_id
        if finished and getattr(o, "stop_reason", None) is None and eos is not None and (not seq or seq[-1] != eos):
            seq.append(eos)  # stopped on EOS: end with it, as the hf backend's completions do
        text = tok.decode(seq, skip_special_tokens=False)
        if tok.eos_token:
            text = text.replace(tok.eos_token, "")
        if tok.pad_token:
            text = text.replace(tok.pad_token, "")
        return Completion(list(prompt_ids), seq, text, finished)

    def generate(self, conversations, sampling: SamplingParams, progress: Progress | None = None,
                 description: str = "Generating") -> list[Completion]:
        encoded = [self.encode(c, sampling.enable_thinking) for c in conversations]
        return self._generate_ids(encoded, sampling, progress, description)

    def generate_text(self, prompts: list[str], sampling: SamplingParams, progress: Progress | None = None,
                      description: str = "Generating", add_special_tokens: bool = False) -> list[Completion]:
        encoded = [list(self.tokenizer(t, add_special_tokens=add_special_tokens)["input_ids"]) for t in prompts]
        return self._generate_ids(encoded, sampling, progress, description)

    def _generate_ids(self, encoded: list[list[int]], sampling: SamplingParams, progress: Progress | None,
                      description: str) -> list[Completion]:
        self.ready()
        progress = progress or Progress()
        results: list[Completion] = []
        step = self.params.chunk_size
        with progress.task(description, total=len(encoded)) as advance:
            for start in range(0, len(encoded), step):
                chunk = encoded[start: start + step]
                sps = [self._sampling_factory(**sampling_kwargs(sampling, start + i)) for i in range(len(chunk))]
                outs = self.llm.generate([{"prompt_token_ids": ids} for ids in chunk], sps, use_tqdm=False)
                results.extend(self.completion(ids, o) for ids, o in zip(chunk, outs))
                advance(len(chunk))
        return results


@hookimpl
def register_generators(register):
    register("vllm", VLLMGenerator)
