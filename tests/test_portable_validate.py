"""Recipes written for a GPU machine validate here with ``--portable``; without it the device
check refuses them in one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from resp_core.cli import app

runner = CliRunner()
RECIPES = sorted((Path(__file__).parents[1] / "recipes").glob("qwen3-8b-*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.name for p in RECIPES])
def test_gpu_recipes_validate_portably_in_paper_mode(recipe):
    res = runner.invoke(app, ["validate", "--portable", str(recipe)])
    assert res.exit_code == 0, res.output
    assert res.output.startswith("ok ")
    assert "mode paper" in res.output  # every Qwen3-8B recipe follows the authors' protocol


@pytest.mark.skipif(torch.cuda.is_available(), reason="the device check passes on a CUDA machine")
def test_gpu_recipe_without_portable_is_one_line(tmp_path):
    res = runner.invoke(app, ["validate", str(RECIPES[0])])
    assert res.exit_code == 2
    assert "model.device" in res.output and "Traceback" not in res.output
