"""The training loop every built-in recoverer shares: the parameters that train (the kept
projection weights, ``mode: full``, or LoRA adapters on them, ``mode: lora``), AdamW, the learning
rate schedule, gradient clipping, a non-finite loss stopping the run with one line naming the
step, the progress bar with the loss, and checkpoints that make a killed recovery resume
bit-identically.

**Resumable.**  Every ``checkpoint_every`` steps and after the last, the state is written to the
recovery's state folder (under the run's ``resume/``): ``state_XXXXXX.safetensors`` (the trained
tensors, AdamW's ``exp_avg``, ``exp_avg_sq`` and ``step`` of each) then ``state.json`` (the commit
point: the step, the loss of every step so far, the torch RNG states, the file name, the params);
older files are removed.  Batches are a function of (seed, step) alone: epoch e visits the samples
in ``randperm(n)`` drawn from a generator seeded with (seed, e), so nothing else needs saving.
The recovery runs inside :func:`torch.random.fork_rng` with its own seed, so the rest of the run
(evaluation, the next steps) sees the RNG as if no recovery had run.  Restoring the tensors,
the optimizer state and the RNG and continuing gives the same bytes as an uninterrupted recovery
(tests/test_recovery_resume.py).  A completed state (step = ``steps``) is reused as it is: a run
killed after its recovery and resumed does not train again.
"""

from __future__ import annotations

import base64
import json
import math
import time
from pathlib import Path
from typing import Callable, Literal

import torch
from pydantic import Field, model_validator

from ..atomic_io import kill_point, write_json, write_safetensors
from ..errors import NumericalError, RespError
from ..interfaces import CalibrationBatch, CalibrationSet, Params, Progress, RecoveryContext
from .lora import add_lora, adapter_parameters, merge_lora, require_peft

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
STATE_FORMAT = 1
Projection = Literal["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class TrainingParams(Params):
    """The training settings every built-in recoverer takes (all bounded)."""

    mode: Literal["full", "lora"] = "lora"  # full: the kept projection weights; lora: adapters merged back
    steps: int = Field(100, ge=1, le=1_000_000)  # optimizer steps
    lr: float | None = Field(None, gt=0, le=1.0)  # default: 1e-4 (lora), 1e-5 (full)
    lr_schedule: Literal["constant", "linear", "cosine"] = "cosine"  # after warmup, down to 0 at the last step
    warmup_steps: int = Field(0, ge=0, le=1_000_000)
    weight_decay: float = Field(0.0, ge=0.0, le=1.0)
    batch_size: int = Field(4, ge=1, le=4096)  # sequences per step
    max_tokens: int = Field(1024, ge=8, le=1_048_576)  # each sequence (prompt + trace) cut to this many tokens
    max_grad_norm: float = Field(1.0, ge=0.0, le=1e6)  # 0: no clipping
    rank: int = Field(8, ge=1, le=4096)  # LoRA
    alpha: float = Field(16.0, gt=0.0, le=1e6)  # LoRA: the update is scaled by alpha / rank
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[Projection] = Field(default_factory=lambda: list(PROJECTIONS), min_length=1)
    checkpoint_every: int = Field(50, ge=1, le=1_000_000)  # steps between resumable checkpoints
    merge_tolerance: float = Field(1e-5, gt=0.0, le=1e-2)  # float32: max |logit diff| merged vs not, per max |logit|

    @model_validator(mode="after")
    def _warmup(self):
        if self.warmup_steps >= self.steps and self.warmup_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be fewer than steps ({self.steps})")
        if len(set(self.target_modules)) != len(self.target_modules):
            raise ValueError("target_modules: each projection may be listed once")
        return self

    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (1e-4 if self.mode == "lora" else 1e-5)

    def check(self, path: str) -> None:
        """What needs this machine (validate time): peft for LoRA."""
        if self.mode == "lora":
            require_peft(f"{path}.params.mode")


def lr_at(p: TrainingParams, step: int) -> float:
    """The learning rate of (0-based) ``step``: linear warmup, then constant / linear / cosine to 0."""
    base = p.learning_rate()
    if step < p.warmup_steps:
        return base * (step + 1) / p.warmup_steps
    if p.lr_schedule == "constant":
        return base
    span = max(1, p.steps - p.warmup_steps)
    frac = (step - p.warmup_steps) / span
    return base * (1.0 - frac) if p.lr_schedule == "linear" else base * 0.5 * (1.0 + math.cos(math.pi * frac))


def batch_order(n: int, batch_size: int, seed: int, step: int) -> list[int]:
    """The sample indices of ``step``: epochs of ``randperm(n)`` seeded by (seed, epoch), cut in
    batches; a batch never spans two epochs (the last batch of an epoch may be short)."""
    per_epoch = -(-n // batch_size)
    epoch, k = divmod(step, per_epoch)
    g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % (1 << 63))
    perm = torch.randperm(n, generator=g).tolist()
    return perm[k * batch_size:(k + 1) * batch_size]


def collate(samples, ids: list[int], pad_id: int, max_tokens: int) -> CalibrationBatch:
    """The samples ``ids`` as one right-padded batch with the decode-only labels."""
    return next(CalibrationSet([samples[i] for i in ids], pad_id, max_length=max_tokens).batches(len(ids), "decode"))


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode()


def _from_b64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def _rng() -> dict:
    out = {"torch": _b64(torch.random.get_rng_state())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return out


def _set_rng(state: dict) -> None:
    torch.random.set_rng_state(_from_b64(state["torch"]))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_from_b64(s) for s in state["cuda"]])


