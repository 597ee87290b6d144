"""Iterative compression (minitron_nemo/workflows/stages.py): recipes/compress.py runs a two-stage chain on a tiny
random Llama and restarts it (finished stages skipped); the shipped chain configs have the papers'
shapes; launchers/submit.py renders a chain as dependent Slurm jobs; bad input is one line, exit code 2,
before anything runs."""

import json
import subprocess
import sys

import pytest
import yaml
from omegaconf import OmegaConf

from conftest import ROOT, load_script, module_dir, run_py


RECIPE = ROOT / "recipes" / "compress.py"
STAGE_A = "{name:a,prune:{target_hidden_size:48}}"
STAGE_B = "{name:b,prune:{target_ffn_hidden_size:64},teacher:source,overrides:['trainer.train_iters=3']}"


@pytest.fixture(scope="module")
def work(small_llama, tmp_path_factory):
    return module_dir(small_llama, tmp_path_factory.mktemp("compress"))


def job(tmp, ckpt, *extra, iters: int = 2, eval_interval: int = 1):
    """A chain on the session's tiny Llama (prune, then distil ``iters`` steps), plus ``extra`` overrides."""
    return ["--config-name", "smollm2_iterative", f"workdir={tmp / 'chain'}", f"teacher.checkpoint={ckpt}",
            "teacher.corrected_checkpoint=null", "~model", "teacher.max_loss_fraction=10", "teacher.held_out=false",
            "data=text", f"data.train_text={tmp / 'calib.txt'}", f"data.valid_text={tmp / 'valid.txt'}",
            f"data.test_text={tmp / 'valid.txt'}", "data.seq_length=32", "data.valid_samples=4", "data.test_tokens=256",
            "prune.grid=16", "prune.calibration.num_samples=8", "prune.calibration.seq_length=32",
            "prune.calibration.micro_batch_size=4", "prune.calibration.loss_samples=4", "trainer.micro_batch_size=2",
            "trainer.global_batch_size=2", f"trainer.train_iters={iters}", "trainer.warmup_iters=0",
            f"trainer.eval_interval={eval_interval}", "trainer.tensorboard=false", "checkpointing.save_interval=null", *extra]


@pytest.fixture(scope="module")
def chain(work):
    """Stage a alone, then the chain a -> b (a is finished and skipped), then the same chain again."""
    tmp, ckpt = work
    env = {"OMP_NUM_THREADS": "1"}
    p1 = run_py(RECIPE, *job(tmp, ckpt, f"stages=[{STAGE_A}]"), env=env)
    a = tmp / "chain" / "stages" / "a"
    before = (a / "distill" / "results.json").stat().st_mtime_ns
    p2 = run_py(RECIPE, *job(tmp, ckpt, f"stages=[{STAGE_A},{STAGE_B}]"), env=env)
    p3 = run_py(RECIPE, *job(tmp, ckpt, f"stages=[{STAGE_A},{STAGE_B}]"), env=env)
    return tmp, ckpt, (p1.stdout, p2.stdout, p3.stdout), before


@pytest.mark.e2e
def test_two_stage_chain(chain):
    tmp, ckpt, (out1, out2, _), _ = chain
    stages = tmp / "chain" / "stages"
    a_res = json.loads((stages / "a" / "distill" / "results.json").read_text())
    b_res = json.loads((stages / "b" / "distill" / "results.json").read_text())
    mc_a = yaml.safe_load((stages / "a" / "pruned" / "model.yaml").read_text())
    mc_b = yaml.safe_load((stages / "b" / "pruned" / "model.yaml").read_text())
    assert (mc_a["hidden_size"], mc_a["ffn_hidden_size"]) == (48, 96)   # stage a: hidden 64 -> 48
    assert (mc_b["hidden_size"], mc_b["ffn_hidden_size"]) == (48, 64)   # stage b: ffn of a's student 96 -> 64
    # b prunes a's distilled student and (teacher: source) is distilled by it
    assert json.loads((stages / "b" / "pruned" / "meta.json").read_text())["pruned_from"] == a_res["final_checkpoint"]
    b_meta = json.loads((ROOT / b_res["final_checkpoint"] / "meta.json").read_text())
    assert b_meta["distilled_from"] == a_res["final_checkpoint"]
    a_meta = json.loads((ROOT / a_res["final_checkpoint"] / "meta.json").read_text())
    assert a_meta["distilled_from"] == str(ckpt)   # a: the original teacher
    assert b_res["final_checkpoint"].endswith("iter_0000003")   # b's own override: 3 iterations
    rows = json.loads((stages / "summary.json").read_text())
    assert [r["stage"] for r in rows] == ["a", "b"] and [r["train_tokens"] for r in rows] == [2 * 2 * 32, 3 * 2 * 32]
    assert rows[0]["params"] > rows[1]["params"]
    assert "stage 1/1 a" in out1 and "[compress] distill.py" in out1
    assert json.loads((stages / "a" / "stage.json").read_text())["prune"]["target_hidden_size"] == 48


