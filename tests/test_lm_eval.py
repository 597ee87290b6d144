"""The offline lm-eval tasks load and score a (tiny, random) model end to end through evaluate.py."""

import json

import pytest
import torch

from conftest import ROOT, run_py


@pytest.fixture(scope="module")
def tiny_with_tokenizer(tmp_path_factory):
    """A 2-layer random Llama that uses SmolLM2's real tokenizer (so the tasks' text tokenizes)."""
    import transformers

    from minitron_nemo.checkpoint.store import copy_tokenizer
    from minitron_nemo.data.assets import smollm2_hf_dir

    d = tmp_path_factory.mktemp("lm_eval") / "tiny"
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, vocab_size=49152,
                                   tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(d)
    copy_tokenizer(smollm2_hf_dir(), d)
    return d


def test_offline_tasks_score_a_model(tiny_with_tokenizer, tmp_path):
    from minitron_nemo.data.assets import shakespeare_splits
    from minitron_nemo.eval.harness import build_task_data

    text = shakespeare_splits()["test"]
    data = build_task_data(text, tmp_path / "data", n_docs=50, seed=0)
    docs = [json.loads(l) for l in (data / "shakespeare_mc.jsonl").read_text().splitlines()]
    assert len(docs) == 50 and all(len(d["choices"]) == 4 and 0 <= d["label"] < 4 for d in docs)
    assert all(d["choices"][d["label"]] not in d["context"] for d in docs)

    out = tmp_path / "res.json"
    run_py(ROOT / "recipes" / "evaluate.py", f"checkpoint={tiny_with_tokenizer}", f"eval.text_file={text}",
           "eval.perplexity=false", "eval.lm_eval_tasks=[shakespeare_mc,shakespeare_lastword]",
           "eval.lm_eval_limit=8", f"eval.output={out}", env={"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    res = json.loads(out.read_text())["lm_eval"]
    assert res["shakespeare_mc"]["sample_len"] == 8 and 0.0 <= res["shakespeare_mc"]["acc"] <= 1.0
    assert res["shakespeare_lastword"]["perplexity"] > 1.0


def test_unknown_task_is_a_one_line_error(tiny_with_tokenizer, tmp_path):
    from minitron_nemo.data.assets import shakespeare_splits

    p = run_py(ROOT / "recipes" / "evaluate.py", f"checkpoint={tiny_with_tokenizer}",
               f"eval.text_file={shakespeare_splits()['test']}", "eval.perplexity=false",
               "eval.lm_eval_tasks=[no_such_task]", check=False,
               env={"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    assert p.returncode == 2 and "no_such_task" in p.stderr and "Traceback" not in p.stderr
