"""The authors' protocol behind RESP's named options: GISP's gold-thinking data, Wanda-sp's
sequential statistics and packed windows, one-shot-per-target comparisons, ``init_from`` and
``mode: paper``.  Tiny random models and hand-checkable tensors."""

from __future__ import annotations

import math
import torch

from resp_core.interfaces import CalibrationSample, CalibrationSet, Progress, RunContext
from resp_core.model.adapter import adapter_for
from resp_core.model.structures import StructureSpec, build_structures
from resp_plugins.calibration.self_generated import SelfGenerated
from resp_plugins.calibration.task_data import TaskData, pack_windows
from resp_plugins.generators.hf import HFGenerator
from resp_plugins.scorers.taylor import GISPScorer, TaylorScorer
from resp_plugins.tasks import testbed_arith

from conftest import tiny_qwen3


def _model(tok, seed=0):
    m = tiny_qwen3(seed=seed, vocab=len(tok))
    for cfg in (m.config, m.generation_config):
        cfg.eos_token_id, cfg.pad_token_id = tok.eos_token_id, tok.pad_token_id
    return m


def _ctx(tok, model=None, spec=None, generator=None):
    model = model or _model(tok)
    adapter = adapter_for(model)
    task = testbed_arith.TestbedArithmetic()
    if generator is not None:
        generator.bind(model, tok)
    return RunContext(model=model, tokenizer=tok, adapter=adapter,
                      structures=build_structures(adapter, spec or StructureSpec(attention="q_head")),
                      generator=generator, tasks=lambda name=None, params=None: task, seed=0, progress=Progress())


# --------------------------------------------------------------------------------------------------
# GISP = RESP's scorer on gold-thinking data
# --------------------------------------------------------------------------------------------------


def test_gisp_loss_mask_equals_resp_on_the_same_prompt_and_target(testbed_tokenizer):
    tok = testbed_tokenizer
    ctx = _ctx(tok, generator=HFGenerator(HFGenerator.Params(batch_size=4)))
    gold = TaskData(TaskData.Params(num_samples=4)).build(ctx)
    traces = SelfGenerated(SelfGenerated.Params(num_samples=4, sampling={"max_new_tokens": 4})).build(ctx)
    # the same prompts, token for token: thinking-mode chat template, generation prompt added
    assert [s.prompt_ids for s in gold] == [s.prompt_ids for s in traces]
    assert all(tok.decode(s.prompt_ids).endswith("<|im_start|>assistant\n") for s in gold)
    # the gold target is the task's reference solution plus EOS
    items = ctx.tasks().items("train", 4, 0)
    assert [tok.decode(s.target_ids) for s in gold] == [it.reference + tok.eos_token for it in items]
    # same prompt and target: GISP's and RESP's labels agree position by position
    same = [CalibrationSample(t.prompt_ids, g.target_ids) for t, g in zip(traces, gold)]
    gisp_loss, resp_loss = GISPScorer().params.loss, TaylorScorer().params.loss
    a = next(CalibrationSet(gold, tok.pad_token_id).batches(4, gisp_loss))
    b = next(CalibrationSet(same, tok.pad_token_id).batches(4, resp_loss))
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
    for row, s in enumerate(gold):  # prompt masked, target labelled
        n = len(s.prompt_ids)
        assert (a.labels[row, :n] == -100).all()
        assert a.labels[row, n: n + len(s.target_ids)].tolist() == s.target_ids
    # so the two scorers give the same scores on the same data
    calib = CalibrationSet(gold, tok.pad_token_id)
    sg = GISPScorer().score(ctx, calib).values
    sr = TaylorScorer().score(ctx, calib).values
    for kind in ("q_head", "mlp_channel"):
        assert torch.equal(sg[kind], sr[kind])


def test_task_data_keeps_the_previous_gisp_reachable(testbed_tokenizer):
    tok = testbed_tokenizer
    ctx = _ctx(tok)
    old = TaskData(TaskData.Params(num_samples=2, enable_thinking=False)).build(ctx)
    assert all(tok.decode(s.prompt_ids).endswith("<think>\n\n</think>\n\n") for s in old)
    full = next(CalibrationSet(old, tok.pad_token_id).batches(2, GISPScorer(GISPScorer.Params(loss="full")).params.loss))
    assert (full.labels[0, : len(old[0].prompt_ids)] != -100).all()


