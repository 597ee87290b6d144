"""recipes/prune.py end to end (TP=2, export to HF, logits vs transformers), reuse of saved scores with a
parameter-budget search, and every validation error (one line, exit code 2, before any compute)."""

import csv
import sys

import pytest
import yaml

from conftest import ROOT, load_script, module_dir, run_py, run_torchrun


RECIPE = ROOT / "recipes" / "prune.py"
SMALL = ["prune.grid=16", "prune.calibration.num_samples=16", "prune.calibration.seq_length=32",
         "prune.calibration.micro_batch_size=4", "prune.calibration.loss_samples=8"]


@pytest.fixture(scope="module")
def work(small_llama, tmp_path_factory):
    return module_dir(small_llama, tmp_path_factory.mktemp("prune"))


@pytest.fixture(scope="module")
def pruned(work):
    """Width + depth prune at TP=2 with the contiguous-block depth criterion."""
    tmp, ckpt = work
    out = tmp / "pruned"
    p = run_torchrun(RECIPE, 2, f"checkpoint={ckpt}", f"output={out}", f"prune.calibration.data={tmp / 'calib.txt'}",
                     *SMALL, "prune.target_hidden_size=48", "prune.target_ffn_hidden_size=64",
                     "prune.target_num_attention_heads=2", "prune.target_num_layers=2",
                     "parallel.tensor_model_parallel_size=2")
    return out, p.stdout


def test_recipe_outputs_and_hf_export(work, pruned):
    tmp, ckpt = work
    out, stdout = pruned
    assert "[calibration]" in stdout and "samples/s" in stdout and "ETA" in stdout
    assert "[block-loss k=2]" in stdout
    mc = yaml.safe_load((out / "model.yaml").read_text())
    assert (mc["num_layers"], mc["hidden_size"], mc["ffn_hidden_size"], mc["num_attention_heads"],
            mc["num_query_groups"], mc["kv_channels"]) == (2, 48, 64, 2, 2, 24)
    for f in ("importance.safetensors", "importance.json", "importance.png"):
        assert (out / "prune" / f).is_file(), f
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    hf = tmp / "pruned_hf"
    run_py(ROOT / "recipes" / "export_hf.py", f"checkpoint={out}", f"output={hf}")
    cfg = yaml.safe_load((hf / "config.json").read_text())
    assert cfg["head_dim"] == 24 and cfg["hidden_size"] == 48
    p = run_py(ROOT / "tests" / "workers" / "logits_worker.py", out, hf, 1, 1, "1e-4")
    assert "max|logits diff|" in p.stdout


def test_reuse_scores_budget_search(work):
    """importance_only writes the scores; a budget search then reuses them without a calibration pass."""
    tmp, ckpt = work
    env = {"OMP_NUM_THREADS": "1"}
    scores = tmp / "scores_only"
    p = run_py(RECIPE, f"checkpoint={ckpt}", f"output={scores}", f"prune.calibration.data={tmp / 'calib.txt'}",
               *SMALL, "prune.importance_only=true", "prune.importance.batch_agg=mean", env=env)
    assert "[calibration]" in p.stdout
    assert {f.name for f in scores.iterdir()} == {"importance.safetensors", "importance.json", "importance.png",
                                                  ".minitron_output.json"}  # + the output policy's manifest
    out = tmp / "budget"
    p = run_py(RECIPE, f"checkpoint={ckpt}", f"output={out}", f"prune.importance.load={scores}",
               f"prune.calibration.data={tmp / 'calib.txt'}", *SMALL, "prune.target_params_ratio=0.6",
               "prune.layer_criterion=bi", "prune.search.eval_samples=8", env=env)
    assert "[calibration]" not in p.stdout and "importance loaded from" in p.stdout
    assert "'batch': 'mean'" in p.stdout
    rows = list(csv.DictReader(open(out / "prune" / "candidates.csv")))
    assert 1 <= len(rows) <= 20 and (out / "prune" / "candidates.md").is_file()
    losses = [float(r["loss"]) for r in rows]
    assert losses == sorted(losses)
    best = rows[0]
    mc = yaml.safe_load((out / "model.yaml").read_text())
    for k in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads"):
        assert mc[k] == int(best[k]), (k, mc, best)
    src = yaml.safe_load((ckpt / "model.yaml").read_text())
    from minitron_nemo.models.builder import count_parameters
    from minitron_nemo.models.config import ModelConfig

    budget = 0.6 * count_parameters(ModelConfig.from_dict(src))
    for r in rows:
        assert abs(int(r["params"]) - budget) <= 0.05 * budget + 1


