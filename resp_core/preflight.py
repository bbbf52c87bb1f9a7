"""Checks of the model a recipe names, and of its device, before any weight is loaded.

``respctl validate`` and the start of ``respctl run`` read only small files: the model folder's
``config.json`` (architecture supported? layer count for the structure fields?), the names of
its tokenizer files, and the JSON header of each ``*.safetensors`` file (is every tensor's byte
range inside the file?).  A hub id is looked up in the local Hugging Face cache first; offline
(``HF_HUB_OFFLINE`` set, or the hub unreachable: :mod:`resp_core.hub`) nothing else is tried,
otherwise one metadata request answers whether the repository exists (no download, no retry loop).  Each problem is one :class:`RespError` line
naming the field.
"""

from __future__ import annotations

import json
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import RespError
from .model_source import HUB_ID, TESTBED_DIR, TESTBED_MODEL, model_source
from .safetensors_io import MAX_HEADER_BYTES, HeaderError, read_header, tensor_entries

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "vocab.txt")
MAX_CONFIG_BYTES = 10 << 20
REQUIRED_CONFIG = ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size")


@dataclass
class ModelInfo:
    """What the checks learned: the folder (None for a hub model not in the cache) and config."""

    path: str
    folder: Path | None
    config: dict | None


def check_device(device: str, field: str = "model.device") -> None:
    """``device`` exists on this machine (the schema has already checked its spelling)."""
    import torch

    kind, _, index = device.partition(":")
    if kind == "cpu":
        return
    if kind == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch build has no CUDA support" if torch.version.cuda is None
                   else "no CUDA device is visible")
            raise RespError(f"{field}: {device!r} is not available ({why}); use cpu")
        n = torch.cuda.device_count()
        if index and int(index) >= n:
            raise RespError(f"{field}: {device!r} does not exist; this machine has {n} CUDA device(s) "
                            f"(cuda:0..cuda:{n - 1})")
        return
    if kind == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise RespError(f"{field}: 'mps' is not available on this machine; use cpu")
        return
    if kind == "xpu":
        xpu = getattr(torch, "xpu", None)
        if xpu is None or not xpu.is_available():
            raise RespError(f"{field}: {device!r} is not available on this machine; use cpu")
        if index and int(index) >= xpu.device_count():
            raise RespError(f"{field}: {device!r} does not exist; this machine has {xpu.device_count()} XPU device(s)")
        return
    raise RespError(f"{field}: unknown device {device!r}; use cpu, cuda, cuda:N, mps or xpu")


def read_config(path: Path, field: str = "model.path") -> dict:
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise RespError(f"{field}: {path} is {size:,} bytes; not a model config")
        cfg = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RespError(f"{field}: {path} is not valid JSON ({exc.__class__.__name__})") from None
    except OSError as exc:
        raise RespError(f"{field}: cannot read {path} ({exc.strerror or exc})") from None
    if not isinstance(cfg, dict):
        raise RespError(f"{field}: {path} is not a JSON object")
    return cfg


def check_config(cfg: dict, where: str, field: str = "model.path") -> None:
    from .model import adapter

    supported = tuple(getattr(adapter, "SUPPORTED_FAMILIES", ()))
    mt = cfg.get("model_type")
    if mt is None:
        raise RespError(f"{field}: {where} has no 'model_type'; not a transformers model config")
    if supported and mt not in supported:
        raise RespError(f"{field}: architecture {mt!r} ({where}) is not supported; supported: {', '.join(supported)}")
    text_cfg = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else cfg
    for key in REQUIRED_CONFIG:
        v = text_cfg.get(key, cfg.get(key))
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise RespError(f"{field}: {where}: {key} is {v!r}, not a positive integer")


