"""NeMo 2 -> Megatron import (recipes/import_nemo.py) against the HF import of the same model.

tests/fixtures/nemo2/<family>/ was written by real NeMo 2 (tools/make_nemo2_fixtures.py, nemo_toolkit
2.7.3) from tests/fixtures/nemo2/<family>_hf/; importing either must give the same checkpoint: the same
model.yaml, bitwise the same weights, the same tokenizer, and logits equal to transformers' (fp32).
No NeMo needed here.
"""

import json
import shutil

import pytest
import torch
import yaml

from conftest import ROOT, run_py, run_torchrun

FIXTURES = ROOT / "tests" / "fixtures" / "nemo2"
FAMILIES = ("llama", "mistral", "qwen2", "nemotron")
WORKERS = ROOT / "tests" / "workers"
RECIPE = ROOT / "recipes" / "import_nemo.py"


def read_weights(ckpt) -> dict:
    """Every tensor of a checkpoint's torch_dist weights (global shapes), without a process group."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    reader = FileSystemReader(str(ckpt / "weights"))
    md = reader.read_metadata()
    sd = {k: torch.empty(v.size, dtype=v.properties.dtype) for k, v in md.state_dict_metadata.items()
          if hasattr(v, "chunks") and "_extra_state" not in k}
    _load_state_dict(sd, reader, no_dist=True)
    return sd


def assert_same_checkpoint(a, b, family):
    ya, yb = (yaml.safe_load((d / "model.yaml").read_text()) for d in (a, b))
    if family == "mistral":  # NeMo's Mistral importer stores seq_length null (HF says 128)
        ya.pop("max_position_embeddings"), yb.pop("max_position_embeddings")
    assert ya == yb
    wa, wb = read_weights(a), read_weights(b)
    assert sorted(wa) == sorted(wb)
    for k in wa:
        assert wa[k].dtype == wb[k].dtype == torch.float32, k
        assert torch.equal(wa[k], wb[k]), k
    ta, tb = a / "tokenizer", b / "tokenizer"
    # (NeMo's Nemotron importer keeps no generation_config.json: a subset of the HF import's files)
    assert {p.name for p in ta.iterdir()} <= {p.name for p in tb.iterdir()}
    # NeMo re-saves the tokenizer (its special_tokens_map.json lists more); the vocabulary is the same
    assert (ta / "tokenizer.json").read_bytes() == (tb / "tokenizer.json").read_bytes()


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    d = tmp_path_factory.mktemp("nemo2")
    for fam in FAMILIES:
        run_py(RECIPE, f"source={FIXTURES / fam}", f"output={d / ('nemo_' + fam)}")
        run_py(ROOT / "recipes" / "import_hf.py", f"source={FIXTURES / (fam + '_hf')}",
               f"output={d / ('hf_' + fam)}")
    return d


@pytest.mark.parametrize("family", FAMILIES)
def test_same_checkpoint_as_hf_import(imported, family):
    assert_same_checkpoint(imported / f"nemo_{family}", imported / f"hf_{family}", family)
    meta = json.loads((imported / f"nemo_{family}" / "meta.json").read_text())
    assert meta["source_format"] == "nemo2"
    assert meta["hf_token_ids"]["bos_token_id"] == 1 and meta["hf_token_ids"]["eos_token_id"] == 2


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_equal_transformers(imported, family):
    p = run_py(WORKERS / "logits_worker.py", imported / f"nemo_{family}", FIXTURES / f"{family}_hf", 1, 1,
               "1e-5")
    assert "max|logits diff|" in p.stdout


def test_import_at_tp2_and_pp2(imported, tmp_path):
    """Nemotron (LayerNorm biases, squared ReLU, partial rotary) at TP=2, logits at TP=2; Llama (tied
    embeddings, Llama-3.1 rope) at PP=2: each rank reads only its shard, same checkpoint as TP=1."""
    ck = tmp_path / "tp2"
    run_torchrun(RECIPE, 2, f"source={FIXTURES / 'nemotron'}", f"output={ck}",
                 "parallel.tensor_model_parallel_size=2")
    assert json.loads((ck / "meta.json").read_text())["saved_tensor_model_parallel_size"] == 2
    assert_same_checkpoint(ck, imported / "hf_nemotron", "nemotron")
    run_torchrun(WORKERS / "logits_worker.py", 2, ck, FIXTURES / "nemotron_hf", 2, 1, "1e-5")
    pp = tmp_path / "pp2"
    run_torchrun(RECIPE, 2, f"source={FIXTURES / 'llama'}", f"output={pp}",
                 "parallel.pipeline_model_parallel_size=2")
    assert json.loads((pp / "meta.json").read_text())["saved_pipeline_model_parallel_size"] == 2
    assert_same_checkpoint(pp, imported / "hf_llama", "llama")


def _user_error(p, *needles):
    assert p.returncode == 2, (p.returncode, p.stdout[-2000:], p.stderr[-2000:])
    lines = [l for l in p.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_bad_input_is_one_line(tmp_path):
    def run(src, out="o"):
        return run_py(RECIPE, f"source={src}", f"output={tmp_path / out}", check=False, timeout=300)

    # not a NeMo 2 directory: an HF directory has no context/
    _user_error(run(FIXTURES / "llama_hf"), "context/")
    _user_error(run(tmp_path / "nope"), "does not exist")
    # an unsupported NeMo model class
    bad = tmp_path / "gemma"
    shutil.copytree(FIXTURES / "llama", bad)
    doc = (bad / "context" / "model.yaml").read_text()
    (bad / "context" / "model.yaml").write_text(doc.replace("llama.LlamaModel", "gemma.GemmaModel", 1))
    _user_error(run(bad), "GemmaModel", "LlamaModel")
    # weights that are not a torch_dist checkpoint
    broken = tmp_path / "broken"
    shutil.copytree(FIXTURES / "qwen2", broken)
    (broken / "weights" / ".metadata").unlink()
    _user_error(run(broken), "torch_dist")
    assert not (tmp_path / "o").exists()
