"""One plugin manager; built-in and third-party plugins are registered the same way.

Built-in plugins are the modules listed in :data:`BUILTIN_PLUGINS` (inside the ``resp_plugins``
package, i.e. the repository's ``plugins/`` folder); third-party ones are found through the
``resp`` entry-point group.  Every implementation is looked up by kind and name; unknown names
get "did you mean" suggestions.

A plugin is isolated from the others: one that fails to import (any exception, ``SystemExit``
included) or whose hook raises is recorded, never fatal; ``respctl plugins``, ``run`` and
``validate`` print one warning line for it, and an unknown name mentions it.  Two distributions
that use the same entry-point name, or register the same implementation name, are reported
with both distributions named (the first one found is used).
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
from .validation import first_error

DISTRIBUTION = "resp-pruning"  # RESP's own distribution name on the package index (import names: resp_core, resp_plugins)
ENTRY_POINT_GROUP = "resp"

BUILTIN_PLUGINS = (
    "resp_plugins.tasks.testbed_arith",
    "resp_plugins.tasks.gsm8k",
    "resp_plugins.tasks.mathqa",
    "resp_plugins.tasks.word_arith",
    "resp_plugins.generators.hf",
    "resp_plugins.generators.vllm",
    "resp_plugins.calibration.task_data",
    "resp_plugins.calibration.self_generated",
    "resp_plugins.calibration.generic_text",
    "resp_plugins.calibration.mixed",
    "resp_plugins.scorers.taylor",
    "resp_plugins.scorers.activation_based",
    "resp_plugins.scorers.sparsegpt",
    "resp_plugins.scorers.simple",
    "resp_plugins.scorers.llm_pruner",
    "resp_plugins.scorers.shortgpt",
    "resp_plugins.allocators.global_rank",
    "resp_plugins.allocators.flap_adaptive",
    "resp_plugins.allocators.owl",
    "resp_plugins.schedules.progressive",
    "resp_plugins.evaluators.task_accuracy",
    "resp_plugins.evaluators.lm_eval_harness",
    "resp_plugins.evaluators.perplexity",
    "resp_plugins.recovery.self_distill",
    "resp_plugins.recovery.lora_sft",
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
    "recovery": "register_recoverers",
}


@dataclass
class Entry:
    kind: str
    name: str
    factory: Any
    plugin: str  # plugin (module) name that registered it
    origin: str  # distribution name and version, or "built-in"
    distribution: str | None = None  # the distribution that supplied it (None: registered in code)
    version: str | None = None

    @property
    def summary(self) -> str:
        doc = (getattr(self.factory, "__doc__", None) or "").strip()
        return doc.splitlines()[0] if doc else ""

    def to_json(self) -> dict:
        return {"kind": self.kind, "name": self.name, "origin": self.origin, "plugin": self.plugin,
                "distribution": self.distribution, "version": self.version, "summary": self.summary}


@dataclass
class Registry:
    entries: dict[str, dict[str, Entry]] = field(default_factory=lambda: {k: {} for k in KINDS})
    failures: list[tuple[str, str]] = field(default_factory=list)  # (plugin, error)

    def names(self, kind: str) -> list[str]:
        return sorted(self.entries[kind])

    def failure_lines(self) -> list[str]:
        """One line per plugin problem (import failure, raising hook, name clash)."""
        return [f"plugin {plugin}: {error}" for plugin, error in self.failures]

    def get(self, kind: str, name: str, field_path: str | None = None) -> Entry:
        table = self.entries[kind]
        if name not in table:
            where = f"{field_path}: " if field_path else ""
            known = ", ".join(sorted(table)) or "none"
            broken = sorted({p for p, err in self.failures if "failed to load" in err or " raised " in err
                             or "not loaded" in err})
            note = (f"; note: plugin(s) {', '.join(broken)} failed to load and may provide it "
                    "(see `respctl plugins`)") if broken else ""
            raise RespError(f"{where}unknown {kind} {name!r}{did_you_mean(name, table)}; known: {known}{note}")
        return table[name]

    def params_for(self, kind: str, name: str, params: dict | None, field_path: str) -> BaseModel | None:
        """Validate ``params`` against the implementation's ``Params`` model."""
        entry = self.get(kind, name, field_path)
        model = getattr(entry.factory, "Params", None)
        if model is None:
            if params:
                raise RespError(f"{field_path}.params: {kind} {name!r} takes no parameters")
            return None
        if params is not None and not isinstance(params, dict):
            raise RespError(f"{field_path}.params: must be a mapping of parameter names to values")
        try:
            return model.model_validate(params or {})
        except ValidationError as exc:
            raise RespError(first_error(exc, f"{field_path}.params")) from None

    def create(self, kind: str, name: str, params: dict | None = None, field_path: str | None = None):
        path = field_path or kind
        validated = self.params_for(kind, name, params, path)
        factory = self.get(kind, name, path).factory
        return factory(validated) if validated is not None else factory()

    def provenance(self, components) -> list[dict]:
        """``[{kind, name, distribution, version}]`` for the ``(kind, name)`` components given
        (the ones a run used), so a run records which plugin versions produced it."""
        out, seen = [], set()
        for kind, name in components:
            e = self.entries.get(kind, {}).get(name)
            if e is None or (kind, name) in seen:
                continue
            seen.add((kind, name))
            out.append({"kind": kind, "name": name, "distribution": e.distribution, "version": e.version,
                        "plugin": e.plugin})
        return out


