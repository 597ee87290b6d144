"""Offline distillation: the teacher cache (recipes/cache_teacher.py) and training from it
(recipes/distill.py distill.teacher_cache=DIR) on a tiny random teacher with SmolLM2's tokenizer."""

import hashlib
import json
import shutil

import pytest
import torch

from conftest import ROOT, run_main, run_py, run_torchrun
from minitron_nemo.distill.losses import logits_kl_loss
from minitron_nemo.distill.bucket_kl import bucket_kl, teacher_topk

CACHE = ROOT / "recipes" / "cache_teacher.py"
DISTILL = ROOT / "recipes" / "distill.py"


# ----------------------------------------------------------------------------- the loss
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_bucket_kl_is_full_kl_at_full_vocab_and_a_lower_bound_below(reverse, tau):
    g = torch.Generator().manual_seed(0)
    n, v = 9, 61
    s = (torch.randn(n, v, generator=g, dtype=torch.float64) * 3).requires_grad_(True)
    t = torch.randn(n, v, generator=g, dtype=torch.float64) * 3
    full = logits_kl_loss(s[None], t[None], temperature=tau, reverse=reverse).per_token[0]
    (g_full,) = torch.autograd.grad(full.sum(), s)
    ids, logp, _ = teacher_topk(t, v, tau)
    kl = bucket_kl(s, ids, logp, tau, reverse)
    (g_kl,) = torch.autograd.grad(kl.sum(), s)
    assert torch.allclose(kl, full, rtol=1e-10, atol=1e-12) and torch.allclose(g_kl, g_full, rtol=1e-9, atol=1e-12)
    for k in (1, 5, 30):  # against the (K + 1)-outcome KL written out directly
        ids, logp, _ = teacher_topk(t, k, tau)
        kl = bucket_kl(s, ids, logp, tau, reverse)
        p, q = torch.softmax(t / tau, -1).gather(-1, ids), torch.softmax(s / tau, -1).gather(-1, ids)
        p = torch.cat([p, 1 - p.sum(-1, keepdim=True)], -1)
        q = torch.cat([q, 1 - q.sum(-1, keepdim=True)], -1)
        a, b = (q, p) if reverse else (p, q)
        ref = (a * (a.log() - b.log())).sum(-1) * tau ** 2
        assert torch.allclose(kl, ref, rtol=1e-9, atol=1e-12), k
        assert torch.allclose(*(torch.autograd.grad(x.sum(), s)[0] for x in (kl, ref)), rtol=1e-8, atol=1e-12)
        assert bool((kl <= full + 1e-12).all()), k  # grouping outcomes never raises the KL


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_nll_and_logprobs_in_one_pass_equal_cross_entropy_and_log_softmax(dtype, tau):
    """``student_nll_and_logprobs`` (the training loss's one pass over the logits, in chunks of 4 rows) against
    torch's cross entropy and log-softmax: values and the gradient of a weighted sum of both outputs, with labels
    among the ids and outside them, fp32 math for bf16 logits."""
    from minitron_nemo.distill.bucket_kl import student_nll_and_logprobs

    g = torch.Generator().manual_seed(1)
    n, v, k = 11, 53, 6
    x = (torch.randn(n, v, generator=g, dtype=torch.float64) * 3).to(dtype)
    ids = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(n)])
    labels = torch.randint(0, v, (n,), generator=g)
    labels[:4] = ids[:4, 2]  # some labels are cached ids too
    w_nll, w_lp = torch.randn(n, generator=g, dtype=torch.float64), torch.randn(n, k, generator=g, dtype=torch.float64)
    a = x.clone().requires_grad_(True)
    nll, lp = student_nll_and_logprobs(a, labels, ids, tau, chunk=4)
    (ga,) = torch.autograd.grad((nll.double() * w_nll).sum() + (lp.double() * w_lp).sum(), a)
    r = x.double().requires_grad_(True)
    nll_r = torch.nn.functional.cross_entropy(r, labels, reduction="none")
    lp_r = torch.log_softmax(r / tau, dim=-1).gather(-1, ids)
    (gr,) = torch.autograd.grad((nll_r * w_nll).sum() + (lp_r * w_lp).sum(), r)
    tol = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 2e-5}[dtype]
    assert nll.dtype == lp.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.allclose(nll.double(), nll_r, rtol=tol, atol=tol) and torch.allclose(lp.double(), lp_r, rtol=tol, atol=tol)
    gtol = 1e-2 if dtype == torch.bfloat16 else tol  # the gradient is stored in the logits' dtype
    assert ga.dtype == dtype and torch.allclose(ga.double(), gr, rtol=gtol, atol=gtol)