def save_state(folder: Path, step: int, trained: dict[str, torch.nn.Parameter], opt: torch.optim.Optimizer,
               losses: list[float], params: TrainingParams) -> None:
    """The tensors then ``state.json`` (the commit point); older tensor files removed."""
    tensors = {}
    for i, (name, p) in enumerate(trained.items()):
        tensors[f"param/{name}"] = p.detach().cpu().contiguous()
        st = opt.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq", "step"):
            if key in st:
                tensors[f"{key}/{name}"] = st[key].detach().cpu().reshape(st[key].shape).contiguous()
    name = f"state_{step:06d}.safetensors"
    write_safetensors(folder / name, tensors, {"format": str(STATE_FORMAT)})
    write_json(folder / "state.json", {"format": STATE_FORMAT, "step": step, "file": name, "losses": losses,
                                       "rng": _rng(), "params": params.model_dump(mode="json")})
    for old in folder.glob("state_*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)


def load_state(folder: Path, trained: dict[str, torch.nn.Parameter], opt: torch.optim.Optimizer,
               params: TrainingParams) -> tuple[int, list[float]]:
    """Restore the newest complete state; ``(0, [])`` when there is none (or it is of other params)."""
    from safetensors.torch import load_file

    meta_file = folder / "state.json"
    if not meta_file.is_file():
        return 0, []
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError):
        return 0, []
    if meta.get("format") != STATE_FORMAT or meta.get("params") != params.model_dump(mode="json") \
            or not (folder / meta["file"]).is_file():
        return 0, []
    tensors = load_file(str(folder / meta["file"]))
    with torch.no_grad():
        for name, p in trained.items():
            p.copy_(tensors[f"param/{name}"].to(p.device))
            if f"exp_avg/{name}" in tensors:
                opt.state[p] = {key: tensors[f"{key}/{name}"].to(p.device if key != "step" else "cpu")
                                for key in ("step", "exp_avg", "exp_avg_sq")}
    _set_rng(meta["rng"])
    return int(meta["step"]), [float(x) for x in meta["losses"]]


def _trainable(model, p: TrainingParams) -> dict[str, torch.nn.Parameter]:
    for q in model.parameters():
        q.requires_grad_(False)
    out = {}
    for name, mod in model.named_modules():
        if name.rsplit(".", 1)[-1] in p.target_modules and isinstance(mod, torch.nn.Linear):
            mod.weight.requires_grad_(True)
            out[f"{name}.weight"] = mod.weight
    return out


