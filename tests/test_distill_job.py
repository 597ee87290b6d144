"""Learning signal: the real SmolLM2 teacher, width-pruned to about half in-job, then distilled for a
few steps through recipes/distill.py; the held-out perplexity must drop clearly."""

import json

import pytest

from conftest import ROOT, run_py

pytestmark = pytest.mark.e2e  # end to end (make test-fast skips it)


def test_distilling_real_pruned_smollm2_lowers_heldout_loss(tmp_path):
    work = tmp_path / "job"
    p = run_py(ROOT / "recipes" / "distill.py", "--config-name", "smollm2_demo", f"workdir={work}",
               "teacher.corrected_checkpoint=null", "prune.calibration.num_samples=8",
               "prune.calibration.seq_length=128", "data.seq_length=128", "data.valid_samples=4",
               "data.test_tokens=1024", "trainer.train_iters=10", "trainer.eval_interval=10",
               "trainer.warmup_iters=2", "trainer.optim.lr=3e-4", "trainer.optim.min_lr=3e-5", timeout=1200)
    res = json.loads((work / "results.json").read_text())
    assert res["tokens"] == 1024
    assert res["teacher"] < 100, res  # the real, unpruned teacher is sane
    # pruning to ~half the parameters destroys much of the zero-shot quality; 10 KD steps recover a lot
    assert res["student_distilled"] < 0.5 * res["student_zero_shot"], res
    assert "held-out perplexity" in p.stdout and (work / "loss.png").is_file()
    assert (work / "student_init" / "model.yaml").is_file()  # the in-job pruned student is saved
