"""DPO (recipes/dpo.py): pairs rendered in the model's chat template with response-only masks; the loss
starts at ln 2 (the policy is its reference), a resumed run repeats the uninterrupted one exactly, TP=2
equals TP=1, and bad pairs or settings are one line before any compute."""

from __future__ import annotations

import json
import math
import os
import shutil

import pytest
import torch

from conftest import ROOT, run_main, run_torchrun
from test_user_errors import assert_one_line, snapshot

RECIPE = "recipes/dpo.py"
PAIRS = [("Tell me about the sea.", "The sea is wide and deep.", "sea sea sea"),
         ("Name a king from Shakespeare.", "King Lear.", "A table."),
         ("Who wrote Hamlet?", "William Shakespeare wrote Hamlet.", "Nobody knows."),
         ("Say hello.", "Hello there!", "Go away.")]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from hf_models import make_chat_model

    d = tmp_path_factory.mktemp("dpo")
    make_chat_model(d / "hf")
    p = run_main("recipes/import_hf.py", f"source={d / 'hf'}", f"output={d / 'ckpt'}")
    assert p.returncode == 0, p.stderr
    lines = [{"prompt": q, "chosen": w, "rejected": lose} for q, w, lose in PAIRS]
    lines[1]["prompt"] = [{"role": "user", "content": PAIRS[1][0]}]          # a message-list prompt
    lines[3]["chosen"] = [{"role": "assistant", "content": PAIRS[3][1]}]      # a message-list response
    (d / "pairs.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return d


def job(model, work, *extra):
    return [f"checkpoint={model / 'ckpt'}", f"data.preference_file={model / 'pairs.jsonl'}", f"workdir={work}",
            "data.seq_length=48", "data.valid_samples=2", "trainer.train_iters=4", "trainer.micro_batch_size=1",
            "trainer.global_batch_size=2", "trainer.warmup_iters=0", "trainer.eval_interval=4",
            "trainer.tensorboard=false", "trainer.optim.lr=1e-3", "trainer.optim.min_lr=1e-4", *extra]


def rows(work, kind="train") -> dict:
    out = {}
    for line in (work / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["kind"] == kind:
            out[r["iteration"]] = r
    return out


def test_response_masks_and_sequence_log_probs_match_transformers(model):
    """Each side's response mask covers the response and its end of turn only, and the per-row sum of
    response log-probs the DPO loss uses equals transformers' on the same tokens."""
    import transformers as tf

    from minitron_nemo import runtime
    from minitron_nemo.align.dpo import sequence_logps
    from minitron_nemo.align.preferences import PreferenceSamples, chat_renderer, read_pairs
    from minitron_nemo.checkpoint import store
    from minitron_nemo.models.forward import full_logits

    hf = tf.AutoTokenizer.from_pretrained(str(model / "hf"))
    pairs = read_pairs(model / "pairs.jsonl", chat_renderer(model / "hf"), 48)
    for (cw, mw, cl, ml), (_, w, lose) in zip(pairs, PAIRS):
        assert hf.decode([t for t, m in zip(cw, mw) if m]) == w + "<|im_end|>"
        assert hf.decode([t for t, m in zip(cl, ml) if m]) == lose + "<|im_end|>"
    batch = {k: v[None] for k, v in PreferenceSamples(pairs, 48, 2, 1)[0].items()}
    env = dict(os.environ)
    runtime.init_distributed(1, 1)  # the environment is restored below, whatever it sets
    try:
        mc = store.load_model_config(model / "ckpt")
        ours = sequence_logps(full_logits(store.load_model(model / "ckpt", mc), batch["tokens"][0]), batch)
    finally:
        runtime.shutdown()
        os.environ.clear()
        os.environ.update(env)
    ref = tf.AutoModelForCausalLM.from_pretrained(str(model / "hf"), dtype=torch.float32).eval()
    for row, (ids, mask) in enumerate(((pairs[0][0], pairs[0][1]), (pairs[0][2], pairs[0][3]))):
        t = torch.tensor([ids])
        with torch.no_grad():
            logp = torch.log_softmax(ref(t).logits[0, :-1].double(), -1).gather(1, t[0, 1:, None])[:, 0]
        want = float((logp * torch.tensor(mask[1:], dtype=torch.float64)).sum())
        assert abs(float(ours[row]) - want) < 1e-3, (row, float(ours[row]), want)


def test_dpo_starts_at_ln2_and_resumes_exactly(tmp_path, model):
    work = tmp_path / "job"
    p = run_main(RECIPE, *job(model, work, "checkpointing.save_interval=2"))
    assert p.returncode == 0, p.stderr[-3000:]
    first = rows(work)[1]
    assert abs(first["dpo"] - math.log(2)) < 1e-6 and first["margin"] == 0.0
    assert abs(rows(work, "valid")[0]["dpo"] - math.log(2)) < 1e-6
    assert rows(work)[4]["margin"] > 0  # the policy moved towards the chosen answers
    full = {k: dict(v) for k, v in rows(work).items()}, rows(work, "valid")[4]
    shutil.rmtree(work / "checkpoints" / "iter_0000004")
    (work / "results.json").unlink()
    p = run_main(RECIPE, *job(model, work, "checkpointing.save_interval=2"))
    assert p.returncode == 0, p.stderr[-3000:]
    again = rows(work)
    for it in (3, 4):
        assert {k: again[it][k] for k in ("dpo", "margin", "reward_chosen")} == \
               {k: full[0][it][k] for k in ("dpo", "margin", "reward_chosen")}
    assert rows(work, "valid")[4]["dpo"] == full[1]["dpo"]


def test_tp2_equals_tp1(tmp_path, model):
    p = run_main(RECIPE, *job(model, tmp_path / "tp1", "trainer.train_iters=2", "checkpointing.save_interval=null"))
    assert p.returncode == 0, p.stderr[-3000:]
    run_torchrun(ROOT / RECIPE, 2, *job(model, tmp_path / "tp2", "trainer.train_iters=2",
                                         "checkpointing.save_interval=null", "parallel.tensor_model_parallel_size=2"))
    a, b = rows(tmp_path / "tp1"), rows(tmp_path / "tp2")
    for it in (1, 2):
        assert abs(a[it]["dpo"] - b[it]["dpo"]) < 1e-5 and abs(a[it]["margin"] - b[it]["margin"]) < 1e-5, (a, b)
    assert a[2]["margin"] != 0.0


BAD = {  # name: (a pairs line or an override, needles)
    "no rejected": ('{"prompt": "a", "chosen": "b"}', ["pairs.jsonl:1", "no 'rejected'"]),
    "empty response": ('{"prompt": "a", "chosen": " ", "rejected": "c"}', ["pairs.jsonl:1", "empty response"]),
    "too long": (json.dumps({"prompt": "word " * 80, "chosen": "b", "rejected": "c"}),
                 ["pairs.jsonl:1", "more than data.seq_length + 1 = 49"]),
    "unknown role": ('{"prompt": [{"role": "judge", "content": "a"}], "chosen": "b", "rejected": "c"}',
                     ["pairs.jsonl:1", "role 'judge'"]),
    "beta=0": ("dpo.beta=0", ["dpo.beta", "0"]),
    "no pairs file": ("data.preference_file=/nonexistent/pairs.jsonl", ["data.preference_file=/nonexistent/pairs.jsonl",
                                                                        "does not exist"]),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_pairs_and_settings_are_one_line_before_compute(tmp_path, model, name):
    line, needles = BAD[name]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(line + "\n" if line.startswith("{") else (model / "pairs.jsonl").read_text())
    extra = [] if line.startswith("{") else [line]
    before = snapshot(tmp_path)
    args = [a.replace(str(model / "pairs.jsonl"), str(pairs)) for a in job(model, tmp_path / "job")]
    p = run_main(RECIPE, *args, *extra)
    assert_one_line(p, 2, *needles)
    assert snapshot(tmp_path) == before and not (tmp_path / "job").exists()
