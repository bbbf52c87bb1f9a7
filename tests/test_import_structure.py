"""The structure as a contract, checked on the import graph that ``grimp`` (import-linter's graph
engine) builds from the code, function-level imports included:

* no import circle anywhere in ``resp_core`` and ``resp_plugins``;
* the ground floor (errors, validation, stats, safetensors I/O, metric keys, option bounds,
  fingerprints, hookspecs) imports nothing of RESP's but ``resp_core.errors``;
* the lower floors (model adapter and structures, interfaces, scoring, run-folder I/O) never
  import the floors above them (recipes, pipeline, comparisons, the CLI) nor ``resp_plugins``;
* every module stays within ~450 lines."""

from __future__ import annotations

from pathlib import Path

import pytest

grimp = pytest.importorskip("grimp")
REPO = Path(__file__).resolve().parents[1]

GROUND = ["resp_core.errors", "resp_core.validation", "resp_core.stats", "resp_core.safetensors_io",
          "resp_core.metric_keys", "resp_core.option_bounds", "resp_core.fingerprint", "resp_core.hookspecs"]
LOWER = ["resp_core.model", "resp_core.interfaces", "resp_core.scoring", "resp_core.activations",
         "resp_core.atomic_io", "resp_core.run_record", "resp_core.rng_state", "resp_core.rundir",
         "resp_core.model_source", "resp_core.text_source", "resp_core.hub", "resp_core.recovery",
         "resp_core.decode_timing"]
UPPER = ["resp_core.recipe", "resp_core.resolve", "resp_core.pipeline", "resp_core.compare", "resp_core.cli",
         "resp_core.bench", "resp_core.plan", "resp_core.export", "resp_core.checkpoint", "resp_core.recovery_stage",
         "resp_core.run_context", "resp_plugins"]
MAX_LINES = 460


@pytest.fixture(scope="module")
def graph():
    return grimp.build_graph("resp_core", "resp_plugins", include_external_packages=False)


def _circles(graph) -> list[list[str]]:
    index, low, stack, on_stack, found = {}, {}, [], set(), []
    for root in sorted(graph.modules):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.find_modules_directly_imported_by(child)))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    component.append(m)
                    if m == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_import_circles(graph):
    assert _circles(graph) == []


def _imports_of(graph, package: str) -> set[str]:
    modules = {m for m in graph.modules if m == package or m.startswith(package + ".")}
    return {i for m in modules for i in graph.find_modules_directly_imported_by(m)}


@pytest.mark.parametrize("module", GROUND)
def test_ground_floor_imports_only_errors(graph, module):
    assert _imports_of(graph, module) - {"resp_core.errors", module} == set()


@pytest.mark.parametrize("module", LOWER)
def test_lower_floors_never_import_upward(graph, module):
    upward = {i for i in _imports_of(graph, module) if any(i == u or i.startswith(u + ".") for u in UPPER)}
    assert upward == set(), f"{module} imports {sorted(upward)}"


def test_modules_stay_small():
    big = {str(p.relative_to(REPO)): n for p in [*(REPO / "resp_core").rglob("*.py"), *(REPO / "plugins").rglob("*.py")]
           if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert big == {}