@pytest.mark.e2e
def test_restart_skips_finished_stages(chain):
    tmp, ckpt, (_, out2, out3), before = chain
    a = tmp / "chain" / "stages" / "a"
    assert "stage a: finished" in out2 and "stage 2/2 b" in out2
    assert out2.count("[compress] prune.py") == 1 and out2.count("[compress] distill.py") == 1   # b only
    assert (a / "distill" / "results.json").stat().st_mtime_ns == before
    assert "stage a: finished" in out3 and "stage b: finished" in out3 and "[compress] prune.py" not in out3


@pytest.mark.e2e
def test_changed_stage_refused(chain):
    tmp, ckpt, _, _ = chain
    p = run_py(RECIPE, *job(tmp, ckpt, "stages=[{name:a,prune:{target_hidden_size:32}}]"), check=False)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert "stage a in" in lines[0] and "prune.target_hidden_size: 48 -> 32" in lines[0]


# ----------------------------------------------------------------------------- shipped chain configs
def stage_shapes(name, overrides):
    from minitron_nemo.config import compose, model_config
    from minitron_nemo.models.builder import count_parameters
    from minitron_nemo.prune.targets import Targets, validate
    from minitron_nemo.workflows import stages

    cfg = compose(name, overrides)
    mc = model_config(cfg.model)
    out = []
    for i, _ in enumerate(cfg.stages):
        mc = validate(mc, Targets.from_cfg(OmegaConf.create(stages.merged_prune(cfg, i))), 1, 1)
        out.append(((mc.num_layers, mc.hidden_size, mc.ffn_hidden_size, mc.num_attention_heads, mc.num_query_groups),
                    count_parameters(mc)))
    return out


def test_chain_configs():
    """minitron_8b_4b_iterative: Nemotron-4-15B -> Minitron-8B -> Minitron-4B (SPEC §5);
    smollm2_iterative: 134.5M -> ~90M -> ~45M."""
    (s8, p8), (s4, p4) = stage_shapes("minitron_8b_4b_iterative", ["teacher.checkpoint=/t", "data=shakespeare"])
    assert s8 == (32, 4096, 16384, 48, 8) and abs(p8 - 8.27e9) / 8.27e9 < 0.03
    assert s4 == (32, 3072, 9216, 24, 8) and abs(p4 - 4.19e9) / 4.19e9 < 0.03
    (_, p90), (_, p45) = stage_shapes("smollm2_iterative", [])
    assert abs(p90 - 90e6) / 90e6 < 0.02 and abs(p45 - 45e6) / 45e6 < 0.02


