"""Artifacts: the atomic writers, canonical safetensors, mask files, and the trace cache's integrity."""

from __future__ import annotations

import errno
import json
import os
import signal

import pytest
import torch

from resp_core.atomic_io import atomic_dir, atomic_file, atomic_write_text, write_json
from resp_core.errors import RespError, RunFailed
from resp_core.interfaces import Completion, Generator, Progress, RunContext
from resp_core.model.adapter import Geometry, adapter_for
from resp_core.model.masks import MaskSet
from resp_core.model.structures import StructureSpec, build_structures
from resp_core.rundir import RunDir
from resp_core.safetensors_io import safetensors_bytes
from resp_plugins.calibration.self_generated import SelfGenerated
from resp_plugins.tasks import testbed_arith

from conftest import tiny_qwen3


def _mode() -> str:
    m = os.umask(0o022)
    os.umask(m)
    return oct(0o666 & ~m)


def _leftovers(folder):
    return [p.name for p in folder.rglob(".*") if ".tmp-" in p.name or ".old-" in p.name]


# --------------------------------------------------------------------------------------------------
# atomic writes
# --------------------------------------------------------------------------------------------------

def test_atomic_write_replaces_whole_and_failure_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "sub" / "metrics.json"
    write_json(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}
    assert oct(target.stat().st_mode & 0o777) == _mode()

    import resp_core.atomic_io as rd

    def full(fd, data):
        os.write(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(rd, "_write_all", full)
    with pytest.raises(RunFailed, match=r"could not write .*metrics.json: No space left on device"):
        write_json(target, {"a": 2, "b": list(range(100))})
    assert json.loads(target.read_text()) == {"a": 1}  # the old content, whole
    assert _leftovers(tmp_path) == []


def test_a_write_killed_before_its_rename_leaves_the_old_file(tmp_path):
    target = tmp_path / "report.md"
    atomic_write_text(target, "old\n")
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.environ["RESP_TEST_KILL_AT"] = "write:1"
        try:
            atomic_write_text(target, "new\n" * 1000)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == -signal.SIGKILL
    assert target.read_text() == "old\n"
    assert len(_leftovers(tmp_path)) == 1
    RunDir(tmp_path).remove_temporaries()
    assert _leftovers(tmp_path) == [] and target.read_text() == "old\n"


def test_atomic_dir_appears_whole_or_not_at_all(tmp_path):
    out = tmp_path / "model"
    with atomic_dir(out) as tmp:
        assert not out.exists()
        (tmp / "config.json").write_text("{}")
        fd = os.open(tmp / "weights.bin", os.O_WRONLY | os.O_CREAT, 0o600)  # a writer that makes 0600 files
        os.write(fd, b"1234")
        os.close(fd)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "weights.bin"]
    assert {oct(p.stat().st_mode & 0o777) for p in out.iterdir()} == {_mode()}
    with pytest.raises(ValueError):
        with atomic_dir(out) as tmp:
            (tmp / "config.json").write_text('{"half": true}')
            raise ValueError("writer died")
    assert (out / "config.json").read_text() == "{}" and (out / "weights.bin").read_bytes() == b"1234"
    with atomic_dir(out) as tmp:  # replacing an existing folder
        (tmp / "config.json").write_text('{"v": 2}')
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]
    assert _leftovers(tmp_path) == []


def test_atomic_file_keeps_the_suffix_for_writers_that_read_it(tmp_path):
    with atomic_file(tmp_path / "plot.png") as tmp:
        assert tmp.suffix == ".png" and tmp.parent == tmp_path
        tmp.write_bytes(b"png")
    assert (tmp_path / "plot.png").read_bytes() == b"png"
    assert oct((tmp_path / "plot.png").stat().st_mode & 0o777) == _mode()


# --------------------------------------------------------------------------------------------------
# safetensors and masks
# --------------------------------------------------------------------------------------------------

def test_safetensors_bytes_are_canonical_and_load_with_the_library(tmp_path):
    from safetensors import safe_open

    tensors = {"b": torch.arange(6, dtype=torch.float32).reshape(2, 3), "a": torch.tensor([True, False]),
               "c": torch.ones(3, dtype=torch.bfloat16)}
    one = safetensors_bytes(tensors, {"z": "1", "a": "2", "m": "3"})
    two = safetensors_bytes(dict(reversed(list(tensors.items()))), {"m": "3", "a": "2", "z": "1"})
    assert one == two
    assert int.from_bytes(one[:8], "little") % 8 == 0
    (tmp_path / "t.safetensors").write_bytes(one)
    with safe_open(str(tmp_path / "t.safetensors"), "pt") as fh:
        assert fh.metadata() == {"z": "1", "a": "2", "m": "3"}
        for k, v in tensors.items():
            assert torch.equal(fh.get_tensor(k), v)


