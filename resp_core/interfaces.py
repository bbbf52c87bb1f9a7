"""The interfaces every plugin implements, and the data passed between them.

Data flows one way::

    Task ──► CalibrationSource ──► CalibrationSet ──► Scorer ──► Scores ──► Allocator ──► MaskSet
              (self-generated ones use a Generator)                                         │
    Schedule: which sparsity each step reaches, where milestones (evaluation, regeneration) are
    Evaluator: metrics of the current (masked) model at each milestone

Each implementation class may declare a nested pydantic ``Params`` model; the recipe's
``params:`` mapping is validated against it before anything runs, and the instance is built as
``Class(params)``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from pydantic import BaseModel, ConfigDict, field_validator

from .model.adapter import DecoderAdapter
from .model.masks import MaskSet
from .model.structures import Structures
from .validation import refuse_bool_for_number


class Params(BaseModel):
    """Base for plugin parameter models: unknown keys are errors, and ``true``/``false`` given
    for a number is refused (pydantic alone would read ``target: true`` as ``1.0``)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())  # fields such as model_path are ours

    _no_bool_numbers = field_validator("*", mode="before")(classmethod(refuse_bool_for_number))


# --------------------------------------------------------------------------------------------------
# Progress reporting (implemented by the CLI with rich; a no-op elsewhere)
# --------------------------------------------------------------------------------------------------

class Progress:
    """``with progress.task("Scoring", total=n) as advance: advance(1)``; ``advance(1,
    description=...)`` may also update the task's description (a training loss), where the
    reporter supports it."""

    def task(self, description: str, total: int):
        return _NullTask()

    def log(self, message: str) -> None:
        pass


class _NullTask:
    def __enter__(self):
        return lambda n=1, description=None: None

    def __exit__(self, *exc):
        return False


# --------------------------------------------------------------------------------------------------
# Tasks and generation
# --------------------------------------------------------------------------------------------------

@dataclass
class SamplingParams:
    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = 20
    max_new_tokens: int = 256
    do_sample: bool = True
    enable_thinking: bool = True
    seed: int = 0


@dataclass
class TaskItem:
    id: str
    messages: list[dict]  # chat messages ending with the user turn
    answer: str  # gold final answer, as text
    reference: str = ""  # human-written worked solution (calibration "task data")
    meta: dict = field(default_factory=dict)


class Task(ABC):
    """A reasoning task: prompts with gold answers, and how to check a completion."""

    name: str = "task"
    # The split names ``items`` accepts; a recipe's ``split:`` is checked against them before
    # the run (empty: not declared, not checked).
    splits: tuple[str, ...] = ()

    @abstractmethod
    def items(self, split: str, count: int | None, seed: int) -> list[TaskItem]:
        """``count`` items of ``split`` (all when None), chosen reproducibly by ``seed``."""

    def split_size(self, split: str) -> int | None:
        """How many items ``split`` holds, when that is known without downloading (None: unknown
        or unbounded); a recipe asking for more is refused before the run."""
        return None

    @abstractmethod
    def extract_answer(self, completion: str) -> str | None:
        """The final answer a completion commits to, or None."""

    def is_correct(self, completion: str, item: TaskItem) -> bool:
        got = self.extract_answer(completion)
        return got is not None and got == item.answer


@dataclass
class Completion:
    prompt_ids: list[int]
    completion_ids: list[int]
    text: str
    finished: bool  # ended with EOS (not cut by max_new_tokens)


class Generator(ABC):
    """Generation backend: batched, chat template with thinking mode, seeded sampling."""

    def bind(self, model, tokenizer) -> None:
        self.model, self.tokenizer = model, tokenizer

    @abstractmethod
    def generate(self, conversations: list[list[dict]], sampling: SamplingParams,
                 progress: Progress | None = None, description: str = "Generating") -> list[Completion]:
        ...

    def generate_text(self, prompts: list[str], sampling: SamplingParams, progress: Progress | None = None,
                      description: str = "Generating", add_special_tokens: bool = False) -> list[Completion]:
        """Completions of already-rendered prompt texts (no chat template applied here; lm-eval
        tasks without a chat template need this).  ``sampling.enable_thinking`` does not apply.
        Optional: backends that only take conversations leave it unimplemented."""
        raise NotImplementedError(f"{type(self).__name__} generates from conversations only")

    def before_scoring(self) -> None:
        """Called by the pipeline right before each scoring pass: a backend that holds GPU memory
        of its own (vLLM's KV cache) may release it while gradients are computed."""

    def after_scoring(self) -> None:
        """Called right after each scoring pass (also when it failed)."""


