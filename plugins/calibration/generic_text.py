"""Generic text calibration (C4, WikiText): the calibration most pruning papers use.

Each sample is a window of ``seq_len`` tokens of ordinary text: ``prompt_ids`` is empty and
``target_ids`` is the window, so whichever loss a scorer asks for (``decode`` or ``full``) is the
full-sequence loss over the window.  Windows are chosen reproducibly by ``seed`` (the recipe's
seed when unset):

* ``c4`` (Wanda/SparseGPT's ``get_c4``): documents are visited in a seeded random order and each
  document with at least ``seq_len`` tokens gives one window at a random offset; documents are
  not reused (the authors draw documents with replacement, which on a 45k-document shard almost
  never repeats one).
* ``wikitext`` (``get_wikitext2``): the rows are joined with ``"\\n\\n"`` and tokenized as one
  stream; windows are ``num_samples`` distinct non-overlapping slots of that stream at a random
  shift (the authors draw overlapping windows at random offsets).

When too few windows exist (too few long-enough documents, or too short a stream) the run stops
with an error naming ``num_samples``.

Data: ``local_path`` (when set nothing is downloaded) is a ``.txt`` file (documents separated by
blank lines), a ``.jsonl`` file (one object per line with a ``text_field`` string) or a
``.json`` file (a list of such objects, or of strings).  Otherwise the ``hub_id`` dataset is
loaded lazily with the ``datasets`` package (``hub_config``, ``split``; ``data_files`` when set
names the files to read inside the dataset repository and replaces ``hub_config``; C4's default
reads one English validation shard, as the authors' loaders do).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from pydantic import Field

from resp_core import hookimpl
from resp_core.errors import RespError
from resp_core.interfaces import CalibrationSample, CalibrationSource, Params, RunContext
from resp_core.validation import Count, Seed

LOCAL_SUFFIXES = (".txt", ".jsonl", ".json")


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class GenericText(CalibrationSource):
    """Windows of generic text (base class of ``c4`` and ``wikitext``)."""

    source_name = "generic_text"
    uses_task_split = False  # ``split`` names a split of the text dataset, not of the recipe's task
    concatenate = False  # True: one token stream of all rows (wikitext); False: per document (c4)

    class Params(Params):
        num_samples: Count = 128
        seq_len: int = Field(512, ge=2)  # tokens per sample
        seed: Seed | None = None  # default: the recipe's seed
        local_path: str | None = None  # .txt / .jsonl / .json; when set nothing is downloaded
        text_field: str = "text"
        hub_id: str = ""
        hub_config: str | None = None
        split: str = "train"
        data_files: str | None = None

    def __init__(self, params=None):
        self.params = params or self.Params()
        self._docs: list[str] | None = None
        self._path = "calibration"

    # --- checks ----------------------------------------------------------------------------------
    def check_recipe(self, recipe, path: str) -> None:
        self._path = path
        if self.params.local_path is not None:
            self._documents()  # a missing file or a wrong field fails here, before anything runs

    # --- loading ---------------------------------------------------------------------------------
    def _origin(self) -> str:
        p = self.params
        if p.local_path:
            return p.local_path
        return f"{p.hub_id}" + (f" ({p.data_files})" if p.data_files else f" ({p.hub_config})" if p.hub_config else "") \
            + f"[{p.split}]"

    def _documents(self) -> list[str]:
        if self._docs is None:
            self._docs = self._load_local() if self.params.local_path else self._load_hub()
            if not any(d.strip() for d in self._docs):
                raise RespError(f"{self._path}: {self._origin()} holds no text")
        return self._docs

    def _load_local(self) -> list[str]:
        p, where = self.params, f"{self._path}.params.local_path"
        path = Path(p.local_path).expanduser()
        if not path.is_file():
            raise RespError(f"{where}: {p.local_path} does not exist")
        suffix = path.suffix.lower()
        if suffix not in LOCAL_SUFFIXES:
            raise RespError(f"{where}: {p.local_path} must be a .txt, .jsonl or .json file")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise RespError(f"{where}: cannot read {p.local_path}: {_first_line(exc)}") from None
        if suffix == ".txt":
            return [d.strip() for d in re.split(r"\n[ \t]*\n", text) if d.strip()]
        if suffix == ".jsonl":
            docs = []
            for lineno, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise RespError(f"{where}: {p.local_path}:{lineno}: not valid JSON ({exc.msg})") from None
                docs.append(self._text_of(obj, f"{p.local_path}:{lineno}", allow_str=False))
            return docs
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RespError(f"{where}: {p.local_path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
        if not isinstance(data, list):
            raise RespError(f"{where}: {p.local_path}: expected a JSON list of objects with a "
                            f"{p.text_field!r} field, got {type(data).__name__}")
        return [self._text_of(obj, f"{p.local_path}[{i}]", allow_str=True) for i, obj in enumerate(data)]

    def _text_of(self, obj, where: str, allow_str: bool) -> str:
        field = self.params.text_field
        if allow_str and isinstance(obj, str):
            return obj
        if isinstance(obj, dict) and isinstance(obj.get(field), str):
            return obj[field]
        got = f"fields {sorted(obj)}" if isinstance(obj, dict) else f"a {type(obj).__name__}"
        raise RespError(f"{self._path}.params.local_path: {where}: no string field {field!r} (got {got}); "
                        f"set {self._path}.params.text_field to the field that holds the text")

    def _load_hub(self) -> list[str]:
        p = self.params
        try:
            import datasets
        except ImportError:
            raise RespError(f"{self._path}: loading {p.hub_id!r} needs the 'datasets' package; install it or set "
                            f"{self._path}.params.local_path") from None
        try:
            if p.data_files:
                ds = datasets.load_dataset(p.hub_id, data_files={p.split: p.data_files}, split=p.split)
            else:
                ds = datasets.load_dataset(p.hub_id, p.hub_config, split=p.split)
        except Exception as exc:  # network, auth, missing files ...
            raise RespError(f"{self._path}: could not load {self._origin()} from the hub: {type(exc).__name__}: "
                            f"{_first_line(exc)} (set {self._path}.params.local_path to a local copy)") from None
        if p.text_field not in ds.column_names:
            raise RespError(f"{self._path}.params.text_field: {self._origin()} has no field {p.text_field!r} "
                            f"(fields: {', '.join(ds.column_names)})")
        return [t if isinstance(t, str) else "" for t in ds[p.text_field]]

    # --- sampling --------------------------------------------------------------------------------
    def build(self, ctx: RunContext) -> list[CalibrationSample]:
        p = self.params
        docs = self._documents()
        seed = ctx.seed if p.seed is None else p.seed
        rng = random.Random(seed)
        tok = ctx.tokenizer
        n, L = p.num_samples, p.seq_len
        meta = {"source": self.source_name, "origin": self._origin()}
        out: list[CalibrationSample] = []
        if self.concatenate:
            ids = tok("\n\n".join(docs), add_special_tokens=False)["input_ids"]
            slots = len(ids) // L
            if slots < n:
                raise RespError(f"{self._path}.params.num_samples: {self._origin()} has {len(ids)} tokens, "
                                f"{slots} windows of seq_len {L}; {n} requested (lower num_samples or seq_len)")
            shift = rng.randint(0, len(ids) - slots * L)
            for s in rng.sample(range(slots), n):
                start = shift + s * L
                out.append(CalibrationSample([], list(ids[start:start + L]), {**meta, "offset": start}))
            return out
        order = list(range(len(docs)))
        rng.shuffle(order)
        for d in order:
            ids = tok(docs[d], add_special_tokens=False)["input_ids"]
            if len(ids) < L:
                continue
            start = rng.randint(0, len(ids) - L)
            out.append(CalibrationSample([], list(ids[start:start + L]), {**meta, "document": d, "offset": start}))
            if len(out) == n:
                return out
        raise RespError(f"{self._path}.params.num_samples: only {len(out)} of the {len(docs)} documents of "
                        f"{self._origin()} have {L} tokens or more; {n} requested (lower num_samples or seq_len)")


class C4(GenericText):
    """C4 (allenai/c4, English validation shard): one random seq_len window per random document."""

    source_name = "c4"

    class Params(GenericText.Params):
        hub_id: str = "allenai/c4"
        hub_config: str | None = "en"
        split: str = "validation"
        data_files: str | None = "en/c4-validation.00000-of-00008.json.gz"


class WikiText(GenericText):
    """WikiText-2 raw (Salesforce/wikitext): random seq_len windows of the concatenated train split."""

    source_name = "wikitext"
    concatenate = True

    class Params(GenericText.Params):
        hub_id: str = "Salesforce/wikitext"
        hub_config: str | None = "wikitext-2-raw-v1"
        split: str = "train"


@hookimpl
def register_calibration_sources(register):
    register("c4", C4)
    register("wikitext", WikiText)
