"""One plugin manager; built-in and third-party plugins are registered the same way.

Built-in plugins are the modules listed in :data:`BUILTIN_PLUGINS` (inside the ``resp_plugins``
package, i.e. the repository's ``plugins/`` folder); third-party ones are found through the
``resp`` entry-point group.  Every implementation is looked up by kind and name; unknown names
get "did you mean" suggestions; a plugin that fails to import is recorded and reported by
``respctl plugins``, never fatal.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
from dataclasses import dataclass, field
from typing import Any

import pluggy
from pydantic import BaseModel, ValidationError

from . import hookspecs
from .errors import RespError, did_you_mean

ENTRY_POINT_GROUP = "resp"

BUILTIN_PLUGINS = (
    "resp_plugins.tasks.testbed_arith",
    "resp_plugins.tasks.gsm8k",
    "resp_plugins.tasks.mathqa",
    "resp_plugins.generators.hf",
    "resp_plugins.calibration.task_data",
    "resp_plugins.calibration.self_generated",
    "resp_plugins.calibration.generic_text",
    "resp_plugins.calibration.mixed",
    "resp_plugins.scorers.taylor",
    "resp_plugins.scorers.activation_based",
    "resp_plugins.scorers.simple",
    "resp_plugins.scorers.llm_pruner",
    "resp_plugins.scorers.shortgpt",
    "resp_plugins.allocators.global_rank",
    "resp_plugins.allocators.flap_adaptive",
    "resp_plugins.allocators.owl",
    "resp_plugins.schedules.progressive",
    "resp_plugins.evaluators.task_accuracy",
    "resp_plugins.evaluators.lm_eval_harness",
)

# kind (as written in recipes and `respctl plugins`) -> hook name
KINDS = {
    "scorer": "register_scorers",
    "calibration": "register_calibration_sources",
    "allocator": "register_allocators",
    "schedule": "register_schedules",
    "evaluator": "register_evaluators",
    "generator": "register_generators",
    "task": "register_tasks",
}


@dataclass
class Entry:
    kind: str
    name: str
    factory: Any
    plugin: str  # plugin (module) name that registered it
    origin: str  # distribution name and version, or "built-in"

    @property
    def summary(self) -> str:
        doc = (getattr(self.factory, "__doc__", None) or "").strip()
        return doc.splitlines()[0] if doc else ""


@dataclass
class Registry:
    entries: dict[str, dict[str, Entry]] = field(default_factory=lambda: {k: {} for k in KINDS})
    failures: list[tuple[str, str]] = field(default_factory=list)  # (plugin, error)

    def names(self, kind: str) -> list[str]:
        return sorted(self.entries[kind])

    def get(self, kind: str, name: str, field_path: str | None = None) -> Entry:
        table = self.entries[kind]
        if name not in table:
            where = f"{field_path}: " if field_path else ""
            known = ", ".join(sorted(table)) or "none"
            raise RespError(f"{where}unknown {kind} {name!r}{did_you_mean(name, table)}; known: {known}")
        return table[name]

    def params_for(self, kind: str, name: str, params: dict | None, field_path: str) -> BaseModel | None:
        """Validate ``params`` against the implementation's ``Params`` model."""
        entry = self.get(kind, name, field_path)
        model = getattr(entry.factory, "Params", None)
        if model is None:
            if params:
                raise RespError(f"{field_path}.params: {kind} {name!r} takes no parameters")
            return None
        try:
            return model.model_validate(params or {})
        except ValidationError as exc:
            err = exc.errors()[0]
            loc = ".".join(str(x) for x in err["loc"])
            raise RespError(f"{field_path}.params{'.' + loc if loc else ''}: {err['msg']}") from None

    def create(self, kind: str, name: str, params: dict | None = None, field_path: str | None = None):
        path = field_path or kind
        validated = self.params_for(kind, name, params, path)
        factory = self.get(kind, name, path).factory
        return factory(validated) if validated is not None else factory()


def _builtin_origin() -> str:
    try:
        return f"built-in (resp {md.version('resp')})"
    except md.PackageNotFoundError:
        return "built-in"


def build_registry(extra_plugins: tuple = ()) -> Registry:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    reg = Registry()
    builtin = _builtin_origin()
    origins: dict[str, str] = {}
    for modname in BUILTIN_PLUGINS:
        try:
            pm.register(importlib.import_module(modname), name=modname)
            origins[modname] = builtin
        except Exception as exc:  # a broken plugin is reported, not fatal
            reg.failures.append((modname, f"{type(exc).__name__}: {exc}"))
    for ep in md.entry_points(group=ENTRY_POINT_GROUP):
        if pm.has_plugin(ep.name) or pm.is_blocked(ep.name):
            continue
        try:
            plugin = ep.load()
            pm.register(plugin, name=ep.name)
            origins[ep.name] = f"{ep.dist.name} {ep.dist.version}" if ep.dist else f"entry point {ep.value}"
        except Exception as exc:
            reg.failures.append((ep.name, f"{type(exc).__name__}: {exc}"))
    for plugin in extra_plugins:
        origins[pm.register(plugin)] = "registered in code"

    for kind, hook_name in KINDS.items():
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            origin = origins.get(impl.plugin_name, "unknown")

            def register(name: str, factory, _kind=kind, _impl=impl, _origin=origin):
                if name in reg.entries[_kind]:
                    prev = reg.entries[_kind][name]
                    reg.failures.append((_impl.plugin_name, f"{_kind} {name!r} already registered by {prev.plugin}"))
                    return
                reg.entries[_kind][name] = Entry(_kind, name, factory, _impl.plugin_name, _origin)

            try:
                impl.function(register=register)
            except Exception as exc:
                reg.failures.append((impl.plugin_name, f"{type(exc).__name__}: {exc}"))
    return reg


_REGISTRY: Registry | None = None


def get_registry() -> Registry:
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = build_registry()
    return _REGISTRY
