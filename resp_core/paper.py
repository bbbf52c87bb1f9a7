"""``mode: paper``: the authors' protocol for every setting a recipe leaves unset.

RESP's defaults are the choices we defend (docs/methods.md, "RESP and the authors' protocol");
where they differ from the authors' code (uncc-efficient-ai/RESP), each difference is a named
option.  ``mode: paper`` at the top of a recipe or comparison recipe fills every such option the
recipe does not set with the authors' value, so that the run follows the paper's protocol on
every row of the table below; a field the recipe sets always wins and is reported as kept.  It is
not their code in every respect: what still differs (``head_dim`` from the config, ties at the
threshold, the run ending at its last milestone, which model is evaluated at a milestone, ...) is
listed in docs/methods.md, "Where paper mode still differs".  The filled recipe is what
the run records (``recipe.yaml``), and ``run.json`` lists what was filled (``protocol.applied``)
and which explicit fields differ from the authors' (``protocol.kept``).

The table (each row: the authors' file and function):

====================================  =============================  =========================================
setting                               authors' value                 where
====================================  =============================  =========================================
``structures.attention``              ``q_head``                     ``data_refresh_GISP.py`` ``prune_oneshot``
``structures.sparsity_basis``         ``all_blocks``                 ``non_uniform_pruner.py`` ``check_sparsity``
``structures.protect_rounding``       ``floor``                      ``prune_oneshot``: ``int(len(layers) * 0.1)``
``structures.min_keep``               ``0`` (no per-layer floor)     ``prune_oneshot``: one ``kthvalue`` threshold
Taylor ``reduction`` (resp, gisp)     ``batch_token_mean``: batch    ``non_uniform_pruner.py`` ``fill_information``
                                      size from the padded length,   (``loss * batch_size``), ``obtain_info_iterative``
                                      token mean inside a batch      (``grad / n_samples``)
gisp ``loss``                         ``decode`` (gold-thinking)     ``configs/section5/main/gisp_gsm8k.yaml``
task_data                             thinking prompt, gold + EOS    ``data_prune_ds.py`` ``get_gsm8k_model_output_sample``
self_generated regenerated count      ``ceil(n * rho)``              ``data_refresh_GISP.py`` ``update_data``
gsm8k task (calibration prompt)       the bare question              same (``build_prompt(question)``)
mathqa task (calibration prompt)      ``Question/Options/Answer:``   ``get_mathqa_model_output_sample``
wanda_sp                              sequential, uniform, one shot  ``wanda_sp.py`` ``baseline_uniform_wanda``
wanda_sp calibration (task_data)      ``pack: 256``                  ``wanda_sp.py`` ``process_data`` (``seq_len``)
uniform allocator                     ratio landing on the target    ``configs/section5/main/wanda_gsm8k_*.yaml`` ``ratio``
progressive schedule                  ``linspace(0, 0.7, 112)``      ``non_uniform_pruner.py`` ``ratio_scheduling``;
                                      whatever the target            ``configs/section5/main/resp_gsm8k.yaml``
                                      (``grid_end``), milestones     ``data_refresh_GISP.py`` ``prune_iterative``
                                      crossed on measured sparsity
global allocator                      ``threshold: kthvalue``;       ``data_refresh_GISP.py`` ``prune_oneshot``
                                      ``budget: count`` on the       (``torch.kthvalue`` over unit counts)
                                      fixed grid
lm_eval tasks                         the paper's GSM8K / MathQA     ``configs/section5/main/*.yaml`` ``lm_eval_options``
====================================  =============================  =========================================

The rules act on the recipe as written (the parsed YAML mapping), before validation: "unset"
means absent from the file.  Settings the authors' protocol ties together are one setting here:
``steps``, ``step_size`` and ``grid_end`` (a recipe that sets any keeps its spacing), and the
count budget goes with the fixed grid: a schedule without ``grid_end`` (its own spacing, one
shot) keeps the parameter budget, its target being a sparsity.
"""

from __future__ import annotations

import copy
from typing import Any

# --- the table ------------------------------------------------------------------------------------

STRUCTURES = {"attention": "q_head", "sparsity_basis": "all_blocks", "protect_rounding": "floor", "min_keep": 0}

PLUGIN_PARAMS: dict[tuple[str, str], dict[str, Any]] = {
    # their batches: padded length -> batch size, token mean inside a batch times its size, / n
    ("scorer", "resp"): {"reduction": "batch_token_mean"},
    ("scorer", "gisp"): {"reduction": "batch_token_mean", "loss": "decode"},
    ("scorer", "wanda_sp"): {"sequential": True},
    ("calibration", "task_data"): {"format": "chat", "enable_thinking": True},
    ("calibration", "self_generated"): {"regenerate_rounding": "ceil"},
    ("task", "gsm8k"): {"prompt_suffix": "", "reference_annotations": "keep"},
    ("task", "mathqa"): {"prompt_format": "paper"},
    # their Qwen3-8B runs: ratio 0.7 in 112 linspace points (0.7 / 111 = 0.0063 per step) whatever
    # the target, milestones judged on the measured sparsity; the run ends at the target
    ("schedule", "progressive"): {"step_size": 0.0063, "milestones_on": "reached", "grid_end": 0.7},
    # their Wanda-sp ratios 0.24 / 0.36 / 0.47 were set to land at 20 / 30 / 40% of all blocks
    ("allocator", "uniform"): {"target_on": "sparsity"},
    # their kthvalue threshold: exactly the k lowest-scored units, no overshoot-skip
    ("allocator", "global"): {"threshold": "kthvalue"},
}

