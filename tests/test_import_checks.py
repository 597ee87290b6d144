"""Sizes that disagree with the weights, and what an import needs: an HF config.json or a NeMo 2
model.yaml naming more or fewer layers than the weights hold is one line naming a tensor, a non-numeric
NeMo 2 size is one line, and a NeMo 2 checkpoint without tokenizer files is refused unless
``tokenizer=HF_DIR`` gives one; nothing is written on a refusal."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import ROOT, run_main
from test_user_errors import assert_one_line, snapshot

FIXTURES = ROOT / "tests" / "fixtures" / "nemo2"


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    from hf_models import make_hf_model

    return make_hf_model("llama", tmp_path_factory.mktemp("hf") / "llama")  # 4 layers


def with_layers(src, dst, n: int):
    shutil.copytree(src, dst)
    c = json.loads((dst / "config.json").read_text())
    c["num_hidden_layers"] = n
    (dst / "config.json").write_text(json.dumps(c))
    return dst


@pytest.mark.parametrize("layers, needles", [
    (3, ["tensor model.layers.3.", "is not part of the model config.json num_hidden_layers=3 describes"]),
    (5, ["num_hidden_layers=5", "implies tensor model.layers.4.", "which the weights lack"])])
def test_hf_config_and_weights_disagree(tmp_path, hf, layers, needles):
    src = with_layers(hf, tmp_path / "src", layers)
    before = snapshot(tmp_path)
    p = run_main("recipes/import_hf.py", f"source={src}", f"output={tmp_path / 'out'}")
    assert_one_line(p, 2, str(src), *needles)
    assert snapshot(tmp_path) == before and not (tmp_path / "out").exists()


def nemo_copy(tmp_path, edit=None, drop_tokenizer=False):
    d = tmp_path / "nemo"
    shutil.copytree(FIXTURES / "llama", d)
    if edit:
        y = d / "context" / "model.yaml"
        y.write_text(y.read_text().replace("  num_layers: 2\n", f"  num_layers: {edit}\n"))
    if drop_tokenizer:
        shutil.rmtree(d / "context" / "nemo_tokenizer")
        for f in (d / "context").rglob("tokenizer*"):
            f.unlink()
    return d


@pytest.mark.parametrize("edit, needles", [
    ("1", ["stacks 2 layers but context/model.yaml says num_layers=1"]),
    ("3", ["stacks 2 layers but context/model.yaml says num_layers=3"]),
    ("four", ["config.num_layers='four' is not an integer", "model.yaml"])])
def test_nemo2_config_and_weights_disagree(tmp_path, edit, needles):
    src = nemo_copy(tmp_path, edit)
    before = snapshot(tmp_path)
    p = run_main("recipes/import_nemo.py", f"source={src}", f"output={tmp_path / 'out'}")
    assert_one_line(p, 2, *needles)
    assert snapshot(tmp_path) == before and not (tmp_path / "out").exists()


def test_nemo2_without_tokenizer_is_refused_or_takes_one(tmp_path):
    src = nemo_copy(tmp_path, drop_tokenizer=True)
    before = snapshot(tmp_path)
    p = run_main("recipes/import_nemo.py", f"source={src}", f"output={tmp_path / 'out'}")
    assert_one_line(p, 2, "has no tokenizer files under context/", "tokenizer=HF_DIR")
    assert snapshot(tmp_path) == before and not (tmp_path / "out").exists()
    p = run_main("recipes/import_nemo.py", f"source={src}", f"output={tmp_path / 'out'}",
                 f"tokenizer={FIXTURES / 'llama_hf'}")
    assert p.returncode == 0, p.stderr[-2000:]
    assert (tmp_path / "out" / "tokenizer" / "tokenizer.json").read_bytes() == \
        (FIXTURES / "llama_hf" / "tokenizer.json").read_bytes()
