"""Perplexity of the current (masked) model on held-out text: token, word and byte perplexity.

Documents come from any ``datasets`` source: a local ``.txt`` (documents separated by blank
lines, stripped), ``.jsonl`` or ``.json`` file (``local_path``), or a hub dataset (``hub_id``,
``hub_config``, ``split``, ``data_files``) -- WikiText, C4, or e.g. GSM8K's test solutions from a
local ``test.jsonl`` (``text_field: answer``, ``prompt_field: question``).

What is scored (``loss``):

* ``full`` -- every token of each document (with ``prompt_field``: of prompt + ``"\\n"`` + text);
  the first token is predicted from a prefix token (BOS, else EOS), as lm-eval's
  ``loglikelihood_rolling`` does;
* ``decode`` -- only the text's tokens, conditioned on the document's prompt (``prompt_field``,
  as plain ``prompt + "\\n"`` or through the chat template, ``prompt_format``): the decode-only
  loss of the paper, the negative of lm-eval's ``loglikelihood(context, continuation)``.

Long documents are scored in windows of at most ``window`` tokens (default: 2048, at most the
model's context); each forward pass after the first predicts ``stride`` new tokens (default:
``window``: disjoint windows, exactly lm-eval's rolling windows), so every scored token sees at
least ``window - stride`` tokens of context.  Both are stated in the result.

Metrics, lm-eval's ``wikitext`` definitions (``lm_eval/tasks/wikitext``, ``api/metrics.py``:
``weighted_perplexity``, ``bits_per_byte``), summed over all documents:

* ``<label>/perplexity`` = exp(NLL / scored tokens) (token perplexity);
* ``<label>/word_perplexity`` = exp(NLL / words), words = ``len(re.split(r"\\s+", text))``;
* ``<label>/byte_perplexity`` = exp(NLL / bytes), bytes = UTF-8 bytes of the text;
* ``<label>/bits_per_byte`` = NLL / bytes / ln 2;

where "text" is what is scored (the continuation for ``decode``) and, with
``detokenize: wikitext``, the original document before lm-eval's own ``wikitext_detokenizer``
(lm-eval counts words and bytes on the original, scores the detokenized text).  Also:
``nll`` (mean per token), ``tokens``, ``words``, ``bytes``, ``documents``, ``window``,
``stride``.  The main metric (``main_metric``) carries ``@seed<seed>`` (the seed that picks
``num_documents`` of them).

One difference from lm-eval: text is tokenized without the tokenizer's own special tokens
(lm-eval keeps them, so on tokenizers that add a BOS it also scores that BOS).
"""

from __future__ import annotations

import math
import re
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from resp_core import hookimpl
from resp_core.errors import RespError
from resp_core.interfaces import EvalResult, Evaluator, Params, RunContext
from resp_core.metric_keys import seed_key
from resp_core.text_source import TextLocation, check_reachable, read_rows
from resp_core.validation import Seed

METRICS = ("perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte")


