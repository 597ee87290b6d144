"""A user's mistakes and a hostile environment, each run as the user would run it (warnings on): exit code
2 (130 for Ctrl-C), no traceback, stderr exactly one line naming the bad value or file, and every file
that existed before byte-identical afterwards.

CASES run the recipe's ``main()`` in this process (``conftest.run_main``: argv, cwd, warnings and fds 1/2
as in a terminal); the cases in REAL_PROCESS, one or more per recipe, and the lock, disk, signal and
resume tests run real processes. Add a case to CASES for every new recipe option or input file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, run_main

ENV = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}  # what a user's terminal shows


def run(script, *args, cwd=ROOT, timeout=600, env=None):
    e = dict(ENV, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=e, timeout=timeout)


def snapshot(*roots) -> dict:
    out = {}
    for r in roots:
        r = Path(r)
        files = [r] if r.is_file() else [p for p in r.rglob("*") if p.is_file()] if r.is_dir() else []
        for f in files:
            out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def assert_one_line(p, code: int, *needles):
    assert p.returncode == code, (p.returncode, p.stdout[-1500:], p.stderr[-3000:])
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, p.stderr[-3000:]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


# ----------------------------------------------------------------------------- fixtures
class Fx:
    hf: Path      # tiny random Llama, HF format
    ckpt: Path    # the same, imported (a checkpoint)
    text: Path


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    from conftest import run_py
    from hf_models import make_hf_model

    d = tmp_path_factory.mktemp("fx")
    f = Fx()
    f.hf = make_hf_model("llama", d / "hf")
    f.ckpt = d / "ckpt"
    run_py(ROOT / "recipes" / "import_hf.py", f"source={f.hf}", f"output={f.ckpt}")
    f.text = d / "text.txt"
    f.text.write_text("To be, or not to be, that is the question.\n" * 50)
    return f


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def user_dir(tmp: Path, name="mine") -> Path:
    d = tmp / name
    d.mkdir()
    (d / "notes.txt").write_text("my own notes")
    return d


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def edit_json(path: Path, fn) -> None:
    d = json.loads(path.read_text())
    fn(d)
    path.write_text(json.dumps(d))


def edit_yaml(path: Path, fn) -> None:
    import yaml

    d = yaml.safe_load(path.read_text())
    fn(d)
    path.write_text(yaml.safe_dump(d))


def a_shard(ckpt: Path) -> Path:
    return sorted((ckpt / "weights").glob("*.distcp"))[0]


NEMO2 = ROOT / "tests" / "fixtures" / "nemo2"
IMPORT, EXPORT, PRUNE, EVAL = "recipes/import_hf.py", "recipes/export_hf.py", "recipes/prune.py", "recipes/evaluate.py"
DISTILL, CORRECT, SUBMIT = "recipes/distill.py", "recipes/correct_teacher.py", "launchers/submit.py"
COMPRESS = "recipes/compress.py"


def distill_args(t, f, *extra):
    return (DISTILL, [f"workdir={t / 'w'}", f"teacher.checkpoint={f.hf}", "~model", *extra])


def prune_args(t, f, *extra, ckpt=None):
    return (PRUNE, [f"checkpoint={ckpt or f.ckpt}", f"output={t / 'pruned'}", f"prune.calibration.data={f.text}",
                    "prune.target_ffn_hidden_size=64", *extra])


def compress_args(t, f, *extra):
    return (COMPRESS, ["--config-name", "smollm2_iterative", f"workdir={t / 'w'}", f"teacher.checkpoint={f.ckpt}",
                       "teacher.corrected_checkpoint=null", "~model", f"prune.calibration.data={f.text}", *extra])


def eval_args(t, f, *extra):
    return (EVAL, [f"checkpoint={f.ckpt}", f"eval.text_file={f.text}", *extra])


# Each case: (t: its tmp dir, f: fixtures) -> (script, args[, cwd]) and the words the error line must have.
CASES = {
    # --- data loss: outputs that would replace or delete something the user owns
    "export onto its source": (lambda t, f: (EXPORT, [f"checkpoint={f.ckpt}", f"output={f.ckpt}"]), ["output=", "same path"]),
    "prune onto its source": (lambda t, f: prune_args(t, f, f"output={f.ckpt}"), ["same path"]),
    "import into a dir of user files": (lambda t, f: (IMPORT, [f"source={f.hf}", f"output={user_dir(t)}"]),
                                        ["did not write", "notes.txt"]),
    "import onto a regular file": (lambda t, f: ((t / "f.txt").write_text("x"), (IMPORT, [f"source={f.hf}", f"output={t / 'f.txt'}"]))[1],
                                   ["existing file"]),
    "export to the current directory": (lambda t, f: (EXPORT, [f"checkpoint={f.ckpt}", "output=."], user_dir(t, "project")),
                                        ["current directory"]),
    "export to an empty path": (lambda t, f: (EXPORT, [f"checkpoint={f.ckpt}", "output="]), ["output is empty"]),
    "export to /": (lambda t, f: (EXPORT, [f"checkpoint={f.ckpt}", "output=/"]), ["root"]),
    "import inside its source": (lambda t, f: (IMPORT, [f"source={copy(f.hf, t / 'hf')}", f"output={t / 'hf' / 'sub'}"]),
                                 ["lies inside"]),
    "export to a dir containing its source": (lambda t, f: (EXPORT, [f"checkpoint={copy(f.ckpt, t / 'a' / 'ck')}",
                                                                    f"output={t / 'a'}"]), ["contains"]),
    "export over another recipe's output": (lambda t, f: (EXPORT, [f"checkpoint={f.ckpt}", f"output={copy(f.ckpt, t / 'ck2')}"]),
                                            ["output of import_hf", "overwrite=true"]),
    "corrected teacher into a dir of user files": (
        lambda t, f: (CORRECT, [f"workdir={t / 'w'}", f"teacher.checkpoint={f.hf}", "~model",
                                f"teacher.corrected_checkpoint={user_dir(t)}"]), ["teacher.corrected_checkpoint", "did not write"]),
    "distill workdir is a file": (lambda t, f: ((t / "w.txt").write_text("x"), distill_args(t, f, f"workdir={t / 'w.txt'}"))[1],
                                  ["workdir=", "existing file"]),
    "distill workdir of user files": (lambda t, f: distill_args(t, f, f"workdir={user_dir(t)}"), ["workdir=", "did not write"]),
    "eval.output is a directory": (lambda t, f: eval_args(t, f, f"eval.output={user_dir(t)}"), ["eval.output=", "directory"]),
    "eval.output is a user's file": (lambda t, f: ((t / "r.json").write_text("{}"), eval_args(t, f, f"eval.output={t / 'r.json'}"))[1],
                                     ["eval.output=", "did not write"]),
    # --- values that silently did the wrong thing, or failed only after the expensive part
    "drop_layers=[1.5]": (lambda t, f: prune_args(t, f, "prune.target_ffn_hidden_size=null", "prune.drop_layers=[1.5]"),
                          ["prune.drop_layers", "1.5"]),
    "submit without data.blend": (lambda t, f: (SUBMIT, ["distill", "--config-name", "mn_minitron_8b", "teacher.checkpoint=X",
                                                         "--dry-run"]), ["data.blend"]),
    "keep_last=abc": (lambda t, f: distill_args(t, f, "checkpointing.keep_last=abc"), ["checkpointing.keep_last", "abc"]),
    "lr=nan": (lambda t, f: distill_args(t, f, "trainer.optim.lr=nan"), ["trainer.optim.lr", "nan"]),
    "lr<0": (lambda t, f: distill_args(t, f, "trainer.optim.lr=-0.1"), ["trainer.optim.lr", "-0.1"]),
    "max_candidates=0": (lambda t, f: prune_args(t, f, "prune.target_ffn_hidden_size=null", "prune.target_params_ratio=0.5",
                                                 "prune.search.max_candidates=0"), ["prune.search.max_candidates", "0"]),
    "search top_k=0": (lambda t, f: prune_args(t, f, "prune.target_ffn_hidden_size=null", "prune.target_params_ratio=0.5",
                                               "prune.search.distill_iters=2", "prune.search.top_k=0"),
                       ["prune.search.top_k", "0"]),
    "search ranked by distillation without a budget": (lambda t, f: prune_args(t, f, "prune.search.distill_iters=2"),
                                                       ["prune.search.distill_iters=2", "parameter-budget"]),
    "compress stage name with a slash": (lambda t, f: compress_args(t, f, "stages=[{name:'a/b',prune:{target_hidden_size:32}}]"),
                                         ["stages[0].name", "a/b"]),
    "compress stage target larger than its source": (
        lambda t, f: compress_args(t, f, "prune.grid=16",
                                   "stages=[{name:a,prune:{target_hidden_size:32}},{name:b,prune:{target_hidden_size:48}}]"),
        ["prune.target_hidden_size=48", "larger than the source hidden_size=32"]),
    "in-job prune target larger than the teacher": (lambda t, f: distill_args(t, f, "prune.target_hidden_size=4096",
                                                                            "prune.target_ffn_hidden_size=null",
                                                                            f"prune.calibration.data={f.text}"),
                                                    ["prune.target_hidden_size=4096", "larger than the source"]),
    "save_interval=-1 keep_last=0": (lambda t, f: distill_args(t, f, "checkpointing.save_interval=-1", "checkpointing.keep_last=0"),
                                     ["checkpointing.save_interval", "-1"]),
    # --- wrong types and ranges in overrides
    "train_iters=abc": (lambda t, f: distill_args(t, f, "trainer.train_iters=abc"), ["trainer.train_iters", "abc", "integer"]),
    "drop_layers=abc": (lambda t, f: prune_args(t, f, "prune.drop_layers=abc"), ["prune.drop_layers", "list"]),
    "drop_layers=2": (lambda t, f: prune_args(t, f, "prune.drop_layers=2"), ["prune.drop_layers", "list"]),
    "calibration.num_samples=abc": (lambda t, f: prune_args(t, f, "prune.calibration.num_samples=abc"),
                                    ["prune.calibration.num_samples", "abc"]),
    "grid=abc": (lambda t, f: prune_args(t, f, "prune.grid=abc"), ["prune.grid", "abc"]),
    "tp=0": (lambda t, f: (IMPORT, [f"source={f.hf}", f"output={t / 'o'}", "parallel.tensor_model_parallel_size=0"]),
             ["parallel.tensor_model_parallel_size", "0"]),
    "tp=abc": (lambda t, f: (IMPORT, [f"source={f.hf}", f"output={t / 'o'}", "parallel.tensor_model_parallel_size=abc"]),
               ["parallel.tensor_model_parallel_size", "abc"]),
    "tp=-1": (lambda t, f: (IMPORT, [f"source={f.hf}", f"output={t / 'o'}", "parallel.tensor_model_parallel_size=-1"]),
              ["parallel.tensor_model_parallel_size", "-1"]),
    "eval.micro_batch_size=0": (lambda t, f: eval_args(t, f, "eval.micro_batch_size=0"), ["eval.micro_batch_size", "0"]),
    "eval.seq_length=abc": (lambda t, f: eval_args(t, f, "eval.seq_length=abc"), ["eval.seq_length", "abc"]),
    "launcher.nodes=abc": (lambda t, f: (SUBMIT, ["distill", "launcher.nodes=abc", "--dry-run"]), ["launcher.nodes", "abc"]),
    "correction.lr_fraction=abc": (lambda t, f: (CORRECT, [f"workdir={t / 'w'}", f"teacher.checkpoint={f.hf}", "~model",
                                                           "correction.lr_fraction=abc"]), ["correction.lr_fraction", "abc"]),
    "correction.lr_fraction=2": (lambda t, f: (CORRECT, [f"workdir={t / 'w'}", f"teacher.checkpoint={f.hf}", "~model",
                                                         "correction.lr_fraction=2"]), ["correction.lr_fraction", "2"]),
    # --- unreadable or inconsistent inputs
    "config.json truncated": (lambda t, f: (truncate(copy(f.hf, t / "hf") / "config.json"),
                                            (IMPORT, [f"source={t / 'hf'}", f"output={t / 'o'}"]))[1], ["config.json"]),
    "config.json is an array": (lambda t, f: ((copy(f.hf, t / "hf") / "config.json").write_text("[1, 2]"),
                                              (IMPORT, [f"source={t / 'hf'}", f"output={t / 'o'}"]))[1], ["config.json", "list"]),
    "config.json lacks hidden_size": (lambda t, f: (edit_json(copy(f.hf, t / "hf") / "config.json", lambda d: d.pop("hidden_size")),
                                                    (IMPORT, [f"source={t / 'hf'}", f"output={t / 'o'}"]))[1],
                                      ["config.json", "hidden_size"]),
    "config.json sizes vs weights": (lambda t, f: (edit_json(copy(f.hf, t / "hf") / "config.json",
                                                             lambda d: d.update(intermediate_size=128)),
                                                   (IMPORT, [f"source={t / 'hf'}", f"output={t / 'o'}"]))[1], ["96", "128"]),
    "model.safetensors truncated": (lambda t, f: (truncate(copy(f.hf, t / "hf") / "model.safetensors"),
                                                  (IMPORT, [f"source={t / 'hf'}", f"output={t / 'o'}"]))[1],
                                    ["model.safetensors", "truncated"]),
    "model.yaml invalid": (lambda t, f: ((copy(f.ckpt, t / "ck") / "model.yaml").write_text("hidden_size: [1,\n"),
                                         (EXPORT, [f"checkpoint={t / 'ck'}", f"output={t / 'o'}"]))[1], ["model.yaml"]),
    "model.yaml empty": (lambda t, f: ((copy(f.ckpt, t / "ck") / "model.yaml").write_text(""),
                                       (EXPORT, [f"checkpoint={t / 'ck'}", f"output={t / 'o'}"]))[1], ["model.yaml", "empty"]),
    "model.yaml non-numeric size": (lambda t, f: (edit_yaml(copy(f.ckpt, t / "ck") / "model.yaml", lambda d: d.update(hidden_size="big")),
                                                  (EXPORT, [f"checkpoint={t / 'ck'}", f"output={t / 'o'}"]))[1],
                                    ["model.yaml", "hidden_size", "big"]),
    "model.yaml sizes vs weights": (lambda t, f: (edit_yaml(copy(f.ckpt, t / "ck") / "model.yaml", lambda d: d.update(ffn_hidden_size=128)),
                                                  (EXPORT, [f"checkpoint={t / 'ck'}", f"output={t / 'o'}"]))[1],
                                    ["weights", "192", "256"]),  # fc1 = 2 x ffn (SwiGLU): 2 x 96 vs 2 x 128
    "dist-checkpoint shard truncated": (lambda t, f: (truncate(a_shard(copy(f.ckpt, t / "ck"))),
                                                      (EXPORT, [f"checkpoint={t / 'ck'}", f"output={t / 'o'}"]))[1], ["weights"]),
    "dist-checkpoint shard missing": (lambda t, f: (a_shard(copy(f.ckpt, t / "ck")).unlink(),
                                                    (EXPORT, [f"checkpoint={t / 'ck'}", f"output={t / 'o'}"]))[1], ["weights"]),
    "dist-checkpoint .metadata missing": (lambda t, f: ((copy(f.ckpt, t / "ck") / "weights" / ".metadata").unlink(),
                                                        (EXPORT, [f"checkpoint={t / 'ck'}", f"output={t / 'o'}"]))[1],
                                          [".metadata"]),
    "importance.safetensors corrupt": (lambda t, f: ((t / "importance.safetensors").write_bytes(b"\x10\x00\x00\x00garbage!"),
                                                     prune_args(t, f, "prune.calibration.data=null",
                                                                f"prune.importance.load={t / 'importance.safetensors'}"))[1],
                                       ["importance.safetensors"]),
    "import_nemo into a dir of user files": (lambda t, f: ("recipes/import_nemo.py", [f"source={NEMO2 / 'llama'}",
                                                                                    f"output={user_dir(t)}"]),
                                             ["did not write", "notes.txt"]),
    "import_nemo of an HF directory": (lambda t, f: ("recipes/import_nemo.py", [f"source={f.hf}", f"output={t / 'o'}"]),
                                       ["context"]),
    "preprocess onto a user's .bin": (lambda t, f: ((t / "data.bin").write_bytes(b"my own bytes"),
                                                    ("recipes/preprocess_data.py", [f"input={f.text}", f"tokenizer={smollm2()}",
                                                                                   f"output_prefix={t / 'data'}"]))[1],
                                      ["output_prefix (.bin)", "data.bin", "did not write"]),
}


def smollm2():
    from minitron_nemo.data import assets

    return assets.smollm2_hf_dir()


# One case per recipe (and the ones where a child process or the working directory matter) runs as a real
# process too: the exit code, stderr as a terminal shows it, and no stray process.
REAL_PROCESS = {"export onto its source", "prune onto its source", "import into a dir of user files",
                "export to the current directory", "distill workdir of user files",
                "corrected teacher into a dir of user files", "eval.output is a user's file",
                "submit without data.blend", "compress stage target larger than its source",
                "import_nemo of an HF directory", "preprocess onto a user's .bin", "tp=abc"}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_one_line_and_harmless(tmp_path, fx, name):
    build, needles = CASES[name]
    got = build(tmp_path, fx)
    script, args, cwd = (*got, ROOT) if len(got) == 2 else got
    before = snapshot(tmp_path, fx.hf, fx.ckpt, fx.text)
    p = (run if name in REAL_PROCESS else run_main)(script, *args, cwd=cwd)
    assert_one_line(p, 2, *needles)
    after = snapshot(tmp_path, fx.hf, fx.ckpt, fx.text)
    assert {k: after.get(k) for k in before} == before  # nothing the user had was touched
    assert not [p for p in tmp_path.rglob("*.tmp")]     # and no temp output was left behind


def test_second_concurrent_run_is_refused(tmp_path, fx):
    """A run holding the output (here: a process that claimed it) makes a second run stop at once."""
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from minitron_nemo import outputs; "
                               f"outputs.claim_dir({str(out)!r}); print('held', flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, text=True, env=dict(ENV, PYTHONPATH=str(ROOT)), cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "held"
        p = run(IMPORT, f"source={fx.hf}", f"output={out}")
        assert_one_line(p, 2, "in use by another run", f"pid {holder.pid}")
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
    run(IMPORT, f"source={fx.hf}", f"output={out}").check_returncode()  # the lock dies with its holder
    assert (out / "model.yaml").is_file() and not list(tmp_path.glob(".out.lock"))


def test_rerun_replaces_own_output_and_overwrite_replaces_another_recipes(tmp_path, fx):
    out = tmp_path / "out"
    for _ in range(2):
        run(IMPORT, f"source={fx.hf}", f"output={out}").check_returncode()
    p = run(EXPORT, f"checkpoint={fx.ckpt}", f"output={out}", "overwrite=true")
    assert p.returncode == 0, p.stderr[-2000:]
    assert (out / "config.json").is_file() and not (out / "model.yaml").exists()
    (out / "README.md").write_text("my notes about this export")  # now it holds a file we did not write
    p = run(EXPORT, f"checkpoint={fx.ckpt}", f"output={out}", "overwrite=true")
    assert_one_line(p, 2, "did not write", "README.md")
    assert (out / "README.md").read_text() == "my notes about this export"


# ----------------------------------------------------------------------------- the environment
def _mount_tmpfs(path: Path, size: str, readonly=False) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if readonly else "")
    return subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True).returncode == 0


@pytest.mark.parametrize("kind", ["full", "readonly"])
def test_full_or_readonly_disk(tmp_path, fx, kind):
    mnt = tmp_path / kind
    if not _mount_tmpfs(mnt, "96k", readonly=kind == "readonly"):
        pytest.skip("mounting a small tmpfs needs root (CAP_SYS_ADMIN); the CI machine has it")
    try:
        p = run(IMPORT, f"source={fx.hf}", f"output={mnt / 'out'}")
        line = assert_one_line(p, 2, str(mnt))
        assert ("disk is full" if kind == "full" else "read-only") in line, line
        assert list(mnt.iterdir()) == []  # no temp output left to keep the disk full
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


# ----------------------------------------------------------------------------- training jobs
@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A tiny random Llama with the real SmolLM2 tokenizer (training needs a tokenizer for the text)."""
    import torch
    import transformers as tf

    from minitron_nemo.data import assets

    d = tmp_path_factory.mktemp("teacher") / "hf"
    cfg = tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=49152, max_position_embeddings=256, tie_word_embeddings=True)
    torch.manual_seed(0)
    tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(d)
    hf = assets.smollm2_hf_dir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (hf / name).is_file():
            shutil.copy(hf / name, d / name)
    text = d.parent / "plays.txt"
    text.write_text(assets.shakespeare_splits()["train"].read_text()[:60000])
    return d, text


