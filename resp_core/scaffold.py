"""``respctl plugin new NAME``: a ready-to-install third-party plugin package.

The package holds one scorer (an empirical-Fisher term, the guide's example in
``docs/plugins.md``) registered through the ``resp`` entry-point group, bounded parameters,
and a test that builds it through RESP's registry and scores a tiny random model.  Install it
with ``pip install -e NAME`` and ``respctl plugins`` lists it; ``pytest NAME/tests`` runs
its test.
"""

from __future__ import annotations

import re
from pathlib import Path

from .errors import RespError
from .registry import DISTRIBUTION, ENTRY_POINT_GROUP

PLUGIN_NAME = re.compile(r"^[a-z][a-z0-9_]{1,40}$")

PYPROJECT = '''[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "{dist}"
version = "0.1.0"
description = "A RESP plugin: the {name} scorer"
requires-python = ">=3.10"
dependencies = ["{resp_dist}"]

[project.optional-dependencies]
test = ["pytest>=8"]

# The line that makes RESP find the plugin: a module under the `{group}` entry-point group.
[project.entry-points.{group}]
{name} = "{package}.plugin"

[tool.setuptools]
packages = ["{package}"]
'''

PLUGIN = '''"""The {name} scorer: empirical-Fisher importance, the sum over a unit's weights of (w * dL/dw)^2.

It reuses RESP's shared machinery: ``accumulate_gradients`` backpropagates the calibration loss
into the prunable weights, and ``aggregate`` sums any per-weight map onto query heads, KV groups,
MLP channels and layers through the model adapter, so the plugin never names a module.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from resp_core import hookimpl
from resp_core.interfaces import Params, Scorer, Scores
from resp_core.scoring import accumulate_gradients, aggregate, normalize_scores, release_gradients, weight_map


class {cls}(Scorer):
    """{name}: squared first-order term (w * dL/dw)^2 summed per structure."""

    class Params(Params):
        # Bounded, so that a bad recipe fails at `respctl validate` with one line naming the field.
        loss: Literal["decode", "full"] = "decode"  # decode: the loss on generated tokens only
        batch_size: int = Field(8, ge=1, le=4096)  # memory and speed only; the scores do not change
        normalization: Literal["block_constant", "per_parameter", "mean", "none"] = "mean"

    def __init__(self, params: "{cls}.Params | None" = None):
        self.params = params or self.Params()

    def score(self, ctx, calibration) -> Scores:
        p = self.params
        accumulate_gradients(ctx.model, ctx.adapter, calibration, p.loss, p.batch_size, ctx.progress,
                             description="Scoring ({name})")
        raw = aggregate(ctx.adapter, lambda layer: weight_map(
            ctx.adapter, layer, lambda lin: (lin.weight * lin.weight.grad).float() ** 2))
        release_gradients(ctx.adapter)
        return Scores(normalize_scores(raw, p.normalization, ctx.adapter, ctx.structures.costs))


@hookimpl
def register_scorers(register):
    register("{name}", {cls})
'''

TEST = '''"""The {name} plugin registers with RESP and scores a tiny random model."""

import pytest
import torch

from resp_core.errors import RespError
from resp_core.interfaces import CalibrationSample, CalibrationSet, RunContext
from resp_core.model.adapter import adapter_for
from resp_core.model.structures import StructureSpec, build_structures
from resp_core.registry import build_registry

from {package} import plugin


def registry():
    return build_registry(extra_plugins=(plugin,))


def tiny_model():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    return Qwen3ForCausalLM(cfg).eval()


def test_registered():
    assert "{name}" in registry().names("scorer")


def test_bounded_params():
    with pytest.raises(RespError, match="scorer.params.batch_size"):
        registry().create("scorer", "{name}", {{"batch_size": 0}}, "scorer")


def test_scores_every_unit():
    model = tiny_model()
    adapter = adapter_for(model)
    structures = build_structures(adapter, StructureSpec())
    ctx = RunContext(model=model, tokenizer=None, adapter=adapter, structures=structures, generator=None,
                     tasks=None)
    g = torch.Generator().manual_seed(0)
    samples = [CalibrationSample(torch.randint(3, 128, (4,), generator=g).tolist(),
                                 torch.randint(3, 128, (6,), generator=g).tolist()) for _ in range(4)]
    scorer = registry().create("scorer", "{name}", {{"batch_size": 2}}, "scorer")
    scores = scorer.score(ctx, CalibrationSet(samples, pad_id=0))
    for kind in structures.kinds:
        values = scores.values[kind]
        assert values.shape == structures.costs[kind].shape
        assert torch.isfinite(values).all() and (values >= 0).all() and values.sum() > 0
'''

README = '''# {dist}

A [RESP](https://pypi.org/project/{resp_dist}/) plugin: the `{name}` scorer.

```bash
pip install -e .            # RESP finds it through the `{group}` entry point
respctl plugins | grep {name}
pip install -e ".[test]" && pytest tests
```

Use it in a recipe as `scorer: {{name: {name}, params: {{batch_size: 8}}}}`.
'''


def scaffold_plugin(name: str, out: Path | None = None) -> Path:
    """Write the plugin package ``name`` into ``out`` (default ``./resp-<name>``); returns it."""
    if not PLUGIN_NAME.match(name):
        raise RespError(f"NAME: {name!r} must be 2-41 lower-case letters, digits or underscores, starting with "
                        "a letter (it is the name recipes use)")
    dist = "resp-" + name.replace("_", "-")
    package = "resp_" + name
    folder = Path(out) if out is not None else Path(dist)
    if folder.exists():
        raise RespError(f"--out: {folder} already exists (nothing was written)")
    cls = "".join(part.capitalize() for part in name.split("_")) + "Scorer"
    fmt = dict(name=name, dist=dist, package=package, cls=cls, group=ENTRY_POINT_GROUP, resp_dist=DISTRIBUTION)
    files = {
        "pyproject.toml": PYPROJECT.format(**fmt),
        "README.md": README.format(**fmt),
        f"{package}/__init__.py": f'"""The {name} RESP plugin."""\n',
        f"{package}/plugin.py": PLUGIN.format(**fmt),
        "tests/test_plugin.py": TEST.format(**fmt),
    }
    tmp = folder.with_name(folder.name + ".partial")
    if tmp.exists():
        raise RespError(f"--out: {tmp} exists (left by an interrupted run); remove it first")
    try:
        for rel, text in files.items():
            path = tmp / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        tmp.rename(folder)
    except OSError as exc:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise RespError(f"--out: cannot write {folder} ({exc.strerror or exc})") from None
    return folder