def _own_version() -> str | None:
    try:
        return md.version(DISTRIBUTION)
    except md.PackageNotFoundError:
        return None


def _fatal(exc: BaseException) -> bool:
    """Exceptions a plugin must never swallow for us: the user's Ctrl-C and interpreter shutdown."""
    return isinstance(exc, (KeyboardInterrupt, GeneratorExit))


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _entry_points() -> list:
    """The group's entry points, each (name, value, distribution) once (a distribution seen twice
    on sys.path is one distribution)."""
    out, seen = [], set()
    for ep in md.entry_points(group=ENTRY_POINT_GROUP):
        dist = getattr(ep, "dist", None)
        key = (ep.name, ep.value, dist.name if dist else None)
        if key in seen:
            continue
        seen.add(key)
        out.append(ep)
    return out


def _dist_label(ep) -> tuple[str | None, str | None, str]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return None, None, f"entry point {ep.value}"
    return dist.name, dist.version, f"{dist.name} {dist.version}"


def build_registry(extra_plugins: tuple = ()) -> Registry:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    reg = Registry()
    version = _own_version()
    builtin = f"built-in ({DISTRIBUTION} {version})" if version else "built-in"
    origins: dict[str, tuple[str, str | None, str | None]] = {}  # plugin name -> (origin, dist, version)
    for modname in BUILTIN_PLUGINS:
        try:
            pm.register(importlib.import_module(modname), name=modname)
            origins[modname] = (builtin, DISTRIBUTION, version)
        except BaseException as exc:  # a broken plugin is reported, not fatal (SystemExit included)
            if _fatal(exc):
                raise
            reg.failures.append((modname, f"failed to load: {_describe(exc)}"))
    claimed: dict[str, str] = {}  # entry-point name -> distribution label
    for ep in _entry_points():
        dist, dist_version, label = _dist_label(ep)
        if ep.name in claimed or pm.has_plugin(ep.name):
            first = claimed.get(ep.name, "a built-in plugin")
            reg.failures.append((ep.name, f"entry point {ep.name!r} of {label} clashes with the one of {first}; "
                                          f"{label}'s is not loaded (rename one of them)"))
            continue
        claimed[ep.name] = label
        try:
            plugin = ep.load()
            pm.register(plugin, name=ep.name)
            origins[ep.name] = (label, dist, dist_version)
        except BaseException as exc:
            if _fatal(exc):
                raise
            reg.failures.append((ep.name, f"failed to load ({label}): {_describe(exc)}"))
    for plugin in extra_plugins:
        if pm.is_registered(plugin):  # already found through its entry point
            continue
        origins[pm.register(plugin)] = ("registered in code", None, None)

    for kind, hook_name in KINDS.items():
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            origin, dist, dist_version = origins.get(impl.plugin_name, ("unknown", None, None))

            def register(name: str, factory, _kind=kind, _impl=impl, _origin=origin, _dist=dist,
                         _version=dist_version):
                if name in reg.entries[_kind]:
                    prev = reg.entries[_kind][name]
                    reg.failures.append((_impl.plugin_name,
                                         f"{_kind} {name!r} is registered by both {prev.origin} (plugin {prev.plugin}) "
                                         f"and {_origin} (plugin {_impl.plugin_name}); the first is used"))
                    return
                reg.entries[_kind][name] = Entry(_kind, name, factory, _impl.plugin_name, _origin, _dist, _version)

            try:
                impl.function(register=register)
            except BaseException as exc:
                if _fatal(exc):
                    raise
                reg.failures.append((impl.plugin_name, f"hook {hook_name} raised {_describe(exc)}"))
    return reg


_REGISTRY: Registry | None = None


def get_registry() -> Registry:
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = build_registry()
    return _REGISTRY
