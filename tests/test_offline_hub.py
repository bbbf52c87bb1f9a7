"""Offline, a hub look-up fails once, at once, in one line that says the machine is offline and
which field takes a local copy — for a model id (``convert``, a recipe's ``model.path``) and for
hub datasets (``c4`` / ``wikitext`` calibration without ``local_path``).  "Offline" is
``HF_HUB_OFFLINE`` set, or the hub's endpoint refusing the connection (here a closed port on the
loopback address: nothing leaves this machine)."""

from __future__ import annotations

import time

import pytest
from typer.testing import CliRunner

from resp_core import hub
from resp_core.cli import app
from test_cli import assert_user_error, small_recipe, write

runner = CliRunner()


@pytest.fixture(params=["HF_HUB_OFFLINE set", "hub unreachable"])
def offline(request, monkeypatch):
    """Each way of being offline, with every flag the hub libraries read restored afterwards."""
    import datasets.config
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", constants.HF_HUB_OFFLINE)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", datasets.config.HF_HUB_OFFLINE)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    hub._probe.cache_clear()
    if request.param == "HF_HUB_OFFLINE set":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # discard port: refused at once
    yield request.param
    hub._probe.cache_clear()


def test_offline_reason_names_the_cause(offline):
    reason = hub.offline_reason()
    assert reason == "HF_HUB_OFFLINE is set" if offline == "HF_HUB_OFFLINE set" else "127.0.0.1:9 cannot be reached" in reason


def test_convert_of_a_hub_id_is_one_line_at_once(offline, tmp_path):
    started = time.perf_counter()
    result = runner.invoke(app, ["convert", "no-such-org-xyz/no-such-model", str(tmp_path / "out")])
    assert_user_error(result, "model.path", "no-such-org-xyz/no-such-model", "offline", "local folder")
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert time.perf_counter() - started < 20  # no retry loop (it waited about 30 s before)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("source", ["c4", "wikitext"])
def test_generic_text_without_local_path_is_refused_by_validate(offline, tmp_path, tiny_model_dir, source):
    recipe = small_recipe(tiny_model_dir)
    recipe["calibration"] = {"name": source, "params": {"num_samples": 2}}
    recipe["scorer"] = {"name": "wanda_sp"}
    recipe["allocator"] = {"name": "uniform"}
    result = runner.invoke(app, ["validate", str(write(tmp_path, recipe))])
    assert_user_error(result, "calibration", "offline", "calibration.params.local_path")
    assert len(result.output.strip().splitlines()) == 1, result.output
