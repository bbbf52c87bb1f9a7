"""Model loading a user expects: a local folder, a hub id, a GGUF file (dequantized by transformers'
own GGUF support), ``respctl convert`` to a safetensors folder, and one line for every bad input.

GGUF tests write a tiny random llama GGUF (byte-level BPE tokenizer, chat template) with the
``gguf`` package, so they run offline in seconds.  The real SmolLM2-135M-Instruct GGUF is used
only when it is present (``RESP_SMOLLM2_GGUF`` or ``.models/SmolLM2-135M-Instruct.Q4_1.gguf``;
fetch it with the command in the README's "Real model" section).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from resp_core.cli import app
from resp_core.errors import RespError
from resp_core.loading import load_model_and_tokenizer
from resp_core.recipe import ModelSection

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]
SMOLLM2 = Path(os.environ.get("RESP_SMOLLM2_GGUF", REPO / ".models" / "SmolLM2-135M-Instruct.Q4_1.gguf"))


def write_tiny_gguf(path: Path, arch: str = "llama", layers: int = 2, hidden: int = 32, heads: int = 4,
                    kv: int = 2, inter: int = 48, seed: int = 0) -> Path:
    """A tiny random llama-layout GGUF with a byte-level BPE tokenizer and a chat template."""
    import numpy as np

    gguf = pytest.importorskip("gguf")
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    rng = np.random.default_rng(seed)
    tokens = list(bytes_to_unicode().values()) + ["Ġt", "he", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = len(tokens)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny-test")
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(inter)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_dimension_count(hidden // heads)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([1] * (vocab - 3) + [3, 3, 3])
    w.add_token_merges(["Ġ t", "h e"])
    w.add_bos_token_id(vocab - 3)
    w.add_eos_token_id(vocab - 1)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

    def t(*shape):
        return (0.2 * rng.standard_normal(shape)).astype(np.float32)

    hd = hidden // heads
    w.add_tensor("token_embd.weight", t(vocab, hidden))
    w.add_tensor("output_norm.weight", 1 + t(hidden))
    w.add_tensor("output.weight", t(vocab, hidden))
    for i in range(layers):
        for name, shape in (("attn_norm", (hidden,)), ("ffn_norm", (hidden,))):
            w.add_tensor(f"blk.{i}.{name}.weight", 1 + t(*shape))
        for name, shape in (("attn_q", (heads * hd, hidden)), ("attn_k", (kv * hd, hidden)),
                            ("attn_v", (kv * hd, hidden)), ("attn_output", (hidden, heads * hd)),
                            ("ffn_gate", (inter, hidden)), ("ffn_up", (inter, hidden)), ("ffn_down", (hidden, inter))):
            w.add_tensor(f"blk.{i}.{name}.weight", t(*shape))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    pytest.importorskip("accelerate")
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


IDS = torch.tensor([[5, 70, 120, 257, 83, 9]])


@torch.no_grad()
def _logits(model):
    return model(input_ids=IDS).logits


def test_gguf_loads_by_path_and_by_gguf_file(tiny_gguf):
    a, tok = load_model_and_tokenizer(ModelSection(path=str(tiny_gguf)))
    b, _ = load_model_and_tokenizer(ModelSection(path=str(tiny_gguf.parent), gguf_file=tiny_gguf.name))
    assert type(a).__name__ == "LlamaForCausalLM" and a.config.num_key_value_heads == 2
    assert tok.chat_template and tok.eos_token == "<|im_end|>" and tok.padding_side == "left"
    assert tok.pad_token is not None
    torch.testing.assert_close(_logits(a), _logits(b), atol=0, rtol=0)
    assert torch.isfinite(_logits(a)).all()


def test_convert_gguf_to_a_plain_folder(tiny_gguf, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "hf"
    result = runner.invoke(app, ["convert", str(tiny_gguf), str(out)])
    assert result.exit_code == 0, result.output
    assert "written to" in result.output
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "llama" and "quantization_config" not in cfg
    gguf_model, gguf_tok = load_model_and_tokenizer(ModelSection(path=str(tiny_gguf)))
    plain = AutoModelForCausalLM.from_pretrained(out).eval()  # plain transformers, no gguf_file
    torch.testing.assert_close(_logits(plain), _logits(gguf_model), atol=0, rtol=0)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok("the cat")["input_ids"] == gguf_tok("the cat")["input_ids"]
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == \
        gguf_tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    # an existing output folder is refused, nothing touched
    result = runner.invoke(app, ["convert", str(tiny_gguf), str(out)])
    assert result.exit_code == 2 and "already exists" in result.output


def test_convert_piped_prints_no_third_party_bars(tiny_gguf, tmp_path):
    """Off a terminal the output is RESP's lines only: transformers' GGUF de-quantizing bar (tqdm,
    which reads TQDM_DISABLE when torch first imports it) stays out."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
    proc = subprocess.run([sys.executable, "-m", "resp_core.cli", "convert", str(tiny_gguf), str(tmp_path / "hf")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "written to" in proc.stdout
    assert "de-quantizing" not in proc.stdout + proc.stderr and "it/s" not in proc.stdout + proc.stderr


def test_run_on_a_gguf_model(tiny_gguf, tmp_path):
    """A recipe whose model.path is a GGUF file prunes, and its compacted model loads back."""
    from transformers import AutoModelForCausalLM

    recipe = yaml.safe_load((REPO / "recipes" / "testbed-resp.yaml").read_text())
    recipe["model"]["path"] = str(tiny_gguf)
    recipe["scorer"] = {"name": "magnitude"}
    recipe["structures"]["protect_first"] = 0.0
    recipe["structures"]["protect_last"] = 0
    recipe["calibration"]["params"].update(num_samples=2, sampling={"temperature": 0.6, "max_new_tokens": 4})
    recipe["evaluation"] = {"evaluate_dense": False, "evaluators": []}
    recipe["schedule"]["params"] = {"target": 0.2, "steps": 1, "milestones": [0.2]}
    recipe["output"] = {"formats": ["compacted", "masked"]}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "run"
    result = runner.invoke(app, ["run", str(path), "--out", str(out)])
    assert result.exit_code == 0, result.output
    info = json.loads((out / "run.json").read_text())
    assert info["compaction_max_abs_logit_diff"] <= 1e-5
    masked = AutoModelForCausalLM.from_pretrained(out / "export" / "final-masked").eval()
    compacted = AutoModelForCausalLM.from_pretrained(out / "model").eval()
    torch.testing.assert_close(_logits(compacted), _logits(masked), atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------------
# bad input: one line
# --------------------------------------------------------------------------------------------------

def _one_line(section: ModelSection, *fragments: str) -> str:
    with pytest.raises(RespError) as exc:
        load_model_and_tokenizer(section)
    msg = str(exc.value)
    assert "\n" not in msg, msg
    for f in fragments:
        assert f in msg, (f, msg)
    return msg


def test_bad_gguf_files(tiny_gguf, tmp_path):
    foo = write_tiny_gguf(tmp_path / "foo.gguf", arch="foo")
    _one_line(ModelSection(path=str(foo)), "architecture foo is not supported")
    data = tiny_gguf.read_bytes()
    (tmp_path / "half.gguf").write_bytes(data[: len(data) // 2])
    _one_line(ModelSection(path=str(tmp_path / "half.gguf")), "half.gguf")
    (tmp_path / "head.gguf").write_bytes(data[:200])
    _one_line(ModelSection(path=str(tmp_path / "head.gguf")), "head.gguf")
    (tmp_path / "rand.gguf").write_bytes(os.urandom(4096))
    _one_line(ModelSection(path=str(tmp_path / "rand.gguf")), "not a GGUF file")
    _one_line(ModelSection(path=str(tmp_path), gguf_file="missing.gguf"), "model.gguf_file", "does not exist")
    _one_line(ModelSection(path=str(tmp_path), gguf_file="../x.gguf"), "model.gguf_file")


def test_missing_gguf_package_is_one_line(tiny_gguf, monkeypatch):
    import importlib.util

    import resp_core.model_source as loading

    real = importlib.util.find_spec
    monkeypatch.setattr(loading.importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    _one_line(ModelSection(path=str(tiny_gguf)), "needs the 'gguf' package", "pip install 'resp-pruning[gguf]'")


def test_bad_folders(tmp_path, tiny_model_dir):
    import shutil

    (tmp_path / "empty").mkdir()
    _one_line(ModelSection(path=str(tmp_path / "empty")), "empty")

    def copy(name, drop=()):
        d = tmp_path / name
        shutil.copytree(tiny_model_dir, d)
        for f in drop:
            (d / f).unlink()
        return d

    notok = copy("no-tokenizer", drop=[p.name for p in tiny_model_dir.iterdir() if p.name.startswith("tokenizer")])
    _one_line(ModelSection(path=str(notok)), "tokenizer")
    rand = copy("random-bytes")
    (rand / "model.safetensors").write_bytes(os.urandom((rand / "model.safetensors").stat().st_size))
    _one_line(ModelSection(path=str(rand)), "model.safetensors")
    trunc = copy("truncated")
    data = (trunc / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(data[: len(data) // 2])
    _one_line(ModelSection(path=str(trunc)), "model.safetensors")
    noconf = copy("no-config", drop=["config.json"])
    _one_line(ModelSection(path=str(noconf)), "config.json")


def test_unsupported_architecture_folder_is_one_line(tmp_path, testbed_tokenizer):
    from transformers import Phi3Config, Phi3ForCausalLM

    Phi3ForCausalLM(Phi3Config(vocab_size=len(testbed_tokenizer), hidden_size=32, intermediate_size=48,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               pad_token_id=0)).save_pretrained(tmp_path)
    testbed_tokenizer.save_pretrained(tmp_path)
    _one_line(ModelSection(path=str(tmp_path)), "phi3")


# --------------------------------------------------------------------------------------------------
# the real model, when present
# --------------------------------------------------------------------------------------------------

@pytest.mark.skipif(not SMOLLM2.is_file(), reason=f"SmolLM2 GGUF not present at {SMOLLM2} (see the README's "
                    "'Real model' section, or set RESP_SMOLLM2_GGUF)")
def test_smollm2_gguf_converts_to_a_plain_folder(tmp_path):
    """One GGUF load (inside ``respctl convert``; converted == GGUF-loaded is checked on the tiny
    GGUF above), then the plain folder: the real geometry, a chat template, finite logits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "smollm2"
    result = runner.invoke(app, ["convert", str(SMOLLM2), str(out), "--dtype", "bfloat16"])
    assert result.exit_code == 0, result.output
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    cfg = model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads,
            cfg.num_key_value_heads, cfg.vocab_size) == ("llama", 30, 576, 9, 3, 49152)
    assert tok.chat_template
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 7 + 5?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()


def test_validate_reads_the_whole_gguf_layout(tiny_gguf, tmp_path, tiny_model_dir):
    """``validate`` finds a GGUF file cut anywhere (in the metadata, the tensor table, the data,
    or its last byte): one line naming the file, exit 2, before any weight is loaded."""
    from test_cli import assert_user_error, small_recipe, write

    data = tiny_gguf.read_bytes()
    for cut in (64, len(data) // 3, len(data) // 2, len(data) - 1):
        cut_file = tmp_path / f"cut{cut}.gguf"
        cut_file.write_bytes(data[:cut])
        recipe = small_recipe(tiny_model_dir)
        recipe["model"]["path"] = str(cut_file)
        result = runner.invoke(app, ["validate", str(write(tmp_path, recipe))])
        assert_user_error(result, "model.path", cut_file.name)
        assert len(result.output.strip().splitlines()) == 1, result.output
    result = runner.invoke(app, ["validate", str(write(tmp_path, {**small_recipe(tiny_model_dir),
                                                                  "model": {"path": str(tiny_gguf)}}))])
    assert result.exit_code == 0, result.output