def windows(first: int, length: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """Forward passes over a token stream ``s`` of ``length`` tokens whose targets are
    ``s[first:]``: ``(lo, a, b)`` = input ``s[lo:b-1]`` predicts targets ``s[a:b]``.

    The first pass predicts up to ``window`` targets from the start; every later pass predicts
    ``stride`` new ones with the preceding ``window`` tokens as input (``stride == window``:
    lm-eval's disjoint rolling windows)."""
    out = []
    a = first
    b = min(length, max(window + 1, first + stride))
    while a < length:
        out.append((max(0, b - 1 - window), a, b))
        a, b = b, min(length, b + stride)
    return out


class Perplexity(Evaluator):
    """Token, word and byte perplexity on held-out text (decode-only or full sequence)."""

    uses_task_split = False  # ``split`` names a split of the text dataset, not of the recipe's task

    class Params(Params):
        label: str = "perplexity"  # metric prefix, e.g. "wikitext" -> wikitext/word_perplexity
        local_path: str | None = None  # .txt / .jsonl / .json; when set nothing is downloaded
        hub_id: str | None = None  # a datasets hub id (e.g. EleutherAI/wikitext_document_level)
        hub_config: str | None = None
        split: str = "test"
        data_files: str | None = None  # files inside the hub dataset (replaces hub_config)
        text_field: str = "text"
        prompt_field: str | None = None
        loss: Literal["full", "decode"] = "full"
        prompt_format: Literal["plain", "chat"] = "plain"  # decode: prompt + "\n", or the chat template
        detokenize: Literal["none", "wikitext"] = "none"  # lm-eval's wikitext_detokenizer
        num_documents: int | None = Field(None, ge=1)  # None: all
        seed: Seed = 0  # which documents, when num_documents is set
        window: int | None = Field(None, ge=2)  # tokens per forward pass (default 2048, <= model context)
        stride: int | None = Field(None, ge=1)  # new tokens per pass after the first (default: window)
        batch_size: int = Field(4, ge=1)  # windows per forward pass
        main_metric: Literal["perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte"] = "perplexity"

    def __init__(self, params: "Perplexity.Params | None" = None):
        self.params = params or self.Params()
        self._docs: list[dict] | None = None
        self._path = "evaluator"

    # -- checks and data --------------------------------------------------------------------------
    def check_recipe(self, recipe, path: str) -> None:
        p = self.params
        self._path = path
        if (p.local_path is None) == (p.hub_id is None):
            raise RespError(f"{path}.params: give exactly one of local_path and hub_id")
        if p.loss == "decode" and not p.prompt_field:
            raise RespError(f"{path}.params.loss: decode scores a text given its prompt; set prompt_field")
        if p.stride is not None and p.window is not None and p.stride > p.window:
            raise RespError(f"{path}.params.stride: {p.stride} is larger than window {p.window}")
        if p.local_path is not None:
            self._documents()  # a missing file or field fails here, before anything runs
        else:
            check_reachable(self._location(), path)  # offline: in the local cache, or one line now

    def _origin(self) -> str:
        return self._location().origin()

    def _location(self) -> TextLocation:
        p = self.params
        return TextLocation(local_path=p.local_path, hub_id=p.hub_id, hub_config=p.hub_config, split=p.split,
                            data_files=p.data_files)

    def _documents(self) -> list[dict]:
        if self._docs is not None:
            return self._docs
        p = self.params
        other = {p.prompt_field: "prompt_field"} if p.prompt_field else {}
        rows = read_rows(self._location(), p.text_field, self._path, other)
        docs = []
        for i, row in enumerate(rows):
            text = row[p.text_field]
            if text is None or not text.strip():
                continue
            prompt = row.get(p.prompt_field) if p.prompt_field else None
            docs.append({"index": i, "text": text, "prompt": prompt if isinstance(prompt, str) else None})
        if not docs:
            raise RespError(f"{self._path}: {self._origin()} holds no text in field {p.text_field!r}")
        self._docs = docs
        return docs

    # -- tokens ---------------------------------------------------------------------------------
    def _detokenize(self, text: str) -> str:
        if self.params.detokenize == "none":
            return text
        try:
            from lm_eval.tasks.wikitext.preprocess_wikitext import wikitext_detokenizer
        except ImportError:
            raise RespError(f"{self._path}.params.detokenize: 'wikitext' uses lm-eval's own detokenizer; "
                            "pip install 'resp-pruning[eval]'") from None
        return wikitext_detokenizer({"page": text})

    def _stream(self, tok, doc: dict) -> tuple[list[int], int, str]:
        """Token stream, index of its first scored token, and the text words and bytes count on."""
        p = self.params
        enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
        text = doc["text"]
        if p.loss == "decode":
            prompt = doc["prompt"] or ""
            if p.prompt_format == "chat":
                context = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                  add_generation_prompt=True, enable_thinking=False)
            else:
                context = prompt + "\n"
            scored = self._detokenize(text)
            # lm-eval's _encode_pair: the context's trailing whitespace goes to the continuation,
            # the whole string is tokenized once and split after the context's tokens
            n_space = len(context) - len(context.rstrip())
            head = context[: len(context) - n_space] if n_space else context
            whole = enc(context + scored)
            ctx = enc(head)
            if not ctx:  # an empty prompt: predict the first token from the prefix token
                return [self._prefix(tok)] + whole, 1, text
            return whole, len(ctx), text
        full_text = (doc["prompt"] + "\n" + text) if (p.prompt_field and doc["prompt"]) else text
        return [self._prefix(tok)] + enc(self._detokenize(full_text)), 1, full_text

    def _prefix(self, tok) -> int:
        """lm-eval's prefix token: BOS, else EOS."""
        prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        if prefix is None:
            raise RespError(f"{self._path}: the tokenizer has neither a BOS nor an EOS token to predict the "
                            "first token from")
        return prefix

    # -- evaluation -------------------------------------------------------------------------------
    def _window(self, model) -> int:
        p = self.params
        limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        w = p.window or min(2048, limit or 2048)
        if limit and w > limit:
            raise RespError(f"{self._path}.params.window: {w} is longer than the model's context ({limit})")
        return w

    @torch.no_grad()
    def evaluate(self, ctx: RunContext) -> EvalResult:
        from resp_plugins.tasks.subsets import pick_subset

        p = self.params
        model, tok = ctx.model, ctx.tokenizer
        window = self._window(model)
        stride = p.stride or window
        if stride > window:
            raise RespError(f"{self._path}.params.stride: {stride} is larger than window {window}")
        docs = self._documents()
        chosen = [docs[i] for i in pick_subset(len(docs), p.num_documents, p.seed)]
        jobs = []  # (doc, stream, lo, a, b)
        per_doc = []
        for d, doc in enumerate(chosen):
            stream, first, counted = self._stream(tok, doc)
            if first >= len(stream):
                continue  # nothing to score (an empty continuation)
            per_doc.append({"index": doc["index"], "tokens": len(stream) - first, "nll": 0.0,
                            "words": len(re.split(r"\s+", counted)), "bytes": len(counted.encode("utf-8"))})
            for lo, a, b in windows(first, len(stream), window, stride):
                jobs.append((len(per_doc) - 1, stream, lo, a, b))
        if not per_doc:
            raise RespError(f"{self._path}: no tokens to score in {self._origin()}")
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        jobs.sort(key=lambda j: j[4] - 1 - j[2], reverse=True)  # longest inputs first
        try:
            with ctx.progress.task(f"Perplexity ({p.label})", total=len(jobs)) as advance:
                for start in range(0, len(jobs), p.batch_size):
                    batch = jobs[start: start + p.batch_size]
                    rows = [j[1][j[2]: j[4] - 1] for j in batch]
                    width = max(len(r) for r in rows)
                    ids = torch.zeros((len(rows), width), dtype=torch.long)
                    att = torch.zeros((len(rows), width), dtype=torch.long)
                    for r, row in enumerate(rows):
                        ids[r, : len(row)] = torch.tensor(row)
                        att[r, : len(row)] = 1
                    logits = model(input_ids=ids.to(device), attention_mask=att.to(device)).logits
                    for r, (di, stream, lo, a, b) in enumerate(batch):
                        # logits at input position k predict stream[lo + k + 1]
                        pos = torch.arange(a - 1 - lo, b - 1 - lo, device=logits.device)
                        target = torch.tensor(stream[a:b], dtype=torch.long, device=logits.device)
                        nll = F.cross_entropy(logits[r, pos].float(), target, reduction="sum").item()
                        per_doc[di]["nll"] += nll
                    advance(len(batch))
        finally:
            model.train(was_training)
        nll = sum(d["nll"] for d in per_doc)
        tokens = sum(d["tokens"] for d in per_doc)
        words = sum(d["words"] for d in per_doc)
        nbytes = sum(d["bytes"] for d in per_doc)
        if not math.isfinite(nll):
            from resp_core.errors import NumericalError

            raise NumericalError(f"perplexity ({p.label}): the negative log-likelihood is not finite")
        L = p.label
        metrics = {
            f"{L}/perplexity": math.exp(nll / tokens),
            f"{L}/word_perplexity": math.exp(nll / words),
            f"{L}/byte_perplexity": math.exp(nll / nbytes),
            f"{L}/bits_per_byte": nll / nbytes / math.log(2),
            f"{L}/nll": nll / tokens,
            f"{L}/tokens": float(tokens), f"{L}/words": float(words), f"{L}/bytes": float(nbytes),
            f"{L}/documents": float(len(per_doc)), f"{L}/window": float(window), f"{L}/stride": float(stride),
        }
        metrics[seed_key(f"{L}/{p.main_metric}", p.seed)] = metrics[f"{L}/{p.main_metric}"]
        return EvalResult(metrics, [{"label": L, **d} for d in per_doc])


@hookimpl
def register_evaluators(register):
    register("perplexity", Perplexity)
