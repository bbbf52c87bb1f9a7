"""Write a pip constraints file that pins every direct dependency of pyproject.toml (and of the
extras named on the command line) to the lowest version its specifier allows, so that an install
with ``-c`` tests the lower bounds (transitive dependencies still resolve to their newest).

    python .ci/lowest_constraints.py test > lowest.txt

torch is left out: the package index serves no CPU build of torch below the 2.13.0 file this
machine installs, so the suite runs on that torch in every environment (README says so)."""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

SKIP = {"torch"}


def lower_bound(requirement: str) -> tuple[str, str] | None:
    name = re.match(r"\s*([A-Za-z0-9_.-]+)", requirement).group(1)
    found = re.search(r">=\s*([0-9][^,;\s]*)", requirement)
    if name.lower() in SKIP or not found:
        return None
    return name, found.group(1)


def main(extras: list[str]) -> None:
    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in extras:
        requirements += project["optional-dependencies"][extra]
    pins = dict(filter(None, map(lower_bound, requirements)))
    sys.stdout.write("".join(f"{name}=={version}\n" for name, version in sorted(pins.items())))


if __name__ == "__main__":
    main(sys.argv[1:])