# ----------------------------------------------------------------------------- Slurm rendering
def test_submit_renders_the_chain(capsys, tmp_path):
    sys.path.insert(0, str(ROOT / "launchers"))
    import submit

    work = tmp_path / "w"
    (work / "stages" / "s90m" / "distill").mkdir(parents=True)
    argv = ["pipeline", "--dry-run", "--config-name", "smollm2_iterative", "launcher=slurm_bare",
            f"launcher.logs={tmp_path}/logs", f"workdir={work}", "data.test_text=/data/test.txt",
            "stages=[{name:s90m,prune:{target_hidden_size:448,target_ffn_hidden_size:1152}},"
            "{name:s45m,prune:{target_hidden_size:256,target_ffn_hidden_size:896},teacher:source}]"]
    submit.main(argv)
    out = capsys.readouterr().out
    scripts = out.split("# ---- ")[1:]
    names = [s.split("\n")[0].rsplit("smollm2_iterative-", 1)[1] for s in scripts]
    assert names == ["correct.sbatch", "s90m.prune.sbatch", "s90m.distill.sbatch", "s45m.prune.sbatch",
                     "s45m.distill.sbatch", "s45m.export.sbatch", "s45m.evaluate.sbatch"]
    for prev, s in zip(names, scripts[1:]):  # each job waits for the one before it
        assert f"--dependency=afterok:<{prev[:-len('.sbatch')]} job id>" in s
    results_1 = work / "stages" / "s90m" / "distill" / "results.json"
    p1, d1, p2, d2, ex = scripts[1:6]
    assert f"recipes/prune.py checkpoint={work}/teacher_corrected output={work}/stages/s90m/pruned" in p1
    assert "#SBATCH --nodes=1" in p1 and "prune.target_hidden_size=448" in p1
    assert f"workdir={work}/stages/s90m/distill student.checkpoint={work}/stages/s90m/pruned" in d1
    assert f"recipes/prune.py checkpoint=$(final_checkpoint {results_1}) output={work}/stages/s45m/pruned" in p2
    assert f"teacher.checkpoint=$(final_checkpoint {results_1}) teacher.corrected_checkpoint=null" in d2
    assert f"checkpoint=$(final_checkpoint {work}/stages/s45m/distill/results.json) output={work}/stages/s45m/hf" in ex
    # the rendered shell function reads the results.json it is given
    func = next(l for l in p2.splitlines() if l.startswith("final_checkpoint()"))
    results_1.write_text(json.dumps({"final_checkpoint": "/ckpt/iter_0000002"}))
    got = subprocess.run(["bash", "-c", f"{func}\nfinal_checkpoint {results_1}"], capture_output=True, text=True)
    assert got.stdout.strip() == "/ckpt/iter_0000002", got.stderr
    # a finished stage is left out; the next one reads its student
    submit.main(argv)
    out = capsys.readouterr().out
    assert "# pipeline: skipping stage s90m (finished:" in out and "s90m.prune.sbatch" not in out
    assert "s45m.prune.sbatch" in out and "--dependency=afterok:<correct job id>" in out


# ----------------------------------------------------------------------------- bad input
ERRORS = [
    (["stages=[]"], "stages is empty"),
    ([f"stages=[{STAGE_A},{STAGE_A}]"], "the names ['a'] are used more than once"),
    (["stages=[{name:'a/b',prune:{target_hidden_size:48}}]"], "stages[0].name='a/b'; allowed: letters"),
    (["stages=[{name:a,prune:{target_hidden_size:48},teacher:/nonexistent}]"],
     "stages[0].teacher=/nonexistent does not exist"),
    (["stages=[{name:a,prune:{target_foo:48}}]"], "stages[0].prune: "),
    (["stages=[{name:a,prune:{target_hidden_size:128}}]"], "is larger than the source hidden_size=64"),
    ([f"stages=[{STAGE_A},{{name:b,prune:{{target_hidden_size:56}}}}]"], "is larger than the source hidden_size=48"),
    (["stages=[{name:a,prune:{target_hidden_size:48,search:{distill_iters:-1}}}]"],
     "stages[0].prune.search.distill_iters=-1; allowed: an integer >= 0"),
    (["stages=[{name:a,prune:{target_hidden_size:48},overrides:['trainer.train_iters=abc']}]"],
     "trainer.train_iters='abc'; allowed: an integer"),
    (["stages=[{name:a,prune:{target_hidden_size:48},overrides:[trainer]}]"], "stages[0].overrides='trainer'"),
    ([f"stages=[{STAGE_A}]", "teacher.checkpoint=HF"], "which is not a minitron_nemo checkpoint"),
    # the align stages after the chain (workflows/align_stages.py), checked before anything runs
    ([f"stages=[{STAGE_A}]", "+align=[{name:a,recipe:sft}]"], "align: the names ['a'] are used more than once"),
    ([f"stages=[{STAGE_A}]", "+align=[{name:p,recipe:dpo,overrides:['dpo.beta=0']}]"], "align stage p (dpo): "),
    ([f"stages=[{STAGE_A}]", "+align=[{name:s,recipe:rlhf}]"], "align[0].recipe='rlhf'; allowed: sft, dpo"),
]


@pytest.mark.parametrize("overrides,message", ERRORS, ids=[" ".join(o) for o, _ in ERRORS])
def test_bad_input(work, overrides, message, capsys, monkeypatch, tmp_path):
    tmp, ckpt = work
    mod = load_script(RECIPE, "compress_recipe")
    monkeypatch.setattr(mod.children, "run", lambda *a, **k: (_ for _ in ()).throw(AssertionError("ran")))
    argv = job(tmp, ckpt, *[o.replace("HF", str(tmp / "hf_llama")) for o in overrides])
    argv = [a.replace(f"workdir={tmp / 'chain'}", f"workdir={tmp_path / 'never'}") for a in argv]
    monkeypatch.setattr(sys, "argv", ["compress.py", *argv])
    with pytest.raises(SystemExit) as e:
        mod.main()
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "never").exists()
