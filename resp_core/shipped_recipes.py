"""The recipes shipped inside the package (``resp_recipes``), reachable by name from anywhere.

A shipped recipe's name is its path inside the package without ``.yaml``: ``testbed-resp``,
``testbed-table1``, ``paper/testbed-table1``.  ``respctl run NAME`` (and ``validate``,
``compare``, ``plan``) take a name where no file of that name exists; ``respctl recipes``
lists them, ``respctl recipes show NAME`` prints one and ``respctl recipes copy NAME`` writes
it to a file to edit.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .errors import RespError

PACKAGE = "resp_recipes"
DEFAULT = "testbed-resp"


@dataclass(frozen=True)
class ShippedRecipe:
    name: str  # e.g. "paper/testbed-table1"
    kind: str  # "run" or "comparison"
    summary: str  # the first line of the recipe's leading comment

    @property
    def source(self) -> str:
        """How messages name it."""
        return f"(built-in) {self.name}.yaml"

    def data(self) -> bytes:
        return _root().joinpath(f"{self.name}.yaml").read_bytes()


def _root():
    return resources.files(PACKAGE)


def _describe(name: str, text: str) -> ShippedRecipe:
    comments = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        comments.append(line.lstrip("#").strip())
    kind = "comparison" if any(line.startswith("methods:") for line in text.splitlines()) else "run"
    return ShippedRecipe(name, kind, next((c for c in comments if c), ""))


def shipped_recipes() -> list[ShippedRecipe]:
    """Every shipped recipe, sorted by name (the top folder first, then ``paper/``)."""
    found = []
    for folder, prefix in ((_root(), ""), (_root().joinpath("paper"), "paper/")):
        if not folder.is_dir():
            continue
        for entry in folder.iterdir():
            if entry.name.endswith(".yaml"):
                name = prefix + entry.name.removesuffix(".yaml")
                found.append(_describe(name, entry.read_text(encoding="utf-8")))
    return sorted(found, key=lambda r: (r.name.count("/"), r.name))


def shipped_recipe(name: str) -> ShippedRecipe | None:
    """The shipped recipe ``name`` (``.yaml`` optional), else None."""
    wanted = name.removesuffix(".yaml").removeprefix("recipes/")
    return next((r for r in shipped_recipes() if r.name == wanted), None)


def require_shipped(name: str) -> ShippedRecipe:
    found = shipped_recipe(name)
    if found is None:
        import difflib

        names = [r.name for r in shipped_recipes()]
        close = difflib.get_close_matches(name.removesuffix(".yaml"), names, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else "; `respctl recipes` lists them"
        raise RespError(f"{name!r} is not a shipped recipe{hint}")
    return found


def copy_shipped(name: str, dest: Path | None = None) -> Path:
    """Write the shipped recipe ``name`` to ``dest`` (default ``./<basename>.yaml``); never
    overwrites a file."""
    recipe = require_shipped(name)
    out = Path(dest) if dest is not None else Path(recipe.name.rsplit("/", 1)[-1] + ".yaml")
    if out.is_dir():
        out = out / (recipe.name.rsplit("/", 1)[-1] + ".yaml")
    if out.exists():
        raise RespError(f"{out} already exists (nothing was written)")
    try:
        out.write_bytes(recipe.data())
    except OSError as exc:
        raise RespError(f"could not write {out}: {exc.strerror or exc}") from None
    return out