# ----------------------------------------------------------------------------- validation
ERRORS = [
    (["prune.target_hidden_size=128"], "is larger than the source hidden_size=64"),
    (["prune.target_num_attention_heads=3"], "is not a multiple of num_query_groups=2"),
    (["prune.target_num_query_groups=1", "parallel.tensor_model_parallel_size=2"],
     "not divisible by tensor_model_parallel_size=2"),
    (["prune.target_ffn_hidden_size=50"], "off the grid"),
    (["prune.target_hidden_size=40", "prune.grid=16"], "off the grid"),
    (["prune.target_num_layers=0"], "prune.target_num_layers=0; allowed: null or an integer >= 1"),
    (["prune.drop_layers=[1,2,3,4]"], "at least 1 layer"),
    (["prune.drop_layers=[5]"], "out of range"),
    (["prune.drop_layers=[0]"], "prune.drop_layers=0; allowed: an integer >= 1"),
    (["prune.drop_layers=[2,2]"], "more than once"),
    (["prune.drop_layers=[1]", "prune.target_num_layers=3"], "both set"),
    (["prune.target_num_layers=3", "parallel.pipeline_model_parallel_size=2"], "pipeline_model_parallel_size=2"),
    (["prune.target_num_query_groups=2", "prune.target_num_attention_heads=6"], "larger than the source"),
    (["prune.target_num_query_groups=1", "prune.target_num_attention_heads=4"], "exceeds the source's 2"),
    (["prune.target_params=1000"], "no architecture on the search grid"),
    (["prune.target_params_ratio=1.5"], "prune.target_params_ratio=1.5; allowed: a number with 0 < value <= 1"),
    (["prune.target_params_ratio=0.5", "prune.target_params=1000"], "both set"),
    (["prune.target_params_ratio=0.5", "prune.target_hidden_size=32"], "cannot be combined"),
    (["prune.search.axes=[depth]", "prune.target_params_ratio=0.5"], "prune.search.axes"),
    ([], "nothing to prune"),
    (["prune.target_num_layers=2", "prune.calibration.data=/nonexistent.txt"], "does not exist"),
    (["prune.target_num_layers=2", "prune.calibration.data=null"], "prune.calibration.data is required"),
    (["prune.target_num_layers=2", "prune.importance.load=/nonexistent"], "has no importance.safetensors"),
    (["prune.target_num_layers=2", "prune.importance.batch_agg=max"], "allowed: l2, mean, var"),
    (["prune.target_num_layers=2", "prune.layer_criterion=cosine"], "allowed: bi, loss, block"),
    (["prune.target_num_layers=2", "prune.calibration.num_samples=0"], "allowed: an integer >= 1"),
    (["prune.target_foo=3"], "config:"),
]


@pytest.mark.parametrize("overrides,message", ERRORS, ids=[" ".join(o) or "empty" for o, _ in ERRORS])
def test_validation_errors(work, overrides, message, capsys, monkeypatch):
    """Each error: SystemExit(2) from the entry point, one stderr line, and no compute started."""
    tmp, ckpt = work
    mod = load_script(RECIPE, "prune_recipe")

    def no_compute(*a, **k):
        raise AssertionError("validation passed: compute would start")

    monkeypatch.setattr(mod.runtime, "init_distributed", no_compute)
    base = [f"checkpoint={ckpt}", f"output={tmp / 'never'}"]
    if not any(o.startswith("prune.calibration.data") for o in overrides):
        base.append(f"prune.calibration.data={tmp / 'calib.txt'}")
    monkeypatch.setattr(sys, "argv", ["prune.py", *base, *overrides])
    with pytest.raises(SystemExit) as e:
        mod.main()
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp / "never").exists()


def test_loaded_scores_without_block_scores(work, pruned, capsys, monkeypatch):
    tmp, ckpt = work
    out1, _ = pruned  # saved scores hold block_loss_k2 only
    mod = load_script(RECIPE, "prune_recipe")
    monkeypatch.setattr(mod.runtime, "init_distributed", lambda *a, **k: (_ for _ in ()).throw(AssertionError()))
    monkeypatch.setattr(sys, "argv", ["prune.py", f"checkpoint={ckpt}", f"output={tmp / 'never'}",
                                      f"prune.importance.load={out1 / 'prune'}", "prune.target_num_layers=3"])
    with pytest.raises(SystemExit) as e:
        mod.main()
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "block_loss_k1" in err[0], err


def test_error_exit_code_in_a_real_process(work):
    tmp, ckpt = work
    p = run_py(RECIPE, f"checkpoint={ckpt}", f"output={tmp / 'never'}", "prune.target_hidden_size=4096",
               check=False)  # warnings on, as in a user's terminal
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "larger than the source" in lines[0] and "Traceback" not in p.stderr, p.stderr