def test_tensor_parallel_cache_loss_matches_single_rank():
    p = run_torchrun(ROOT / "tests" / "workers" / "bucket_kl_worker.py", 2, "2", timeout=300)
    assert "16 checks passed at TP=2" in p.stdout and "NLL and log-probabilities: 4 checks passed" in p.stdout


# ----------------------------------------------------------------------------- recipes
@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """A random teacher and a smaller random student (imported checkpoint), both with SmolLM2's
    tokenizer, and slices of the Shakespeare splits."""
    import transformers

    from minitron_nemo.checkpoint.store import copy_tokenizer
    from minitron_nemo.data import assets

    d = tmp_path_factory.mktemp("cache_job")
    hf = assets.smollm2_hf_dir()
    for name, hidden, seed in (("teacher", 64, 0), ("student_hf", 48, 1)):
        torch.manual_seed(seed)
        cfg = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=96, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, vocab_size=49152,
                                       tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                                       initializer_range=0.5)
        transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(d / name)
        copy_tokenizer(hf, d / name)
    run_py(ROOT / "recipes" / "import_hf.py", f"source={d / 'student_hf'}", f"output={d / 'student'}")
    text = {}
    for split, chars in (("train", 20_000), ("valid", 5_000), ("test", 5_000)):
        text[split] = d / f"{split}.txt"
        text[split].write_text(assets.shakespeare_splits()[split].read_text()[:chars])
    common = ["--config-name", "smollm2_demo", f"teacher.checkpoint={d / 'teacher'}", "teacher.corrected_checkpoint=null",
              "~model", "data=text", f"data.train_text={text['train']}", f"data.valid_text={text['valid']}",
              f"data.test_text={text['test']}", "data.test_tokens=256", "data.seq_length=32", "dtype=float32",
              "teacher.max_loss_fraction=20", "trainer.train_iters=4", "trainer.micro_batch_size=2",
              "trainer.global_batch_size=4", "trainer.eval_interval=2", "trainer.warmup_iters=1", "data.valid_samples=4",
              "checkpointing.save_interval=2", "checkpointing.keep_last=3"]
    return {"dir": d, "common": common, "student": d / "student"}


def _digest(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.name.endswith(".lock")}


def _train_records(work):
    rows = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    return {r["iteration"]: r for r in rows if r.get("kind") == "train"}


@pytest.fixture(scope="module")
def cache16(job):
    out = job["dir"] / "cache16"
    p = run_py(CACHE, *job["common"], f"cache.dir={out}", "cache.topk=16", "cache.shard_samples=3")
    return out, p


def test_cache_is_written_with_progress_and_resumes_after_a_kill(job, cache16):
    out, p = cache16
    m = json.loads((out / "manifest.json").read_text())
    assert m["topk"] == 16 and m["dtype"] == "bfloat16" and m["identity"]["train_samples"] == 16
    assert m["splits"] == {"train": {"samples": 16, "shards": 6}, "valid": {"samples": 4, "shards": 2}}
    assert m["bytes_per_token"] == 16 * (2 + 2) + 8 and m["teacher_held_out"]["perplexity"] > 1
    assert "samples/s" in p.stdout and "ETA" in p.stdout and "bytes per token" in p.stdout
    before = _digest(out)
    # a kill: no manifest, one shard missing, one half-written temp shard left behind
    (out / "manifest.json").unlink()
    shutil.rmtree(out / "train" / "00004")
    (out / "train" / ".00005.tmp-999").mkdir()
    (out / "train" / ".00005.tmp-999" / "ids.bin").write_bytes(b"partial")
    p = run_py(CACHE, *job["common"], f"cache.dir={out}", "cache.topk=16", "cache.shard_samples=3")
    assert "train: 16 samples in 6 shards, 5 already written, 1 to write" in p.stdout, p.stdout
    after = _digest(out)
    same = [k for k in before if k != "manifest.json"]
    assert {k: after[k] for k in same} == {k: before[k] for k in same}  # the rewritten shard is identical
    assert not list((out / "train").glob(".*"))
    p = run_py(CACHE, *job["common"], f"cache.dir={out}", "cache.topk=16", "cache.shard_samples=3")
    assert "is complete; nothing to do" in p.stdout