def test_mask_files_byte_identical_and_load_errors_are_one_line(tmp_path):
    g = Geometry(num_layers=3, hidden_size=8, num_heads=4, num_kv_heads=2, head_dim=2, intermediate_size=5)
    m = MaskSet.full(g)
    m.mlp_channel[1, 2] = False
    m.save(tmp_path / "a.safetensors", {"step": 1, "target": 0.1, "sparsity": 0.09})
    m.save(tmp_path / "b.safetensors", {"sparsity": 0.09, "target": 0.1, "step": 1})
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    assert oct((tmp_path / "a.safetensors").stat().st_mode & 0o777) == _mode()
    assert MaskSet.load(tmp_path / "a.safetensors", g) == m
    other = Geometry(num_layers=3, hidden_size=8, num_heads=4, num_kv_heads=2, head_dim=2, intermediate_size=7)
    with pytest.raises(RespError, match="intermediate_size=5, the model has intermediate_size=7"):
        MaskSet.load(tmp_path / "a.safetensors", other)
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(RespError, match="bad.safetensors: not a readable mask file"):
        MaskSet.load(tmp_path / "bad.safetensors", g)
    with pytest.raises(RespError, match="does not exist"):
        MaskSet.load(tmp_path / "missing.safetensors", g)


# --------------------------------------------------------------------------------------------------
# trace cache
# --------------------------------------------------------------------------------------------------

class Scripted(Generator):
    """Answers every prompt with a fixed trace; counts calls."""

    def __init__(self, tok):
        self.tok, self.calls = tok, 0

    def generate(self, conversations, sampling, progress=None, description=""):
        self.calls += 1
        text = "<think>\nsteps\n</think>\n\nThe answer is 7."
        return [Completion(self.tok(c[0]["content"])["input_ids"], self.tok(text)["input_ids"], text, True)
                for c in conversations]


class Log(Progress):
    def __init__(self):
        self.lines = []

    def log(self, message):
        self.lines.append(message)


@pytest.fixture
def cache_setup(testbed_tokenizer, tmp_path):
    tok = testbed_tokenizer
    model = tiny_qwen3(vocab=len(tok))
    adapter = adapter_for(model)
    task = testbed_arith.TestbedArithmetic()
    gen, log = Scripted(tok), Log()
    ctx = RunContext(model=model, tokenizer=tok, adapter=adapter, structures=build_structures(adapter, StructureSpec()),
                     generator=gen, tasks=lambda name=None, params=None: task, seed=0, progress=log)
    params = SelfGenerated.Params(num_samples=8, cache_dir=str(tmp_path / "cache"))
    first = SelfGenerated(params).build(ctx)
    assert gen.calls == 1
    (cache,) = (tmp_path / "cache").glob("traces-*.jsonl")
    return ctx, params, gen, log, cache, first


def _rebuild(ctx, params, log):
    log.lines.clear()
    return SelfGenerated(params).build(ctx)


def test_intact_cache_is_used(cache_setup):
    ctx, params, gen, log, cache, first = cache_setup
    header = json.loads(cache.read_text().splitlines()[0])
    assert header["count"] == 8 and len(header["sha256"]) == 64
    again = _rebuild(ctx, params, log)
    assert gen.calls == 1 and [s.target_ids for s in again] == [s.target_ids for s in first]
    assert any("Loaded cached traces" in line for line in log.lines)


def _edit(cache, change):
    lines = cache.read_text().splitlines(keepends=True)
    cache.write_text("".join(change(lines)))


@pytest.mark.parametrize("damage, reason", [
    (lambda lines: lines[:5], "it holds 4 traces, its header says 8"),  # truncated to 4 of 8 traces
    (lambda lines: lines[:-1] + [lines[-1][: len(lines[-1]) // 2]], "the last line is cut"),  # half-written
    (lambda lines: [lines[0].replace('"temperature": 0.6', '"temperature": 0.9')] + lines[1:],
     "header's 'sampling' differs"),  # changed header
    (lambda lines: [lines[0]] + [lines[1].replace("steps", "STEPS")] + lines[2:], "sha256"),  # edited trace
    (lambda lines: ["{not json\n"] + lines[1:], "header line is not valid JSON"),
])
def test_damaged_cache_is_regenerated_with_a_warning_naming_the_file(cache_setup, damage, reason):
    ctx, params, gen, log, cache, first = cache_setup
    _edit(cache, damage)
    again = _rebuild(ctx, params, log)
    assert gen.calls == 2  # generated again
    assert len(again) == 8 and [s.target_ids for s in again] == [s.target_ids for s in first]
    warnings = [line for line in log.lines if line.startswith("warning:")]
    assert len(warnings) == 1 and str(cache) in warnings[0] and reason in warnings[0], warnings
    # the file was replaced by a good one: used as is next time
    _rebuild(ctx, params, log)
    assert gen.calls == 2 and not any(line.startswith("warning:") for line in log.lines)
