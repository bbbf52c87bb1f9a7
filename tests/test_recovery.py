"""Recovery after pruning, the parts: the decode-token divergences against a direct computation
from full logits (with the stored top-k), the LoRA merge check, bounded parameters (one line), the
plugin kind, the plan and the recipe field."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from typer.testing import CliRunner

from conftest import tiny_qwen3
from resp_core.cli import app
from resp_core.errors import RespError, RunFailed
from resp_core.interfaces import CalibrationSample, CalibrationSet, TeacherSpec
from resp_core.recipe import dump_recipe, parse_recipe
from resp_core.recovery.divergence import decode_positions, distill_loss, logits_at
from resp_core.recovery.teacher import TeacherLogits, compute_teacher, save_teacher, teacher_metadata
from resp_core.registry import get_registry

runner = CliRunner()
VOCAB = 64


def _samples(n: int = 5, seed: int = 0) -> list[CalibrationSample]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        p = torch.randint(3, VOCAB, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g).tolist()
        t = torch.randint(3, VOCAB, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g).tolist()
        out.append(CalibrationSample([] if i == 0 else p, t))  # one sample without a prompt
    return out


def _direct(teacher, student, samples, kind: str, temperature: float, k: int | None = None, tail=None):
    """The divergence from full logits, written out with no RESP code: token mean over decode positions."""
    total, count = 0.0, 0
    for s in samples:
        ids = torch.tensor([s.prompt_ids + s.target_ids])
        with torch.no_grad():
            zt, zs = teacher(input_ids=ids).logits[0].double(), student(input_ids=ids).logits[0].double()
        first = max(len(s.prompt_ids), 1) - 1  # position predicting the first target token
        for pos in range(first, ids.shape[1] - 1):
            p = torch.softmax(zt[pos] / temperature, -1)
            q = torch.softmax(zs[pos] / temperature, -1)
            if k is not None:
                top = p.topk(k).indices
                if tail == "renormalize":
                    p, q = p[top] / p[top].sum(), q[top] / q[top].sum()
                else:
                    rest = torch.ones_like(p, dtype=torch.bool)
                    rest[top] = False
                    p = torch.cat([p[top], p[rest].sum()[None]])
                    q = torch.cat([q[top], q[rest].sum()[None]])
            kl = lambda a, b: float((a * (a.log() - b.log())).sum())  # noqa: E731
            if kind == "forward":
                d = kl(p, q)
            elif kind == "reverse":
                d = kl(q, p)
            else:
                m = (p + q) / 2
                d = 0.5 * kl(p, m) + 0.5 * kl(q, m)
            total += d
            count += 1
    return total / count * temperature ** 2


def _resp_loss(teacher, student, samples, kind, temperature, k, tail="bucket"):
    spec = TeacherSpec(top_k=k, temperature=temperature, max_tokens=64, batch_size=2)
    stored = compute_teacher(teacher, samples, 0, spec)
    batch = next(CalibrationSet(samples, 0, max_length=64).batches(len(samples), "decode"))
    where = decode_positions(batch.labels)
    with torch.no_grad():
        logits = logits_at(student, batch.input_ids, batch.attention_mask, where)
    return float(distill_loss(logits, stored["indices"], stored["logprobs"], kind, tail, temperature))


@pytest.mark.parametrize("kind", ["forward", "reverse", "js"])
def test_divergences_on_decode_tokens_match_a_direct_computation(kind):
    teacher, student = tiny_qwen3(seed=1, vocab=VOCAB), tiny_qwen3(seed=2, vocab=VOCAB)
    samples = _samples()
    # k = V - 1 plus the tail bucket is the whole distribution: the exact divergence
    full = _direct(teacher, student, samples, kind, 1.5)
    assert _resp_loss(teacher, student, samples, kind, 1.5, VOCAB - 1) == pytest.approx(full, rel=1e-4, abs=1e-7)
    # top-8 + tail bucket: the divergence between the coarsened distributions, a lower bound of the full one
    bucket = _resp_loss(teacher, student, samples, kind, 1.5, 8)
    assert bucket == pytest.approx(_direct(teacher, student, samples, kind, 1.5, 8, "bucket"), rel=1e-4, abs=1e-7)
    assert bucket <= full + 1e-7
    # top-8 renormalized: both distributions renormalized over the teacher's 8 tokens
    renorm = _resp_loss(teacher, student, samples, kind, 1.5, 8, "renormalize")
    assert renorm == pytest.approx(_direct(teacher, student, samples, kind, 1.5, 8, "renormalize"), rel=1e-4,
                                   abs=1e-7)
    assert _resp_loss(teacher, teacher, samples, kind, 1.0, 8) == pytest.approx(0.0, abs=1e-6)


def test_teacher_file_round_trip_and_checks(tmp_path):
    teacher = tiny_qwen3(seed=1, vocab=VOCAB)
    samples = _samples()
    spec = TeacherSpec(top_k=4, temperature=2.0, max_tokens=64, batch_size=3)
    stored = compute_teacher(teacher, samples, 0, spec)
    counts = [len(s.target_ids) - (1 if not s.prompt_ids else 0) for s in samples]
    assert stored["offsets"].tolist() == [0] + torch.tensor(counts).cumsum(0).tolist()
    assert stored["indices"].shape == (sum(counts), 4) and stored["logprobs"].shape == (sum(counts), 5)
    assert torch.allclose(stored["logprobs"].exp().sum(-1), torch.ones(sum(counts)), atol=1e-5)  # top-k + tail = 1
    path = tmp_path / "t.safetensors"
    save_teacher(path, stored, teacher_metadata(spec, VOCAB, len(samples), "0" * 64))
    loaded = TeacherLogits.load(path, spec, len(samples))
    idx, lp = loaded.rows([3, 1])
    assert torch.equal(idx, torch.cat([stored["indices"][sum(counts[:3]):sum(counts[:4])],
                                       stored["indices"][counts[0]:counts[0] + counts[1]]]))
    with pytest.raises(RespError, match="temperature"):
        TeacherLogits.load(path, TeacherSpec(top_k=4, temperature=1.0, max_tokens=64), len(samples))
    with pytest.raises(RespError, match="vocabulary size"):
        compute_teacher(teacher, samples, 0, TeacherSpec(top_k=VOCAB, max_tokens=64))


def test_lora_merge_is_exact_and_a_wrong_merge_stops_with_one_line(monkeypatch):
    pytest.importorskip("peft")
    from resp_core.recovery import lora

    model = tiny_qwen3(seed=3, vocab=VOCAB)
    ref = tiny_qwen3(seed=3, vocab=VOCAB)
    probe = next(CalibrationSet(_samples(), 0).batches(4, "decode"))
    torch.manual_seed(0)
    peft_model = lora.add_lora(model, 4, 8.0, 0.0, ["q_proj", "v_proj", "down_proj"])
    with torch.no_grad():
        for p in lora.adapter_parameters(model).values():
            p.normal_(0, 0.05)
        unmerged = model(input_ids=probe.input_ids, attention_mask=probe.attention_mask).logits
    diff = lora.merge_lora(peft_model, model, probe, 1e-5)
    assert diff <= 1e-5 * max(1.0, float(unmerged.abs().max()))
    assert not lora.lora_layers(model) and not any("lora" in n for n in model.state_dict())
    with torch.no_grad():
        merged = model(input_ids=probe.input_ids, attention_mask=probe.attention_mask).logits
        plain = ref(input_ids=probe.input_ids, attention_mask=probe.attention_mask).logits
    assert float((merged - unmerged).abs().max()) == pytest.approx(diff)
    assert float((merged - plain).abs().max()) > 1e-3  # the adapters changed the model
    # a merge that leaves the update out is caught
    broken = tiny_qwen3(seed=3, vocab=VOCAB)
    torch.manual_seed(0)
    peft_broken = lora.add_lora(broken, 4, 8.0, 0.0, ["q_proj"])
    with torch.no_grad():
        for p in lora.adapter_parameters(broken).values():
            p.normal_(0, 0.05)
    monkeypatch.setattr(lora, "_merged_weights", lambda m: {n: layer.get_base_layer().weight.detach().clone()
                                                            for n, layer in lora.lora_layers(m)})
    with pytest.raises(RunFailed, match="not merged exactly") as info:
        lora.merge_lora(peft_broken, broken, probe, 1e-5)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name,params,field", [
    ("self_distill", {"steps": 0}, "steps"),
    ("self_distill", {"lr": -1.0}, "lr"),
    ("self_distill", {"top_k": 0}, "top_k"),
    ("self_distill", {"top_k": 100000}, "top_k"),
    ("self_distill", {"temperature": 0}, "temperature"),
    ("self_distill", {"divergence": "kl"}, "divergence"),
    ("self_distill", {"mode": "qlora"}, "mode"),
    ("self_distill", {"batch_size": 0}, "batch_size"),
    ("self_distill", {"max_tokens": 2}, "max_tokens"),
    ("self_distill", {"steps": 5, "warmup_steps": 5}, "warmup_steps"),
    ("self_distill", {"steps": True}, "steps"),
    ("lora_sft", {"rank": 0}, "rank"),
    ("lora_sft", {"alpha": 0}, "alpha"),
    ("lora_sft", {"mode": "full"}, "mode"),
    ("lora_sft", {"data": "web"}, "data"),
    ("lora_sft", {"target_modules": ["lm_head"]}, "target_modules"),
    ("lora_sft", {"unknown": 1}, "unknown"),
])
def test_bad_parameters_are_one_line(name, params, field):
    with pytest.raises(RespError) as info:
        get_registry().create("recovery", name, params, "recovery")
    msg = str(info.value)
    assert msg.startswith("recovery.params") and field in msg and "\n" not in msg


def _recipe(tmp_path, recovery: dict | None, model_dir="testbed") -> dict:
    data = {"name": "rec", "model": {"path": str(model_dir)}, "calibration": {"name": "task_data"},
            "scorer": {"name": "resp"}, "schedule": {"name": "oneshot", "params": {"target": 0.2}}}
    if recovery is not None:
        data["recovery"] = recovery
    return data


def test_validate_reports_bad_recovery_before_loading(tmp_path, monkeypatch):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(_recipe(tmp_path, {"name": "self_distill", "params": {"lr": 5.0}})))
    res = runner.invoke(app, ["validate", str(bad)])
    assert res.exit_code == 2 and "recovery.params.lr" in res.output and len(res.output.strip().splitlines()) == 1
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text(yaml.safe_dump(_recipe(tmp_path, {"name": "self_distil"})))
    res = runner.invoke(app, ["validate", str(unknown)])
    assert res.exit_code == 2 and "unknown recovery 'self_distil'" in res.output and "self_distill" in res.output
    at = tmp_path / "at.yaml"
    at.write_text(yaml.safe_dump(_recipe(tmp_path, {"name": "self_distill", "at": "sometimes"})))
    assert runner.invoke(app, ["validate", str(at)]).exit_code == 2
    # LoRA without peft: one line with the install hint; full fine-tuning needs no peft
    from resp_core.recovery import lora

    monkeypatch.setattr(lora, "peft_available", lambda: False)
    no_peft = tmp_path / "nopeft.yaml"
    no_peft.write_text(yaml.safe_dump(_recipe(tmp_path, {"name": "lora_sft"})))
    res = runner.invoke(app, ["validate", str(no_peft)])
    assert res.exit_code == 2 and "recovery.params.mode" in res.output and "pip install" in res.output
    full = tmp_path / "full.yaml"
    full.write_text(yaml.safe_dump(_recipe(tmp_path, {"name": "self_distill", "params": {"mode": "full"}})))
    assert runner.invoke(app, ["validate", str(full)]).exit_code == 0


def test_recipe_without_recovery_is_written_as_before(tmp_path):
    plain = parse_recipe(_recipe(tmp_path, None))
    assert plain.recovery is None and "recovery" not in yaml.safe_load(dump_recipe(plain))
    with_rec = parse_recipe(_recipe(tmp_path, {"name": "self_distill", "params": {"steps": 3}}))
    assert yaml.safe_load(dump_recipe(with_rec))["recovery"] == {"name": "self_distill", "params": {"steps": 3},
                                                                 "at": "final"}


def test_plugins_lists_the_recovery_kind():
    res = runner.invoke(app, ["plugins", "--json"])
    assert res.exit_code == 0
    rec = {p["name"]: p for p in json.loads(res.output)["plugins"] if p["kind"] == "recovery"}
    assert set(rec) >= {"self_distill", "lora_sft"}
    assert rec["self_distill"]["distribution"] == "resp-pruning" and rec["lora_sft"]["origin"].startswith("built-in")


def test_plan_includes_recovery_memory_and_time(tmp_path):
    from resp_core.plan import make_plan
    from resp_core.plan.recovery import recovery_memory

    base = _recipe(tmp_path, None, "Qwen/Qwen3-8B")
    assert "recovery" not in make_plan(parse_recipe(base)).to_json()
    lora_r = parse_recipe({**base, "recovery": {"name": "self_distill", "params": {"steps": 200}}})
    full_r = parse_recipe({**base, "recovery": {"name": "self_distill", "params": {"steps": 200, "mode": "full"}}})
    lp, fp = make_plan(lora_r), make_plan(full_r)
    c = lp.counts
    # full fine-tuning: the projections, their gradients and two AdamW moments (bf16 here: float32 recipe)
    assert fp.recovery["bytes"]["trained"] == c.projection * 4
    assert fp.recovery["bytes"]["adamw_state"] == 2 * c.projection * 4
    per_layer = sum(8 * (i + o) for i, o in [(4096, 4096), (4096, 1024), (4096, 1024), (4096, 4096),
                                             (4096, 12288), (4096, 12288), (12288, 4096)])
    assert lp.recovery["bytes"]["trained"] == 36 * per_layer * 4
    assert fp.recovery["peak_bytes"] > lp.recovery["peak_bytes"]
    assert lp.times["recovery"] > 0 and lp.times["total"] > make_plan(parse_recipe(base)).times["total"]
    small = recovery_memory(c, "float32", {"mode": "lora", "targets": ["q_proj"], "rank": 8, "batch_size": 1,
                                           "max_tokens": 64, "teacher": False}, 32)
    assert small["trained"] == 36 * 8 * (4096 + 4096) * 4
    assert not math.isnan(lp.recovery["seconds"])


def _ctx(tmp_path, model, samples):
    from resp_core.interfaces import RecoveryContext

    class Tok:
        pad_token_id = 0

    return RecoveryContext(model=model, tokenizer=Tok(), samples=samples, tasks=None, state_dir=tmp_path / "state",
                           seed=3)


def _ce(model, batch, ids):
    from resp_core.recovery.divergence import decode_cross_entropy

    where = decode_positions(batch.labels)
    return decode_cross_entropy(logits_at(model, batch.input_ids, batch.attention_mask, where),
                                batch.labels[:, 1:][where])


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_training_resumes_bit_identically(tmp_path, monkeypatch, mode):
    if mode == "lora":
        pytest.importorskip("peft")
    from resp_core.recovery import trainer
    from resp_core.recovery.trainer import TrainingParams, train

    p = TrainingParams(mode=mode, steps=6, lr=1e-2, batch_size=2, checkpoint_every=1, warmup_steps=1)
    samples = _samples(7)
    whole = tiny_qwen3(seed=4, vocab=VOCAB)
    ref = train(_ctx(tmp_path / "a", whole, samples), p, samples, _ce, "t")
    saves = {"n": 0}

    def kill(phase):
        saves["n"] += 1
        if saves["n"] == 3:
            raise KeyboardInterrupt  # killed right after the third checkpoint

    monkeypatch.setattr(trainer, "kill_point", kill)
    cut = tiny_qwen3(seed=4, vocab=VOCAB)
    with pytest.raises(KeyboardInterrupt):
        train(_ctx(tmp_path / "b", cut, samples), p, samples, _ce, "t")
    assert json.loads((tmp_path / "b" / "state" / "state.json").read_text())["step"] == 3
    resumed = tiny_qwen3(seed=4, vocab=VOCAB)  # a fresh process: the weights as they were before training
    out = train(_ctx(tmp_path / "b", resumed, samples), p, samples, _ce, "t")
    assert out["losses"] == ref["losses"] and out["final_loss"] == ref["final_loss"]
    a, b = whole.state_dict(), resumed.state_dict()
    assert set(a) == set(b) and not any("lora" in k for k in b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], tiny_qwen3(seed=4, vocab=VOCAB).state_dict()[k]) for k in a)  # it trained
    # a completed state is reused: no training, the same weights
    again = tiny_qwen3(seed=4, vocab=VOCAB)
    train(_ctx(tmp_path / "b", again, samples), p, samples, _ce, "t")
    assert all(torch.equal(a[k], again.state_dict()[k]) for k in a)


def test_non_finite_loss_stops_naming_the_step(tmp_path):
    from resp_core.errors import NumericalError
    from resp_core.recovery.trainer import TrainingParams, train

    calls = {"n": 0}

    def loss(model, batch, ids):
        calls["n"] += 1
        value = _ce(model, batch, ids)
        return value * float("nan") if calls["n"] == 3 else value

    samples = _samples(4)
    with pytest.raises(NumericalError) as info:
        train(_ctx(tmp_path, tiny_qwen3(seed=5, vocab=VOCAB), samples), TrainingParams(mode="full", steps=5), samples,
              loss, "t")
    assert "step 3 of 5" in str(info.value) and "\n" not in str(info.value)


# --- the third-party example of docs/plugins.md ----------------------------------------------------
from typing import Literal  # noqa: E402

from resp_core import hookimpl  # noqa: E402
from resp_core.interfaces import Recoverer  # noqa: E402
from resp_core.recovery.divergence import decode_cross_entropy  # noqa: E402
from resp_core.recovery.trainer import TrainingParams, train  # noqa: E402


class FullSequenceSFT(Recoverer):
    """full_sft: cross-entropy on every token of the traces, prompt included."""

    class Params(TrainingParams):
        mode: Literal["full", "lora"] = "full"

    def __init__(self, params=None):
        self.params = params or self.Params()

    def recover(self, ctx) -> dict:
        def loss(model, batch, sample_ids):
            labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
            where = decode_positions(labels)
            logits = logits_at(model, batch.input_ids, batch.attention_mask, where)
            return decode_cross_entropy(logits, labels[:, 1:][where])

        return train(ctx, self.params, ctx.samples, loss, "Recovery (full_sft)")


@hookimpl
def register_recoverers(register):
    register("full_sft", FullSequenceSFT)


def test_third_party_recoverer(tmp_path):
    import sys

    from resp_core.registry import build_registry

    reg = build_registry(extra_plugins=(sys.modules[__name__],))
    entry = reg.get("recovery", "full_sft")
    assert entry.origin == "registered in code" and entry.summary.startswith("full_sft")
    rec = reg.create("recovery", "full_sft", {"steps": 2, "batch_size": 2}, "recovery")
    model = tiny_qwen3(seed=6, vocab=VOCAB)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = rec.recover(_ctx(tmp_path, model, _samples(4)))
    assert out["steps"] == 2 and out["mode"] == "full" and math.isfinite(out["final_loss"])
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.rsplit(".", 2)[-2].endswith("_proj") for k in changed)
    with pytest.raises(RespError, match="recovery.params.steps"):
        reg.create("recovery", "full_sft", {"steps": -1}, "recovery")


def test_progress_shows_the_loss(tmp_path):
    import io

    from rich.console import Console

    from resp_core.progress import PlainProgressReporter
    from resp_core.recovery.trainer import TrainingParams, train

    console = Console(file=io.StringIO(), width=200)
    ctx = _ctx(tmp_path, tiny_qwen3(seed=7, vocab=VOCAB), _samples(4))
    ctx.progress = PlainProgressReporter(console, interval=0.0)
    out = train(ctx, TrainingParams(mode="full", steps=2), ctx.samples, _ce, "Recovery (t)")
    lines = console.file.getvalue().splitlines()
    assert any(ln.startswith(f"Recovery (t) loss {out['losses'][1]:.4f}: 2/2") for ln in lines), lines
