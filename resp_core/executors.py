"""Where a comparison's pruning paths run: here, one after the other (``serial``), or as Ray
tasks on a cluster (``ray``).

A *pruning path* is one run folder of a comparison: a method (its scorer, calibration source,
allocator and schedule) pruned to every sparsity in one progressive run, or — for a one-shot
method — to one target.  Each path is independent of the others (same model, prompts,
structures and seeds; its own run folder), so the Ray executor submits one task per path that
requests the resources its recipe needs (``num_gpus`` = 1 on a CUDA device, times the vLLM
generator's ``tensor_parallel_size``; ``num_cpus`` = 1), and every task writes its finished run
into the same comparison folder the serial executor writes to.  The comparison folder must
therefore be on a file system every Ray worker sees (one machine, or a shared mount).  A sweep
stopped half way is continued by running ``respctl compare`` again on the same folder, with
either executor: finished runs are kept; unfinished ones start over on Ray, and continue from
their last checkpoint with the serial executor.

A path is a pure function of the comparison recipe and its label (seeds included), so the
serial and the Ray executor give identical results (tests/test_executors.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .errors import RespError


@dataclass(frozen=True)
class PathJob:
    """One pruning path: the method's label, its one-shot target (None: progressive) and its run
    folder relative to the comparison folder."""

    label: str
    target: float | None
    sub: str


def run_path(compare_json: dict, protocol: dict, folder: str, job: dict) -> dict:
    """Run one pruning path into ``folder/job['sub']`` (in this process: a Ray worker or here)."""
    from .compare import CompareRecipe, method_recipe
    from .interfaces import Progress
    from .pipeline import run_recipe
    from .recipe import resolve
    from .registry import get_registry

    cmp = CompareRecipe.model_validate(compare_json)
    cmp._protocol = dict(protocol)
    method = next(m for m in cmp.methods if m.label == job["label"])
    reg = get_registry()
    res = resolve(method_recipe(cmp, method, reg, job["target"], Path(folder)), reg)
    result = run_recipe(res, Path(folder) / job["sub"], Progress())
    return {"label": job["label"], "target": job["target"], "sub": job["sub"],
            "run_dir": str(result.run_dir.path), "rows": len(result.rows)}


def path_resources(cmp, label: str) -> dict:
    """What one path's task asks Ray for: GPUs when the model runs on CUDA (times the vLLM
    generator's tensor-parallel size), one CPU."""
    gpus = 0
    if cmp.model.device.startswith("cuda"):
        gpus = 1
        if cmp.generator.name == "vllm":
            gpus = int(cmp.generator.params.get("tensor_parallel_size", 1))
    return {"num_gpus": gpus, "num_cpus": 1}


class SerialExecutor:
    name = "serial"

    def run(self, cmp, folder: Path, jobs: list[PathJob], say: Callable[[str], None] = lambda m: None,
            progress=None) -> list[dict]:
        from .compare import method_recipe
        from .pipeline import run_recipe
        from .recipe import resolve
        from .registry import get_registry

        reg = get_registry()
        out = []
        for job in jobs:
            method = next(m for m in cmp.methods if m.label == job.label)
            res = resolve(method_recipe(cmp, method, reg, job.target, folder), reg)
            result = run_recipe(res, folder / job.sub, progress)
            out.append({"label": job.label, "target": job.target, "sub": job.sub,
                        "run_dir": str(result.run_dir.path), "rows": len(result.rows)})
        return out


class RayExecutor:
    """Each path a Ray task (``ray.remote`` with the path's ``num_gpus`` / ``num_cpus``).

    ``address``: ``None`` starts a local Ray instance (or joins the one already initialized in
    this process), ``"auto"`` joins the running cluster, or a ``ray://`` / ``host:port`` address.
    ``init_kwargs`` go to ``ray.init`` (e.g. ``num_cpus`` for a local instance)."""

    name = "ray"

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

    def run(self, cmp, folder: Path, jobs: list[PathJob], say: Callable[[str], None] = lambda m: None,
            progress=None) -> list[dict]:
        self.check_available()
        ray = self._init()
        remote = ray.remote(run_path)
        compare_json = json.loads(json.dumps(cmp.model_dump(mode="json", exclude_none=True)))
        protocol = cmp.protocol() if hasattr(cmp, "protocol") else {}
        refs = {}
        for job in jobs:
            res = path_resources(cmp, job.label)
            ref = remote.options(**res, name=f"resp:{job.sub}").remote(
                compare_json, protocol, str(folder.resolve()), {"label": job.label, "target": job.target,
                                                                "sub": job.sub})
            refs[ref] = job
            say(f"[bold]{job.label}[/]{'' if job.target is None else f' ({job.target:.0%})'}: Ray task "
                f"({res['num_gpus']} GPU, {res['num_cpus']} CPU)")
        done, failures = [], []
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            job = refs[ready[0]]
            try:
                done.append(ray.get(ready[0]))
                say(f"[bold]{job.label}[/]{'' if job.target is None else f' ({job.target:.0%})'}: finished")
            except Exception as exc:  # a task's failure: the others finish, then the first one is reported
                cause = getattr(exc, "cause", None) or exc
                failures.append((job, cause))
        if failures:
            job, cause = failures[0]
            if isinstance(cause, RespError):
                raise type(cause)(f"{job.label}: {cause}")
            raise RuntimeError(f"{job.label}: {type(cause).__name__}: {cause}") from cause
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