# --------------------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------------------

@dataclass
class CalibrationSample:
    """One calibration sequence: prompt tokens then target tokens (a trace, a solution, or text).

    ``prompt_ids`` may be empty (generic text); then the whole sequence is the target."""

    prompt_ids: list[int]
    target_ids: list[int]
    meta: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"prompt_ids": self.prompt_ids, "target_ids": self.target_ids, "meta": self.meta}

    @classmethod
    def from_json(cls, obj: dict) -> "CalibrationSample":
        return cls(list(obj["prompt_ids"]), list(obj["target_ids"]), dict(obj.get("meta", {})))


@dataclass
class CalibrationBatch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor  # -100 where the loss does not apply


class CalibrationSet:
    """The calibration samples of one step, batched for a chosen loss mask."""

    def __init__(self, samples: list[CalibrationSample], pad_id: int, max_length: int | None = None):
        self.samples = samples
        self.pad_id = pad_id
        self.max_length = max_length

    def __len__(self) -> int:
        return len(self.samples)

    def batches(self, batch_size: int, loss: str = "decode") -> Iterator[CalibrationBatch]:
        """Right-padded batches. ``loss='decode'``: labels on target tokens only (Eq. 4);
        ``'full'``: labels on every token (the full-sequence loss of GISP and most baselines)."""
        if loss not in ("decode", "full"):
            raise ValueError(f"loss must be 'decode' or 'full', not {loss!r}")
        for start in range(0, len(self.samples), batch_size):
            chunk = self.samples[start : start + batch_size]
            rows, labs = [], []
            for s in chunk:
                ids = s.prompt_ids + s.target_ids
                lab = ([-100] * len(s.prompt_ids) if loss == "decode" else list(s.prompt_ids)) + s.target_ids
                if self.max_length:
                    ids, lab = ids[: self.max_length], lab[: self.max_length]
                rows.append(ids)
                labs.append(lab)
            width = max(len(r) for r in rows)
            ids_t = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
            lab_t = torch.full((len(rows), width), -100, dtype=torch.long)
            att_t = torch.zeros((len(rows), width), dtype=torch.long)
            for i, (r, lb) in enumerate(zip(rows, labs)):
                ids_t[i, : len(r)] = torch.tensor(r)
                lab_t[i, : len(lb)] = torch.tensor(lb)
                att_t[i, : len(r)] = 1
            yield CalibrationBatch(ids_t, att_t, lab_t)

    def target_token_count(self, loss: str = "decode") -> int:
        """Tokens that carry a loss (after the causal shift) over the whole set."""
        total = 0
        for s in self.samples:
            n = len(s.prompt_ids) + len(s.target_ids)
            if self.max_length:
                n = min(n, self.max_length)
            first = len(s.prompt_ids) if loss == "decode" else 1
            total += max(0, n - max(first, 1))
        return total


@dataclass
class RunContext:
    """What a calibration source, scorer, allocator or evaluator may use during a run."""

    model: torch.nn.Module
    tokenizer: Any
    adapter: DecoderAdapter
    structures: Structures
    generator: Generator
    tasks: Callable[..., Task]  # tasks(name=None, params=None) -> Task instance
    seed: int = 0
    device: str = "cpu"
    progress: Progress = field(default_factory=Progress)
    mask: MaskSet | None = None  # the current mask
    step: int = 0
    target: float | None = None  # the sparsity the current step prunes to (set by the run loop)
    allocator: Any = None  # the run's allocator (per-layer scorers such as sequential Wanda-sp ask it)


class CalibrationSource(ABC):
    """Produces the calibration set; regenerable sources can refresh it from the current model."""

    regenerable: bool = False

    @abstractmethod
    def build(self, ctx: RunContext) -> list[CalibrationSample]:
        ...

    def regenerate(self, ctx: RunContext, samples: list[CalibrationSample], fraction: float) -> list[CalibrationSample]:
        """Replace ``fraction`` of the samples with ones produced by the current model (same prompts)."""
        return samples


# --------------------------------------------------------------------------------------------------
# Scoring, allocation, scheduling, evaluation
# --------------------------------------------------------------------------------------------------

@dataclass
class Scores:
    """Importance per unit kind, tensors shaped like the MaskSet's ([L, n]); higher = keep.

    Only kinds the run prunes need be present.  ``layer_stats`` carries optional per-layer
    statistics an allocator may use (e.g. OWL's outlier ratios)."""

    values: dict[str, torch.Tensor]
    layer_stats: dict[str, torch.Tensor] = field(default_factory=dict)