def test_gsm8k_reference_annotations_keep_or_strip():
    from resp_plugins.tasks.gsm8k import GSM8K

    row = {"question": "q?", "answer": "He has 2*3=<<2*3=6>>6 apples.\n#### 6"}
    for annotations, want in (("keep", row["answer"]), ("strip", "He has 2*3=6 apples.\n#### 6")):
        task = GSM8K(GSM8K.Params(reference_annotations=annotations))
        task._rows["train"] = [row]
        assert task.items("train", 1, 0)[0].reference == want


def test_pack_windows_cuts_the_token_stream():
    samples = [CalibrationSample([1, 2], [3, 4, 5]), CalibrationSample([6], [7, 8, 9, 10, 11])]
    windows = pack_windows(samples, 4)
    assert [w.target_ids for w in windows] == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11]]
    assert all(w.prompt_ids == [] for w in windows)
    calib = CalibrationSet(windows, 0)
    assert calib.target_token_count("decode") == 3 + 3 + 2  # every token after the first is a target


# --------------------------------------------------------------------------------------------------
# Wanda-sp: sequential statistics through the already-pruned earlier layers
# --------------------------------------------------------------------------------------------------


def _random_calibration(n=3, length=10, vocab=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return CalibrationSet([CalibrationSample([], torch.randint(3, vocab, (length + k,), generator=g).tolist())
                           for k in range(n)], pad_id=0)


def test_sequential_stats_see_the_pruned_earlier_layers():
    import copy

    from resp_core.activations import collect_input_stats
    from resp_core.model.masks import MaskSet, apply_mask

    model = tiny_qwen3(seed=1)
    adapter = adapter_for(model)
    g = adapter.geometry
    calib = _random_calibration()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dense = collect_input_stats(model, adapter, calib, sites=("o", "down"))
    # layer 1 loses query head 0 and MLP channels 0..5; nothing else is removed
    removed = MaskSet.full(g)
    removed.q_head[1, 0] = False
    removed.mlp_channel[1, :6] = False
    seen = []

    def decide(i, stats):
        seen.append(i)
        if i != 1:
            return None
        e = removed.effective()
        return {"o": e.q_head[1].repeat_interleave(g.head_dim), "down": e.mlp_channel[1]}

    seq = collect_input_stats(model, adapter, calib, sites=("o", "down"), sequential=True, decide=decide)
    assert seen == [0, 1, 2, 3]
    for k, v in before.items():  # nothing in the model changed
        assert torch.equal(model.state_dict()[k], v)
    # layers 0 and 1 are measured before layer 1 is pruned: the dense statistics
    for i in (0, 1):
        for site in ("o", "down"):
            assert torch.allclose(seq[(i, site)].sum_sq, dense[(i, site)].sum_sq)
    # layer 2 sees the pruned layer 1: different from dense, equal to the masked model's statistics
    assert not torch.allclose(seq[(2, "o")].sum_sq, dense[(2, "o")].sum_sq)
    manual_model = copy.deepcopy(model)
    manual_adapter = adapter_for(manual_model)
    apply_mask(manual_adapter, removed)
    manual = collect_input_stats(manual_model, manual_adapter, calib, sites=("o", "down"), layers=[2, 3])
    for i in (2, 3):
        for site in ("o", "down"):
            assert seq[(i, site)].count == manual[(i, site)].count
            assert torch.allclose(seq[(i, site)].sum_sq, manual[(i, site)].sum_sq, rtol=1e-5, atol=1e-7)
            assert torch.allclose(seq[(i, site)].sum, manual[(i, site)].sum, rtol=1e-5, atol=1e-7)


def test_sequential_wanda_equals_layer_by_layer_manual_pruning():
    import copy

    from resp_core.activations import collect_input_stats
    from resp_core.interfaces import Scores
    from resp_core.model.masks import MaskSet, apply_mask
    from resp_plugins.allocators.global_rank import UniformPerLayer
    from resp_plugins.scorers.activation_based import WandaSP, unit_scores, wanda_channel_metric

    model = tiny_qwen3(seed=2)
    adapter = adapter_for(model)
    g = adapter.geometry
    spec = StructureSpec(attention="q_head", protected_layers=(0,))
    structures = build_structures(adapter, spec)
    calib = _random_calibration(seed=3)
    allocator = UniformPerLayer()
    ctx = RunContext(model=model, tokenizer=None, adapter=adapter, structures=structures, generator=None,
                     tasks=None, mask=MaskSet.full(g), target=0.5, allocator=allocator)
    scorer = WandaSP(WandaSP.Params(sequential=True, batch_size=2))
    scores = scorer.score(ctx, calib)
    mask = allocator.allocate(scores, structures, MaskSet.full(g), 0.5)
    # by hand: layer i scored on the model whose layers < i carry the final mask
    for i in (1, 2, 3):
        partial = MaskSet.full(g)
        for kind in ("q_head", "mlp_channel"):
            partial[kind][:i] = mask[kind][:i]
        m = copy.deepcopy(model)
        ad = adapter_for(m)
        apply_mask(ad, partial)
        st = collect_input_stats(m, ad, calib, sites=("o", "down"), layers=[i])
        attn = wanda_channel_metric(ad.attention_input(i).weight, st[(i, "o")].norm())
        mlp = wanda_channel_metric(ad.mlp_input(i).weight, st[(i, "down")].norm())
        want = unit_scores(g, attn[None], mlp[None])
        assert torch.allclose(scores.values["q_head"][i], want["q_head"][0], rtol=1e-5)
        assert torch.allclose(scores.values["mlp_channel"][i], want["mlp_channel"][0], rtol=1e-5)
        # and the allocator's choice for that layer is the uniform one on those scores
        alone = allocator.allocate(Scores({k: v.expand(g.num_layers, -1).clone() for k, v in want.items()
                                           if k in ("q_head", "mlp_channel")}), structures, MaskSet.full(g), 0.5)
        assert torch.equal(alone.q_head[i], mask.q_head[i]) and torch.equal(alone.mlp_channel[i], mask.mlp_channel[i])
    assert not bool(mask.q_head[0].logical_not().any())  # protected layer untouched
    # layer 2's scores differ from one-pass (dense) statistics
    dense = WandaSP(WandaSP.Params(batch_size=2)).score(ctx, calib)
    assert not torch.allclose(dense.values["mlp_channel"][2], scores.values["mlp_channel"][2])


def test_sequential_wanda_needs_a_per_layer_allocator(tmp_path):
    import pytest

    from resp_core.errors import RespError
    from resp_core.recipe import Recipe
    from resp_core.resolve import resolve

    base = {"name": "x", "calibration": {"name": "task_data"}, "structures": {"attention": "q_head"},
            "scorer": {"name": "wanda_sp", "params": {"sequential": True}},
            "schedule": {"name": "oneshot", "params": {"target": 0.2}}}
    with pytest.raises(RespError, match=r"scorer.params.sequential: needs an allocator that decides layer by layer"):
        resolve(Recipe.model_validate(base))
    resolve(Recipe.model_validate(dict(base, allocator={"name": "uniform"})))


# --------------------------------------------------------------------------------------------------
# respctl compare: a one-shot method is one run per sparsity, each from the dense model
# --------------------------------------------------------------------------------------------------


def test_compare_oneshot_method_runs_once_per_sparsity_from_dense(tmp_path, tiny_model_dir):
    import json

    from safetensors import safe_open
    from test_compare import compare_recipe, runner, write

    from resp_core.cli import app

    methods = [{"label": "Wanda", "scorer": {"name": "wanda_sp", "params": {"sequential": True}},
                "allocator": {"name": "uniform"}, "schedule": {"name": "oneshot"}},
               {"label": "GISP", "scorer": {"name": "gisp"}}]
    recipe = compare_recipe(tiny_model_dir, methods=methods, seeds=(0,))
    recipe["structures"] = {"attention": "q_head", "mlp": "channel"}
    out = tmp_path / "cmp"
    result = runner.invoke(app, ["compare", str(write(tmp_path, recipe)), "--out", str(out)])
    assert result.exit_code == 0, result.output
    for s in ("0.20", "0.40"):
        run = out / "runs" / "wanda" / s
        assert json.loads((run / "run.json").read_text())["status"] == "finished"
        masks = sorted(p.name for p in (run / "masks").iterdir())
        assert masks == [f"milestone_{s}.safetensors", "step_01.safetensors"]  # one step, from dense
        with safe_open(str(run / "masks" / "step_01.safetensors"), "pt") as f:
            assert float(f.metadata()["target"]) == float(s)
        assert (run / "models" / f"milestone_{s}").is_dir()
    assert (out / "runs" / "gisp" / "run.json").is_file()  # the others keep one nested path
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert sorted(r["target"] for r in rows if r["method"] == "Wanda" and r["metric"].endswith("/accuracy")) == [0.2, 0.4]
    # extending with a seed evaluates the saved one-shot models
    result = runner.invoke(app, ["compare", str(write(tmp_path, recipe)), "--out", str(out), "--seeds", "0,1"])
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert all(r["n_seeds"] == 2 for r in rows if r["method"] == "Wanda")


def test_compare_oneshot_takes_no_schedule_fields(tmp_path, tiny_model_dir):
    from test_compare import compare_recipe, runner, write

    from resp_core.cli import app

    methods = [{"label": "Wanda", "scorer": {"name": "wanda_sp"}, "allocator": {"name": "uniform"},
                "schedule": {"name": "oneshot", "steps": 3}}]
    result = runner.invoke(app, ["validate", str(write(tmp_path, compare_recipe(tiny_model_dir, methods=methods)))])
    assert result.exit_code == 2 and "methods[0].schedule: a one-shot method takes no other schedule fields" in result.output
    methods[0]["schedule"] = {"name": "cosine"}
    result = runner.invoke(app, ["validate", str(write(tmp_path, compare_recipe(tiny_model_dir, methods=methods)))])
    assert result.exit_code == 2 and "methods[0].schedule.name: 'cosine' is not one of progressive, oneshot" in result.output


# --------------------------------------------------------------------------------------------------
# init_from: a run continues from a saved run's mask (the paper's Table 3 path)
# --------------------------------------------------------------------------------------------------


def _run_dict(model_dir, **over) -> dict:
    recipe = {
        "name": "tiny", "seed": 0, "model": {"path": str(model_dir)}, "task": {"name": "testbed_arith"},
        "structures": {"attention": "q_head", "mlp": "channel"},
        "generator": {"name": "hf", "params": {"batch_size": 8}},
        "calibration": {"name": "self_generated", "params": {"num_samples": 4, "sampling": {"max_new_tokens": 6}}},
        "scorer": {"name": "resp"},
        "schedule": {"name": "progressive", "params": {"target": 0.4, "steps": 4, "milestones": [0.2, 0.4],
                                                        "regenerate_fraction": 0.0}},
        "evaluation": {"evaluate_dense": False, "evaluators": []},
        "output": {"save_model": False},
    }
    recipe.update(over)
    return recipe


def _cli_run(tmp_path, recipe: dict, out):
    import yaml
    from typer.testing import CliRunner

    from resp_core.cli import app

    path = tmp_path / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return CliRunner().invoke(app, ["run", str(path), "--out", str(out)])


def _mask(path):
    from safetensors.torch import load_file

    return {k: v.bool() for k, v in load_file(str(path)).items()}


def test_init_from_continues_after_the_saved_milestone(tmp_path, tiny_model_dir):
    import json

    base = tmp_path / "base"
    assert _cli_run(tmp_path, _run_dict(tiny_model_dir), base).exit_code == 0
    saved = base / "masks" / "milestone_0.20.safetensors"
    # rho = 0 from the saved 20% mask: the same path as the source run from there on
    same = tmp_path / "rho0"
    result = _cli_run(tmp_path, _run_dict(tiny_model_dir, init_from=str(saved)), same)
    assert result.exit_code == 0, result.output
    info = json.loads((same / "run.json").read_text())
    assert info["init_from"]["milestone"] == 0.2 and info["init_from"]["position"] == 0.2
    assert info["init_from"]["source_step"] == "2" and info["init_from"]["source_name"] == "tiny"
    assert sorted(p.name for p in (same / "masks").iterdir()) == [
        "milestone_0.40.safetensors", "step_03.safetensors", "step_04.safetensors"]  # steps 0.1, 0.2 skipped
    for name in ("step_03.safetensors", "step_04.safetensors"):
        a, b = _mask(same / "masks" / name), _mask(base / "masks" / name)
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert (same / "calibration" / "generation_00.jsonl").read_text() == (base / "calibration" / "generation_00.jsonl").read_text()
    assert not (same / "calibration" / "generation_01.jsonl").exists()
    # rho = 0.5 at the saved milestone: half the traces regenerated once by the 20% model, then on to 40%
    half = tmp_path / "rho05"
    sched = _run_dict(tiny_model_dir)["schedule"]
    sched["params"]["regenerate_overrides"] = {0.2: 0.5}
    result = _cli_run(tmp_path, _run_dict(tiny_model_dir, init_from=str(saved), schedule=sched), half)
    assert result.exit_code == 0, result.output
    g0 = [json.loads(x) for x in (half / "calibration" / "generation_00.jsonl").read_text().splitlines()]
    g1 = [json.loads(x) for x in (half / "calibration" / "generation_01.jsonl").read_text().splitlines()]
    assert sum(a["target_ids"] != b["target_ids"] or a["meta"] != b["meta"] for a, b in zip(g0, g1)) == 2
    start = _mask(saved)
    step3 = _mask(half / "masks" / "step_03.safetensors")
    assert all(bool((~step3[k] | start[k]).all()) for k in start)  # nested on the saved mask
    assert not (half / "metrics.json").exists() or all(r["target"] > 0.2 for r in json.loads((half / "metrics.json").read_text()))


def test_init_from_bad_inputs_are_one_line(tmp_path, tiny_model_dir):
    from test_compare import runner, write  # noqa: F401  (CLI helpers)

    missing = tmp_path / "runs" / "x" / "masks" / "milestone_0.30.safetensors"
    out = tmp_path / "bad"
    result = _cli_run(tmp_path, _run_dict(tiny_model_dir, init_from=str(missing)), out)
    assert result.exit_code == 2 and "init_from:" in result.output and "does not exist" in result.output
    assert not out.exists()
    # a mask made for another geometry
    from resp_core.model.adapter import Geometry
    from resp_core.model.masks import MaskSet

    other = tmp_path / "other.safetensors"
    MaskSet.full(Geometry(2, 16, 4, 2, 4, 24)).save(other, {"target": 0.2})
    result = _cli_run(tmp_path, _run_dict(tiny_model_dir, init_from=str(other)), out)
    assert result.exit_code == 2 and "other.safetensors" in result.output and not out.exists()


# --------------------------------------------------------------------------------------------------
# mode: paper
# --------------------------------------------------------------------------------------------------


def test_paper_mode_fills_what_the_recipe_leaves_unset():
    from resp_core.recipe import parse_recipe

    data = {"name": "x", "mode": "paper", "task": {"name": "gsm8k"},
            "structures": {"attention": "kv_group"},  # explicit: kept, reported
            "calibration": {"name": "task_data", "params": {"num_samples": 8}},
            "scorer": {"name": "gisp", "params": {"loss": "full"}},  # explicit: kept, reported
            "schedule": {"name": "progressive", "params": {"target": 0.4, "milestones": [0.2, 0.3]}},
            "evaluation": {"evaluators": [{"name": "lm_eval"}]}}
    r = parse_recipe(data)
    assert (r.structures.attention, r.structures.sparsity_basis, r.structures.protect_rounding) == \
        ("kv_group", "all_blocks", "floor")
    assert r.scorer.params == {"loss": "full", "reduction": "batch_token_mean"}
    assert r.task.params == {"prompt_suffix": "", "reference_annotations": "keep"}
    assert r.schedule.params["step_size"] == 0.0063 and r.schedule.params["milestones_on"] == "reached"
    assert r.schedule.params["grid_end"] == 0.7 and r.allocator.params == {"threshold": "kthvalue", "budget": "count"}
    assert r.evaluation.evaluators[0].params["tasks"] == ["resp_gsm8k_cot_paper"]
    assert r.allocator.name == "global"
    proto = r.protocol()
    assert proto["kept"] == {"structures.attention": {"recipe": "kv_group", "paper": "q_head"},
                             "scorer.params.loss": {"recipe": "full", "paper": "decode"}}
    assert proto["applied"]["structures.sparsity_basis"] == "all_blocks"
    assert proto["applied"]["scorer.params.reduction"] == "batch_token_mean"
    # default mode: nothing filled
    plain = parse_recipe(dict(data, mode="default"))
    assert plain.structures.sparsity_basis == "prunable_blocks" and plain.protocol() == {}
    # a spacing the recipe sets is kept (steps, step_size and grid_end are one setting)
    data["schedule"]["params"]["steps"] = 4
    r = parse_recipe(data)
    assert "step_size" not in r.schedule.params and r.schedule.params["steps"] == 4
    assert r.protocol()["kept"]["schedule.params.step_size"] == {"recipe": {"steps": 4}, "paper": 0.0063}
    assert r.protocol()["kept"]["schedule.params.grid_end"] == {"recipe": {"steps": 4}, "paper": 0.7}
    assert r.allocator.params == {"threshold": "kthvalue"}  # no fixed grid: the parameter budget stays


def test_paper_mode_wanda_gets_the_authors_protocol():
    from resp_core.compare import parse_compare
    from resp_core.recipe import parse_recipe

    run = parse_recipe({"name": "w", "mode": "paper", "calibration": {"name": "task_data"},
                        "scorer": {"name": "wanda_sp"}, "schedule": {"name": "oneshot", "params": {"target": 0.2}}})
    assert run.allocator.name == "uniform" and run.scorer.params == {"sequential": True}
    assert run.calibration.params["pack"] == 256
    cmp = parse_compare({"name": "c", "mode": "paper", "calibration": {"name": "task_data", "params": {"num_samples": 8}},
                         "sparsities": [0.2, 0.3], "evaluators": [{"name": "task_accuracy"}],
                         "methods": [{"label": "Wanda", "scorer": {"name": "wanda_sp"}},
                                     {"label": "GISP", "scorer": {"name": "gisp"}},
                                     {"label": "RESP", "scorer": {"name": "resp"}, "schedule": {"steps": 3}}]}, "c")
    wanda, gisp, resp = cmp.methods
    assert wanda.schedule == {"name": "oneshot"} and wanda.allocator.name == "uniform"
    assert wanda.calibration.params == {"num_samples": 8, "format": "chat", "enable_thinking": True, "pack": 256}
    assert wanda.scorer.params == {"sequential": True}
    assert gisp.calibration is None and gisp.scorer.params == {"reduction": "batch_token_mean", "loss": "decode"}
    assert gisp.schedule == {"step_size": 0.0063, "milestones_on": "reached", "grid_end": 0.7}
    assert gisp.allocator.params == {"threshold": "kthvalue", "budget": "count"}
    assert resp.schedule == {"steps": 3, "milestones_on": "reached"}
    kept = cmp.protocol()["kept"]
    assert kept["methods[RESP].schedule.step_size"] == {"recipe": {"steps": 3}, "paper": 0.0063}
    assert cmp.protocol()["applied"]["methods[Wanda].schedule.name"] == "oneshot"


def test_paper_mode_is_recorded_in_the_run(tmp_path, tiny_model_dir):
    import json

    import yaml

    out = tmp_path / "paper"
    recipe = _run_dict(tiny_model_dir, mode="paper", calibration={"name": "task_data", "params": {"num_samples": 4}},
                       scorer={"name": "gisp"})
    result = _cli_run(tmp_path, recipe, out)
    assert result.exit_code == 0, result.output
    info = json.loads((out / "run.json").read_text())
    assert info["mode"] == "paper"
    assert info["protocol"]["applied"]["scorer.params.loss"] == "decode"
    assert "structures.attention" not in info["protocol"]["kept"]  # explicit and equal to the authors'
    assert info["protocol"]["kept"]["schedule.params.step_size"] == {"recipe": {"steps": 4}, "paper": 0.0063}
    saved = yaml.safe_load((out / "recipe.yaml").read_text())
    assert saved["mode"] == "paper" and saved["structures"]["sparsity_basis"] == "all_blocks"
    assert saved["scorer"]["params"]["reduction"] == "batch_token_mean"


def test_compare_method_starts_from_an_earlier_methods_milestone(tmp_path, tiny_model_dir):
    import json

    from test_compare import compare_recipe, runner, write

    from resp_core.cli import app

    self_gen = {"name": "self_generated", "params": {"num_samples": 4, "sampling": {"max_new_tokens": 6}}}
    methods = [{"label": "RESP w/o regen", "scorer": {"name": "resp"}, "calibration": self_gen},
               {"label": "rho=0.5", "scorer": {"name": "resp"}, "calibration": self_gen,
                "init_from": {"method": "RESP w/o regen", "milestone": 0.2},
                "schedule": {"regenerate_fraction": 0.0, "regenerate_overrides": {0.2: 0.5}}}]
    recipe = compare_recipe(tiny_model_dir, methods=methods, seeds=(0,))
    recipe["mode"] = "paper"
    recipe["steps"] = 2
    out = tmp_path / "t3"
    result = runner.invoke(app, ["compare", str(write(tmp_path, recipe)), "--out", str(out)])
    assert result.exit_code == 0, result.output
    info = json.loads((out / "runs" / "rho-0-5" / "run.json").read_text())
    assert info["init_from"]["path"] == str(out / "runs" / "resp-w-o-regen" / "masks" / "milestone_0.20.safetensors")
    assert info["mode"] == "paper" and info["protocol"]["applied"]["scorer.params.reduction"] == "batch_token_mean"
    assert "structures.sparsity_basis" in info["protocol"]["applied"]
    assert (out / "runs" / "rho-0-5" / "calibration" / "generation_01.jsonl").is_file()
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert sorted(r["target"] for r in rows if r["method"] == "rho=0.5" and r["metric"].endswith("/accuracy")) == [0.4]
    # a method may only start from one listed before it, at one of the sparsities
    bad = dict(recipe, methods=[methods[1], methods[0]])
    result = runner.invoke(app, ["validate", str(write(tmp_path, bad))])
    assert result.exit_code == 2 and "methods[0].init_from.method: 'RESP w/o regen' is not a method listed before" in result.output


# --------------------------------------------------------------------------------------------------
# Every shipped recipe validates (Qwen3-8B: its config from a stand-in hub cache, CUDA assumed)
# --------------------------------------------------------------------------------------------------

QWEN3_8B_CONFIG = {  # Qwen/Qwen3-8B config.json (the fields RESP reads)
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 4096, "intermediate_size": 12288,
    "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
    "vocab_size": 151936, "max_position_embeddings": 40960, "rms_norm_eps": 1e-06, "rope_theta": 1000000,
    "tie_word_embeddings": False, "attention_bias": False, "hidden_act": "silu", "bos_token_id": 151643,
    "eos_token_id": 151645, "torch_dtype": "bfloat16",
}


def test_every_shipped_recipe_validates(tmp_path, monkeypatch):
    import json
    from pathlib import Path

    from huggingface_hub import constants
    from typer.testing import CliRunner

    from resp_core import preflight
    from resp_core.cli import app
    from resp_core.testbed.generic_text import write_generic_text

    repo = Path(__file__).resolve().parents[1]
    snap = tmp_path / "hub" / "models--Qwen--Qwen3-8B" / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(json.dumps(QWEN3_8B_CONFIG))
    (tmp_path / "hub" / "models--Qwen--Qwen3-8B" / "refs").mkdir()
    (tmp_path / "hub" / "models--Qwen--Qwen3-8B" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(preflight, "check_device", lambda device, field="model.device": None)  # no GPU here
    import importlib.util

    real_find_spec = importlib.util.find_spec  # nor vLLM: the GPU machine these recipes are for has it
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "vllm" else real_find_spec(name, *a))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    write_generic_text(tmp_path / "runs" / "generic.txt")  # the baselines' offline generic text
    recipes = (sorted((repo / "recipes").glob("testbed-*.yaml")) + sorted((repo / "recipes").glob("qwen3-*.yaml"))
               + sorted((repo / "recipes" / "paper").glob("*.yaml")))
    assert len(recipes) >= 15
    for path in recipes:
        result = CliRunner().invoke(app, ["validate", str(path)])
        assert result.exit_code == 0, f"{path.name}: {result.output}"
    for name in ("qwen3-8b-table1-gsm8k", "qwen3-8b-table1-mathqa", "qwen3-8b-gsm8k-resp", "qwen3-8b-table3-rho"):
        assert "mode: paper" in (repo / "recipes" / f"{name}.yaml").read_text()


def test_uniform_allocator_can_land_on_the_target_sparsity():
    from resp_core.interfaces import Scores
    from resp_core.model.masks import MaskSet, sparsity_of
    from resp_plugins.allocators.global_rank import UniformPerLayer

    model = tiny_qwen3(seed=5, layers=4, heads=6, kv=3, inter=48)
    adapter = adapter_for(model)
    g = adapter.geometry
    structures = build_structures(adapter, StructureSpec(attention="q_head", sparsity_basis="all_blocks",
                                                         protect_rounding="floor"))
    gen = torch.Generator().manual_seed(0)
    scores = Scores({k: torch.rand(structures.costs[k].shape, generator=gen) for k in ("q_head", "mlp_channel")})
    full = MaskSet.full(g)
    units = UniformPerLayer().allocate(scores, structures, full, 0.3)
    assert sparsity_of(units, structures) < 0.3  # a per-layer unit fraction: protected layer, K/V uncounted
    on = UniformPerLayer(UniformPerLayer.Params(target_on="sparsity"))
    for target in (0.2, 0.3, 0.4):
        m = on.allocate(scores, structures, full, target)
        reached = sparsity_of(m, structures)
        one_more = (structures.costs["q_head"][0, 0] + structures.costs["mlp_channel"][0, 0]) * g.num_layers
        assert target <= reached < target + float(one_more) / structures.basis_total()
        removed = [(~m.mlp_channel[i]).sum().item() for i in range(g.num_layers)]
        assert len(set(removed[:-1])) == 1 and removed[-1] == 0  # uniform over the unprotected layers


def test_validate_reports_what_paper_mode_filled_and_kept(tmp_path):
    import yaml
    from typer.testing import CliRunner

    from resp_core.cli import app

    recipe = {"name": "p", "mode": "paper", "structures": {"attention": "kv_group"},
              "calibration": {"name": "task_data"}, "scorer": {"name": "resp"},
              "schedule": {"name": "progressive", "params": {"target": 0.2, "steps": 2}}}
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 0, result.output
    # structures: 3 + min_keep, reduction, milestones_on, task, allocator threshold
    assert "mode paper: 8 settings set to the authors' protocol" in result.output
    assert "structures.attention = kv_group (authors': q_head)" in result.output


def test_mathqa_paper_prompt_and_reference():
    from resp_plugins.tasks.mathqa import MathQA

    row = {"Problem": "what is 2+2 ?", "Rationale": '"2 + 2 = 4 answer : b"', "correct": "b",
           "options": "a ) 3 , b ) 4 , c ) 5 , d ) 6 , e ) 7"}
    task = MathQA(MathQA.Params(prompt_format="paper"))
    task._rows["train"] = [row]
    item = task.items("train", 1, 0)[0]
    assert item.messages[0]["content"] == "Question: what is 2+2 ?\nOptions: a ) 3 , b ) 4 , c ) 5 , d ) 6 , e ) 7\nAnswer:"
    assert item.reference == '"2 + 2 = 4 answer : b"' and item.answer == "b"
    ours = MathQA()
    ours._rows["train"] = [row]
    assert ours.items("train", 1, 0)[0].reference == "2 + 2 = 4 answer : b\n#### b"


def test_regenerated_trace_count_rounds_or_takes_the_authors_ceiling():
    """rho of n traces: the nearest count by default, ``ceil(n * rho)`` as the authors' update_data
    computes it (uncc-efficient-ai/RESP data_refresh_GISP.py); paper mode sets the ceiling."""
    from resp_core.paper import PLUGIN_PARAMS
    from resp_plugins.calibration.self_generated import regenerated_count

    assert regenerated_count(0.6, 64) == 38 and regenerated_count(0.6, 64, "ceil") == 39
    assert regenerated_count(0.5, 64, "ceil") == 32 and regenerated_count(1.0, 64, "ceil") == 64
    assert regenerated_count(0.0, 64, "ceil") == 0 and regenerated_count(0.01, 10, "ceil") == 1
    assert [regenerated_count(r, 10, "ceil") for r in (0.1, 0.2, 0.3)] == [math.ceil(10 * r) for r in (0.1, 0.2, 0.3)]
    assert PLUGIN_PARAMS[("calibration", "self_generated")] == {"regenerate_rounding": "ceil"}
