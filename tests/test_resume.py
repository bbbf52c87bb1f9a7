"""Runs that survive: SIGKILL/SIGTERM then ``--resume`` to the same bytes, stale runs, determinism,
write failures, and an interrupted comparison that recomputes only its unfinished cells.

Each run here happens in a forked child process with one torch thread (the parent has already
imported torch and transformers, so a run costs only its own work): the child can be killed for
real (``RESP_TEST_KILL_AT``, the test hook in :mod:`resp_core.atomic_io`), and every run of a test
uses the same thread count, which float reductions depend on.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from resp_core.cli import app
from resp_core.run_record import effective_status, source_commit
from resp_core.rundir import CHECKPOINT_DIR

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")

runner = CliRunner()


def tiny_run_recipe(model_dir: Path, **overrides) -> dict:
    """Two steps, both milestones, regeneration of half the traces, dense evaluation, saved model."""
    recipe = yaml.safe_load((Path(__file__).parents[1] / "recipes" / "testbed-resp.yaml").read_text())
    recipe["model"]["path"] = str(model_dir)
    recipe["generator"]["params"] = {"batch_size": 8}
    recipe["calibration"]["params"].update(num_samples=6, sampling={"temperature": 0.6, "max_new_tokens": 10})
    recipe["evaluation"]["evaluators"][0]["params"] = {"num_items": 4, "sampling": {"max_new_tokens": 10}}
    recipe["schedule"]["params"].update(target=0.2, steps=2, milestones=[0.1, 0.2], regenerate_fraction=0.5)
    recipe.update(overrides)
    return recipe


@pytest.fixture(scope="module", autouse=True)
def _one_commit():
    """run.json records the checkout's commit, read once per process: read it here, so that every
    forked run records the same one even if the checkout gets a commit while the tests run."""
    source_commit()


def in_child(fn, env: dict | None = None) -> int:
    """Run ``fn() -> exit code`` in a forked child with one torch thread; its exit code
    (negative: killed by that signal)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 70
        try:
            import torch

            torch.set_num_threads(1)
            os.environ.update(env or {})
            code = int(fn() or 0)
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def cli(args: list[str], log: Path | None = None):
    def go():
        result = runner.invoke(app, args)
        if log is not None:
            log.write_text(result.output)
        return result.exit_code
    return go


def run_in_child(args: list[str], tmp_path: Path, env: dict | None = None, name: str = "log") -> tuple[int, str]:
    log = tmp_path / f"{name}.txt"
    code = in_child(cli(args, log), env)
    return code, log.read_text() if log.is_file() else ""