class Scorer(ABC):
    """Importance of each prunable unit under the current mask.

    A scorer may also edit the weights that stay when units are removed (FLAP's bias
    compensation, SparseGPT's reconstruction) in :meth:`before_removal`."""

    @abstractmethod
    def score(self, ctx: RunContext, calibration: CalibrationSet) -> Scores:
        ...

    def before_removal(self, ctx: RunContext, old: MaskSet, new: MaskSet) -> None:
        """Called with the current and the next mask before the next mask is applied."""


class Allocator(ABC):
    """Turns scores into the next (nested) mask at a target sparsity."""

    def prepare(self, ctx: RunContext, calibration: CalibrationSet) -> None:
        """Called before :meth:`allocate` at every step; allocators that need statistics of
        the current model (OWL's per-layer outlier ratios) compute them here."""

    @abstractmethod
    def allocate(self, scores: Scores, structures: Structures, mask: MaskSet, target: float) -> MaskSet:
        ...


@dataclass
class Step:
    sparsity: float
    milestone: bool
    regenerate_fraction: float = 0.0  # fraction of traces regenerated after this step (milestones)
    # Milestones judged on the sparsity the run has *measured* (the authors' schedule), as
    # {milestone sparsity: ρ}; empty for schedules whose milestones are steps.  See
    # :meth:`milestones_crossed`.
    measured_milestones: dict[float, float] = field(default_factory=dict)

    def milestones_crossed(self, previous: float, reached: float) -> list[tuple[float, float]]:
        """(milestone, ρ) of :attr:`measured_milestones` that this step crossed, ascending:
        ``previous < m <= reached``, where ``previous`` is the sparsity measured before the step
        and ``reached`` after it (on the recipe's basis).  At each crossing the run evaluates
        the current model (recorded with target ``m``) and, when ρ > 0 and steps remain,
        regenerates a fraction ρ of the traces; the next step rescores on them."""
        return [(m, r) for m, r in sorted(self.measured_milestones.items()) if previous < m <= reached]


class Schedule(ABC):
    @abstractmethod
    def steps(self) -> list[Step]:
        ...


@dataclass
class EvalResult:
    metrics: dict[str, float]  # e.g. {"testbed_arith/accuracy": 0.96}
    records: list[dict] = field(default_factory=list)  # per-item details, saved as JSONL


class Evaluator(ABC):
    @abstractmethod
    def evaluate(self, ctx: RunContext) -> EvalResult:
        ...


# --------------------------------------------------------------------------------------------------
# Recovery after pruning (resp_core/recovery/, resp_core/recovery_stage.py)
# --------------------------------------------------------------------------------------------------

@dataclass
class TeacherSpec:
    """What a recoverer needs of the dense model: its top-``top_k`` log-probabilities at
    ``temperature`` on every decode position of the run's calibration traces (generation 0),
    sequences cut to ``max_tokens``; computed once, before pruning, and stored in the run folder."""

    top_k: int
    temperature: float = 1.0
    max_tokens: int = 1024
    batch_size: int = 4


@dataclass
class RecoveryContext:
    """What a recoverer may use.  ``model`` is the *compacted* model (every parameter frozen); it
    shares its embeddings, norms and output head with the run's masked model, so a recoverer
    changes the projection weights (q/k/v/o/gate/up/down) only, or adapters merged into them
    (the run checks that nothing else changed).  ``samples``: the calibration traces the dense
    model produced (generation 0).  ``teacher_file``: the dense model's top-k log-probabilities
    on them (:class:`TeacherSpec`), or None.  ``state_dir``: where resumable training state goes
    (a killed run resumes from it)."""

    model: torch.nn.Module
    tokenizer: Any
    samples: list[CalibrationSample]
    tasks: Callable[..., Task]
    state_dir: Any  # pathlib.Path
    teacher_file: Any = None  # pathlib.Path | None
    seed: int = 0
    device: str = "cpu"
    progress: Progress = field(default_factory=Progress)
    label: str = "final"  # the point recovered ("step_08")


class Recoverer(ABC):
    """Recovery after pruning: trains the compacted model (full weights or LoRA merged back),
    after the final step or after every milestone (``recovery.at``), before it is evaluated."""

    def teacher(self) -> TeacherSpec | None:
        """The dense model's top-k log-probabilities this recoverer needs (None: none)."""
        return None

    @abstractmethod
    def recover(self, ctx: RecoveryContext) -> dict:
        """Train ``ctx.model`` in place; returns a JSON summary (at least ``steps`` and
        ``final_loss``), recorded in ``metrics.json`` and ``run.json``."""
