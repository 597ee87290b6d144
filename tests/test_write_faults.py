"""Issue-27 cases of writing and prompting: a data cache inside the teacher is refused before anything is
written; a short write while writing the teacher cache (numpy's tofile on a full disk, no errno) is a
full disk in one line, with no partial shard; an empty generation prompt is one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import run_main
from test_user_errors import assert_one_line, snapshot


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from hf_models import make_hf_model

    d = tmp_path_factory.mktemp("faults")
    make_hf_model("llama", d / "hf")
    p = run_main("recipes/import_hf.py", f"source={d / 'hf'}", f"output={d / 'ckpt'}")
    assert p.returncode == 0, p.stderr
    (d / "text.txt").write_text("To be, or not to be, that is the question.\n" * 40)
    return d


@pytest.mark.parametrize("script", ["recipes/distill.py", "recipes/correct_teacher.py"])
def test_a_data_cache_inside_the_teacher_is_refused(tmp_path, ckpt, script):
    before = snapshot(ckpt / "ckpt")
    p = run_main(script, "~model", f"teacher.checkpoint={ckpt / 'ckpt'}", "teacher.corrected_checkpoint="
                 f"{tmp_path / 'corrected'}", f"student.checkpoint={ckpt / 'ckpt'}", f"workdir={tmp_path / 'job'}",
                 "data=text", f"data.train_text={ckpt / 'text.txt'}", f"data.cache_dir={ckpt / 'ckpt' / 'datacache'}",
                 "data.seq_length=16", "trainer.train_iters=1", "trainer.warmup_iters=0", "correction.train_iters=1",
                 "correction.warmup_iters=0")
    assert_one_line(p, 2, "data.cache_dir=", "lies inside", str(ckpt / "ckpt"))
    assert snapshot(ckpt / "ckpt") == before and not (tmp_path / "job").exists()


class ShortWrite(np.ndarray):
    def tofile(self, *a, **k):  # what numpy raises when the disk fills mid-write
        raise OSError("16384 requested and 8192 written")


def test_a_short_write_of_a_cache_shard_is_a_full_disk(tmp_path, monkeypatch):
    from minitron_nemo.distill import cache
    from minitron_nemo.errors import UserError

    layout = cache.Layout(4, 8, "float32", 100)
    n = 2
    arrays = {"ids": torch.zeros(n, 8, 4, dtype=torch.int64), "logp": torch.zeros(n, 8, 4),
              "lse": torch.zeros(n, 8), "target": torch.zeros(n, 8), "hashes": torch.zeros(n, dtype=torch.int64)}
    arrays = {k: v for k, v in arrays.items() if k in layout.shapes(n) or k == "hashes"}
    real = cache._to_numpy
    monkeypatch.setattr(cache, "_to_numpy", lambda a, dt: real(a, dt).view(ShortWrite))
    with pytest.raises(UserError) as e:
        cache.write_shard(tmp_path / "cache", "train", 0, 0, layout, arrays)
    msg = str(e.value)
    assert "disk is full" in msg and "16384 requested and 8192 written" in msg and "\n" not in msg
    assert str(tmp_path / "cache") in msg
    assert [p for p in (tmp_path / "cache").rglob("*") if p.is_file()] == []  # no partial shard


WORKER_SHORT = "Worker failure: [enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"
WORKER_REPORTS = {  # as Megatron-Core's writer process reports it: alone, or in the checkpoint's exception with
    # the process's traceback (seen on a CI run)
    "alone": WORKER_SHORT,
    "with_traceback": "CheckpointException ranks:dict_keys([0])\nTraceback (most recent call last): (RANK 0)\n  File "
                      "\"filesystem_async.py\", line 445, in retrieve_write_results\n    raise RuntimeError(\n"
                      f"RuntimeError: {WORKER_SHORT}\n",
}


@pytest.mark.parametrize("report", sorted(WORKER_REPORTS))
def test_a_short_write_inside_the_checkpoint_writer_is_a_full_disk(tmp_path, ckpt, monkeypatch, report):
    """What Megatron-Core's checkpoint writer process reports when torch.save's zip writer stops short on a
    full disk (a RuntimeError, no errno): one line naming the output, which is not created."""
    from megatron.core import dist_checkpointing

    def short(*a, **k):
        raise RuntimeError(WORKER_REPORTS[report])

    monkeypatch.setattr(dist_checkpointing, "save", short)
    out = tmp_path / "ckpt"
    p = run_main("recipes/import_hf.py", f"source={ckpt / 'hf'}", f"output={out}")
    assert_one_line(p, 2, f"cannot write {out}", "the disk is full", "unexpected pos 704 vs 598")
    assert not out.exists()


def test_an_empty_generation_prompt_is_one_line(tmp_path, ckpt):
    p = run_main("recipes/evaluate.py", f"checkpoint={ckpt / 'ckpt'}", f"eval.text_file={ckpt / 'text.txt'}",
                 "eval.generate.prompts=['To be','']")
    assert_one_line(p, 2, "eval.generate.prompts[1]=''", "is empty")


def test_an_uncached_lm_eval_task_offline_is_one_line_at_once(tmp_path):
    """Without a network (here: HF_HUB_OFFLINE=1) and with an empty Hugging Face cache, a standard lm-eval
    task stops before the model loads, in one line naming the task and the cache: no retries."""
    from hf_models import make_chat_model
    from test_user_errors import run

    make_chat_model(tmp_path / "hf")
    assert run_main("recipes/import_hf.py", f"source={tmp_path / 'hf'}", f"output={tmp_path / 'ckpt'}").returncode == 0
    (tmp_path / "text.txt").write_text("To be, or not to be, that is the question.\n" * 40)
    p = run("recipes/evaluate.py", f"checkpoint={tmp_path / 'ckpt'}", f"eval.text_file={tmp_path / 'text.txt'}",
            "eval.lm_eval_tasks=[arc_easy]", "eval.perplexity=false", f"eval.output={tmp_path / 'eval.json'}",
            env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}, timeout=120)
    assert_one_line(p, 2, "lm-eval task(s) arc_easy", "not in the local Hugging Face cache", str(tmp_path / "hf_home"))
    assert not (tmp_path / "eval.json").exists()
