"""Importance and trimming correctness: independent formula check, masking equivalence, parameter
count (one process), and TP=2 / PP=2 / DP=2 invariance against TP=1 (gloo ranks under torchrun)."""

import sys


from conftest import ROOT, run_py, run_torchrun

sys.path.insert(0, str(ROOT / "tests" / "workers"))
from prune_common import make_spread_hf_model  # noqa: E402

MASK = ROOT / "tests" / "workers" / "prune_mask_worker.py"
PARALLEL = ROOT / "tests" / "workers" / "prune_parallel_worker.py"


def test_independent_masking_and_count():
    out = run_py(MASK, env={"OMP_NUM_THREADS": "1"}).stdout
    assert "OK independent check (9 aggregations)" in out
    for family in ("llama", "qwen2", "nemotron"):
        for case in ("ffn", "heads", "groups", "ffn+groups+depth"):
            assert f"OK masking equivalence {family} {case}:" in out, out
        assert f"OK count_parameters {family}" in out


def test_parallel_invariance(tmp_path):
    """A small random Llama (tied embeddings; SmolLM2's 9 heads / 3 groups do not divide by TP=2)."""
    hf = make_spread_hf_model("llama", tmp_path / "hf")
    run_torchrun(PARALLEL, 2, "run", hf, tmp_path)  # TP=2, then PP=2, then DP=2 in one launch
    outs = [tmp_path / n for n in ("tp2", "pp2", "dp2")]
    out = run_py(PARALLEL, "compare", hf, *outs, env={"OMP_NUM_THREADS": "1"}).stdout
    assert out.count("match TP=1") == 3, out
