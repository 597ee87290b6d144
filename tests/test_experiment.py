"""`make experiment` machinery end to end at a tiny scale, on a tiny random teacher (a smoke test of
the stages, tables and plots; the numbers themselves are meaningless here)."""

import json
import math
import re

import pytest
import torch

from conftest import ROOT, run_py

pytestmark = pytest.mark.e2e  # end to end (make test-fast skips it)


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    import transformers

    from minitron_nemo.checkpoint.store import copy_tokenizer
    from minitron_nemo.data.assets import smollm2_hf_dir

    d = tmp_path_factory.mktemp("experiment") / "teacher"
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=49152, tie_word_embeddings=True,
                                   bos_token_id=1, eos_token_id=2,
                                   initializer_range=0.1)  # varied greedy answers (0.02: all blank)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(d)
    copy_tokenizer(smollm2_hf_dir(), d)
    return d


def test_experiment_runs_end_to_end_at_tiny_scale(tiny_teacher, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# title\n<!-- experiment:begin -->\nold\n<!-- experiment:end -->\nrest\n")
    args = [f"teacher={tiny_teacher}", f"workdir={tmp_path / 'work'}", f"results={tmp_path / 'docs'}",
            f"readme={readme}", "scale=0.1", "width.hidden_size=32", "width.ffn_hidden_size=64", "width.grid=16",
            "depth.num_layers=2", "aggregations=[[l2,mean],[mean,l2]]", "depth_criteria=[block,bi]", "budget.train_iters=20",
            "budget.evals_per_run=2", "budget.valid_samples=20", "budget.test_tokens=5000", "budget.lm_eval_limit=20",
            "throughput.prompt_length=8", "throughput.generation_length=4", "throughput.repeats=1",
            "generate_tokens=4", "extra_overrides=['teacher.max_loss_fraction=10']",
            "iterative.enabled=false", "search.top_k=2", "teacher_cache.topk=16", "teacher_cache.ks=[8]",
            "chat.answer_tokens=24", "chat.if_new_tokens=24", "alignment.answer_tokens=24"]
    run_py(ROOT / "recipes" / "experiments" / "minitron_smollm2.py", *args, env={"HF_DATASETS_OFFLINE": "1",
                                                                                     "HF_HUB_OFFLINE": "1"})
    md = (tmp_path / "docs" / "results.md").read_text()
    for section in ("## Headline", "## 1. Teacher correction", "## 2. Width vs depth", "## 3. Distillation vs",
                    "## 4. Importance aggregation", "## 5. Depth criteria", "## 6. Offline distillation",
                    "## 7. Budget search by short distillation", "### 7a.", "## Greedy samples",
                    "## Chat: raw text vs conversations", "## Alignment: SFT and DPO after distillation"):
        assert section in md
    for png in ("headline", "correction", "width_vs_depth", "kd_vs_lm", "depth_criteria", "aggregation",
                "importance", "search"):
        assert (tmp_path / "docs" / "img" / f"{png}.png").stat().st_size > 1000
    assert "nan" not in md.lower()
    assert readme.read_text().startswith("# title\n<!-- experiment:begin -->\n| model |")
    assert "rest" in readme.read_text() and "old" not in readme.read_text()
    # every arm trained the same number of tokens and logged its validation curve
    work = tmp_path / "work" / "arms"
    arms = sorted(d.name for d in work.iterdir())
    assert arms == sorted(["width_kd", "width_kd_uncorrected", "width_lm", "random_lm", "depth_block_kd",
                           "depth_bi_kd", "width_kd_cached", "width_kd_top8"])
    # the arms that share the corrected teacher read it from the caches; width_kd stays online
    meta = {a: json.loads((work / a / "results.json").read_text()) for a in arms}
    for a in arms:
        log = (tmp_path / "work" / "logs" / f"{a}.log").read_text()
        assert ("offline, from the cache" in log) == (a.startswith(("depth_", "width_kd_top")) or a == "width_kd_cached"), a
    assert abs(meta["width_kd_cached"]["student_distilled"] - meta["width_kd"]["student_distilled"]) \
        <= 1e-3 * meta["width_kd"]["student_distilled"]
    for a in arms:
        res = json.loads((work / a / "results.json").read_text())
        assert res["final_checkpoint"].endswith("iter_0000002")
        valid = [json.loads(l) for l in (work / a / "metrics.jsonl").read_text().splitlines()
                 if '"valid"' in l]
        assert [v["iteration"] for v in valid] == [0, 1, 2] and all(math.isfinite(v["student_lm"]) for v in valid)
    # the random-init arm really started from random weights of the width architecture
    r = json.loads((work / "random_lm" / "results.json").read_text())
    w = json.loads((work / "width_lm" / "results.json").read_text())
    assert r["student_zero_shot"] != w["student_zero_shot"]
    assert re.search(r"agrees|differs", md)
    # a second run skips every stage and rewrites the same report
    p2 = run_py(ROOT / "recipes" / "experiments" / "minitron_smollm2.py", *args,
                env={"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    assert "[experiment] recipes/" not in p2.stdout and "[experiment] wrote" in p2.stdout
