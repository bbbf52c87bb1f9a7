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

import random

from pydantic import Field

from resp_core import hookimpl
from resp_core.errors import RespError
from resp_core.interfaces import (
    CalibrationSample,
    CalibrationSource,
    Params,
    RunContext,
)
from resp_core.text_source import TextLocation, check_reachable, read_rows
from resp_core.validation import Count, Seed


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
        else:
            check_reachable(self._location(), path)  # offline: in the local cache, or one line now

    # --- loading ---------------------------------------------------------------------------------
    def _location(self) -> TextLocation:
        p = self.params
        return TextLocation(local_path=p.local_path, hub_id=p.hub_id or None, hub_config=p.hub_config,
                            split=p.split, data_files=p.data_files)

    def _origin(self) -> str:
        return self._location().origin()

    def _documents(self) -> list[str]:
        if self._docs is None:
            p = self.params
            self._docs = [row[p.text_field] or "" for row in read_rows(self._location(), p.text_field, self._path)]
            if not any(d.strip() for d in self._docs):
                raise RespError(f"{self._path}: {self._origin()} holds no text")
        return self._docs

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