def digest(folder: Path) -> dict[str, tuple[str, str]]:
    """sha256 and mode of every file under ``folder``; run.json without its ``process`` object
    (pid, host, times: the only part that differs between two runs of one recipe and seed)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_dir():
            continue
        data = p.read_bytes()
        if p.name == "run.json":
            info = json.loads(data)
            assert list(info)[-1] == "process"
            info.pop("process")
            data = json.dumps(info).encode()
        out[str(p.relative_to(folder))] = (hashlib.sha256(data).hexdigest(), oct(p.stat().st_mode & 0o777))
    return out


@pytest.fixture(scope="module")
def recipe_file(tmp_path_factory, tiny_model_dir) -> Path:
    p = tmp_path_factory.mktemp("recipe") / "tiny.yaml"
    p.write_text(yaml.safe_dump(tiny_run_recipe(tiny_model_dir)))
    return p


@pytest.fixture(scope="module")
def reference(tmp_path_factory, recipe_file) -> dict:
    """An uninterrupted run of the tiny recipe."""
    tmp = tmp_path_factory.mktemp("reference")
    code, out = run_in_child(["run", str(recipe_file), "--out", str(tmp / "run")], tmp)
    assert code == 0, out
    return digest(tmp / "run")


def test_same_recipe_and_seed_twice_gives_the_same_bytes(tmp_path, recipe_file, reference):
    code, out = run_in_child(["run", str(recipe_file), "--out", str(tmp_path / "again")], tmp_path)
    assert code == 0, out
    again = digest(tmp_path / "again")
    assert again == reference
    files = set(reference)
    assert {"recipe.yaml", "run.json", "metrics.json", "masks/step_01.safetensors", "masks/milestone_0.20.safetensors",
            "calibration/generation_01.jsonl", "model/model.safetensors", "model/resp_pruning.json"} <= files
    assert not any(f.startswith(CHECKPOINT_DIR + "/") for f in files)  # checkpoints go when the run finishes
    assert {mode for _, mode in reference.values()} == {oct(0o666 & ~_umask())}
    info = json.loads((tmp_path / "again" / "run.json").read_text())
    assert info["status"] == "finished" and {"pid", "host", "heartbeat", "started", "seconds"} <= set(info["process"])


def _umask() -> int:
    m = os.umask(0o022)
    os.umask(m)
    return m


# kill points: before the first checkpoint (the first generation), during step 2's scoring, during the
# regeneration after milestone 1, during milestone 2's evaluation, during the final model save
@pytest.mark.parametrize("kill_at", ["generate:1", "score:2", "generate:2", "evaluate:3", "save:1"])
def test_sigkill_then_resume_is_bit_identical(tmp_path, recipe_file, reference, kill_at):
    run = tmp_path / "run"
    code, out = run_in_child(["run", str(recipe_file), "--out", str(run)], tmp_path, {"RESP_TEST_KILL_AT": kill_at})
    assert code == -signal.SIGKILL, out
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "running"
    assert effective_status(info)[0] == "stale"
    if kill_at == "save:1":  # the model folder appears whole or not at all
        assert not (run / "model").exists()
        assert list(run.glob(".model.tmp-*"))  # what the killed process left, removed on resume
    # a stale run is reported as such by report and --out, with the way to continue it
    for args in (["report", str(run)], ["run", str(recipe_file), "--out", str(run)]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and "stale" in result.output and "--resume" in result.output, result.output
    code, out = run_in_child(["run", "--resume", str(run)], tmp_path, name="resume")
    assert code == 0, out
    assert "resuming" in out or kill_at == "generate:1"
    assert digest(run) == reference
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "finished" and info["process"]["resumed_at_step"]


def test_resume_restores_weights_a_scorer_edited(tmp_path, tiny_model_dir):
    """FLAP adds output biases at every step: the checkpoint keeps the weights, biases included."""
    recipe = tiny_run_recipe(tiny_model_dir, scorer={"name": "flap"},
                             calibration={"name": "task_data", "params": {"num_samples": 4}})
    recipe["schedule"]["params"]["regenerate_fraction"] = 0.0
    recipe["evaluation"]["evaluate_dense"] = False
    path = tmp_path / "flap.yaml"
    path.write_text(yaml.safe_dump(recipe))
    code, out = run_in_child(["run", str(path), "--out", str(tmp_path / "whole")], tmp_path, name="whole")
    assert code == 0, out
    run = tmp_path / "run"
    code, out = run_in_child(["run", str(path), "--out", str(run)], tmp_path, {"RESP_TEST_KILL_AT": "score:2"})
    assert code == -signal.SIGKILL, out
    assert (run / CHECKPOINT_DIR / "step_01.weights.safetensors").is_file()
    code, out = run_in_child(["run", "--resume", str(run)], tmp_path, name="resume")
    assert code == 0, out
    assert digest(run) == digest(tmp_path / "whole")
    from safetensors import safe_open

    with safe_open(str(run / "model" / "model.safetensors"), "pt") as fh:
        assert any(k.endswith(("o_proj.bias", "down_proj.bias")) for k in fh.keys())


def test_sigterm_marks_interrupted_then_resumes(tmp_path, recipe_file, reference):
    run = tmp_path / "run"
    code, out = run_in_child(["run", str(recipe_file), "--out", str(run)], tmp_path,
                             {"RESP_TEST_KILL_AT": "score:2:TERM"})
    assert code == 128 + signal.SIGTERM, out
    lines = [ln for ln in out.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "interrupted by SIGTERM" in lines[0] and "--resume" in lines[0], out
    assert "Traceback" not in out
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "interrupted"
    assert sorted(p.name for p in (run / CHECKPOINT_DIR).iterdir()) == ["step_01.json", "step_01.mask.safetensors"]
    code, out = run_in_child(["run", "--resume", str(run)], tmp_path, name="resume")
    assert code == 0, out
    assert digest(run) == reference


def test_sigint_in_a_real_process_is_one_line(tmp_path, recipe_file):
    run = tmp_path / "run"
    env = {**os.environ, "RESP_TEST_KILL_AT": "evaluate:1:INT", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "resp_core.cli", "run", str(recipe_file), "--out", str(run)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 128 + signal.SIGINT, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("error:") and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert json.loads((run / "run.json").read_text())["status"] == "interrupted"


def test_resume_refuses_finished_running_and_foreign_folders(tmp_path, recipe_file):
    assert_one_line = lambda r, frag: (r.exit_code == 2 and frag in r.output and "Traceback" not in r.output)  # noqa: E731
    folder = tmp_path / "f"
    folder.mkdir()
    r = runner.invoke(app, ["run", "--resume", str(folder)])
    assert assert_one_line(r, "no run.json"), r.output
    r = runner.invoke(app, ["run", "--resume", str(tmp_path / "missing")])
    assert assert_one_line(r, "does not exist"), r.output
    (folder / "run.json").write_text(json.dumps({"status": "finished"}))
    r = runner.invoke(app, ["run", "--resume", str(folder)])
    assert assert_one_line(r, "already finished"), r.output
    # a live process (this one) with a fresh heartbeat: still running
    from resp_core.run_record import RunRecord

    rec = RunRecord(folder / "run.json", {"name": "x"})
    rec.write(status="running")
    r = runner.invoke(app, ["run", "--resume", str(folder)])
    assert assert_one_line(r, "still running"), r.output
    r = runner.invoke(app, ["run", str(recipe_file), "--resume", str(folder)])
    assert assert_one_line(r, "give only the run folder"), r.output
    # no heartbeat for long: stale even where the pid cannot be checked
    info = json.loads((folder / "run.json").read_text())
    info["process"].update(host="elsewhere", heartbeat="2000-01-01T00:00:00Z")
    (folder / "run.json").write_text(json.dumps(info))
    assert effective_status(info)[0] == "stale"
    r = runner.invoke(app, ["report", str(folder)])
    assert assert_one_line(r, "stale"), r.output


def test_disk_full_during_final_save_fails_cleanly_then_resumes(tmp_path, recipe_file, reference):
    run = tmp_path / "run"

    def full_disk_at_model_save():
        import resp_core.atomic_io as rd

        real = rd._fsync_path

        def fsync(path):
            if ".model.tmp-" in str(path):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            return real(path)

        rd._fsync_path = fsync
        return cli(["run", str(recipe_file), "--out", str(run)], tmp_path / "log.txt")()

    code = in_child(full_disk_at_model_save)
    out = (tmp_path / "log.txt").read_text()
    assert code == 2, out
    assert "Traceback" not in out
    lines = [ln for ln in out.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "No space left on device" in lines[0] and "model" in lines[0], out
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "failed" and "No space left" in info["error"]
    assert not (run / "model").exists() and not list(run.glob(".model*"))  # no half model, no temporaries
    before = digest(run)
    # everything written before the failure is intact: the same bytes as the reference run's
    for name, value in before.items():
        if name != "run.json" and not name.startswith(CHECKPOINT_DIR + "/"):
            assert reference[name] == value, name
    code, out = run_in_child(["run", "--resume", str(run)], tmp_path, name="resume")
    assert code == 0, out
    assert digest(run) == reference


@pytest.mark.parametrize("whole_folder", [False, True])
def test_read_only_folder_is_one_line_and_keeps_the_run(tmp_path, recipe_file, whole_folder):
    """masks/ read-only from step 2 on (run.json still writable: status failed), or the whole run
    folder (run.json cannot be marked either: the message says so, and the run reads as stale)."""
    run = tmp_path / "run"
    if not os.path.exists("/proc/self/fd"):
        pytest.skip("needs /proc/self/fd")

    def read_only():
        import resp_core.atomic_io as rd

        real = rd._write_all
        state = {"on": False}

        def write_all(fd, data):
            path = os.readlink(f"/proc/self/fd/{fd}")
            state["on"] = state["on"] or ("step_02" in path and "/masks/" in path)
            if state["on"] and (whole_folder or "/masks/" in path):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
            return real(fd, data)

        rd._write_all = write_all  # root ignores permission bits: simulate what the OS would say
        return cli(["run", str(recipe_file), "--out", str(run)], tmp_path / "log.txt")()

    code = in_child(read_only)
    out = (tmp_path / "log.txt").read_text()
    assert code == 2 and "Traceback" not in out, out
    lines = [ln for ln in out.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Read-only file system" in lines[0] and "step_02" in lines[0], out
    info = json.loads((run / "run.json").read_text())
    if whole_folder:
        assert "not marked failed: could not write" in lines[0] and "run.json" in lines[0], out
        assert info["status"] == "running" and effective_status(info)[0] == "stale"
    else:
        assert info["status"] == "failed" and "step_02" in info["error"]
    assert (run / "masks" / "step_01.safetensors").is_file() and not (run / "masks" / "step_02.safetensors").exists()
    assert not [p for p in run.rglob(".*") if ".tmp-" in p.name]


def test_out_in_an_unwritable_place_is_one_line_and_writes_nothing(tmp_path, recipe_file):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = runner.invoke(app, ["run", str(recipe_file), "--out", str(blocker / "run")])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert "cannot create run folder" in result.output
    assert blocker.read_text() == "x"


# --------------------------------------------------------------------------------------------------
# compare: killed mid-sweep, restarted: only unfinished cells recomputed, same bytes
# --------------------------------------------------------------------------------------------------

def compare_recipe(model_dir: Path) -> dict:
    return {
        "name": "tiny-compare", "model": {"path": str(model_dir)}, "task": {"name": "testbed_arith"},
        "structures": {"attention": "kv_group", "mlp": "channel"},
        "generator": {"name": "hf", "params": {"batch_size": 8}},
        "calibration": {"name": "task_data", "params": {"num_samples": 4}},
        "sparsities": [0.2, 0.4], "steps": 2, "seeds": [0, 1],
        "evaluators": [{"name": "task_accuracy", "params": {"num_items": 4, "sampling": {"max_new_tokens": 6}}}],
        "methods": [{"label": "GISP", "scorer": {"name": "gisp"}},
                    {"label": "Magnitude", "scorer": {"name": "magnitude"}}],
    }


def compare_digest(folder: Path) -> dict:
    # plots are re-rendered from results.json; image files may embed dates
    return {k: v for k, v in digest(folder).items() if not k.endswith((".png", ".pdf", ".svg"))}


@pytest.mark.parametrize("kill_at", ["score:3", "score:4"], ids=["in-first-step", "in-second-step"])
def test_compare_killed_mid_sweep_recomputes_only_unfinished_cells(tmp_path, tiny_model_dir, kill_at):
    """Dense evaluation, then GISP's two steps (score:1, score:2), killed in Magnitude's first step
    or its second: the restarted comparison keeps GISP, continues Magnitude from its last
    checkpoint (as ``respctl run --resume``) and ends byte-identical to an uncut sweep."""
    cmp = tmp_path / "cmp.yaml"
    cmp.write_text(yaml.safe_dump(compare_recipe(tiny_model_dir)))
    code, out = run_in_child(["compare", str(cmp), "--out", str(tmp_path / "whole")], tmp_path, name="whole")
    assert code == 0, out
    folder = tmp_path / "cut"
    code, out = run_in_child(["compare", str(cmp), "--out", str(folder)], tmp_path, {"RESP_TEST_KILL_AT": kill_at})
    assert code == -signal.SIGKILL, out
    done = folder / "runs" / "gisp"
    assert json.loads((done / "run.json").read_text())["status"] == "finished"
    kept = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in done.rglob("*") if p.is_file()}
    dense = (folder / "dense" / "metrics.json").stat().st_mtime_ns
    code, out = run_in_child(["compare", str(cmp), "--out", str(folder)], tmp_path, name="again")
    assert code == 0, out
    assert "Magnitude: continuing the unfinished run from its last checkpoint" in out, out
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in kept} == kept  # finished cells not recomputed
    assert (folder / "dense" / "metrics.json").stat().st_mtime_ns == dense
    assert compare_digest(folder) == compare_digest(tmp_path / "whole")


def test_compare_starts_a_run_again_when_it_cannot_be_continued(tmp_path, monkeypatch):
    from resp_core import pipeline
    from resp_core.compare import cells as compare
    from resp_core.errors import RespError, RunInterrupted

    run = tmp_path / "runs" / "m"
    said: list[str] = []
    assert not compare._continue_unfinished(run, "M", said.append, None)  # no checkpoint: start again
    (run / "resume").mkdir(parents=True)
    (run / "resume" / "step_00.json").write_text("{}")  # not a complete checkpoint: start again
    assert not compare._continue_unfinished(run, "M", said.append, None) and not said
    monkeypatch.setattr(pipeline, "latest_checkpoint", lambda run_dir: {"step": 0})  # a complete one

    def refuse(path, progress=None):
        raise RespError("run.json: held by a live process")

    monkeypatch.setattr(pipeline, "resume_run", refuse)
    assert not compare._continue_unfinished(run, "M", said.append, None)
    assert "cannot continue (run.json: held by a live process); starting it again" in said[-1]

    def interrupted(path, progress=None):
        raise RunInterrupted("interrupted by SIGINT", 2)

    monkeypatch.setattr(pipeline, "resume_run", interrupted)
    with pytest.raises(RunInterrupted):  # a stop while continuing stops the comparison, keeping the folder
        compare._continue_unfinished(run, "M", said.append, None)
