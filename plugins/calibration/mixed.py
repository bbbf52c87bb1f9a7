"""A blend of calibration sources (e.g. C4 text with GSM8K solutions or self-generated traces).

``sources`` lists other calibration sources by registered name with their own ``params`` and a
``weight``.  Source k contributes ``round(w_k / Σw · num_samples)`` samples (so the counts may
differ from ``num_samples`` by rounding); a source that would contribute 0 is skipped.  Each
source is built through the registry exactly as if it were the recipe's ``calibration`` (its
``params`` are validated and its ``check_recipe`` runs, errors naming
``calibration.params.sources[k]...``); when its ``params`` do not set ``num_samples`` (and it has
one) it is set to the source's count.  A source that produces more samples than its count gives
its first ones; fewer is an error.

The blend is shuffled with ``seed`` (the recipe's seed when unset) so that batches mix sources;
every sample's meta records its ``source`` (the component's name) and ``mixed_component`` (k).
The blend is regenerable when any component is: regeneration is delegated to those components,
each on its own samples in its own order; the others' samples stay as they are.
"""

from __future__ import annotations

import random
from typing import Any

from pydantic import Field

from resp_core import hookimpl
from resp_core.errors import RespError
from resp_core.interfaces import CalibrationSample, CalibrationSource, Params, RunContext
from resp_core.validation import Count, Seed


class SourceSpec(Params):
    name: str
    params: dict[str, Any] = Field(default_factory=dict)
    weight: float = Field(1.0, gt=0)


class Mixed(CalibrationSource):
    """A weighted blend of other calibration sources (counts round(weight·num_samples), seeded)."""

    class Params(Params):
        num_samples: Count = 128
        sources: list[SourceSpec] = Field(min_length=1)
        seed: Seed | None = None  # shuffle of the blend; default: the recipe's seed
        shuffle: bool = True

    def __init__(self, params: "Mixed.Params"):
        self.params = params
        self._path = "calibration"
        self._built: list[tuple[int, CalibrationSource]] | None = None
        self._order: list[tuple[int, int]] = []  # position -> (component, index within the component)

    # --- components --------------------------------------------------------------------------
    def counts(self) -> list[int]:
        total = sum(s.weight for s in self.params.sources)
        return [int(s.weight / total * self.params.num_samples + 0.5) for s in self.params.sources]

    def _components(self) -> list[tuple[int, CalibrationSource]]:
        if self._built is None:
            from resp_core.registry import get_registry

            reg = get_registry()
            built = []
            for k, (spec, count) in enumerate(zip(self.params.sources, self.counts())):
                if count == 0:
                    continue
                where = f"{self._path}.params.sources[{k}]"
                params = dict(spec.params)
                model = getattr(reg.get("calibration", spec.name, f"{where}.name").factory, "Params", None)
                if model is not None and "num_samples" in model.model_fields and "num_samples" not in params:
                    params["num_samples"] = count
                built.append((k, reg.create("calibration", spec.name, params, where)))
            self._built = built
        return self._built

    @property
    def regenerable(self) -> bool:
        return any(c.regenerable for _, c in self._components())

    def check_recipe(self, recipe, path: str) -> None:
        self._path = path
        self._built = None
        for k, comp in self._components():
            check = getattr(comp, "check_recipe", None)
            if check is not None:
                check(recipe, f"{path}.params.sources[{k}]")

    # --- building ----------------------------------------------------------------------------
    def build(self, ctx: RunContext) -> list[CalibrationSample]:
        counts = self.counts()
        pool: list[tuple[int, int, CalibrationSample]] = []
        for k, comp in self._components():
            name = self.params.sources[k].name
            got = comp.build(ctx)
            if len(got) < counts[k]:
                raise RespError(f"{self._path}.params.sources[{k}]: source {name!r} produced {len(got)} samples, "
                                f"{counts[k]} needed (check its num_samples)")
            for j, s in enumerate(got[: counts[k]]):
                self._tag(s, k)
                pool.append((k, j, s))
        if self.params.shuffle:
            seed = ctx.seed if self.params.seed is None else self.params.seed
            random.Random(seed).shuffle(pool)
        self._order = [(k, j) for k, j, _ in pool]
        return [s for _, _, s in pool]

    # --- resume ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"order": [list(o) for o in self._order],
                "components": {str(k): c.state_dict() for k, c in self._components() if hasattr(c, "state_dict")}}

    def load_state_dict(self, state: dict) -> None:
        self._order = [(int(k), int(j)) for k, j in state["order"]]
        for k, comp in self._components():
            if str(k) in state["components"] and hasattr(comp, "load_state_dict"):
                comp.load_state_dict(state["components"][str(k)])

    def _tag(self, sample: CalibrationSample, k: int) -> None:
        sample.meta.setdefault("source", self.params.sources[k].name)
        sample.meta["mixed_component"] = k

    def regenerate(self, ctx: RunContext, samples: list[CalibrationSample], fraction: float) -> list[CalibrationSample]:
        out = list(samples)
        for k, comp in self._components():
            if not comp.regenerable:
                continue
            positions = sorted((j, pos) for pos, (kk, j) in enumerate(self._order) if kk == k)
            own = [samples[pos] for _, pos in positions]
            fresh = comp.regenerate(ctx, own, fraction)
            for (_, pos), s in zip(positions, fresh):
                self._tag(s, k)
                out[pos] = s
        return out


@hookimpl
def register_calibration_sources(register):
    register("mixed", Mixed)
