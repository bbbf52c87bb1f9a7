"""The dense model's top-k log-probabilities on the run's calibration traces, computed once before
pruning and stored in the run folder (``recovery/teacher_topk.safetensors``), so that the teacher
and the pruned student are never in memory together.

One row per decode position (the positions whose next token is a target, in sample order, each
sample's positions in order; sequences cut to ``max_tokens``):

* ``indices``  ``[M, k]`` int32: the teacher's k most likely next tokens at temperature τ;
* ``logprobs`` ``[M, k + 1]`` float32: their log-probabilities under softmax(z / τ) and, last, the
  log-probability of every other token together (the tail bucket, log-sum-exp of the other V − k
  entries, exact);
* ``offsets``  ``[S + 1]`` int64: sample s owns rows ``offsets[s]:offsets[s + 1]``.

The header's metadata records k, τ, ``max_tokens``, the vocabulary size, the number of samples
and the sha256 of the calibration file it was computed on; the recovery refuses a file that does
not match its own settings.  Size: M · (8k + 4) bytes (128 traces of 256 tokens at k = 32: 8.5 MB).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..atomic_io import write_safetensors
from ..errors import RespError
from ..interfaces import CalibrationSample, CalibrationSet, Progress, TeacherSpec
from .divergence import decode_positions, logits_at

FORMAT = 1
TEACHER_FILE = "recovery/teacher_topk.safetensors"


@torch.no_grad()
def compute_teacher(model, samples: list[CalibrationSample], pad_id: int, spec: TeacherSpec,
                    progress: Progress | None = None) -> dict[str, torch.Tensor]:
    """The top-k tensors of ``model`` (the dense model) on ``samples``; see the module docstring."""
    vocab = model.get_output_embeddings().weight.shape[0]
    if spec.top_k >= vocab:
        raise RespError(f"recovery.params.top_k: {spec.top_k} is not below the vocabulary size {vocab} "
                        f"(top_k = {vocab - 1} with the tail bucket already holds the whole distribution)")
    calib = CalibrationSet(samples, pad_id, max_length=spec.max_tokens)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    indices, logprobs, counts = [], [], []
    progress = progress or Progress()
    n_batches = -(-len(samples) // spec.batch_size)
    try:
        with progress.task("Teacher top-k (dense model)", total=n_batches) as advance:
            for batch in calib.batches(spec.batch_size, "decode"):
                where = decode_positions(batch.labels)
                counts.append(where.sum(1))
                if bool(where.any()):
                    logits = logits_at(model, batch.input_ids.to(device), batch.attention_mask.to(device), where)
                    logp = torch.log_softmax(logits / spec.temperature, -1)
                    top, idx = logp.topk(spec.top_k, -1)
                    tail = torch.logsumexp(logp.scatter(-1, idx, float("-inf")), -1, keepdim=True)
                    indices.append(idx.to(torch.int32).cpu())
                    logprobs.append(torch.cat([top, tail], -1).cpu())
                advance(1)
    finally:
        model.train(was_training)
    per_sample = torch.cat(counts).to(torch.int64)
    offsets = torch.zeros(len(samples) + 1, dtype=torch.int64)
    offsets[1:] = per_sample.cumsum(0)
    if int(offsets[-1]) == 0:
        raise RespError("recovery: the calibration traces have no decode tokens to distill")
    return {"indices": torch.cat(indices), "logprobs": torch.cat(logprobs), "offsets": offsets}


def teacher_metadata(spec: TeacherSpec, vocab: int, samples: int, calibration_sha256: str) -> dict[str, str]:
    return {"format": str(FORMAT), "top_k": str(spec.top_k), "temperature": repr(float(spec.temperature)),
            "max_tokens": str(spec.max_tokens), "vocab": str(vocab), "samples": str(samples),
            "calibration_sha256": calibration_sha256}


def save_teacher(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    write_safetensors(Path(path), {k: v.contiguous() for k, v in tensors.items()}, metadata)


@dataclass
class TeacherLogits:
    """A loaded teacher file: :meth:`rows` of any samples, in the order given."""

    indices: torch.Tensor
    logprobs: torch.Tensor
    offsets: torch.Tensor
    metadata: dict

    @classmethod
    def load(cls, path: Path, spec: TeacherSpec | None = None, samples: int | None = None) -> "TeacherLogits":
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise RespError(f"recovery: the teacher file {path} is missing (it is written at the start of the run)")
        with safe_open(str(path), framework="pt") as fh:
            meta = dict(fh.metadata() or {})
            tensors = {k: fh.get_tensor(k) for k in ("indices", "logprobs", "offsets")}
        out = cls(tensors["indices"], tensors["logprobs"], tensors["offsets"], meta)
        want = {} if spec is None else {"top_k": str(spec.top_k), "temperature": repr(float(spec.temperature)),
                                        "max_tokens": str(spec.max_tokens)}
        if samples is not None:
            want["samples"] = str(samples)
        for key, value in want.items():
            if meta.get(key) != value:
                raise RespError(f"recovery: {path} was computed with {key} {meta.get(key)}, the recovery needs "
                                f"{value}")
        return out

    def rows(self, sample_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(indices, logprobs)`` of the samples ``sample_ids``, concatenated in that order."""
        parts = [(int(self.offsets[s]), int(self.offsets[s + 1])) for s in sample_ids]
        idx = torch.cat([self.indices[a:b] for a, b in parts])
        lp = torch.cat([self.logprobs[a:b] for a, b in parts])
        return idx, lp

    def count(self, s: int) -> int:
        return int(self.offsets[s + 1] - self.offsets[s])


def describe(path: Path) -> dict:
    """The teacher file's metadata (for ``run.json``)."""
    from ..safetensors_io import read_header

    header, _, size = read_header(Path(path))
    return {**json.loads(json.dumps(header.get("__metadata__", {}))), "bytes": size}


__all__ = ["TEACHER_FILE", "TeacherLogits", "compute_teacher", "describe", "save_teacher", "teacher_metadata"]
