"""The Hugging Face hub, asked at most once per process whether it can be reached.

Without a network, ``huggingface_hub`` and ``datasets`` retry every request for half a minute
and print a screen of "Retrying in 1s" lines before they fail.  :func:`offline_reason` answers
first (``HF_HUB_OFFLINE`` set, or one TCP connection to the hub's endpoint that fails within a
few seconds); where the hub cannot be reached, :func:`use_cache_only` switches both libraries to
their local cache, so a cached model or dataset still loads and a missing one fails at once, as
one line that says the machine is offline and which recipe field takes a local copy.
"""

from __future__ import annotations

import functools
import os
import socket
from urllib.parse import urlsplit

from .errors import RespError

PROBE_TIMEOUT_S = 3.0
_TRUE = ("1", "true", "yes", "on")


@functools.lru_cache(maxsize=1)
def _probe(endpoint: str) -> str | None:
    parts = urlsplit(endpoint)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S):
            return None
    except OSError as exc:
        return f"{host}:{port} cannot be reached: {exc.strerror or type(exc).__name__}"


def offline_reason() -> str | None:
    """Why the hub cannot be used (``None`` when it can)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE:
        return "HF_HUB_OFFLINE is set"
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    return _probe(constants.ENDPOINT)


def use_cache_only() -> None:
    """Make ``huggingface_hub``, ``transformers`` and ``datasets`` read the local cache only, for
    the rest of this process (they read these flags when asked, or at import)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    from huggingface_hub import constants

    constants.HF_HUB_OFFLINE = True
    import importlib

    try:
        importlib.import_module("datasets.config").HF_HUB_OFFLINE = True
    except ImportError:  # pragma: no cover - datasets is a dependency
        pass


def load_hub_dataset(hub_id: str, where: str, local_hint: str, config: str | None = None, split: str = "train",
                     data_files: str | None = None):
    """``datasets.load_dataset`` of one split, every failure one :class:`RespError` line naming
    ``where`` (the recipe field) and ending with ``local_hint`` (how to give a local copy)."""
    try:
        import datasets
    except ImportError:
        raise RespError(f"{where}: loading {hub_id!r} needs the 'datasets' package; install it or {local_hint}") from None
    offline = offline_reason()
    if offline:
        use_cache_only()
    what = f"{hub_id!r} ({data_files or config}, split {split!r})" if (data_files or config) else \
        f"{hub_id!r} (split {split!r})"
    try:
        if data_files:
            return datasets.load_dataset(hub_id, data_files={split: data_files}, split=split)
        return datasets.load_dataset(hub_id, config, split=split) if config else datasets.load_dataset(hub_id, split=split)
    except Exception as exc:  # network, auth, missing config or split, script-based dataset ...
        first = (str(exc).strip().splitlines() or [""])[0]
        if offline:
            raise RespError(f"{where}: could not load {what}: this machine is offline ({offline}) and the local "
                            f"cache cannot serve it ({type(exc).__name__}: {first}); {local_hint}") from None
        raise RespError(f"{where}: could not load {what} from the hub: {type(exc).__name__}: {first} "
                        f"({local_hint})") from None


def check_hub_dataset_offline(hub_id: str, where: str, local_hint: str, config: str | None = None,
                              data_files: str | None = None) -> None:
    """For ``validate`` and the start of a run: offline, the dataset must be in the local cache
    (its builder is made from the cache alone, nothing is downloaded); online nothing is asked."""
    offline = offline_reason()
    if not offline:
        return
    use_cache_only()
    import datasets

    try:
        if data_files:
            datasets.load_dataset_builder(hub_id, data_files=data_files)
        else:
            datasets.load_dataset_builder(hub_id, config)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        raise RespError(f"{where}: {hub_id!r} cannot be loaded: this machine is offline ({offline}) and the local "
                        f"cache does not hold it ({type(exc).__name__}: {first}); {local_hint}") from None
