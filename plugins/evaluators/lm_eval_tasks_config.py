"""Which lm-eval tasks the ``lm_eval`` evaluator runs and how: RESP's shipped task folder, local
data files for RESP's tasks, and the run's sampling, few-shot and stop-string settings per task.

Nothing here imports lm-eval at module level; the functions that need it import it when called.
"""

from __future__ import annotations

from pathlib import Path

from resp_core.errors import RespError

TASKS_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"
# RESP task -> kind (which local files, extraction and judge prompt it uses)
RESP_TASKS = {"resp_gsm8k_cot": "gsm8k", "resp_mathqa_gen": "mathqa",
              "resp_gsm8k_cot_paper": "gsm8k", "resp_mathqa_paper": "mathqa"}
PAPER_TASKS = {"gsm8k": "resp_gsm8k_cot_paper", "mathqa": "resp_mathqa_paper"}
# local files per kind: lm-eval split -> file name (optional ones may be missing)
LOCAL_FILES = {
    "gsm8k": {"train": "train.jsonl", "test": "test.jsonl"},
    "mathqa": {"validation": "dev.json", "test": "test.json"},
}
OPTIONAL_FILES = {"mathqa": {"train": "train.json"}}
STOP_MODES = ("after_think", "whole_output")
DEFAULT_MAX_NEW_TOKENS = {"resp_gsm8k_cot": 2048, "resp_mathqa_gen": 4096,
                          "resp_gsm8k_cot_paper": 2048, "resp_mathqa_paper": 4096}


def task_utils():
    """The shipped tasks' helper module (``lm_eval_tasks/utils.py``; it imports lm-eval)."""
    from resp_plugins.evaluators.lm_eval_tasks import utils

    return utils


def task_meta(task) -> dict:
    """A loaded task's ``metadata`` (empty when it has none)."""
    meta = task.get_config("metadata") if task is not None else None
    return meta if isinstance(meta, dict) else {}


def task_manager(tasks: list[str], include_path: list[str]):
    """lm-eval's task index over RESP's task folder and ``include_path``."""
    from lm_eval.tasks import TaskManager

    paths = [str(TASKS_DIR)] + [str(Path(x).expanduser()) for x in include_path]
    tm = TaskManager(include_path=paths, include_defaults=False)
    # indexing lm-eval's own few thousand task files takes seconds: only when a task needs it
    if any(t not in tm.all_tasks for t in tasks):
        tm = TaskManager(include_path=paths, include_defaults=True)
    return tm


def local_files(task: str, folder: str) -> dict[str, str]:
    """lm-eval split -> file for a RESP task's local data folder."""
    kind = RESP_TASKS[task]
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise RespError(f"lm_eval: data_dir for {task} {str(root)!r} is not a folder")
    files = {}
    for split, name in LOCAL_FILES[kind].items():
        f = root / name
        if not f.is_file():
            raise RespError(f"lm_eval: {task}: missing file {str(f)!r} in data_dir")
        files[split] = str(f.resolve())
    for split, name in OPTIONAL_FILES.get(kind, {}).items():
        if (root / name).is_file():
            files[split] = str((root / name).resolve())
    return files


def task_specs(tasks: list[str], data_dir: dict[str, str]) -> list:
    """Task names, or full config dicts for RESP tasks given a data_dir."""
    from lm_eval.tasks._yaml_loader import load_yaml

    specs = []
    for name in tasks:
        if name not in RESP_TASKS:
            if name in data_dir:
                raise RespError(f"lm_eval: data_dir is only for RESP tasks ({', '.join(RESP_TASKS)})")
            specs.append(name)
            continue
        if name not in data_dir:
            specs.append(name)
            continue
        cfg = load_yaml(TASKS_DIR / f"{name}.yaml", resolve_func=True)
        cfg["dataset_path"] = "json"
        cfg["dataset_name"] = None
        cfg["dataset_kwargs"] = {"data_files": local_files(name, data_dir[name])}
        specs.append(cfg)
    return specs


def load_tasks(tm, tasks: list[str], data_dir: dict[str, str]) -> dict:
    """Task name -> lm-eval task object."""
    return dict(tm.load(task_specs(tasks, data_dir))["tasks"])


def configure_tasks(tasks: dict, sampling, num_fewshot: int | dict[str, int] | None) -> None:
    """Write the run's sampling into every generative task (do_sample always explicit) and
    apply num_fewshot overrides."""
    s = sampling
    for name, task in tasks.items():
        if task.get_config("output_type") == "generate_until":
            gen = dict(task.get_config("generation_kwargs") or {})
            gen.update(do_sample=s.do_sample, temperature=float(s.temperature), top_p=float(s.top_p),
                       top_k=int(s.top_k))
            budget = s.budget(name)
            if budget is not None:
                gen["max_gen_toks"] = int(budget)
            gen.pop("max_new_tokens", None)
            gen.setdefault("until", [])
            task.set_config(key="generation_kwargs", value=gen)
        shots = num_fewshot if not isinstance(num_fewshot, dict) else num_fewshot.get(name)
        if shots is not None:
            task.set_config(key="num_fewshot", value=int(shots))


def stop_modes(tasks: dict, stop_strings: str | None) -> dict[str, str]:
    """Task name -> stop-string mode: ``stop_strings`` if set, else the task's
    ``metadata.resp_stop_strings``, else ``after_think``."""
    out = {}
    for name, task in tasks.items():
        mode = stop_strings or task_meta(task).get("resp_stop_strings") or "after_think"
        if mode not in STOP_MODES:
            raise RespError(f"lm_eval: task {name}: metadata.resp_stop_strings {mode!r} is not one of "
                            f"{', '.join(STOP_MODES)}")
        out[name] = mode
    return out
