"""``respctl compare --executor ray``: each pruning path a Ray task on a local Ray instance (CPU),
the same results as the serial executor for the same seeds, stop / continue in the same folder."""

from __future__ import annotations

import json
import importlib.util

import pytest
from typer.testing import CliRunner

from resp_core.cli import app
from resp_core.compare import CompareRecipe, path_resources
from resp_core.errors import RespError
from resp_core.executors import make_executor

from test_compare import compare_recipe, write

runner = CliRunner()


def _recipe(model_dir):
    return compare_recipe(model_dir, seeds=(0,), methods=[
        {"label": "GISP", "scorer": {"name": "gisp"}},
        {"label": "magnitude", "scorer": {"name": "magnitude"}},
    ])


def test_resources_follow_the_recipe(tiny_model_dir):
    data = _recipe(tiny_model_dir)
    cmp = CompareRecipe.model_validate(data)
    assert path_resources(cmp, "GISP") == {"num_gpus": 0, "num_cpus": 1}
    gpu = CompareRecipe.model_validate({**data, "model": {"path": str(tiny_model_dir), "device": "cuda"},
                                        "generator": {"name": "vllm", "params": {"tensor_parallel_size": 2}}})
    assert path_resources(gpu, "GISP") == {"num_gpus": 2, "num_cpus": 1}
    with pytest.raises(RespError, match="--executor"):
        make_executor("dask")
    with pytest.raises(RespError, match="--address: only with --executor ray"):
        make_executor("serial", "auto")


@pytest.fixture(scope="module")
def local_ray():
    if importlib.util.find_spec("ray") is None:
        pytest.skip("ray is not installed (pip install 'resp-pruning[ray]')")
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _rows(folder):
    res = json.loads((folder / "results.json").read_text())
    return sorted((r["method"], r["target"], r["metric"], r["sparsity"], r["parameters"], r["mean"],
                   json.dumps(r["per_seed"], sort_keys=True)) for r in res["rows"])


def test_ray_and_serial_give_identical_results_and_continue(tmp_path, tiny_model_dir, local_ray):
    recipe = write(tmp_path, _recipe(tiny_model_dir))
    serial, distributed = tmp_path / "serial", tmp_path / "ray"
    r = runner.invoke(app, ["compare", str(recipe), "--out", str(serial)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["compare", str(recipe), "--out", str(distributed), "--executor", "ray"])
    assert r.exit_code == 0, r.output
    assert "Ray task" in r.output
    assert _rows(serial) == _rows(distributed)
    for slug in ("gisp", "magnitude"):  # each path's run folder written by its task, in the same layout
        assert json.loads((distributed / "runs" / slug / "run.json").read_text())["status"] == "finished"
    masks_a = sorted(p.name for p in (serial / "runs" / "gisp" / "masks").iterdir())
    assert masks_a == sorted(p.name for p in (distributed / "runs" / "gisp" / "masks").iterdir())

    # stop / continue: an interrupted path is run again by the next call, finished ones are kept
    kept = (distributed / "runs" / "gisp" / "metrics.json").stat().st_mtime_ns
    info = distributed / "runs" / "magnitude" / "run.json"
    info.write_text(json.dumps({**json.loads(info.read_text()), "status": "running"}))
    r = runner.invoke(app, ["compare", str(recipe), "--out", str(distributed), "--executor", "ray"])
    assert r.exit_code == 0, r.output
    assert (distributed / "runs" / "gisp" / "metrics.json").stat().st_mtime_ns == kept
    assert json.loads(info.read_text())["status"] == "finished"
    assert _rows(serial) == _rows(distributed)
