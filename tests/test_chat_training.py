"""Training on chat data (``data.source=chat``): one conversation per sample (or several, packed), the
loss on answer tokens; the validation loss ``recipes/distill.py`` reports equals the answer-token loss
``transformers`` computes for the same conversation, and differs from the all-token loss it reports with
``data.answer_only=false``; packed documents' logits equal their logits alone at TP=2 and PP=2."""

from __future__ import annotations

import json
import random
import re

import numpy as np
import pytest
import torch

from conftest import ROOT, run_main, run_torchrun
from test_user_errors import assert_one_line

WORDS = "love death crown storm night king sea ghost sword letter".split()


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    """A tiny random Llama with SmolLM2's real tokenizer and chat template (HF and imported), and 40
    short conversations preprocessed in that template."""
    from hf_models import make_chat_model

    d = tmp_path_factory.mktemp("chat")
    make_chat_model(d / "hf")
    rng = random.Random(0)
    with open(d / "c.jsonl", "w") as f:
        for i in range(40):
            a, b = rng.sample(WORDS, 2)
            f.write(json.dumps({"messages": [
                {"role": "user", "content": f"Tell me about the {a} and the {b}."},
                {"role": "assistant", "content": f"The {a} meets the {b} in act {i % 5 + 1}."}]}) + "\n")
    for script, args in (("recipes/import_hf.py", [f"source={d / 'hf'}", f"output={d / 'ckpt'}"]),
                         ("recipes/preprocess_data.py", ["format=chat", f"input={d / 'c.jsonl'}",
                                                         f"tokenizer={d / 'hf'}", f"output_prefix={d / 'chat'}"])):
        p = run_main(script, *args)
        assert p.returncode == 0, p.stderr[-3000:]
    return d


def example(prefix, index: int) -> dict:
    p = run_main("recipes/inspect_data.py", f"prefix={prefix}", f"index={index}")
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def test_samples_are_conversations_with_shifted_answer_masks(chat):
    from omegaconf import OmegaConf

    from minitron_nemo.data.chat_samples import build_chat_datasets

    dcfg = OmegaConf.create({"blend": str(chat / "chat"), "valid_blend": None, "split": "969,30,1",
                             "seq_length": 32, "answer_only": True})
    train, valid = build_chat_datasets(dcfg, pad_id=2, samples=(80, 1), seed=5, log=lambda m: None)
    assert len(train) == 80 and len(valid) == 1
    seen = []
    for i in range(len(train)):
        s, d = train[i], train.doc_of(i)
        ex = example(chat / "chat", d) if i < 3 else None
        seen.append(d)
        if ex is None:
            continue
        ids, mask, n = ex["tokens"], ex["loss_mask"], min(len(ex["tokens"]) - 1, 32)
        assert s["tokens"][:n].tolist() == ids[:n] and s["labels"][:n].tolist() == ids[1:n + 1]
        assert s["loss_mask"][:n].tolist() == mask[1:n + 1] and not s["loss_mask"][n:].any()
        assert (s["tokens"][n:] == 2).all()
    assert sorted(seen[:39]) == list(range(39)) and sorted(seen[39:78]) == list(range(39))  # every conversation
    assert seen[:39] != seen[39:78]  # once per epoch, in a new order each epoch
    again, _ = build_chat_datasets(dcfg, pad_id=2, samples=(80, 1), seed=5, log=lambda m: None)
    assert all(torch.equal(train[i]["tokens"], again[i]["tokens"]) for i in (0, 41, 79))  # the seed fixes it
    assert valid.doc_of(0) == 39


def reference_loss(chat, answer_only: bool) -> float:
    """The teacher's next-token loss on the validation conversation (document 39), from transformers."""
    import transformers as tf

    ex = example(chat / "chat", 39)
    model = tf.AutoModelForCausalLM.from_pretrained(chat / "hf", dtype=torch.float32).eval()
    ids = torch.tensor([ex["tokens"]])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
    nll = -logp.gather(1, ids[0, 1:, None])[:, 0]
    mask = torch.tensor(ex["loss_mask"][1:], dtype=torch.float64) if answer_only else torch.ones_like(nll)
    return float((nll * mask).sum() / mask.sum())


