"""Bad input: one line on stderr, exit code 2, no traceback, existing outputs untouched.

The recipes run in this process (``conftest.run_main``); ``test_missing_paths`` runs them as real processes."""

import json

import pytest
import torch

from conftest import ROOT, run_main, run_py
from hf_models import make_hf_model


def assert_user_error(p, *needles):
    assert p.returncode == 2, (p.returncode, p.stdout[-2000:], p.stderr[-2000:])
    lines = [l for l in p.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    assert "Traceback" not in p.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
    return make_hf_model("llama", tmp_path_factory.mktemp("bad") / "hf_llama")


def recipe(name, *args, real_process=False):
    if real_process:
        return run_py(ROOT / "recipes" / name, *args, check=False, timeout=300)
    return run_main(ROOT / "recipes" / name, *args)


def test_missing_paths(tmp_path):
    for script, args in (("import_hf.py", [f"source={tmp_path}/nope", f"output={tmp_path}/o"]),
                         ("export_hf.py", [f"checkpoint={tmp_path}/nope", f"output={tmp_path}/o"]),
                         ("evaluate.py", [f"checkpoint={tmp_path}/nope", "eval.text_file=x"])):
        assert_user_error(recipe(script, *args, real_process=True), "nope")
    assert not (tmp_path / "o").exists()


def test_unsupported_architecture(tmp_path, hf_llama):
    bad = tmp_path / "gpt2"
    bad.mkdir()
    cfg = json.loads((hf_llama / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (bad / "config.json").write_text(json.dumps(cfg))
    assert_user_error(recipe("import_hf.py", f"source={bad}", f"output={tmp_path}/o"),
                      "GPT2LMHeadModel", "LlamaForCausalLM")


@pytest.mark.parametrize("override,needle", [
    ("parallel.tensor_model_parallel_size=3", "num_attention_heads=4"),
    ("parallel.pipeline_model_parallel_size=3", "num_layers=4"),
    ("parallel.bogus_key=1", "bogus_key"),
    ("dtype=float8", "float8"),
])
def test_bad_parallel_and_keys_keep_existing_output(tmp_path, hf_llama, override, needle):
    out = tmp_path / "existing"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert_user_error(recipe("import_hf.py", f"source={hf_llama}", f"output={out}", override), needle)
    assert (out / "keep.txt").read_text() == "precious" and len(list(out.iterdir())) == 1


def test_unknown_config_name():
    assert_user_error(recipe("import_hf.py", "--config-name", "nope", "source=x", "output=y"), "nope")


def test_interrupted_export_leaves_previous_output(tmp_path):
    """A write that fails half way leaves the old directory as it was and no partial output."""
    from minitron_nemo.checkpoint.export import save_hf_dir
    from minitron_nemo.models.config import ModelConfig

    mc = ModelConfig()
    out = tmp_path / "hf"
    out.mkdir()
    (out / "config.json").write_text("old")

    class Boom(dict):
        def items(self):
            yield "model.norm.weight", torch.ones(64)
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        save_hf_dir(mc, Boom(), out)
    assert (out / "config.json").read_text() == "old" and len(list(out.iterdir())) == 1


@pytest.mark.parametrize("script,args,needle", [
    ("distill.py", ["student.init=copy"], "student.init='copy'"),
    ("distill.py", ["student.loss=ce"], "student.loss='ce'"),
    ("evaluate.py", ["eval.perplexity=false", "eval.throughput.enabled=true", "eval.throughput.batch_size=0"],
     "eval.throughput.batch_size=0"),
    ("experiments/minitron_smollm2.py", ["scale=0"], "scale=0"),
])
def test_bad_values_of_baselines_evaluation_and_experiment(tmp_path, hf_llama, script, args, needle):
    base = {"distill.py": [f"workdir={tmp_path}/w", f"teacher.checkpoint={hf_llama}"],
            "evaluate.py": [f"checkpoint={hf_llama}", "eval.text_file=unused.txt"],
            "experiments/minitron_smollm2.py": [f"workdir={tmp_path}/w"]}[script]
    assert_user_error(recipe(script, *base, *args), needle)
    assert not (tmp_path / "w").exists()
