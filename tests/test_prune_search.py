"""recipes/prune.py's budget search ranked by short distillation (workflows/search.py) on a tiny random Llama:
artifacts and winner, resume at candidate granularity and inside a candidate, and bad input (one line,
exit code 2, before any compute)."""

import csv
import json
import sys

import pytest
import yaml

from conftest import ROOT, load_script, module_dir, run_py


RECIPE = ROOT / "recipes" / "prune.py"
K = 2


@pytest.fixture(scope="module")
def work(small_llama, tmp_path_factory):
    return module_dir(small_llama, tmp_path_factory.mktemp("search"))


def args(tmp, ckpt, *extra):
    return [f"checkpoint={ckpt}", f"output={tmp / 'out'}", f"prune.calibration.data={tmp / 'calib.txt'}",
            "prune.grid=16", "prune.calibration.num_samples=16", "prune.calibration.seq_length=32",
            "prune.calibration.micro_batch_size=4", "prune.calibration.loss_samples=8", "prune.target_params_ratio=0.6",
            "prune.layer_criterion=bi", "prune.search.eval_samples=8", f"prune.search.distill_iters={K}",
            "data=text", f"data.train_text={tmp / 'calib.txt'}", f"data.valid_text={tmp / 'valid.txt'}",
            "data.seq_length=32", "data.valid_samples=4", "trainer.micro_batch_size=2", "trainer.global_batch_size=2",
            "trainer.tensorboard=false", *extra]


def rows_of(out):
    return list(csv.DictReader(open(out / "prune" / "candidates.csv")))


@pytest.fixture(scope="module")
def searched(work):
    """The search run twice: top_k=1, then extended to top_k=2 (the first candidate is reused)."""
    tmp, ckpt = work
    env = {"OMP_NUM_THREADS": "1"}
    p1 = run_py(RECIPE, *args(tmp, ckpt, "prune.search.top_k=1"), env=env)
    first = rows_of(tmp / "out")[0]
    name = "L{num_layers}_H{hidden_size}_F{ffn_hidden_size}_A{num_attention_heads}_G{num_query_groups}".format(**first)
    done = tmp / "out_search" / name / "result.json"
    before = (done.read_bytes(), done.stat().st_mtime_ns)
    p2 = run_py(RECIPE, *args(tmp, ckpt, "prune.search.top_k=2"), env=env)
    return tmp, ckpt, p1.stdout, p2.stdout, name, before


@pytest.mark.e2e
def test_artifacts_and_winner(searched):
    tmp, ckpt, _, out2, _, _ = searched
    out = tmp / "out"
    rows = rows_of(out)
    ranked = [r for r in rows if r["rank"]]
    assert len(ranked) == 2 and len(rows) >= 2
    assert [int(r["rank"]) for r in ranked] == [1, 2]
    assert {int(r["zero_shot_rank"]) for r in ranked} == {1, 2}  # the two zero-shot best were distilled
    ends = [float(r["valid_loss_end"]) for r in ranked]
    assert ends == sorted(ends)  # ranked by the validation loss after K
    for r in rows[2:]:
        assert r["rank"] == "" and r["valid_loss_end"] == ""
    zs = sorted(rows, key=lambda r: int(r["zero_shot_rank"]))
    assert [float(r["zero_shot_loss"]) for r in zs] == sorted(float(r["zero_shot_loss"]) for r in zs)
    mc = yaml.safe_load((out / "model.yaml").read_text())  # the winner is the pruned checkpoint
    for k in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups"):
        assert mc[k] == int(ranked[0][k]), (k, mc, ranked[0])
    meta = json.loads((out / "meta.json").read_text())
    assert meta["prune"]["search"]["distill_iters"] == K and meta["prune"]["search"]["top_k"] == 2
    md = (out / "prune" / "candidates.md").read_text()
    assert f"after a {K}-iteration distillation" in md and md.count("\n| ") == len(rows) + 1
    assert (out / "prune" / "search.png").stat().st_size > 1000
    assert (out / "prune" / "importance.safetensors").is_file()
    for r in ranked:  # each candidate's run: validation at 0, ..., K, and the final checkpoint
        name = "L{num_layers}_H{hidden_size}_F{ffn_hidden_size}_A{num_attention_heads}_G{num_query_groups}".format(**r)
        res = json.loads((tmp / "out_search" / name / "result.json").read_text())
        assert [it for it, _ in res["valid_curve"]][0] == 0 and res["valid_curve"][-1][0] == K
        assert res["valid_loss_end"] == pytest.approx(float(r["valid_loss_end"]))
        assert (tmp / "out_search" / name / "checkpoints" / f"iter_{K:07d}" / "COMPLETE").is_file()
    assert f"[search] rank 1 (zero-shot {ranked[0]['zero_shot_rank']})" in out2


@pytest.mark.e2e
def test_resume_skips_finished_candidates(searched):
    tmp, ckpt, out1, out2, name, before = searched
    assert out1.count("distilling 2 iterations") == 1 and "[calibration]" in out1
    # the extended search reads the zero-shot phase back and does not retrain the finished candidate
    assert "zero-shot ranking and importance read from" in out2 and "[calibration]" not in out2
    assert f"{name}: finished earlier" in out2 and out2.count("distilling 2 iterations") == 1
    done = tmp / "out_search" / name / "result.json"
    assert (done.read_bytes(), done.stat().st_mtime_ns) == before