# The global allocator's count budget (their grid's points are count ratios): filled only with
# the fixed grid (a schedule with ``grid_end``), where the target is a measured sparsity at which
# the run ends; elsewhere a target is a sparsity and the parameter budget stays.
COUNT_BUDGET = {"budget": "count"}

# The authors' evaluation task for each RESP task (lm-eval task names, plugins/evaluators/lm_eval_tasks).
LM_EVAL_TASKS = {"gsm8k": ["resp_gsm8k_cot_paper"], "mathqa": ["resp_mathqa_paper"]}

# Methods whose protocol is more than their own parameters.
METHODS: dict[str, dict[str, Any]] = {
    "wanda_sp": {"allocator": "uniform", "schedule": "oneshot", "calibration": {"task_data": {"pack": 256}}},
}

# Parameters that are one setting (a recipe that sets one of them keeps its choice).
GROUPS = {("schedule", "progressive"): [("steps", "step_size", "grid_end")]}


class Report:
    """What ``mode: paper`` filled in, and which explicit fields differ from the authors'."""

    def __init__(self):
        self.applied: dict[str, Any] = {}
        self.kept: dict[str, dict[str, Any]] = {}

    def to_json(self) -> dict:
        return {"applied": dict(self.applied), "kept": dict(self.kept)}


def _fill(mapping: dict, defaults: dict, path: str, report: Report, groups=()) -> None:
    """Put each default missing from ``mapping`` into it (recursively for nested mappings)."""
    taken = set()
    for group in groups:
        present = [k for k in group if k in mapping]
        if present:
            taken |= set(group)
            for k in group:
                if k in defaults and k not in mapping:
                    report.kept[f"{path}.{k}"] = {"recipe": {p: mapping[p] for p in present}, "paper": defaults[k]}
    for key, value in defaults.items():
        if key in taken:
            continue
        where = f"{path}.{key}"
        if key not in mapping:
            mapping[key] = copy.deepcopy(value)
            report.applied[where] = value
        elif isinstance(value, dict) and isinstance(mapping[key], dict):
            _fill(mapping[key], value, where, report)
        elif mapping[key] != value:
            report.kept[where] = {"recipe": mapping[key], "paper": value}


def _fill_ref(parent: dict | list, key: str | int, kind: str, path: str, report: Report, default_name: str | None = None,
              extra: dict | None = None) -> None:
    """Fill the params of the plugin reference ``parent[key]`` (created when absent and a default
    plugin name is known)."""
    ref = parent[key] if isinstance(parent, list) else parent.get(key)
    if ref is None:
        if default_name is None:
            return
        ref = parent[key] = {"name": default_name}
    if not isinstance(ref, dict) or not isinstance(ref.get("name"), str):
        return  # malformed: validation reports it
    defaults = dict(PLUGIN_PARAMS.get((kind, ref["name"]), {}))
    defaults.update(extra or {})
    if not defaults:
        return
    params = ref.setdefault("params", {})
    if not isinstance(params, dict):
        return
    _fill(params, defaults, f"{path}.params", report, GROUPS.get((kind, ref["name"]), ()))


def _fill_shared(data: dict, report: Report) -> None:
    st = data.setdefault("structures", {})
    if isinstance(st, dict):
        defaults = dict(STRUCTURES)
        if st.get("layers") is True or st.get("attention") == "none":
            defaults.pop("attention")
        _fill(st, defaults, "structures", report)
    _fill_ref(data, "task", "task", "task", report, default_name="testbed_arith")
    _fill_ref(data, "calibration", "calibration", "calibration", report)


def _fill_evaluators(evaluators, task_name: str, path: str, report: Report) -> None:
    if not isinstance(evaluators, list):
        return
    for i, ev in enumerate(evaluators):
        if isinstance(ev, dict) and ev.get("name") == "lm_eval" and task_name in LM_EVAL_TASKS:
            _fill_ref(evaluators, i, "evaluator", f"{path}[{i}]", report,
                      extra={"tasks": LM_EVAL_TASKS[task_name]})


