"""Rows of text for calibration sources and evaluators: a local file or a hub dataset.

One reader for every plugin that takes text from a recipe's ``local_path`` or ``hub_id``
(``c4`` / ``wikitext`` calibration, the ``perplexity`` evaluator):

* ``.txt``: documents separated by blank lines, each one row whose text field is the document;
* ``.jsonl``: one JSON object per line;
* ``.json``: a list of objects (or of strings, each one row's text);
* a hub dataset through ``datasets.load_dataset`` (``hub_config``, ``split``; ``data_files``
  when set replaces ``hub_config``), loaded only when no local path is given.

Every failure is one :class:`RespError` line naming the recipe field (``where``) and the file or
dataset: a missing or unreadable file, malformed JSON (with its line), a text field absent from
the rows, a dataset the hub cannot serve.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import RespError

LOCAL_SUFFIXES = (".txt", ".jsonl", ".json")


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@dataclass(frozen=True)
class TextLocation:
    """Where the text is: ``local_path`` or ``hub_id`` (with its config, split and files)."""

    local_path: str | None = None
    hub_id: str | None = None
    hub_config: str | None = None
    split: str = "train"
    data_files: str | None = None

    def origin(self) -> str:
        if self.local_path:
            return self.local_path
        what = f" ({self.data_files})" if self.data_files else f" ({self.hub_config})" if self.hub_config else ""
        return f"{self.hub_id}{what}[{self.split}]"


def check_local_path(loc: TextLocation, where: str) -> Path:
    """The local file as a path, or one line: it does not exist, or its suffix is not one of
    :data:`LOCAL_SUFFIXES`."""
    path = Path(loc.local_path).expanduser()
    if not path.is_file():
        raise RespError(f"{where}.params.local_path: {loc.local_path} does not exist")
    if path.suffix.lower() not in LOCAL_SUFFIXES:
        raise RespError(f"{where}.params.local_path: {loc.local_path} must be a .txt, .jsonl or .json file")
    return path


def check_reachable(loc: TextLocation, where: str) -> None:
    """A hub dataset can be loaded: offline, it must be in the local cache (checked without
    loading it; a local file is checked by reading it)."""
    if loc.local_path:
        return
    from .hub import check_hub_dataset_offline

    check_hub_dataset_offline(loc.hub_id, where, f"set {where}.params.local_path to a local copy",
                              config=loc.hub_config, data_files=loc.data_files)


def read_rows(loc: TextLocation, text_field: str, where: str, other_fields: dict[str, str] | None = None) -> list[dict]:
    """Every row as ``{text_field: str | None, other: value | None, ...}``, in file / dataset order.

    ``text_field`` must exist in the rows (a hub dataset's columns, or each JSON object);
    ``other_fields`` (field -> the recipe parameter naming it, e.g. a prompt field) must exist in
    a hub dataset's columns and are ``None`` in local rows that lack them.  A text value that is
    not a string is ``None``."""
    other_fields = other_fields or {}
    if loc.local_path:
        rows = _read_local(loc, text_field, where)
    else:
        rows = _read_hub(loc, text_field, where, other_fields)
    out = []
    for row in rows:
        text = row.get(text_field)
        item = {text_field: text if isinstance(text, str) else None}
        item.update({f: row.get(f) for f in other_fields})
        out.append(item)
    return out


def _read_local(loc: TextLocation, text_field: str, where: str) -> list[dict]:
    path = check_local_path(loc, where)
    field_hint = f"set {where}.params.text_field to the field that holds the text"
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RespError(f"{where}.params.local_path: cannot read {loc.local_path}: {first_line(exc)}") from None
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return [{text_field: d.strip()} for d in re.split(r"\n[ \t]*\n", text) if d.strip()]
    if suffix == ".jsonl":
        rows = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise RespError(f"{where}.params.local_path: {loc.local_path}:{lineno}: not valid JSON "
                                f"({exc.msg})") from None
            rows.append(_with_field(obj, text_field, f"{where}.params.local_path: {loc.local_path}:{lineno}",
                                    field_hint))
        return rows
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RespError(f"{where}.params.local_path: {loc.local_path}: not valid JSON ({exc.msg}, line "
                        f"{exc.lineno})") from None
    if not isinstance(data, list):
        raise RespError(f"{where}.params.local_path: {loc.local_path}: expected a JSON list of objects with a "
                        f"{text_field!r} field, got {type(data).__name__}")
    rows = []
    for i, obj in enumerate(data):
        if isinstance(obj, str):
            rows.append({text_field: obj})
            continue
        rows.append(_with_field(obj, text_field, f"{where}.params.local_path: {loc.local_path}[{i}]", field_hint))
    return rows


def _with_field(obj, text_field: str, at: str, hint: str) -> dict:
    if not isinstance(obj, dict) or text_field not in obj:
        got = f"fields {sorted(obj)}" if isinstance(obj, dict) else f"a {type(obj).__name__}"
        raise RespError(f"{at}: no field {text_field!r} (got {got}); {hint}")
    return obj


def _read_hub(loc: TextLocation, text_field: str, where: str, other_fields: dict[str, str]) -> list[dict]:
    from .hub import load_hub_dataset

    ds = load_hub_dataset(loc.hub_id, where, f"set {where}.params.local_path to a local copy", config=loc.hub_config,
                          split=loc.split, data_files=loc.data_files)
    for f, name in [(text_field, "text_field"), *other_fields.items()]:
        if f not in ds.column_names:
            raise RespError(f"{where}.params.{name}: {loc.origin()} has no field {f!r} "
                            f"(fields: {', '.join(ds.column_names)})")
    columns = {f: ds[f] for f in (text_field, *other_fields)}
    return [{f: columns[f][i] for f in columns} for i in range(len(ds))]