def correct_args(work, teacher, *extra):
    d, text = teacher
    return [f"workdir={work}", f"teacher.checkpoint={d}", "~model", "data=text", f"data.train_text={text}",
            f"data.valid_text={text}", "data.seq_length=32", "data.valid_samples=2", "trainer.micro_batch_size=2",
            "trainer.global_batch_size=2", "trainer.eval_interval=0", "trainer.tensorboard=false",
            "correction.warmup_iters=1", *extra]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_checkpoints_and_a_rerun_resumes(tmp_path, teacher, sig):
    """Ctrl-C (or a plain SIGTERM, outside Slurm) during training: the step finishes, a checkpoint is saved,
    one line says where it stopped, exit 128 + signal; a re-run resumes there."""
    work = tmp_path / "w"
    args = correct_args(work, teacher, "correction.train_iters=400", "checkpointing.save_interval=1000")
    e = dict(ENV, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(ROOT / CORRECT), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, env=e)
    for line in proc.stdout:  # training has started
        if line.startswith("[train] iter") or "iteration" in line and "/400" in line:
            break
    time.sleep(1.0)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + sig, (out[-2000:], err[-3000:])
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert lines[0].startswith(f"interrupted by {sig.name} at iteration") and "re-run" in lines[0], lines[0]
    saved = sorted((work / "correction" / "checkpoints").glob("iter_*"))
    assert len(saved) == 1 and (saved[0] / "COMPLETE").is_file()
    stopped = int(saved[0].name.split("_")[1])
    assert f"iteration {stopped} of 400" in lines[0] and 0 < stopped < 400
    # a re-run (a shorter schedule now ends the test quickly) resumes from that checkpoint
    p = run(CORRECT, *correct_args(work, teacher, f"correction.train_iters={stopped + 2}"))
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"resumed from {saved[0]}" in p.stdout


