"""safetensors files without the safetensors library: one dtype table, one header reader, and the
writers, which give the same tensors and metadata the same bytes (canonical header)."""

from __future__ import annotations

import json
from pathlib import Path

MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit

# torch dtype name (``str(t.dtype)`` without ``torch.``) -> safetensors dtype
DTYPES = {"bool": "BOOL", "uint8": "U8", "int8": "I8", "int16": "I16", "int32": "I32", "int64": "I64",
          "float16": "F16", "bfloat16": "BF16", "float32": "F32", "float64": "F64"}


class HeaderError(ValueError):
    """A file whose header cannot be read.  ``kind``: ``short`` (under 8 bytes), ``length`` (the
    header length does not fit the file), ``json`` (not UTF-8 JSON), ``not_object``."""

    def __init__(self, kind: str, message: str, size: int, length: int | None = None):
        super().__init__(message)
        self.kind, self.size, self.length = kind, size, length


def read_header(path: Path, max_bytes: int = MAX_HEADER_BYTES) -> tuple[dict, int, int]:
    """``(header, header length, file size)`` of a safetensors file, reading only its header.

    Raises OSError when the file cannot be read, :class:`HeaderError` when it holds no header."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise HeaderError("short", "shorter than a header", size)
        n = int.from_bytes(head, "little")
        if n > min(size - 8, max_bytes):
            raise HeaderError("length", "header length beyond the file", size, n)
        raw = fh.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HeaderError("json", str(exc), size, n) from None
    if not isinstance(header, dict):
        raise HeaderError("not_object", "header is not an object", size, n)
    return header, n, size


def tensor_entries(header: dict):
    """``(name, entry)`` of every tensor in a header (its ``__metadata__`` left out)."""
    return ((name, info) for name, info in header.items() if name != "__metadata__")


def dtype_of(t) -> str:
    """The safetensors dtype of tensor ``t`` (KeyError for one safetensors cannot hold)."""
    return DTYPES[str(t.dtype).removeprefix("torch.")]


def header_block(entries, metadata: dict | None) -> bytes:
    """The 8-byte length and the JSON header for ``entries`` (``(name, dtype, shape, nbytes)``, in
    file order, data back to back): compact JSON, ``__metadata__`` first with its keys sorted and
    values as strings (none when ``metadata`` is None), padded with spaces to 8 bytes."""
    header: dict = {}
    if metadata is not None:
        header["__metadata__"] = {str(k): str(metadata[k]) for k in sorted(metadata)}
    offset = 0
    for name, dtype, shape, nbytes in entries:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    return len(head).to_bytes(8, "little") + head


def safetensors_bytes(tensors: dict, metadata: dict[str, str] | None = None) -> bytes:
    """The safetensors serialization of ``tensors`` with a canonical header: tensors in name
    order, metadata keys sorted, compact JSON, padded to 8 bytes.  The same tensors and metadata
    always give the same bytes (the safetensors library orders metadata by a hash map)."""
    import torch

    entries, chunks = [], []
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        dtype = dtype_of(t)
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        entries.append((name, dtype, list(t.shape), len(raw)))
        chunks.append(raw)
    return header_block(entries, metadata if metadata else None) + b"".join(chunks)


def write_safetensors_streaming(path: Path, tensors: dict, metadata: dict | None = None) -> None:
    """safetensors with a canonical header (names sorted, metadata sorted; ``{"format": "pt"}``
    when none is given), written one tensor at a time: host memory is one tensor's bytes at most,
    and equal tensors give equal bytes."""
    import torch

    names = sorted(tensors)
    entries = []
    for name in names:
        t = tensors[name]
        entries.append((name, dtype_of(t), list(t.shape), t.numel() * t.element_size()))
    head = header_block(entries, metadata or {"format": "pt"})
    with open(path, "wb") as fh:
        fh.write(head)
        for name in names:
            t = tensors[name].detach()
            if t.numel() == 0:
                continue
            t = t.to("cpu").contiguous().reshape(-1)
            fh.write(memoryview(t.view(torch.uint8).numpy()))