def distill(chat, work, *extra, script="recipes/distill.py", seq=64):
    return run_main(script, "~model", f"teacher.checkpoint={chat / 'ckpt'}",
                    "teacher.corrected_checkpoint=null", "teacher.held_out=false", "teacher.max_loss_fraction=10",
                    f"student.checkpoint={chat / 'ckpt'}", f"workdir={work}", "data=chat", f"data.blend={chat / 'chat'}",
                    f"data.seq_length={seq}", "data.valid_samples=1", "trainer.train_iters=2", "trainer.warmup_iters=0",
                    "trainer.micro_batch_size=1", "trainer.global_batch_size=2", "trainer.tensorboard=false",
                    "checkpointing.save_interval=null", *extra)


@pytest.mark.parametrize("answer_only, packing", [(True, False), (False, False), (True, True)])
def test_distill_reports_the_answer_token_loss(tmp_path, chat, answer_only, packing):
    p = distill(chat, tmp_path / "job", f"data.answer_only={str(answer_only).lower()}",
                f"data.packing={str(packing).lower()}")
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"loss on {'answer' if answer_only else 'all'} tokens" in p.stdout
    assert ("[data] packing: padding" in p.stdout) == packing
    got = float(re.search(r"\[valid\] iter 0 \| .*teacher_lm ([0-9.]+)", p.stdout).group(1))
    want, other = reference_loss(chat, answer_only), reference_loss(chat, not answer_only)
    assert abs(got - want) < 2e-4 and abs(other - want) > 1e-2, (got, want, other)
    res = json.loads((tmp_path / "job" / "results.json").read_text())
    assert np.isfinite(res["seconds"])
    # no held-out text: the end of the run reports the last validation, on the same tokens, not NaN perplexities
    assert abs(res["valid"]["teacher_lm"] - want) < 2e-4 and "nan" not in p.stdout.split("validation at the end")[1]


def test_packed_samples_hold_whole_conversations(chat):
    from omegaconf import OmegaConf

    from minitron_nemo.data.chat_samples import build_chat_datasets

    dcfg = OmegaConf.create({"blend": str(chat / "chat"), "valid_blend": None, "split": "98,2,0",
                             "seq_length": 128, "answer_only": True, "packing": True})
    said = []
    train, _ = build_chat_datasets(dcfg, pad_id=2, samples=(24, 1), seed=5, log=said.append)
    fractions = re.search(r"padding ([0-9.]+)% of positions unpacked, ([0-9.]+)% packed", said[-1])
    assert float(fractions.group(2)) < float(fractions.group(1)) / 2, said
    seen = []
    for i in range(len(train)):
        s, docs = train[i], train.bin(i)
        seg = s["segment_ids"].tolist()
        at = 0
        for k, d in enumerate(docs):
            ex = example(chat / "chat", d)
            n = len(ex["tokens"])
            assert s["tokens"][at:at + n].tolist() == ex["tokens"] and seg[at:at + n] == [k] * n
            assert s["position_ids"][at:at + n].tolist() == list(range(n))
            assert s["labels"][at:at + n - 1].tolist() == ex["tokens"][1:]
            assert s["loss_mask"][at:at + n].tolist() == ex["loss_mask"][1:] + [0.0]  # nothing across documents
            at += n
        assert not s["loss_mask"][at:].any() and set(seg[at:]) <= {len(docs)} and at > 128 - 60
        seen += docs
    assert sorted(seen[:39]) == list(range(39))  # the first epoch: every conversation once


def test_packed_logits_equal_each_conversation_alone_at_tp2_and_pp2(chat):
    p = run_torchrun(ROOT / "tests" / "workers" / "packing_worker.py", 2, chat / "ckpt")
    assert p.stdout.count("max|packed - alone|") == 2


def test_packing_needs_one_sequence_per_micro_batch(tmp_path, chat):
    p = distill(chat, tmp_path / "job", "data.packing=true", "trainer.micro_batch_size=2")
    assert_one_line(p, 2, "data.packing=true needs trainer.micro_batch_size=1", "got 2")
    assert not (tmp_path / "job").exists()


