"""Where a recipe's model is: the shipped testbed, a local folder, a hub id or a GGUF file.

The ground floor that the recipe schema, the model checks and the loader share: the testbed's
location, what a hub id looks like, and the GGUF file checks (magic bytes, packages, layout).
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import RespError

TESTBED_MODEL = "testbed"
TESTBED_DIR = Path(__file__).parent / "testbed" / "assets"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
GGUF_PACKAGES = ("gguf", "accelerate")


def model_dir(path: str) -> str:
    if path == TESTBED_MODEL:
        if not (TESTBED_DIR / "model.safetensors").is_file():
            raise RespError("the testbed model is missing; train it with `respctl testbed train`")
        return str(TESTBED_DIR)
    return path


@dataclass(frozen=True)
class ModelSource:
    """Where the weights are: ``location`` (a folder or hub id) and, for GGUF, the file in it."""

    location: str
    gguf_file: str | None = None

    @property
    def label(self) -> str:
        return f"{self.location}/{self.gguf_file}" if self.gguf_file else self.location


def model_source(path: str, gguf_file: str | None = None, field: str = "model.path") -> ModelSource:
    """Resolve a recipe's ``model.path`` (and ``model.gguf_file``) without reading weights."""
    if path == TESTBED_MODEL:
        if gguf_file:
            raise RespError("model.gguf_file: the testbed model is not a GGUF file")
        return ModelSource(model_dir(path))
    p = Path(path).expanduser()
    if gguf_file:
        if Path(gguf_file).name != gguf_file:
            raise RespError(f"model.gguf_file: {gguf_file!r} must be a file name inside model.path")
        if p.is_dir():
            f = p / gguf_file
            if not f.is_file():
                raise RespError(f"model.gguf_file: {f} does not exist")
            check_gguf_file(f, "model.gguf_file")
        elif p.exists():
            raise RespError(f"{field}: {path} is a file; with model.gguf_file, model.path names its folder or hub id")
        return ModelSource(str(p) if p.is_dir() else path, gguf_file)
    if p.is_file() and (p.suffix.lower() == ".gguf" or _has_gguf_magic(p)):
        check_gguf_file(p, field)
        return ModelSource(str(p.parent), p.name)
    return ModelSource(str(p) if p.exists() else path)


def _has_gguf_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == b"GGUF"
    except OSError:
        return False


def check_gguf_file(path: Path, field: str = "model.path") -> None:
    """The file starts like a GGUF file and the packages transformers needs to read it are installed."""
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise RespError(f"{field}: cannot read {path} ({exc.strerror or exc})") from None
    if magic != b"GGUF":
        raise RespError(f"{field}: {path} is not a GGUF file (it does not start with the GGUF magic bytes)")
    missing = [p for p in GGUF_PACKAGES if importlib.util.find_spec(p) is None]
    if missing:
        raise RespError(f"{field}: reading a GGUF file needs the {' and '.join(repr(m) for m in missing)} "
                        f"package{'s' if len(missing) > 1 else ''}: pip install 'resp-pruning[gguf]'")
    check_gguf_layout(path, field)


def check_gguf_layout(path: Path, field: str = "model.path") -> None:
    """The whole GGUF header parses (metadata and tensor table, read by the ``gguf`` package's own
    reader, which maps the file without loading it) and every tensor's bytes lie inside the file:
    a file cut short or corrupted is one line here instead of a failure in the middle of loading."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except Exception as exc:  # the reader fails with numpy's errors wherever the bytes run out
        raise RespError(f"{field}: {path} cannot be read as GGUF (cut short or corrupt; {first_line(exc)})") from None
    size = path.stat().st_size
    for tensor in reader.tensors:
        end = int(tensor.data_offset) + int(tensor.n_bytes)
        if end > size:
            raise RespError(f"{field}: {path} is truncated: tensor {tensor.name!r} ends at byte {end:,}, "
                            f"the file has {size:,}")
    if not reader.tensors:
        raise RespError(f"{field}: {path} holds no tensors")


def first_line(exc: BaseException) -> str:
    """``Type: first line of the message`` (or the type alone) of a library's exception."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__
