"""Alignment after distillation: SFT on the answer tokens (recipes/sft.py), on-policy pairs from a teacher
and a student (recipes/make_pairs.py) and the SFT -> DPO chain (recipes/align.py; the ``align`` stages of
recipes/compress.py and launchers/submit.py). SFT's first validation loss is the answer-token loss
transformers computes, a resumed run repeats the uninterrupted one exactly, TP=2 equals TP=1, and bad
settings are one line before any compute."""

from __future__ import annotations

import json
import random
import shutil
import sys

import pytest
import torch

from conftest import ROOT, run_main, run_torchrun
from minitron_nemo.workflows.stages import value
from test_user_errors import assert_one_line, snapshot

WORDS = "love death crown storm night king sea ghost sword letter".split()


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    """Two tiny random chat models (SmolLM2's tokenizer and template), imported; 24 training and 4 held-out
    conversations in that template; prompts for pairs."""
    from hf_models import make_chat_model

    d = tmp_path_factory.mktemp("align")
    make_chat_model(d / "hf")
    make_chat_model(d / "hf_other", seed=1)
    rng = random.Random(0)
    for split, n in (("train", 24), ("valid", 4)):
        with open(d / f"{split}.jsonl", "w") as f:
            for i in range(n):
                a, b = rng.sample(WORDS, 2)
                f.write(json.dumps({"messages": [
                    {"role": "user", "content": f"Tell me about the {a} and the {b}."},
                    {"role": "assistant", "content": f"The {a} meets the {b} in act {i % 5 + 1}."}]}) + "\n")
        p = run_main("recipes/preprocess_data.py", "format=chat", f"input={d / f'{split}.jsonl'}",
                     f"tokenizer={d / 'hf'}", f"output_prefix={d / split}")
        assert p.returncode == 0, p.stderr[-3000:]
    p = run_main("recipes/import_hf.py", f"source={d / 'hf'}", f"output={d / 'ckpt'}")
    assert p.returncode == 0, p.stderr[-3000:]
    (d / "prompts.jsonl").write_text(
        json.dumps({"prompt": "Name a king."}) + "\n"
        + json.dumps({"prompt": [{"role": "user", "content": "Say hello."}]}) + "\n"
        + (d / "valid.jsonl").read_text())   # conversations: the answer after the last user turn is regenerated
    return d


def sft_args(chat, work, *extra):
    return [f"checkpoint={chat / 'ckpt'}", f"workdir={work}", f"data.blend={chat / 'train'}",
            f"data.valid_blend={chat / 'valid'}", "data.seq_length=64", "data.valid_samples=4", "trainer.train_iters=4",
            "trainer.micro_batch_size=1", "trainer.global_batch_size=2", "trainer.warmup_iters=0",
            "trainer.eval_interval=4", "trainer.tensorboard=false", "trainer.optim.lr=1e-3", "trainer.optim.min_lr=1e-4",
            *extra]