def test_full_vocabulary_cache_trains_like_the_online_teacher(job):
    """K = the whole vocabulary (fp32): the offline job's losses equal the online job's."""
    d = job["dir"]
    run_py(CACHE, *job["common"], f"cache.dir={d / 'cache_full'}", "cache.topk=null", "cache.dtype=float32")
    run_py(DISTILL, *job["common"], f"workdir={d / 'online'}", f"student.checkpoint={job['student']}")
    p = run_py(DISTILL, *job["common"], f"workdir={d / 'offline'}", f"student.checkpoint={job['student']}",
               f"distill.teacher_cache={d / 'cache_full'}")
    assert "offline, from the cache" in p.stdout
    on, off = _train_records(d / "online"), _train_records(d / "offline")
    assert sorted(on) == sorted(off) == [1, 2, 3, 4]
    for i in on:
        for k in ("lm", "logits", "total"):
            assert abs(on[i][k] - off[i][k]) <= 1e-4 * abs(on[i][k]) + 1e-6, (i, k, on[i][k], off[i][k])
    r_on, r_off = (json.loads((d / w / "results.json").read_text()) for w in ("online", "offline"))
    assert abs(r_on["teacher"] - r_off["teacher"]) <= 1e-4 * r_on["teacher"]  # measured when caching
    assert abs(r_on["student_distilled"] - r_off["student_distilled"]) <= 1e-3 * r_on["student_distilled"]


def test_offline_job_resumes_bitwise(job, cache16):
    d, (cache, _) = job["dir"], cache16
    args = [*job["common"], f"workdir={d / 'resume'}", f"student.checkpoint={job['student']}",
            f"distill.teacher_cache={cache}", "distill.teacher_cache_topk=8"]
    run_py(DISTILL, *args)
    first = _train_records(d / "resume")
    shutil.rmtree(d / "resume" / "checkpoints" / "iter_0000004")  # as if killed after the checkpoint at 2
    p = run_py(DISTILL, *args)
    assert "resumed from" in p.stdout and "iteration 2" in p.stdout
    again = _train_records(d / "resume")  # the later records of iterations 3 and 4 win
    assert [again[i] for i in (3, 4)] != [] and all(again[i][k] == first[i][k] for i in (3, 4)
                                                    for k in ("lm", "logits", "total"))


MISMATCH = {
    "sequence length": (["data.seq_length=16"], "seq_length is 32 in the cache and 16 here"),
    "samples": (["trainer.train_iters=5"], "train_samples is 16 in the cache and 20 here"),
    "other teacher": (["teacher.checkpoint={student_hf}"], "this job's teacher"),
    "other data": (["data.train_text={valid}"], "other tokens than this job's data"),
    "topk": (["distill.teacher_cache_topk=17"], "distill.teacher_cache_topk=17"),
    "temperature": (["distill.logit_kl_temperature=2.0"], "temperature is 1.0 in the cache and 2.0 here"),
    "hidden states": (["distill=logits_and_final_norm"], "distill.intermediate_layer_pairs"),
    "incomplete": (["distill.teacher_cache={incomplete}"], "is incomplete"),
    "truncated": (["distill.teacher_cache={truncated}"], "cannot read teacher cache shard"),
}


@pytest.mark.parametrize("case", sorted(MISMATCH))
def test_mismatched_cache_is_refused_before_compute(job, cache16, tmp_path, case):
    d, (cache, _) = job["dir"], cache16
    if case in ("incomplete", "truncated"):
        broken = tmp_path / case
        shutil.copytree(cache, broken)
        if case == "incomplete":
            (broken / "manifest.json").unlink()
        else:
            f = broken / "train" / "00002" / "logp.bin"
            f.write_bytes(f.read_bytes()[:100])
        cache = broken
    before = _digest(cache)
    extra, want = MISMATCH[case]
    extra = [e.format(student_hf=d / "student_hf", valid=d / "valid.txt", incomplete=cache, truncated=cache)
             for e in extra]
    run = run_py if case == "truncated" else run_main  # one real process; the rest in-process
    p = run(DISTILL, *job["common"], f"workdir={tmp_path / 'w'}", f"student.checkpoint={job['student']}",
            f"distill.teacher_cache={cache}", *extra, **({"check": False} if case == "truncated" else {}))
    assert p.returncode == 2, p.stdout[-1500:] + p.stderr[-1500:]
    err = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and want in err[0] and "Traceback" not in p.stderr, err
    assert "[train]" not in p.stdout  # refused before any training step
    assert _digest(cache) == before


