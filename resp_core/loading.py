"""Loading the model and tokenizer a recipe names.

``model.path`` is one of:

* ``testbed`` — the shipped testbed model;
* a local Hugging Face folder (``config.json``, tokenizer files, ``*.safetensors``);
* a hub id (``org/name``), read through the local cache or the hub;
* a GGUF file (``path/to/model.gguf``), or a folder / hub id together with ``model.gguf_file``.
  GGUF weights are dequantized by transformers' own GGUF support
  (``from_pretrained(folder, gguf_file=NAME)``; needs the ``gguf`` and ``accelerate`` packages,
  ``pip install 'resp-pruning[gguf]'``), to ``model.dtype``.  ``respctl convert`` writes such a model as a
  normal safetensors folder, which loads faster and anywhere.

Every problem is one :class:`RespError` line naming the field: a missing or empty folder, one
without tokenizer files, a random-byte or truncated ``model.safetensors``, a GGUF file that is
truncated or of an architecture transformers or the adapter does not know, a missing ``gguf``
package.  The cheap checks (no weight read) run first; a failure of transformers' own loading is
reported with its first line.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import RespError
from .recipe import TESTBED_MODEL, ModelSection

TESTBED_DIR = Path(__file__).parent / "testbed" / "assets"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
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
        raise RespError(f"{field}: {path} cannot be read as GGUF (cut short or corrupt; {_first_line(exc)})") from None
    size = path.stat().st_size
    for tensor in reader.tensors:
        end = int(tensor.data_offset) + int(tensor.n_bytes)
        if end > size:
            raise RespError(f"{field}: {path} is truncated: tensor {tensor.name!r} ends at byte {end:,}, "
                            f"the file has {size:,}")
    if not reader.tensors:
        raise RespError(f"{field}: {path} holds no tensors")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _preflight(section: ModelSection, source: ModelSource) -> None:
    """The checks ``respctl validate`` runs (config, tokenizer files, safetensors headers of a
    folder; a hub id in the cache or on the hub), and, where the hub cannot be reached, the hub
    libraries switched to the local cache so that nothing waits on retries."""
    from .preflight import check_model

    if Path(source.location).is_dir():
        if not source.gguf_file:
            check_model(section.model_copy(update={"path": source.location}) if section.path != TESTBED_MODEL
                        else section)
        return
    if not source.gguf_file:
        check_model(section)  # a hub id: cached, or offline in one line, or looked up once
    from .hub import offline_reason, use_cache_only

    if offline_reason():
        use_cache_only()


def load_model_and_tokenizer(section: ModelSection, device: str | None = None):
    """The recipe's model (eval mode, on ``device`` or ``section.device``) and its tokenizer
    (left padding, a pad token)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .model.adapter import check_supported

    source = model_source(section.path, getattr(section, "gguf_file", None))
    _preflight(section, source)
    kwargs = {"revision": section.revision}
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.location, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source.location, dtype=DTYPES[section.dtype], **kwargs)
    except RespError:
        raise
    except Exception as exc:  # transformers, safetensors, gguf and tokenizers each raise their own types
        raise RespError(f"model.path: cannot load {source.label!r}: {_first_line(exc)}") from None
    check_supported(getattr(model.config, "model_type", None), f"model.path: {source.label}")
    check_finite_weights(model, f"model.path: {source.label}")
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device or section.device)
    model.eval()
    return model, tokenizer


def check_finite_weights(model, where: str) -> None:
    """Every floating-point parameter and buffer is finite; else one line naming the first tensor
    that is not (found at load, before generation samples from NaN probabilities)."""
    import torch

    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise RespError(f"{where}: tensor {name!r} holds {bad:,} NaN or infinite value{'s' if bad > 1 else ''}; "
                            "the weights are corrupt")


def convert(section: ModelSection, out: Path) -> dict:
    """Write the model ``section`` names (a GGUF file, a hub id, a folder) as a normal safetensors
    Hugging Face folder at ``out`` (which must not exist).  Returns what was written."""
    import time

    from .model.saving import config_json, write_model_folder

    out = Path(out)
    if out.exists():
        raise RespError(f"{out} already exists; choose another output folder (nothing was written)")
    started = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer(section, device="cpu")
    loaded = time.perf_counter() - started
    # transformers marks a GGUF-loaded model as quantized and will not save_pretrained it; the
    # dequantized tensors are written as they are, with a plain config
    write_model_folder(out, config_json(model.config, type(model).__name__), model.state_dict(), tokenizer,
                       model.generation_config)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    return {"out": str(out), "bytes": size, "load_seconds": loaded,
            "parameters": sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()),
            "model_type": model.config.model_type, "dtype": section.dtype}