LossFn = Callable[[torch.nn.Module, CalibrationBatch, list[int]], torch.Tensor]


def train(ctx: RecoveryContext, p: TrainingParams, samples, loss_fn: LossFn, description: str,
          probe: list | None = None) -> dict:
    """Train ``ctx.model`` on ``samples`` with ``loss_fn(model, batch, sample_ids)`` for ``p.steps``
    steps (resuming from ``ctx.state_dir``), merge LoRA adapters back; returns the summary."""
    if not samples:
        raise RespError("recovery: no training samples")
    model, folder = ctx.model, Path(ctx.state_dir)
    folder.mkdir(parents=True, exist_ok=True)
    pad_id = ctx.tokenizer.pad_token_id if ctx.tokenizer.pad_token_id is not None else 0
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed((ctx.seed * 7919 + 17) % (1 << 63))
        peft_model = None
        if p.mode == "lora":
            for q in model.parameters():
                q.requires_grad_(False)
            peft_model = add_lora(model, p.rank, p.alpha, p.lora_dropout, p.target_modules)
            trained = adapter_parameters(model)
        else:
            trained = _trainable(model, p)
        opt = torch.optim.AdamW(list(trained.values()), lr=p.learning_rate(), weight_decay=p.weight_decay,
                                foreach=False)
        start, losses = load_state(folder, trained, opt, p)
        if start:
            ctx.progress.log(f"recovery {ctx.label}: resuming after step {start}/{p.steps}")
        device = next(model.parameters()).device
        model.train()
        t0 = time.monotonic()
        try:
            with ctx.progress.task(description, total=p.steps) as advance:
                if start:
                    advance(start)
                for step in range(start, p.steps):
                    ids = batch_order(len(samples), p.batch_size, ctx.seed, step)
                    batch = collate(samples, ids, pad_id, p.max_tokens)
                    for group in opt.param_groups:
                        group["lr"] = lr_at(p, step)
                    loss = loss_fn(model, CalibrationBatch(batch.input_ids.to(device), batch.attention_mask.to(device),
                                                           batch.labels.to(device)), ids)
                    value = float(loss.detach())
                    if not math.isfinite(value):
                        raise NumericalError(f"recovery {ctx.label}: the training loss is {value} at step {step + 1} "
                                             f"of {p.steps}; lower recovery.params.lr")
                    loss.backward()
                    if p.max_grad_norm > 0:
                        torch.nn.utils.clip_grad_norm_(list(trained.values()), p.max_grad_norm, foreach=False)
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    losses.append(value)
                    _advance(advance, f"{description} loss {value:.4f}")
                    if (step + 1) % p.checkpoint_every == 0 or step + 1 == p.steps:
                        save_state(folder, step + 1, trained, opt, losses, p)
                        kill_point("recovery")
        finally:
            model.eval()
        seconds = time.monotonic() - t0
        merge_diff = None
        if peft_model is not None:
            probe_batch = collate(probe or samples, list(range(min(4, len(probe or samples)))), pad_id,
                                  min(p.max_tokens, 256))
            merge_diff = merge_lora(peft_model, model, probe_batch, p.merge_tolerance)
        for q in model.parameters():
            q.requires_grad_(False)
        del opt
    ctx.progress.log(f"recovery {ctx.label}: {p.steps} steps, loss {losses[0]:.4f} -> {losses[-1]:.4f} "
                     f"({seconds:.1f} s this process)")
    tail = losses[-min(10, len(losses)):]
    return {"mode": p.mode, "steps": p.steps, "trained_parameters": sum(t.numel() for t in trained.values()),
            "first_loss": losses[0], "final_loss": losses[-1], "final_loss_mean10": sum(tail) / len(tail),
            "merge_max_abs_logit_diff": merge_diff, "losses": losses}


def _advance(advance, description: str) -> None:
    try:
        advance(1, description=description)
    except TypeError:  # a reporter whose advance takes the count only
        advance(1)


__all__ = ["PROJECTIONS", "TrainingParams", "batch_order", "collate", "load_state", "lr_at", "save_state", "train"]
