"""The wheel carries everything the source tree has: every package folder is listed in
pyproject.toml and every data file (testbed weights, recipes, lm-eval task files) is matched by a
package-data pattern.  (CI also builds the wheel, installs it elsewhere and runs from there.)"""

from __future__ import annotations

import fnmatch
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]


def _packages_on_disk() -> dict[str, Path]:
    found = {}
    for dotted_root, folder in CONFIG["package-dir"].items():
        for init in (REPO / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO / folder)
            found[".".join((dotted_root, *rel.parts))] = init.parent
    return found


def test_every_package_folder_is_listed():
    missing = sorted(set(_packages_on_disk()) - set(CONFIG["packages"]))
    assert not missing, f"add to [tool.setuptools] packages in pyproject.toml: {missing}"


def test_every_data_file_is_package_data():
    data = CONFIG["package-data"]
    unmatched = []
    for package, folder in _packages_on_disk().items():
        if package not in CONFIG["packages"]:
            continue
        for f in folder.rglob("*"):
            if not f.is_file() or f.suffix == ".pyc" or "__pycache__" in f.parts:
                continue
            if f.suffix == ".py" and (f.parent / "__init__.py").is_file():
                continue  # a module of a listed package; a .py in a plain folder is data
            owner = max((p for p, d in _packages_on_disk().items() if d in f.parents), key=len)
            if owner != package:
                continue
            rel = f.relative_to(folder).as_posix()
            if not any(fnmatch.fnmatch(rel, pattern) for pattern in data.get(package, [])):
                unmatched.append(f.relative_to(REPO).as_posix())
    assert not unmatched, f"not in any package-data pattern (the wheel would lack them): {unmatched}"
