"""Train the testbed reasoning model (``respctl testbed train``).

A tiny Qwen3ForCausalLM (GQA, q/k norms) trained from scratch on freshly sampled problems each
step: 70% thinking traces, 30% terse reference solutions in non-thinking mode.  The loss covers
assistant tokens only, as in chat SFT.  Seeded end to end; the output folder holds
``config.json``, ``model.safetensors``, ``tokenizer.json`` + ``tokenizer_config.json`` and
``training.json`` (settings and loss curve).
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from . import task
from .tokenizer import build_tokenizer


TOKENIZER_SEED = 0  # the tokenizer is part of the testbed's definition, not of a training run


@dataclass
class TrainSettings:
    seed: int = 0
    steps: int = 1500
    batch_size: int = 96
    bucket_batches: int = 8  # sample this many batches at once and group them by length
    lr: float = 3e-3
    warmup: int = 100
    weight_decay: float = 0.01
    terse_fraction: float = 0.3
    hidden_size: int = 96
    intermediate_size: int = 256
    num_layers: int = 6
    num_heads: int = 6
    num_kv_heads: int = 3
    head_dim: int = 16
    vocab_size: int = 512
    init_from: str | None = None  # continue from a saved testbed model (same tokenizer settings)
    checkpoint_every: int = 0  # also save to <out>/checkpoint every this many steps (0: never)


def model_config(s: TrainSettings, tok) -> Qwen3Config:
    return Qwen3Config(
        vocab_size=len(tok),
        hidden_size=s.hidden_size,
        intermediate_size=s.intermediate_size,
        num_hidden_layers=s.num_layers,
        num_attention_heads=s.num_heads,
        num_key_value_heads=s.num_kv_heads,
        head_dim=s.head_dim,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        rope_theta=10000.0,
        bos_token_id=None,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def training_example(p: task.Problem, rng: random.Random, terse_fraction: float) -> tuple[str, str]:
    """(prompt text, assistant text) for one problem."""
    user = [{"role": "user", "content": p.prompt(rng.randrange(4))}]
    return user, (task.reference_solution(p) if rng.random() < terse_fraction else task.thinking_response(p, rng))


def encode_batch(tok, examples) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded input ids, attention mask, and labels masked to the assistant reply."""
    rows, labels = [], []
    for user, reply in examples:
        terse = not reply.startswith("<think>")
        prompt = tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True, enable_thinking=not terse)
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        r_ids = tok(reply + "<|im_end|>", add_special_tokens=False)["input_ids"]
        rows.append(p_ids + r_ids)
        labels.append([-100] * len(p_ids) + r_ids)
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id)
    lab = torch.full((len(rows), width), -100)
    att = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (r, lb) in enumerate(zip(rows, labels)):
        ids[i, : len(r)] = torch.tensor(r)
        lab[i, : len(lb)] = torch.tensor(lb)
        att[i, : len(r)] = 1
    return ids, att, lab


def train(out_dir: Path, settings: TrainSettings, progress=None) -> dict:
    torch.manual_seed(settings.seed)
    rng = random.Random(settings.seed)
    if settings.init_from:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(settings.init_from)
    else:
        tok = build_tokenizer(settings.vocab_size, TOKENIZER_SEED)
    config = model_config(settings, tok)
    if settings.init_from:
        model = Qwen3ForCausalLM.from_pretrained(settings.init_from, dtype=torch.float32)
        if model.config.vocab_size != config.vocab_size:
            raise ValueError("init_from was trained with another tokenizer")
    else:
        model = Qwen3ForCausalLM(config)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=settings.lr,
        betas=(0.9, 0.98),
    )

    def lr_at(step: int) -> float:
        if step < settings.warmup:
            return settings.lr * (step + 1) / settings.warmup
        frac = (step - settings.warmup) / max(1, settings.steps - settings.warmup)
        return settings.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))

    prob_rng = random.Random(settings.seed + 1)
    losses = []
    t0 = time.time()
    pending: list = []
    for step in range(settings.steps):
        if not pending:
            pool = [
                training_example(task.sample_problem(prob_rng), rng, settings.terse_fraction)
                for _ in range(settings.batch_size * settings.bucket_batches)
            ]
            pool.sort(key=lambda ex: len(ex[1]))
            pending = [pool[i : i + settings.batch_size] for i in range(0, len(pool), settings.batch_size)]
            rng.shuffle(pending)
        ids, att, lab = encode_batch(tok, pending.pop())
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        loss = model(input_ids=ids, attention_mask=att, labels=lab).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(round(loss.item(), 5))
        if settings.checkpoint_every and (step + 1) % settings.checkpoint_every == 0:
            model.save_pretrained(out_dir / "checkpoint", safe_serialization=True)
            tok.save_pretrained(out_dir / "checkpoint")
        if progress is not None:
            progress(step + 1, settings.steps, loss.item())
    elapsed = time.time() - t0

    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    record = {
        "settings": asdict(settings),
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_seconds": round(elapsed, 1),
        "final_loss": float(sum(losses[-50:]) / len(losses[-50:])),
        "loss_every_50": losses[::50],
    }
    (out_dir / "training.json").write_text(json.dumps(record, indent=2))
    return record