def test_cache_dir_of_other_settings_is_refused(job, cache16):
    cache, _ = cache16
    before = _digest(cache)
    p = run_main(CACHE, *job["common"], f"cache.dir={cache}", "cache.topk=32", "cache.shard_samples=3")
    assert p.returncode == 2 and "Traceback" not in p.stderr
    err = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and "topk=16" in err[0] and "overwrite=true" in err[0], err
    assert _digest(cache) == before


def test_slurm_pipeline_runs_the_cache_stage_before_distill(capsys, tmp_path):
    import sys

    sys.path.insert(0, str(ROOT / "launchers"))
    import submit

    def dry(*argv):
        try:
            submit.main(["pipeline", "--dry-run", f"launcher.logs={tmp_path}/logs", "trainer.train_iters=10", *argv])
            code = 0
        except SystemExit as e:
            code = e.code
        out = capsys.readouterr()
        return code, out.out, out.err

    code, out, err = dry(f"distill.teacher_cache={tmp_path}/cache")
    assert code == 0, err
    scripts = out.split("# ---- ")[1:]
    names = [s.split("\n")[0].rsplit("-", 1)[1] for s in scripts]
    assert names[names.index("cache_teacher.sbatch") + 1] == "distill.sbatch", names
    cache_script = scripts[names.index("cache_teacher.sbatch")]
    assert f"recipes/cache_teacher.py --config-name smollm2_demo" in cache_script
    assert f"cache.dir={tmp_path}/cache" in cache_script and "--dependency=afterok:<" in cache_script
    assert f"distill.teacher_cache={tmp_path}/cache" in scripts[names.index("distill.sbatch")]
    code, out, _ = dry()  # no cache asked for: no cache stage
    assert code == 0 and "cache_teacher.sbatch" not in out and "skipping cache_teacher" in out


@pytest.mark.parametrize("layout", ["pp2", "dp2"])
def test_cache_of_any_layout_equals_the_single_process_cache(job, cache16, tmp_path, layout):
    """Written by two processes (pipeline stages, or data-parallel replicas taking shards in turn), the
    cache holds the single-process cache's tokens and values."""
    import numpy as np

    single, _ = cache16
    par = ["parallel.pipeline_model_parallel_size=2"] if layout == "pp2" else []
    out = tmp_path / "cache"
    run_torchrun(CACHE, 2, *job["common"], f"cache.dir={out}", "cache.topk=16", "cache.shard_samples=3", *par,
                 timeout=600)
    for split, shards in (("train", 6), ("valid", 2)):
        for s in range(shards):
            for name, dtype in (("ids", np.uint16), ("logp", np.uint16), ("hashes", np.int64)):
                a, b = (np.fromfile(r / split / f"{s:05d}" / f"{name}.bin", dtype=dtype) for r in (single, out))
                assert np.array_equal(a, b), (split, s, name)
            a, b = (np.fromfile(r / split / f"{s:05d}" / "lse.bin", dtype=np.float32) for r in (single, out))
            assert np.allclose(a, b, rtol=1e-5, atol=1e-5), (split, s)


def test_offline_job_at_tp2_matches_tp1(job, cache16, tmp_path):
    cache, _ = cache16
    args = [*job["common"], f"student.checkpoint={job['student']}", f"distill.teacher_cache={cache}",
            "checkpointing.save_interval=null"]
    run_py(DISTILL, *args, f"workdir={tmp_path / 'tp1'}")
    run_torchrun(DISTILL, 2, *args, f"workdir={tmp_path / 'tp2'}", "parallel.tensor_model_parallel_size=2",
                 timeout=600)
    a, b = _train_records(tmp_path / "tp1"), _train_records(tmp_path / "tp2")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for i in a:
        for k in ("lm", "logits", "total"):
            assert abs(a[i][k] - b[i][k]) <= 1e-4 * abs(a[i][k]) + 1e-6, (i, k, a[i][k], b[i][k])
