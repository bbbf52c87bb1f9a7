"""The real SmolLM2-135M-Instruct, pruned end to end from its GGUF file (skipped when the file is absent).

The shipped ``recipes/smollm2-resp.yaml``, shrunk to one RESP step to 10% on two self-generated
traces, runs on the GGUF file; the compacted model it saves loads back with ``load_pruned`` and
its logits on a real chat prompt equal the masked model's (the ``masked`` export) within 1e-4.
The file is fetched by hand (README, "Real model"), never by a test.
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

REPO = Path(__file__).resolve().parents[1]
SMOLLM2 = Path(os.environ.get("RESP_SMOLLM2_GGUF", REPO / ".models" / "SmolLM2-135M-Instruct.Q4_1.gguf"))

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not SMOLLM2.is_file(), reason=f"SmolLM2 GGUF not present at {SMOLLM2} (fetch it as the "
                       "README's 'Real model' section says, or set RESP_SMOLLM2_GGUF)"),
]


def test_smollm2_pruned_compacted_equals_masked_and_reloads(tmp_path):
    pytest.importorskip("gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import resp_core

    recipe = yaml.safe_load((REPO / "recipes" / "smollm2-resp.yaml").read_text())
    recipe["model"]["path"] = str(SMOLLM2)
    recipe["task"] = {"name": "word_arith"}  # offline: no GSM8K files needed
    recipe["calibration"]["params"].update(num_samples=2, sampling={"temperature": 0.6, "max_new_tokens": 8,
                                                                    "enable_thinking": False})
    recipe["schedule"]["params"] = {"target": 0.1, "steps": 1, "milestones": [0.1], "regenerate_fraction": 0.0}
    recipe["evaluation"] = {"evaluate_dense": False, "evaluators": []}
    recipe["output"] = {"formats": ["compacted", "masked"]}
    path = tmp_path / "smollm2.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", str(path), "--out", str(out)])
    assert result.exit_code == 0, result.output

    info = json.loads((out / "run.json").read_text())
    assert info["compaction_max_abs_logit_diff"] <= 1e-4
    rows = json.loads((out / "metrics.json").read_text())
    assert abs(rows[-1]["sparsity"] - 0.1) < 0.01

    tok = AutoTokenizer.from_pretrained(out / "model")
    enc = tok.apply_chat_template([{"role": "user", "content": "What is 7 + 5?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    compacted = resp_core.load_pruned(out / "model").eval()
    masked = AutoModelForCausalLM.from_pretrained(out / "export" / "final-masked").eval()
    cfg = masked.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == \
        ("llama", 30, 9, 3)
    n_compacted = sum(p.numel() for p in compacted.parameters())
    n_masked = sum(p.numel() for p in masked.parameters())
    assert n_compacted < n_masked
    with torch.no_grad():
        a = compacted(**enc).logits
        b = masked(**enc).logits
    assert torch.isfinite(a).all()
    assert (a - b).abs().max().item() <= 1e-4