def _tree(obj: Any) -> Any:
    """A copy of a parsed YAML tree in which no two places share an object (YAML aliases such as
    ``scorer: *resp`` are expanded, so each method is filled and reported on its own)."""
    if isinstance(obj, dict):
        return {k: _tree(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_tree(v) for v in obj]
    return obj


def _method_protocol(scorer: Any) -> dict:
    return METHODS.get(scorer.get("name"), {}) if isinstance(scorer, dict) else {}


def apply_to_recipe(data: dict) -> tuple[dict, Report]:
    """A run recipe (``mode: paper``) with the authors' protocol filled in."""
    data, report = _tree(data), Report()
    _fill_shared(data, report)
    proto = _method_protocol(data.get("scorer"))
    if "allocator" not in data and "allocator" in proto:
        data["allocator"] = {"name": proto["allocator"]}
        report.applied["allocator.name"] = proto["allocator"]
    _fill_ref(data, "scorer", "scorer", "scorer", report)
    _fill_ref(data, "schedule", "schedule", "schedule", report)
    sched = data.get("schedule")
    params = sched.get("params") if isinstance(sched, dict) and sched.get("name") == "progressive" else None
    _fill_allocator(data, "allocator", report, isinstance(params, dict) and params.get("grid_end") is not None)
    calib = data.get("calibration")
    if isinstance(calib, dict) and calib.get("name") in proto.get("calibration", {}):
        _fill_ref(data, "calibration", "calibration", "calibration", report,
                  extra=proto["calibration"][calib["name"]])
    evaluation = data.get("evaluation")
    if isinstance(evaluation, dict):
        _fill_evaluators(evaluation.get("evaluators"), _task_name(data), "evaluation.evaluators", report)
    return data, report


def apply_to_compare(data: dict) -> tuple[dict, Report]:
    """A comparison recipe (``mode: paper``) with the authors' protocol filled in, per method."""
    data, report = _tree(data), Report()
    _fill_shared(data, report)
    _fill_evaluators(data.get("evaluators"), _task_name(data), "evaluators", report)
    schedule_defaults = dict(PLUGIN_PARAMS[("schedule", "progressive")])
    if "steps" in data:  # the comparison's own spacing wins
        report.kept["steps"] = {"recipe": data["steps"], "paper": {k: schedule_defaults.pop(k)
                                                                   for k in ("step_size", "grid_end")}}
    methods = data.get("methods")
    for i, m in enumerate(methods if isinstance(methods, list) else []):
        if not isinstance(m, dict):
            continue
        path = f"methods[{i}]"
        proto = _method_protocol(m.get("scorer"))
        _fill_ref(m, "scorer", "scorer", f"{path}.scorer", report)
        if "allocator" not in m and "allocator" in proto:
            m["allocator"] = {"name": proto["allocator"]}
            report.applied[f"{path}.allocator.name"] = proto["allocator"]
        if proto.get("calibration"):
            calib = m.get("calibration")
            if calib is None and isinstance(data.get("calibration"), dict) \
                    and data["calibration"].get("name") in proto["calibration"]:
                m["calibration"] = copy.deepcopy(data["calibration"])
                report.applied[f"{path}.calibration"] = "the comparison's calibration"
            calib = m.get("calibration")
            if isinstance(calib, dict) and calib.get("name") in proto["calibration"]:
                _fill_ref(m, "calibration", "calibration", f"{path}.calibration", report,
                          extra=proto["calibration"][calib["name"]])
        else:
            _fill_ref(m, "calibration", "calibration", f"{path}.calibration", report)
        schedule = m.setdefault("schedule", {})
        if not isinstance(schedule, dict):
            _fill_allocator(m, f"{path}.allocator", report, False)
            continue
        if proto.get("schedule") == "oneshot":
            if not schedule:
                schedule["name"] = "oneshot"
                report.applied[f"{path}.schedule.name"] = "oneshot"
            elif schedule.get("name") != "oneshot":
                report.kept[f"{path}.schedule"] = {"recipe": dict(schedule), "paper": {"name": "oneshot"}}
        elif schedule.get("name", "progressive") == "progressive":
            _fill(schedule, schedule_defaults, f"{path}.schedule", report, GROUPS[("schedule", "progressive")])
        _fill_allocator(m, f"{path}.allocator", report, schedule.get("name", "progressive") == "progressive"
                        and schedule.get("grid_end") is not None)
    return data, report


def _fill_allocator(parent: dict, path: str, report: Report, fixed_grid: bool) -> None:
    """The allocator (``global`` when absent) with the authors' values; the count budget only on
    the fixed grid (:data:`COUNT_BUDGET`)."""
    ref = parent.get("allocator")
    name = "global" if ref is None else ref.get("name") if isinstance(ref, dict) else None
    _fill_ref(parent, "allocator", "allocator", path, report, default_name="global",
              extra=COUNT_BUDGET if fixed_grid and name == "global" else None)


def _task_name(data: dict) -> str:
    task = data.get("task")
    return task.get("name", "testbed_arith") if isinstance(task, dict) else "testbed_arith"