def check_safetensors(path: Path, field: str = "model.path") -> dict:
    """Read only the JSON header of a safetensors file and check it describes the file."""
    try:
        header, n, size = read_header(path, MAX_HEADER_BYTES)
    except OSError as exc:
        raise RespError(f"{field}: cannot read {path} ({exc.strerror or exc})") from None
    except HeaderError as exc:
        if exc.kind == "short":
            raise RespError(f"{field}: {path} is not a safetensors file ({exc.size} bytes)") from None
        if exc.kind == "length":
            raise RespError(f"{field}: {path} is not a readable safetensors file (header length {exc.length:,} "
                            f"for a {exc.size:,}-byte file; truncated or corrupt)") from None
        raise RespError(f"{field}: {path} is not a readable safetensors file (corrupt header)") from None
    data_len = size - 8 - n
    end = 0
    for name, info in tensor_entries(header):
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(x, int) for x in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise RespError(f"{field}: {path}: tensor {name!r} has a corrupt header entry")
        end = max(end, offsets[1])
    if end > data_len:
        raise RespError(f"{field}: {path} is truncated: its header describes {end:,} bytes of tensors, the file "
                        f"holds {data_len:,}")
    return header


def check_weights(folder: Path, field: str = "model.path") -> None:
    files = sorted(folder.glob("*.safetensors"))
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        idx = read_config(index, field)
        shards = sorted(set((idx.get("weight_map") or {}).values()))
        if not shards:
            raise RespError(f"{field}: {index} lists no weights")
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise RespError(f"{field}: {folder} lacks the weight file {missing[0]} listed in {index.name}")
        files = [folder / s for s in shards]
    if not files:
        if any(folder.glob("*.bin")) or any(folder.glob("*.gguf")):
            return  # transformers reads these itself
        raise RespError(f"{field}: {folder} holds no weights (*.safetensors)")
    for f in files:
        check_safetensors(f, field)


def check_tokenizer_files(names: set[str], where: str, field: str = "model.path") -> None:
    if not any(n in names for n in TOKENIZER_FILES):
        raise RespError(f"{field}: {where} holds no tokenizer files (one of {', '.join(TOKENIZER_FILES)})")


def _check_local(path: str, folder: Path, field: str) -> ModelInfo:
    if folder.is_file():
        raise RespError(f"{field}: {path} is a file; give the model's folder (with config.json)")
    if not folder.is_dir():
        raise RespError(f"{field}: {path} does not exist (not a local folder, nor a hub id like 'Qwen/Qwen3-8B')")
    try:
        names = {p.name for p in folder.iterdir()}
    except OSError as exc:
        raise RespError(f"{field}: cannot read the folder {path} ({exc.strerror or exc})") from None
    if not names:
        raise RespError(f"{field}: {path} is an empty folder")
    if "config.json" not in names:
        raise RespError(f"{field}: {path} holds no config.json; not a model folder")
    cfg = read_config(folder / "config.json", field)
    check_config(cfg, f"{path}/config.json", field)
    check_tokenizer_files(names, path, field)
    check_weights(folder, field)
    return ModelInfo(path, folder, cfg)


