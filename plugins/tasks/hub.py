"""Loading a task's split from the Hugging Face hub, with one-line errors (shared by the tasks)."""

from __future__ import annotations

from resp_core.errors import RespError


def hub_rows(task: str, hub_id: str, split: str, config: str | None = None) -> list[dict]:
    """Every row of ``hub_id`` (``config``) ``split`` as a dict; failures become a RespError."""
    try:
        import datasets
    except ImportError:
        raise RespError(
            f"{task}: loading from the hub needs the 'datasets' package; install it or set data_dir"
        ) from None
    try:
        ds = datasets.load_dataset(hub_id, config, split=split) if config else datasets.load_dataset(hub_id, split=split)
    except Exception as exc:  # network, auth, missing config, script-based dataset ...
        msg = (str(exc).strip().splitlines() or [""])[0]
        what = f"({config}, split {split!r})" if config else f"(split {split!r})"
        raise RespError(
            f"{task}: could not load {hub_id!r} {what} from the hub: "
            f"{type(exc).__name__}: {msg} (set data_dir to a local copy)"
        ) from None
    return [dict(row) for row in ds]