@pytest.mark.e2e
def test_unfinished_candidate_resumes_from_its_checkpoint(searched):
    """A candidate killed after its last checkpoint and before result.json: the re-run resumes the training
    loop (Trainer.resume) instead of starting over, and ends with the same ranking."""
    tmp, ckpt, _, _, name, _ = searched
    rows = rows_of(tmp / "out")
    (tmp / "out_search" / name / "result.json").unlink()
    p = run_py(RECIPE, *args(tmp, ckpt, "prune.search.top_k=2"), env={"OMP_NUM_THREADS": "1"})
    assert f"[train] resumed from {tmp / 'out_search' / name / 'checkpoints'}" in p.stdout, p.stdout[-3000:]
    assert "[train] iter" not in p.stdout  # nothing left to train
    assert rows_of(tmp / "out") == rows


@pytest.mark.e2e
def test_search_from_a_teacher_cache_matches_online(searched):
    """distill.teacher_cache passes through to the short runs: a whole-vocabulary fp32 cache of the same
    samples (recipes/cache_teacher.py with K x GBS training samples) gives the online search's ranking and
    losses to float precision."""
    tmp, ckpt, _, _, _, _ = searched
    env = {"OMP_NUM_THREADS": "1"}
    run_py(ROOT / "recipes" / "cache_teacher.py", f"workdir={tmp / 'cache_job'}", f"teacher.checkpoint={ckpt}",
           "teacher.corrected_checkpoint=null", "~model", "teacher.max_loss_fraction=10", "data=text",
           f"data.train_text={tmp / 'calib.txt'}", f"data.valid_text={tmp / 'valid.txt'}", "data.seq_length=32",
           "data.valid_samples=4", "trainer.micro_batch_size=2", "trainer.global_batch_size=2",
           f"trainer.train_iters={K}", f"cache.dir={tmp / 'cache'}", "cache.topk=null", "cache.dtype=float32", env=env)
    argv = [a.replace(f"output={tmp / 'out'}", f"output={tmp / 'out_cached'}") for a in args(tmp, ckpt)]
    run_py(RECIPE, *argv, "prune.search.top_k=2", f"distill.teacher_cache={tmp / 'cache'}", env=env)
    online, cached = rows_of(tmp / "out"), rows_of(tmp / "out_cached")
    assert [r["rank"] for r in cached] == [r["rank"] for r in online]
    for a, b in zip(online[:2], cached[:2]):
        assert float(b["valid_loss_end"]) == pytest.approx(float(a["valid_loss_end"]), abs=1e-4)


# ----------------------------------------------------------------------------- bad input
ERRORS = [
    (["prune.search.distill_iters=-1"], "prune.search.distill_iters=-1; allowed: an integer >= 0"),
    (["prune.search.top_k=0"], "prune.search.top_k=0; allowed: an integer >= 1"),
    (["prune.search.eval_interval=0"], "prune.search.eval_interval=0; allowed: null or an integer >= 1"),
    (["prune.search.distill_iters=abc"], "prune.search.distill_iters='abc'; allowed: an integer"),
    (["prune.target_params_ratio=null", "prune.target_hidden_size=48"], "ranks the candidates of a parameter-budget"),
    (["prune.importance_only=true"], "prune.importance_only=true; allowed: one of them"),
    (["data.valid_text=null"], "ranks by validation loss"),
    (["data.valid_samples=0"], "ranks by validation loss"),
    (["trainer.global_batch_size=3"], "trainer.global_batch_size=3 is not a multiple of trainer.micro_batch_size=2"),
    (["prune.search.workdir=CKPT/search"], "lies inside checkpoint="),
]


@pytest.mark.parametrize("overrides,message", ERRORS, ids=[" ".join(o) for o, _ in ERRORS])
def test_bad_input(work, overrides, message, capsys, monkeypatch):
    tmp, ckpt = work
    mod = load_script(RECIPE, "prune_recipe")
    monkeypatch.setattr(mod.runtime, "init_distributed",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("compute would start")))
    argv = args(tmp, ckpt, *[o.replace("CKPT", str(ckpt)) for o in overrides])
    argv = [a.replace(f"output={tmp / 'out'}", f"output={tmp / 'never'}") for a in argv]
    monkeypatch.setattr(sys, "argv", ["prune.py", *argv])
    with pytest.raises(SystemExit) as e:
        mod.main()
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp / "never").exists() and not (tmp / "never_search").exists()


@pytest.mark.e2e
def test_changed_settings_and_in_job_search_refused(searched):
    """A search workdir reused with other settings, and distill.py's in-job pruning asked for the ranked
    search: one line each, exit code 2, no traceback (real processes, warnings on)."""
    tmp, ckpt, _, _, _, _ = searched
    p = run_py(RECIPE, *args(tmp, ckpt, "prune.search.top_k=2", "trainer.optim.lr=0.01"), check=False)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert "holds a search started with other settings (trainer.optim.lr: 0.001 -> 0.01)" in lines[0]
    p = run_py(ROOT / "recipes" / "distill.py", f"workdir={tmp / 'job'}", f"teacher.checkpoint={ckpt}",
               "teacher.corrected_checkpoint=null", "~model", "data=text", f"data.train_text={tmp / 'calib.txt'}",
               "prune.target_hidden_size=null", "prune.target_ffn_hidden_size=null", "prune.target_params_ratio=0.6",
               "prune.grid=16", "prune.search.distill_iters=2", check=False)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and "runs in recipes/prune.py" in lines[0], p.stderr