def _check_hub(path: str, revision: str | None, field: str, portable: bool = False) -> ModelInfo:
    import logging

    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(path, "config.json", revision=revision)
    if isinstance(cached, str):
        cfg = read_config(Path(cached), field)
        check_config(cfg, f"{path} (cached config.json)", field)
        return ModelInfo(path, Path(cached).parent, cfg)
    if portable:  # a recipe written for another machine: the hub is not asked
        return ModelInfo(path, None, None)
    from .hub import offline_reason

    offline = offline_reason()
    if offline:
        raise RespError(f"{field}: {path!r} is not in the local Hugging Face cache and this machine is offline "
                        f"({offline}); give a local folder or GGUF file in {field}, or download it first "
                        f"(`hf download {path}`)")
    from huggingface_hub import HfApi, errors

    quiet = logging.getLogger("huggingface_hub")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        info = HfApi().model_info(path, revision=revision, timeout=15, files_metadata=False)
    except errors.RepositoryNotFoundError:
        raise RespError(f"{field}: {path!r} does not exist on the Hugging Face hub (or is private: "
                        "log in with `hf auth login`)") from None
    except errors.GatedRepoError:
        raise RespError(f"{field}: {path!r} is gated; accept its terms on the hub and log in") from None
    except errors.RevisionNotFoundError:
        raise RespError(f"model.revision: {revision!r} does not exist in {path!r}") from None
    except Exception as exc:  # network errors come from several libraries
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise RespError(f"{field}: cannot reach the Hugging Face hub to look up {path!r} ({first}); give a "
                        f"local folder or GGUF file in {field}") from None
    finally:
        quiet.setLevel(level)
    names = {s.rfilename for s in (info.siblings or [])}
    if "config.json" not in names:
        raise RespError(f"{field}: {path!r} on the hub holds no config.json; not a transformers model")
    check_tokenizer_files(names, repr(path), field)
    if not any(n.endswith((".safetensors", ".bin")) for n in names):
        raise RespError(f"{field}: {path!r} on the hub holds no weights (*.safetensors)")
    try:  # the config alone (a few kilobytes), for the structure checks
        from huggingface_hub import hf_hub_download

        local = Path(hf_hub_download(path, "config.json", revision=revision))
    except Exception:
        return ModelInfo(path, None, None)
    cfg = read_config(local, field)
    check_config(cfg, f"{path} (config.json)", field)
    return ModelInfo(path, local.parent, cfg)


def check_model(section: Any, field: str = "model.path", portable: bool = False) -> ModelInfo:
    """Check the recipe's ``model`` section without loading weights (see the module docstring).

    ``portable``: the recipe is meant for another machine (``respctl validate --portable``): the
    device is not checked and a hub model that is not in the local cache is not looked up, so the
    structure checks that need its config are skipped; everything else is checked.  A full
    check (not ``portable``) that passes is remembered: see :func:`already_checked`."""
    info = _check_model(section, field, portable)
    if not portable:
        _remember(section)
    return info


def _check_model(section: Any, field: str, portable: bool) -> ModelInfo:
    if not portable:
        check_device(section.device)
    path = section.path
    gguf_file = getattr(section, "gguf_file", None)
    if gguf_file or (Path(path).expanduser().is_file() and path != TESTBED_MODEL):
        src = model_source(path, gguf_file, field)  # GGUF: the magic bytes and the packages to read it
        if src.gguf_file:
            return ModelInfo(path, None, None)
    if path == TESTBED_MODEL:
        if not (TESTBED_DIR / "model.safetensors").is_file():
            raise RespError("model.path: the testbed model is missing; train it with `respctl testbed train`")
        return _check_local(path, TESTBED_DIR, field)
    folder = Path(path).expanduser()
    if folder.exists() or not HUB_ID.match(path) or path.startswith((".", "/", "~")):
        return _check_local(path, folder, field)
    return _check_hub(path, section.revision, field, portable)


# The sections that passed a full check in this process, by object: a run checks its model when
# the recipe is resolved, and loading that same (unchanged) section does not check it again.
_CHECKED: dict[int, tuple[weakref.ref, tuple]] = {}


def _state(section: Any) -> tuple:
    return (section.path, section.revision, getattr(section, "gguf_file", None), section.device)


def _remember(section: Any) -> None:
    key = id(section)
    try:
        ref = weakref.ref(section, lambda _, key=key: _CHECKED.pop(key, None))
    except TypeError:  # an object that cannot be weakly referenced is simply checked again
        return
    _CHECKED[key] = (ref, _state(section))


def already_checked(section: Any) -> bool:
    """``section`` (this very object, its path, revision, GGUF file and device unchanged) passed
    :func:`check_model` on this machine earlier in this process."""
    entry = _CHECKED.get(id(section))
    return entry is not None and entry[0]() is section and entry[1] == _state(section)


def transformers_config(info: ModelInfo):
    """The transformers config object of a checked model (None when only the hub knows it)."""
    if info.config is None or info.folder is None:
        return None
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(info.folder))
    except Exception as exc:  # a config transformers cannot read
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise RespError(f"model.path: {info.path}: transformers cannot read config.json ({first})") from None
