"""Hook specifications: every implementation in RESP, built-in or third-party, arrives through one
of these.  Each hook receives a ``register`` callable; call it once per implementation::

    from resp_core import hookimpl

    @hookimpl
    def register_scorers(register):
        register("my_scorer", MyScorer)

Third-party packages expose a module with such hooks under the ``resp`` entry-point group::

    [project.entry-points.resp]
    my_plugin = "my_package.plugin"
"""

from __future__ import annotations

import pluggy

PROJECT = "resp"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_scorers(register):
    """Register importance scorers: ``register(name, ScorerClass)``."""


@hookspec
def register_calibration_sources(register):
    """Register calibration sources: ``register(name, CalibrationSourceClass)``."""


@hookspec
def register_allocators(register):
    """Register allocators (scores -> masks at a target sparsity): ``register(name, AllocatorClass)``."""


@hookspec
def register_schedules(register):
    """Register pruning schedules: ``register(name, ScheduleClass)``."""


@hookspec
def register_evaluators(register):
    """Register evaluators: ``register(name, EvaluatorClass)``."""


@hookspec
def register_generators(register):
    """Register generation backends: ``register(name, GeneratorClass)``."""


@hookspec
def register_tasks(register):
    """Register reasoning tasks (prompts, gold answers, answer checking): ``register(name, TaskClass)``."""


@hookspec
def register_recoverers(register):
    """Register recovery methods run after pruning (``recovery:``): ``register(name, RecovererClass)``."""