def rows(work, kind="train") -> dict:
    return {r["iteration"]: r for r in map(json.loads, (work / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == kind}


def answer_loss(chat, split: str, n: int) -> float:
    """Mean over ``n`` conversations of each one's answer-token loss, from transformers."""
    import transformers as tf

    from minitron_nemo.data.chat import read_example

    model = tf.AutoModelForCausalLM.from_pretrained(chat / "hf", dtype=torch.float32).eval()
    losses = []
    for i in range(n):
        ex = read_example(chat / split, i)
        ids, mask = torch.tensor([ex["tokens"]]), torch.tensor(ex["loss_mask"][1:], dtype=torch.float64)
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
        losses.append(float((-logp.gather(1, ids[0, 1:, None])[:, 0] * mask).sum() / mask.sum()))
    return sum(losses) / n


def test_sft_loss_is_the_answer_token_loss_and_resumes_exactly(tmp_path, chat):
    work = tmp_path / "sft"
    p = run_main("recipes/sft.py", *sft_args(chat, work, "checkpointing.save_interval=2"))
    assert p.returncode == 0, p.stderr[-3000:]
    start, end = rows(work, "valid")[0]["lm"], rows(work, "valid")[4]["lm"]
    assert abs(start - answer_loss(chat, "valid", 4)) < 1e-4, start
    assert end < start - 0.5  # it learns the answers' pattern
    res = json.loads((work / "results.json").read_text())
    assert res["valid_loss"] == end and res["final_checkpoint"].endswith("iter_0000004")
    full = rows(work)
    shutil.rmtree(work / "checkpoints" / "iter_0000004")
    (work / "results.json").unlink()
    p = run_main("recipes/sft.py", *sft_args(chat, work, "checkpointing.save_interval=2"))
    assert p.returncode == 0, p.stderr[-3000:]
    again = rows(work)
    assert [again[i]["lm"] for i in (3, 4)] == [full[i]["lm"] for i in (3, 4)]
    assert rows(work, "valid")[4]["lm"] == end


def test_sft_tp2_equals_tp1(tmp_path, chat):
    one = ["trainer.train_iters=2", "checkpointing.save_interval=null"]
    p = run_main("recipes/sft.py", *sft_args(chat, tmp_path / "tp1", *one))
    assert p.returncode == 0, p.stderr[-3000:]
    run_torchrun(ROOT / "recipes/sft.py", 2, *sft_args(chat, tmp_path / "tp2", *one,
                                                        "parallel.tensor_model_parallel_size=2"))
    a, b = rows(tmp_path / "tp1"), rows(tmp_path / "tp2")
    for it in (1, 2):
        assert abs(a[it]["lm"] - b[it]["lm"]) < 1e-5, (a, b)
    assert a[2]["lm"] != a[1]["lm"]


def test_make_pairs_then_the_sft_dpo_chain(tmp_path, chat):
    """Pairs: the teacher's greedy answer chosen, the student's rejected, each as transformers generates it
    in the model's own template; the chain runs SFT then DPO from the SFT stage's checkpoint, and a re-run
    skips both."""
    from minitron_nemo.eval.generate import load_hf
    from minitron_nemo.eval.instruct import generate_chat

    pairs = tmp_path / "pairs.jsonl"
    p = run_main("recipes/make_pairs.py", f"teacher={chat / 'hf'}", f"student={chat / 'hf_other'}",
                 f"prompts={chat / 'prompts.jsonl'}", f"output={pairs}", "max_new_tokens=6")
    assert p.returncode == 0, p.stderr[-3000:]
    lines = [json.loads(x) for x in pairs.read_text().splitlines()]
    assert len(lines) == 6 and lines[0]["prompt"] == [{"role": "user", "content": "Name a king."}]
    assert lines[2]["prompt"] == json.loads((chat / "valid.jsonl").read_text().splitlines()[0])["messages"][:1]
    model, tok = load_hf(chat / "hf")
    assert [x["chosen"] for x in lines[:2]] == [a.strip() for a in generate_chat(
        model, tok, ["Name a king.", "Say hello."], 6, log=None)]
    # our checkpoint as the teacher: exported, the same answers
    again = tmp_path / "pairs_ckpt.jsonl"
    p = run_main("recipes/make_pairs.py", f"teacher={chat / 'ckpt'}", f"student={chat / 'hf_other'}",
                 f"prompts={chat / 'prompts.jsonl'}", f"output={again}", "max_new_tokens=6", "limit=2")
    assert p.returncode == 0, p.stderr[-3000:]
    assert [json.loads(x)["chosen"] for x in again.read_text().splitlines()] == [x["chosen"] for x in lines[:2]]

    work = tmp_path / "chain"
    small = ["trainer.train_iters=2", "trainer.warmup_iters=0", "trainer.micro_batch_size=1",
             "trainer.global_batch_size=2", "trainer.tensorboard=false", "checkpointing.save_interval=null",
             "trainer.eval_interval=2", "data.valid_samples=2", "data.seq_length=64"]
    stages = [{"name": "sft_a", "recipe": "sft", "overrides": [f"data.blend={chat / 'train'}", *small]},
              {"name": "pref", "recipe": "dpo", "overrides": [f"data.preference_file={pairs}", *small,
                                                            "trainer.optim.lr=1e-3"]}]
    args = [f"checkpoint={chat / 'ckpt'}", f"workdir={work}", "dtype=float32", f"align={value(stages)}"]
    p = run_main("recipes/align.py", *args)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    sft = json.loads((work / "align" / "sft_a" / "results.json").read_text())
    dpo_meta = json.loads((work / "align" / "pref" / "checkpoints" / "iter_0000002" / "meta.json").read_text())
    first = rows(work / "align" / "pref")[1]
    assert abs(first["dpo"] - 0.6931471805599453) < 1e-6   # the reference is the SFT stage's model
    assert dpo_meta["dpo_from"] == sft["final_checkpoint"]
    assert "aligned model" in p.stdout
    p = run_main("recipes/align.py", *args)
    assert p.returncode == 0 and p.stdout.count("skipped") == 2, p.stdout


def test_submit_pipeline_ends_with_the_align_stages(capsys, tmp_path, chat):
    sys.path.insert(0, str(ROOT / "launchers"))
    import submit

    stages = [{"name": "sft1", "recipe": "sft", "overrides": [f"data.blend={chat / 'train'}"]},
              {"name": "dpo1", "recipe": "dpo", "overrides": [f"data.preference_file={chat / 'prompts.jsonl'}"]}]
    try:
        submit.main(["pipeline", "--dry-run", f"launcher.logs={tmp_path}/logs", f"workdir={tmp_path}/w",
                     f"+align={value(stages)}"])
    except SystemExit as e:
        assert e.code == 0
    out = capsys.readouterr().out
    names = [s.split("\n")[0].rsplit("-", 1)[1] for s in out.split("# ---- ")[1:]]
    assert names == ["correct.sbatch", "distill.sbatch", "sft1.sft.sbatch", "dpo1.dpo.sbatch", "export.sbatch"], names
    scripts = dict(zip(names, out.split("# ---- ")[1:]))
    assert f"recipes/sft.py checkpoint=$(final_checkpoint {tmp_path}/w/results.json) workdir={tmp_path}/w/align/sft1" \
        in scripts["sft1.sft.sbatch"]
    assert f"recipes/dpo.py checkpoint=$(final_checkpoint {tmp_path}/w/align/sft1/results.json)" in scripts["dpo1.dpo.sbatch"]
    assert f"checkpoint=$(final_checkpoint {tmp_path}/w/align/dpo1/results.json)" in scripts["export.sbatch"]


BAD = {  # name: (recipe, extra arguments, needles)
    "sft on text": ("recipes/sft.py", ["data=shakespeare"], ["data.source=shakespeare", "allowed: chat"]),
    "sft no checkpoint": ("recipes/sft.py", ["checkpoint=/nonexistent/ckpt"], ["checkpoint=/nonexistent/ckpt"]),
    "align bad stage": ("recipes/align.py", ["align=[{name: x, recipe: ppo}]"],
                        ["align[0].recipe", "ppo", "sft, dpo"]),
    "align stage beta": ("recipes/align.py", ["align=[{name: x, recipe: dpo, overrides: ['dpo.beta=-1', "
                                              "'data.preference_file=PAIRS']}]"],
                         ["align stage x (dpo)", "dpo.beta"]),
    "pairs bad prompt": ("recipes/make_pairs.py", ["prompts=BADPROMPTS"], ["bad.jsonl:1", "no 'prompt' or 'messages'"]),
    "pairs not a model": ("recipes/make_pairs.py", ["student=/nonexistent/model"], ["student=/nonexistent/model"]),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_settings_are_one_line_before_compute(tmp_path, chat, name):
    script, extra, needles = BAD[name]
    (tmp_path / "bad.jsonl").write_text('{"question": "a"}\n')
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n")
    extra = [e.replace("BADPROMPTS", str(tmp_path / "bad.jsonl")).replace("PAIRS", str(tmp_path / "pairs.jsonl"))
             for e in extra]
    if script.endswith("make_pairs.py"):
        base = [f"teacher={chat / 'hf'}", f"student={chat / 'hf_other'}", f"prompts={chat / 'prompts.jsonl'}",
                f"output={tmp_path / 'out' / 'pairs.jsonl'}"]
    elif script.endswith("align.py"):
        base = [f"checkpoint={chat / 'ckpt'}", f"workdir={tmp_path / 'out'}"]
    else:
        base = sft_args(chat, tmp_path / "out")
    keys = {e.split("=", 1)[0] for e in extra}
    before = snapshot(tmp_path)
    p = run_main(script, *[b for b in base if b.split("=", 1)[0] not in keys], *extra)
    assert_one_line(p, 2, *needles)
    assert snapshot(tmp_path) == before and not (tmp_path / "out").exists()


def test_p2_chain_config(tmp_path, chat):
    """conf/p2_align.yaml: math/code SFT, instruction SFT, DPO, each stage's config composed and checked."""
    from minitron_nemo import schemas
    from minitron_nemo.config import compose
    from minitron_nemo.workflows import align_stages

    (tmp_path / "pairs.jsonl").write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n")
    cfg = compose("align", ["--config-name", "p2_align", f"checkpoint={chat / 'ckpt'}", f"workdir={tmp_path / 'w'}",
                            f"data.math_code={chat / 'train'}", f"data.instruct={chat / 'valid'}",
                            f"data.pairs={tmp_path / 'pairs.jsonl'}"], schema=schemas.AlignJob)
    chain = align_stages.resolve(cfg, tmp_path / "w", str(chat / "ckpt"))
    assert [(s.name, s.recipe) for s in chain] == [("sft_math_code", "sft"), ("sft_instruct", "sft"), ("dpo", "dpo")]
    args = align_stages.stage_args(cfg, chain[1], "PREV")
    assert args[:2] == ["checkpoint=PREV", f"workdir={tmp_path / 'w' / 'align' / 'sft_instruct'}"]
    assert f"data.blend={chat / 'valid'}" in args and "data.packing=true" in args
