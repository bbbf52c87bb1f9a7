"""Loading a task's split from the Hugging Face hub, with one-line errors (shared by the tasks)."""

from __future__ import annotations

from resp_core.hub import load_hub_dataset


def hub_rows(task: str, hub_id: str, split: str, config: str | None = None) -> list[dict]:
    """Every row of ``hub_id`` (``config``) ``split`` as a dict; failures become a RespError
    (offline: at once, without the hub libraries' retries)."""
    ds = load_hub_dataset(hub_id, task, "set data_dir to a local copy", config=config, split=split)
    return [dict(row) for row in ds]