def test_offline_distillation_from_a_cache_of_packed_chat_data(tmp_path, chat):
    """The teacher cache of packed chat samples holds each conversation's log-probabilities as if it were
    alone (checked against transformers), and distillation from it reports the teacher's answer-token
    validation loss that transformers computes."""
    import transformers as tf
    from omegaconf import OmegaConf

    from minitron_nemo.data.chat_samples import build_chat_datasets
    from minitron_nemo.distill.cache import TeacherCache

    p = distill(chat, tmp_path / "cache_job", "data.packing=true", f"cache.dir={tmp_path / 'cache'}",
                script="recipes/cache_teacher.py", seq=128)
    assert p.returncode == 0, p.stderr[-3000:]
    tc = TeacherCache(tmp_path / "cache")
    dcfg = OmegaConf.create({"blend": str(chat / "chat"), "valid_blend": None, "split": "98,2,0",
                             "seq_length": 128, "answer_only": True, "packing": True})
    train, _ = build_chat_datasets(dcfg, 2, (4, 1), int(tc.identity["seed"]), log=lambda m: None)
    sample, docs = train[0], train.bin(0)
    assert len(docs) >= 2
    target = tc.lookup("train", [0], sample["tokens"][None], sample["labels"][None])["target"][0]
    model = tf.AutoModelForCausalLM.from_pretrained(chat / "hf", dtype=torch.float32).eval()
    at = 0
    for d in docs:
        ids = torch.tensor([example(chat / "chat", d)["tokens"]])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1).gather(1, ids[0, 1:, None])[:, 0]
        n = ids.shape[1]
        assert (target[at:at + n - 1] - logp).abs().max() < 1e-4, d
        at += n

    p = distill(chat, tmp_path / "job", "data.packing=true", f"distill.teacher_cache={tmp_path / 'cache'}", seq=128)
    assert p.returncode == 0, p.stderr[-3000:]
    got = float(re.search(r"\[valid\] iter 0 \| .*teacher_lm ([0-9.]+)", p.stdout).group(1))
    assert abs(got - reference_loss(chat, True)) < 2e-4, got
    # the cache's own teacher check counts the same tokens (answers, no padding) as the online check
    online = distill(chat, tmp_path / "online", "data.packing=true", "trainer.train_iters=1", seq=128)
    want = float(re.search(r"\[distill\] teacher validation loss ([0-9.]+)", online.stdout).group(1))
    assert abs(tc.manifest["teacher_loss"]["loss"] - want) < 1e-3, (tc.manifest["teacher_loss"], want)


def test_the_first_kd_step_of_a_student_equal_to_its_teacher_is_zero(tmp_path, chat):
    """fp32: the LM loss computed beside the KD loss must not change the student's logits (Megatron's
    cross entropy works in place)."""
    p = distill(chat, tmp_path / "job", "data.packing=true")
    assert p.returncode == 0, p.stderr[-3000:]
    line = re.search(r"\[train\] iter 1/2 \| lm [0-9.]+ logits (-?[0-9.]+) .*grad ([0-9.]+)", p.stdout)
    assert float(line.group(1)) == 0.0 and float(line.group(2)) == 0.0, line.group(0)


def test_teacher_correction_and_pruning_calibration_on_chat_data(tmp_path, chat):
    """The same chat data serves teacher correction (an answer-only fine-tune: its validation loss is the
    answer-token loss transformers computes) and pruning calibration (the conversations' tokens)."""
    p = distill(chat, tmp_path / "cw", "data.packing=true", f"teacher.corrected_checkpoint={tmp_path / 'corrected'}",
                "correction.train_iters=1", "correction.warmup_iters=0", script="recipes/correct_teacher.py")
    assert p.returncode == 0, p.stderr[-3000:]
    got = float(re.search(r"\[valid\] iter 0 \| lm ([0-9.]+)", p.stdout).group(1))
    assert abs(got - reference_loss(chat, True)) < 2e-4, got
    assert (tmp_path / "corrected" / "model.yaml").is_file()
    p = run_main("recipes/prune.py", f"checkpoint={chat / 'ckpt'}", f"output={tmp_path / 'pruned'}",
                 f"prune.calibration.data={chat / 'chat'}", "prune.calibration.num_samples=4",
                 "prune.calibration.seq_length=32", "prune.target_ffn_hidden_size=48", "prune.grid=16")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "ffn 96->48" in p.stdout
