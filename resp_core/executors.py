"""Where a batch of independent jobs runs: here, one after the other (``serial``), or as Ray tasks
on a cluster (``ray``).  An executor is handed the jobs and the function that runs one of them;
it knows nothing of what the jobs are (a comparison's pruning paths, see :mod:`resp_core.compare`).

The serial executor runs each job in this process (``in_process``), so its function may use this
process's objects (a progress display, parsed recipes); it takes the jobs one at a time, each
right before it runs.  The Ray executor submits one task per job, each asking for the job's
``resources``: its function must be a module-level function and a job's ``args`` what Ray can
ship to a worker; every task then writes where the serial run would, which must therefore be on
a file system every Ray worker sees (one machine, or a shared mount).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from .errors import RespError


@dataclass(frozen=True)
class Job:
    """One job: ``run_one(*args)`` runs it.  ``key`` names its Ray task (``resp:<key>``), ``name``
    prefixes the error it raises, ``title`` names it in messages (Rich markup), ``resources`` is
    what its Ray task asks for (``num_gpus``, ``num_cpus``)."""

    key: str
    name: str
    title: str
    args: tuple
    resources: dict = field(default_factory=lambda: {"num_gpus": 0, "num_cpus": 1})


class SerialExecutor:
    """Each job here, in order.  ``jobs`` is consumed one at a time, so a job prepared as it is
    taken (messages, folders) is prepared right before it runs."""

    name = "serial"
    in_process = True  # jobs run in this process: run_one may use its objects

    def run(self, jobs: Iterable[Job], run_one: Callable[..., Any],
            say: Callable[[str], None] = lambda m: None) -> list:
        return [run_one(*job.args) for job in jobs]


class RayExecutor:
    """Each job a Ray task (``ray.remote`` with the job's ``num_gpus`` / ``num_cpus``); every job is
    taken before the first is submitted, and Ray starts only when there is one.

    ``address``: ``None`` starts a local Ray instance (or joins the one already initialized in
    this process), ``"auto"`` joins the running cluster, or a ``ray://`` / ``host:port`` address.
    ``init_kwargs`` go to ``ray.init`` (e.g. ``num_cpus`` for a local instance)."""

    name = "ray"
    in_process = False  # run_one is shipped to Ray workers

    def __init__(self, address: str | None = None, init_kwargs: dict[str, Any] | None = None):
        self.address = address
        self.init_kwargs = dict(init_kwargs or {})

    @staticmethod
    def check_available() -> None:
        import importlib.util

        if importlib.util.find_spec("ray") is None:
            raise RespError("--executor ray: the ray package is not installed (pip install 'resp-pruning[ray]')")

    def _init(self):
        import ray

        if not ray.is_initialized():
            kwargs = dict(self.init_kwargs)
            if self.address is not None:
                kwargs["address"] = self.address
            kwargs.setdefault("log_to_driver", False)
            try:
                ray.init(**kwargs)
            except ConnectionError as exc:
                raise RespError(f"--address: cannot reach a Ray cluster at {self.address!r}: "
                                f"{str(exc).splitlines()[0]}") from None
        return ray

    def run(self, jobs: Iterable[Job], run_one: Callable[..., Any],
            say: Callable[[str], None] = lambda m: None) -> list:
        jobs = list(jobs)
        if not jobs:
            return []
        self.check_available()
        ray = self._init()
        remote = ray.remote(run_one)
        refs = {}
        for job in jobs:
            res = job.resources
            ref = remote.options(**res, name=f"resp:{job.key}").remote(*job.args)
            refs[ref] = job
            say(f"{job.title}: Ray task ({res['num_gpus']} GPU, {res['num_cpus']} CPU)")
        done, failures = [], []
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            job = refs[ready[0]]
            try:
                done.append(ray.get(ready[0]))
                say(f"{job.title}: finished")
            except Exception as exc:  # a task's failure: the others finish, then the first one is reported
                cause = getattr(exc, "cause", None) or exc
                failures.append((job, cause))
        if failures:
            job, cause = failures[0]
            if isinstance(cause, RespError):
                raise type(cause)(f"{job.name}: {cause}")
            raise RuntimeError(f"{job.name}: {type(cause).__name__}: {cause}") from cause
        return done


def make_executor(name: str, address: str | None = None, init_kwargs: dict | None = None):
    if name == "serial":
        if address is not None:
            raise RespError("--address: only with --executor ray")
        return SerialExecutor()
    if name == "ray":
        RayExecutor.check_available()
        return RayExecutor(address, init_kwargs)
    raise RespError(f"--executor: {name!r} is not one of serial, ray")