def test_resume_skips_a_checkpoint_with_a_truncated_shard(tmp_path, teacher):
    work = tmp_path / "w"
    base = ["checkpointing.save_interval=2", "checkpointing.keep_last=5",
            f"teacher.corrected_checkpoint={tmp_path / 'c1'}"]
    p = run(CORRECT, *correct_args(work, teacher, "correction.train_iters=4", *base))
    assert p.returncode == 0, p.stderr[-3000:]
    ck = work / "correction" / "checkpoints"
    assert sorted(x.name for x in ck.iterdir()) == ["iter_0000002", "iter_0000004"]
    truncate(a_shard(ck / "iter_0000004"))
    more = [*base[:2], f"teacher.corrected_checkpoint={tmp_path / 'c2'}"]
    p = run(CORRECT, *correct_args(work, teacher, "correction.train_iters=6", *more))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "skipping iter_0000004" in p.stdout and f"resumed from {ck / 'iter_0000002'}" in p.stdout
    # with no readable checkpoint left, the job stops with a line naming the file
    for d in ck.iterdir():
        for shard in (d / "weights").glob("*.distcp"):
            truncate(shard)
    p = run(CORRECT, *correct_args(work, teacher, "correction.train_iters=8", *base[:2],
                                   f"teacher.corrected_checkpoint={tmp_path / 'c3'}"))
    assert_one_line(p, 2, "cannot read checkpoint weights", "no older complete checkpoint")
