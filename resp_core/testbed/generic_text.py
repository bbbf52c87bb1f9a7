"""An offline stand-in for generic web text (C4 / WikiText) on machines without a network.

It gathers the English documentation of a fixed list of Python standard-library modules
(module, class and function docstrings) into a plain-text file with one document per
paragraph block, which the ``c4`` / ``wikitext`` calibration sources read through their
``local_path`` parameter.  It is generic prose, unrelated to the testbed's arithmetic task,
which is what the "generic calibration" experiments need; it is not C4.
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

MODULES = (
    "argparse", "asyncio", "calendar", "collections", "contextlib", "csv", "dataclasses", "datetime", "decimal",
    "difflib", "email", "enum", "fractions", "functools", "gzip", "hashlib", "heapq", "html", "http.client",
    "inspect", "itertools", "json", "logging", "mailbox", "math", "os", "pathlib", "pickle", "random", "re",
    "shutil", "socket", "sqlite3", "statistics", "string", "subprocess", "tarfile", "textwrap", "threading",
    "time", "tkinter", "typing", "unittest", "urllib.parse", "uuid", "wave", "xml.dom", "zipfile",
)


def _docs(module) -> list[str]:
    out = []
    doc = inspect.getdoc(module)
    if doc:
        out.append(doc)
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        d = inspect.getdoc(obj)
        if d and len(d) > 200:
            out.append(d)
    return out


def write_generic_text(path: Path) -> int:
    """Write the text; returns its size in characters."""
    docs = []
    for name in MODULES:
        try:
            docs += _docs(importlib.import_module(name))
        except Exception:  # a module missing from this Python build is simply skipped
            continue
    text = "\n\n".join(d.strip() for d in docs) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return len(text)
