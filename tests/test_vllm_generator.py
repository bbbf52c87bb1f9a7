"""The vLLM generator's logic against a fake engine, and its vLLM names against the real package.

The fake engine loads the checkpoint from disk the way vLLM does, stores q/k/v and gate/up in
fused parameters (``qkv_proj``, ``gate_up_proj``) filled by its own ``load_weights`` (written
after vLLM's ``stacked_params_mapping``), serves generation from those fused tensors, and records
every call (sleep, wake_up, collective_rpc, reset_prefix_cache, generate) in order.  The worker
extension's real methods run against it.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import inspect
import os
import sys
from types import SimpleNamespace

import pytest
import torch

from resp_core.errors import RespError, RunFailed
from resp_core.interfaces import SamplingParams
from resp_core.model.adapter import adapter_for
from resp_core.model.masks import MaskSet, apply_mask
from resp_plugins.generators import vllm as vgen
from resp_plugins.generators.hf import HFGenerator

# vLLM's own HF -> fused mapping (vllm/model_executor/models/qwen2.py ``stacked_params_mapping``),
# written out independently of the generator's ``PACKED`` table
STACKED = [(".qkv_proj", ".q_proj", "q"), (".qkv_proj", ".k_proj", "k"), (".qkv_proj", ".v_proj", "v"),
           (".gate_up_proj", ".gate_proj", 0), (".gate_up_proj", ".up_proj", 1)]


class FakeVLLMModel(torch.nn.Module):
    """vLLM-style parameters (fused qkv / gate_up) around an HF model it serves from."""

    def __init__(self, served, break_shard=None):
        super().__init__()
        self.served = served
        self.break_shard = break_shard
        self.fused = torch.nn.ParameterDict()
        cfg = served.config
        self.hd = cfg.head_dim
        self.sizes = {"q": cfg.num_attention_heads * self.hd, "k": cfg.num_key_value_heads * self.hd,
                      "v": cfg.num_key_value_heads * self.hd}
        self.inter = cfg.intermediate_size
        self.names = []
        for name, p in served.named_parameters():
            if any(f"{hf}." in name for _, hf, _ in STACKED):
                continue
            self.names.append(name)
        for i, layer in enumerate(served.model.layers):
            a, m = layer.self_attn, layer.mlp
            self.names += [f"model.layers.{i}.self_attn.qkv_proj.weight", f"model.layers.{i}.mlp.gate_up_proj.weight"]
            self.fused[f"qkv{i}"] = torch.nn.Parameter(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]).detach().clone())
            self.fused[f"gu{i}"] = torch.nn.Parameter(torch.cat([m.gate_proj.weight, m.up_proj.weight]).detach().clone())
        self.loaded: list[str] = []

    def named_parameters(self, *args, **kwargs):  # the names vLLM's model has
        for n in self.names:
            yield n, None

    def _offset(self, shard):
        if shard in ("q", "k", "v"):
            start = {"q": 0, "k": self.sizes["q"], "v": self.sizes["q"] + self.sizes["k"]}[shard]
            return start, self.sizes[shard]
        return shard * self.inter, self.inter

    @torch.no_grad()
    def load_weights(self, weights):
        served = dict(self.served.named_parameters())
        for name, tensor in weights:
            self.loaded.append(name)
            for fused, hf, shard in STACKED:
                if hf in name:
                    if shard == self.break_shard:
                        break  # a broken loader: this shard never lands
                    layer = int(name.split(".")[2])
                    key = f"qkv{layer}" if fused == ".qkv_proj" else f"gu{layer}"
                    start, size = self._offset(shard)
                    self.fused[key][start:start + size].copy_(tensor)
                    break
            else:
                served[name].copy_(tensor)
        self._refresh()
        return {n for n, _ in weights}

    @torch.no_grad()
    def _refresh(self):
        for i, layer in enumerate(self.served.model.layers):
            a, m = layer.self_attn, layer.mlp
            q, k, v = torch.split(self.fused[f"qkv{i}"], [self.sizes["q"], self.sizes["k"], self.sizes["v"]])
            a.q_proj.weight.copy_(q), a.k_proj.weight.copy_(k), a.v_proj.weight.copy_(v)
            g, u = torch.split(self.fused[f"gu{i}"], [self.inter, self.inter])
            m.gate_proj.weight.copy_(g), m.up_proj.weight.copy_(u)


class FakeWorker(vgen.RespWeightSync):
    def __init__(self, model):
        self.model_runner = SimpleNamespace(model=model)


class FakeLLM:
    """Records calls; loads the checkpoint from ``model``; samples with a per-request seed."""

    def __init__(self, events, break_shard=None, **kwargs):
        from transformers import AutoModelForCausalLM

        self.kwargs = kwargs
        self.events = events
        served = AutoModelForCausalLM.from_pretrained(kwargs["model"]).eval()
        self.worker = FakeWorker(FakeVLLMModel(served, break_shard))
        self.asleep = False
        events.append(("init",))

    @property
    def served(self):
        return self.worker.model_runner.model.served

    def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        self.events.append(("rpc", method, len(args[0]) if args else 0))
        return [getattr(self.worker, method)(*args, **(kwargs or {}))]

    def sleep(self, level=1, mode="abort"):
        self.events.append(("sleep", level))
        self.asleep = True

    def wake_up(self, tags=None):
        self.events.append(("wake_up", tuple(tags or ())))
        if tags is None or "kv_cache" in tags:
            self.asleep = False
        return True

    def reset_prefix_cache(self, reset_running_requests=False, reset_connector=False):
        self.events.append(("reset_prefix_cache",))
        return True

    @torch.no_grad()
    def generate(self, prompts, sampling_params, *, use_tqdm=True, **kw):
        assert not self.asleep, "generate on a sleeping engine"
        sps = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        self.events.append(("generate", len(prompts)))
        eos = self.served.config.eos_token_id
        outs = []
        for prompt, sp in zip(prompts, sps):
            ids = list(prompt["prompt_token_ids"])
            g = torch.Generator().manual_seed(sp["seed"])
            new, reason = [], "length"
            for _ in range(sp["max_tokens"]):
                logits = self.served(input_ids=torch.tensor([ids + new])).logits[0, -1].float()
                if sp["temperature"] == 0:
                    t = int(logits.argmax())
                else:
                    probs = torch.softmax(logits / sp["temperature"], -1)
                    t = int(torch.multinomial(probs, 1, generator=g))
                new.append(t)
                if t == eos:
                    reason = "stop"
                    break
            outs.append(SimpleNamespace(outputs=[SimpleNamespace(token_ids=new, finish_reason=reason, stop_reason=None)]))
        return outs


@pytest.fixture
def setup(tmp_path, testbed_tokenizer):
    tok = testbed_tokenizer
    tok.padding_side = "left"
    from conftest import tiny_generation_model

    model = tiny_generation_model(tok)
    model.save_pretrained(tmp_path / "ckpt")
    model.config._name_or_path = str(tmp_path / "ckpt")
    events: list = []

    def make(break_shard=None, **params):
        engines = []

        def factory(**kwargs):
            engines.append(FakeLLM(events, break_shard=break_shard, **kwargs))
            return engines[-1]

        params.setdefault("probe_tokens", 4)
        gen = vgen.VLLMGenerator(vgen.VLLMGenerator.Params(**params), engine_factory=factory,
                                 sampling_factory=dict)
        gen.bind(model, tok)
        return gen, engines

    return SimpleNamespace(tok=tok, model=model, events=events, make=make)


def _convs(n=4):
    return [[{"role": "user", "content": "What is " + "1 + " * k + "2?"}] for k in range(n)]


def _drop_units(model, layer=1, channels=(0, 3), heads=()):
    adapter = adapter_for(model)
    mask = MaskSet.full(adapter.geometry)
    for c in channels:
        mask.mlp_channel[layer, c] = False
    for h in heads:
        mask.q_head[layer, h] = False
    with torch.no_grad():
        apply_mask(adapter, mask)
    return mask


# --------------------------------------------------------------------------------------------------
# mapping and sampling
# --------------------------------------------------------------------------------------------------

def test_vllm_target_maps_fused_projections():
    assert vgen.vllm_target("model.layers.3.self_attn.k_proj.weight") == ("model.layers.3.self_attn.qkv_proj.weight", "k")
    assert vgen.vllm_target("model.layers.0.self_attn.q_proj.bias") == ("model.layers.0.self_attn.qkv_proj.bias", "q")
    assert vgen.vllm_target("model.layers.2.mlp.up_proj.weight") == ("model.layers.2.mlp.gate_up_proj.weight", 1)
    assert vgen.vllm_target("model.layers.2.mlp.gate_proj.weight") == ("model.layers.2.mlp.gate_up_proj.weight", 0)
    assert vgen.vllm_target("model.layers.2.mlp.down_proj.weight") == ("model.layers.2.mlp.down_proj.weight", None)
    assert vgen.vllm_target("model.layers.2.self_attn.o_proj.weight") == ("model.layers.2.self_attn.o_proj.weight", None)


def test_sampling_params_map_one_to_one_with_per_request_seeds():
    s = SamplingParams(temperature=0.6, top_p=0.95, top_k=20, max_new_tokens=2048, seed=7)
    assert vgen.sampling_kwargs(s, 0) == {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "max_tokens": 2048,
                                          "seed": 7, "n": 1, "detokenize": False}
    assert vgen.sampling_kwargs(s, 5)["seed"] == 12
    greedy = vgen.sampling_kwargs(SamplingParams(do_sample=False, temperature=0.6, top_k=20, max_new_tokens=3), 0)
    assert (greedy["temperature"], greedy["top_p"], greedy["top_k"], greedy["max_tokens"]) == (0.0, 1.0, 0, 3)
    assert vgen.sampling_kwargs(SamplingParams(top_k=0), 0)["top_k"] == 0  # 0 = off, in both libraries
    assert vgen.sampling_kwargs(SamplingParams(top_k=-1), 0)["top_k"] == 0


# --------------------------------------------------------------------------------------------------
# generation contract
# --------------------------------------------------------------------------------------------------

def test_prompts_and_greedy_completions_match_the_hf_backend(setup):
    gen, engines = setup.make()
    hf = HFGenerator(HFGenerator.Params(batch_size=2))
    hf.bind(setup.model, setup.tok)
    for thinking in (True, False):
        s = SamplingParams(do_sample=False, max_new_tokens=5, enable_thinking=thinking)
        a, b = gen.generate(_convs(), s), hf.generate(_convs(), s)
        assert [c.prompt_ids for c in a] == [c.prompt_ids for c in b]
        assert [c.completion_ids for c in a] == [c.completion_ids for c in b]
        assert [c.finished for c in a] == [c.finished for c in b]
        assert [c.text for c in a] == [c.text for c in b]
    assert setup.tok.decode(a[0].prompt_ids).endswith("<think>\n\n</think>\n\n")  # thinking off reached the template
    kw = engines[0].kwargs
    assert kw["worker_extension_cls"] == vgen.WORKER_EXTENSION and kw["enable_sleep_mode"] is True
    assert kw["model"] == setup.model.config._name_or_path and kw["tensor_parallel_size"] == 1


def test_seeds_are_per_request_not_per_batch(setup):
    gen, _ = setup.make(chunk_size=2)
    s = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=6, seed=3)
    convs = _convs(5)
    a = gen.generate(convs, s)
    assert [c.completion_ids for c in a] == [c.completion_ids for c in gen.generate(convs, s)]
    alone = gen.generate(convs[:1], s)  # the first conversation alone: the same request seed, the same trace
    assert alone[0].completion_ids == a[0].completion_ids
    other = gen.generate(convs, SamplingParams(temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=6, seed=4))
    assert [c.completion_ids for c in other] != [c.completion_ids for c in a]


def test_finished_flag_and_eos_follow_finish_reason(setup):
    gen, _ = setup.make()
    eos = setup.tok.eos_token_id
    stop_without = SimpleNamespace(outputs=[SimpleNamespace(token_ids=[5, 6], finish_reason="stop", stop_reason=None)])
    stop_with = SimpleNamespace(outputs=[SimpleNamespace(token_ids=[5, 6, eos], finish_reason="stop", stop_reason=None)])
    cut = SimpleNamespace(outputs=[SimpleNamespace(token_ids=[5, 6, 7], finish_reason="length", stop_reason=None)])
    a, b, c = (gen.completion([1, 2], o) for o in (stop_without, stop_with, cut))
    assert a.finished and a.completion_ids == [5, 6, eos] and b.completion_ids == [5, 6, eos]
    assert not c.finished and c.completion_ids == [5, 6, 7]
    assert setup.tok.eos_token not in a.text and a.prompt_ids == [1, 2]


# --------------------------------------------------------------------------------------------------
# weight sync, cache reset, verification, sleep / wake
# --------------------------------------------------------------------------------------------------

def test_first_sync_pushes_every_projection_then_only_changed_ones(setup):
    gen, engines = setup.make()
    s = SamplingParams(do_sample=False, max_new_tokens=3)
    gen.generate(_convs(2), s)
    layers = setup.model.config.num_hidden_layers
    assert gen.syncs[-1]["tensors"] == 7 * layers and gen.syncs[-1]["probe_agreement"] == "4/4"
    gen.generate(_convs(2), s)
    assert gen.syncs[-1]["tensors"] == 0  # nothing changed: nothing sent, cache kept, no probe
    setup.events.clear()
    _drop_units(setup.model, layer=1, channels=(0, 3), heads=(2,))  # gate, up, down + q, o of layer 1
    gen.generate(_convs(2), s)
    engine = engines[0].worker.model_runner.model
    assert gen.syncs[-1]["tensors"] == 5
    pushed = engine.loaded[-5:]
    assert sorted(pushed) == sorted(f"model.layers.1.{p}.weight" for p in
                                    ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "self_attn.q_proj", "self_attn.o_proj"))
    kinds = [e[0] for e in setup.events]
    assert kinds.index("reset_prefix_cache") > max(i for i, e in enumerate(setup.events) if e[:2] == ("rpc", "resp_load_weights"))
    # the engine now serves exactly the masked model
    served = dict(engines[0].served.named_parameters())
    for name, p in setup.model.named_parameters():
        assert torch.equal(served[name], p), name
    # the next generation agrees with the HF backend on the masked model
    hf = HFGenerator(HFGenerator.Params(batch_size=4))
    hf.bind(setup.model, setup.tok)
    g = SamplingParams(do_sample=False, max_new_tokens=4)
    assert [c.completion_ids for c in gen.generate(_convs(2), g)] == [c.completion_ids for c in hf.generate(_convs(2), g)]


def test_weight_edits_outside_the_mask_are_synced(setup):
    gen, engines = setup.make()
    gen.generate(_convs(1), SamplingParams(do_sample=False, max_new_tokens=2))
    with torch.no_grad():
        setup.model.model.layers[2].self_attn.v_proj.weight.data[0, 0] += 0.5  # a SparseGPT-like edit via .data
    gen.generate(_convs(1), SamplingParams(do_sample=False, max_new_tokens=2))
    assert gen.syncs[-1]["tensors"] == 1
    assert engines[0].worker.model_runner.model.loaded[-1] == "model.layers.2.self_attn.v_proj.weight"


def test_sleep_around_scoring_and_wake_order(setup):
    gen, engines = setup.make()
    s = SamplingParams(do_sample=False, max_new_tokens=2)
    gen.before_scoring()  # no engine yet: nothing to do
    assert setup.events == []
    gen.generate(_convs(1), s)
    setup.events.clear()
    gen.before_scoring()
    gen.after_scoring()
    assert setup.events == [("sleep", 1)]
    _drop_units(setup.model, layer=2, channels=(1,))
    gen.generate(_convs(1), s)
    ev = setup.events
    order = [e if e[0] != "rpc" else ("rpc", e[1]) for e in ev]
    assert order[:6] == [("sleep", 1), ("wake_up", ("weights",)), ("rpc", "resp_load_weights"),
                         ("wake_up", ("kv_cache",)), ("reset_prefix_cache",), ("generate", 1)]
    assert order[6] == ("generate", 1)  # the probe, then the request
    # asleep, nothing changed: wake both, no push, no cache reset
    setup.events.clear()
    gen.before_scoring()
    gen.generate(_convs(1), s)
    assert [e[0] for e in setup.events] == ["sleep", "wake_up", "wake_up", "generate"]
    # sleep mode off: never sleeps
    gen2, _ = setup.make(enable_sleep_mode=False)
    gen2.generate(_convs(1), s)
    setup.events.clear()
    gen2.before_scoring()
    assert setup.events == []


def test_probe_catches_an_engine_that_does_not_serve_the_mask(testbed_available, tmp_path):
    """On the trained testbed model (a random tiny model's greedy tokens hardly depend on its
    attention weights): an engine that drops every K shard it is sent fails the probe after the
    K weights change (a SparseGPT-like edit)."""
    from resp_core.loading import load_model_and_tokenizer
    from resp_core.recipe import ModelSection

    model, tok = load_model_and_tokenizer(ModelSection(path="testbed"))
    events: list = []
    gen = vgen.VLLMGenerator(vgen.VLLMGenerator.Params(probe_tokens=8),
                             engine_factory=lambda **kw: FakeLLM(events, break_shard="k", **kw), sampling_factory=dict)
    gen.bind(model, tok)
    s = SamplingParams(do_sample=False, max_new_tokens=2)
    gen.generate(_convs(1), s)  # the checkpoint's K weights are still right
    assert gen.syncs[-1]["probe_agreement"] == "8/8"
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for layer in model.model.layers:
            w = layer.self_attn.k_proj.weight
            w.copy_(torch.randn(w.shape, generator=g) * w.std() * 3)
    with pytest.raises(RunFailed, match="not serving the current masked model"):
        gen.generate(_convs(1), s)


def test_a_tensor_without_a_home_in_the_engine_is_one_clear_error(setup):
    gen, _ = setup.make()
    s = SamplingParams(do_sample=False, max_new_tokens=2)
    gen.generate(_convs(1), s)
    adapter = adapter_for(setup.model)
    with torch.no_grad():
        adapter.ensure_bias(adapter.attention_parts(1).o).fill_(0.1)  # FLAP's compensation bias
    with pytest.raises(RunFailed, match=r"no parameter for model\.layers\.1\.self_attn\.o_proj\.bias"):
        gen.generate(_convs(1), s)


def test_sync_all_and_rebinding_to_another_model(setup):
    gen, engines = setup.make(sync="all", verify=False)
    s = SamplingParams(do_sample=False, max_new_tokens=2)
    gen.generate(_convs(1), s)
    gen.generate(_convs(1), s)
    layers = setup.model.config.num_hidden_layers
    assert [r["tensors"] for r in gen.syncs] == [7 * layers, 7 * layers]
    assert "probe_agreement" not in gen.syncs[-1]
    other = copy.deepcopy(setup.model)
    gen.bind(other, setup.tok)  # another model: a fresh engine on first use
    gen.generate(_convs(1), s)
    assert len(engines) == 2


def test_compacted_models_and_missing_vllm_are_refused(setup, monkeypatch):
    gen, _ = setup.make()
    monkeypatch.setattr(setup.model.config, "model_type", "resp_pruned_qwen3")
    with pytest.raises(RespError, match="per-layer widths"):
        gen.generate(_convs(1), SamplingParams(max_new_tokens=2))
    monkeypatch.setattr(setup.model.config, "model_type", "qwen3")
    real = vgen.VLLMGenerator()
    real.bind(setup.model, setup.tok)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else object())
    with pytest.raises(RespError, match="vllm package is not installed"):
        real.generate(_convs(1), SamplingParams(max_new_tokens=2))


def test_registered_and_params_validated():
    from resp_core.registry import get_registry

    reg = get_registry()
    gen = reg.create("generator", "vllm", {"gpu_memory_utilization": 0.5, "tensor_parallel_size": 2}, "generator")
    assert gen.params.tensor_parallel_size == 2
    with pytest.raises(RespError, match="gpu_memory_utilization"):
        reg.create("generator", "vllm", {"gpu_memory_utilization": 1.5}, "generator")


# --------------------------------------------------------------------------------------------------
# every vLLM name the generator uses, against the installed package
# --------------------------------------------------------------------------------------------------

def _import_vllm():
    """vllm, if it imports here.  ``RESP_VLLM_SITE`` may name an import-only install
    (scripts/vllm-api-env.sh builds one: the wheel and its light dependencies, no CUDA torch)."""
    site = os.environ.get("RESP_VLLM_SITE")
    if site and site not in sys.path:
        sys.path.insert(0, site)
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm is not installed (pip install vllm on a GPU machine, or scripts/vllm-api-env.sh "
                    "then RESP_VLLM_SITE=/tmp/vllm-api for the import-only check)")
    try:
        return importlib.import_module("vllm")
    except Exception as exc:  # e.g. a vllm built for another torch
        pytest.skip(f"vllm is installed but does not import here: {type(exc).__name__}: {exc}")


def test_every_vllm_name_exists_in_the_installed_package():
    vllm = _import_vllm()
    import dataclasses

    from vllm import LLM, SamplingParams as VSP

    llm_params = inspect.signature(LLM.__init__).parameters
    from vllm.engine.arg_utils import EngineArgs

    engine_fields = {f.name for f in dataclasses.fields(EngineArgs)}
    kwargs = vgen.VLLMGenerator(vgen.VLLMGenerator.Params(max_model_len=4096, max_num_seqs=64))
    kwargs.model = SimpleNamespace(config=SimpleNamespace(_name_or_path="/models/x"))
    for key in kwargs.engine_kwargs():
        assert key in llm_params or key in engine_fields, f"vllm.LLM takes no {key!r}"
    gen_sig = inspect.signature(LLM.generate).parameters
    assert "sampling_params" in gen_sig and "use_tqdm" in gen_sig
    assert {"method", "args"} <= set(inspect.signature(LLM.collective_rpc).parameters)
    assert "level" in inspect.signature(LLM.sleep).parameters
    assert "tags" in inspect.signature(LLM.wake_up).parameters
    assert all(p.default is not inspect.Parameter.empty
               for n, p in inspect.signature(LLM.reset_prefix_cache).parameters.items() if n != "self")
    for kw in (vgen.sampling_kwargs(SamplingParams(), 3), vgen.sampling_kwargs(SamplingParams(do_sample=False), 0)):
        sp = VSP(**kw)  # constructing validates every value
        assert sp.seed == kw["seed"] and sp.max_tokens == kw["max_tokens"] and sp.top_k == kw["top_k"]
    from vllm.inputs import TokensPrompt
    from vllm.outputs import CompletionOutput

    assert "prompt_token_ids" in TokensPrompt.__annotations__
    assert {"token_ids", "finish_reason", "stop_reason"} <= set(CompletionOutput.__dataclass_fields__)
    # the worker the extension is mixed into: model_runner / get_model, and no name clash
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.gpu_worker import Worker

    assert "self.model_runner" in inspect.getsource(Worker)
    assert callable(getattr(GPUModelRunner, "get_model", None))
    clash = [a for a in dir(vgen.RespWeightSync) if not a.startswith("__") and hasattr(Worker, a)]
    assert not clash, f"worker extension attributes clash with vLLM's Worker: {clash}"
    # the fused-name mapping is vLLM's, for every family RESP supports that vLLM implements
    from vllm.model_executor.models.llama import LlamaForCausalLM
    from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM
    from vllm.model_executor.models.qwen3 import Qwen3ForCausalLM

    for cls in (Qwen3ForCausalLM, Qwen2ForCausalLM, LlamaForCausalLM):
        packed = cls.packed_modules_mapping
        for hf, (fused, _) in vgen.PACKED.items():
            assert hf in packed[fused], (cls.__name__, hf)
        assert "weights" in inspect.signature(cls.load_weights).parameters
    assert vllm.__version__


def test_pipeline_calls_the_scoring_hooks_around_every_scoring_pass(tmp_path, tiny_model_dir, monkeypatch):
    """The run loop brackets each scorer.score with generator.before_scoring / after_scoring (where
    the vLLM generator sleeps), in that order, once per pruning step."""
    from resp_core.pipeline import run_recipe
    from resp_core.recipe import parse_recipe
    from resp_core.resolve import resolve

    from test_cli import small_recipe

    calls: list[str] = []
    monkeypatch.setattr(HFGenerator, "before_scoring", lambda self: calls.append("before"), raising=False)
    monkeypatch.setattr(HFGenerator, "after_scoring", lambda self: calls.append("after"), raising=False)
    recipe = small_recipe(tiny_model_dir)
    recipe["evaluation"]["evaluators"] = []
    resolved = resolve(parse_recipe(recipe, "recipe"))
    real = resolved.scorer.score
    monkeypatch.setattr(resolved.scorer, "score", lambda ctx, calib: (calls.append("score"), real(ctx, calib))[1])
    run_recipe(resolved, tmp_path / "run")
    steps = len(resolved.schedule.steps())
    assert calls == ["before", "score", "after"] * steps
