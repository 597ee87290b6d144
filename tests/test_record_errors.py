"""Records the project wrote itself and reads back on a re-run (issue 27 §6): a truncated or empty one is
recomputed, with a one-line note, when it caches redoable work, and refused with a one-line ``UserError``
naming the file and what to remove when it cannot be redone safely. Each case runs the workflow function
that reads the record (a full re-run of a chain or a search costs minutes)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from minitron_nemo.errors import UserError

BAD = {"truncated": '{"final_checkpoint": "/x", "te', "empty": ""}


def one_line(e: pytest.ExceptionInfo, *needles):
    text = str(e.value)
    assert "\n" not in text, text
    for n in needles:
        assert str(n) in text, (n, text)


# ----------------------------------------------------------------------------- stages (refused)
def stage(tmp: Path):
    from minitron_nemo.workflows.stages import Stage

    st = Stage(0, "a", {}, "original", [], tmp / "stages" / "a")
    st.distill_dir.mkdir(parents=True)
    return st


@pytest.mark.parametrize("how", BAD)
def test_stage_results_refused(tmp_path, how):
    from minitron_nemo.workflows import stages

    st = stage(tmp_path)
    st.results.write_text(BAD[how])
    with pytest.raises(UserError) as e:
        stages.final_checkpoint(st)
    one_line(e, st.results, f"remove {st.distill_dir}")
    assert st.results.read_text() == BAD[how]


def test_stage_settings_refused(tmp_path):
    from minitron_nemo.workflows import stages

    st = stage(tmp_path)
    st.results.write_text(json.dumps({"final_checkpoint": "/x"}))
    (st.root / "stage.json").write_text('{"name": "a", "te')
    with pytest.raises(UserError) as e:
        stages.summary([st])
    one_line(e, st.root / "stage.json", f"remove {st.root}")


# ----------------------------------------------------------------------------- search
class Recomputed(Exception):
    pass


@pytest.mark.parametrize("how", BAD)
def test_zero_shot_table_recomputed(tmp_path, how, monkeypatch, capsys):
    """An unreadable table.json is not read: the zero-shot pass starts again (stopped here at its first step)."""
    from megatron.core import parallel_state as ps

    from minitron_nemo.workflows import search

    (tmp_path / "zero_shot").mkdir()
    (tmp_path / "zero_shot" / "table.json").write_text(BAD[how])
    for f in ("get_tensor_model_parallel_world_size", "get_pipeline_model_parallel_world_size",
              "get_expert_model_parallel_world_size"):
        monkeypatch.setattr(ps, f, lambda: 1)

    def recompute(*a, **k):
        raise Recomputed

    monkeypatch.setattr(search.from_config, "check_config", recompute)
    with pytest.raises(Recomputed):
        search.zero_shot(None, None, None, None, tmp_path)
    out = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert len(out) == 1 and "table.json" in out[0] and out[0].endswith("recomputing it"), out


def test_candidate_result_refused(tmp_path):
    from minitron_nemo.workflows import search

    row = dict(num_layers=2, hidden_size=16, ffn_hidden_size=32, num_attention_heads=2, num_query_groups=1)
    work = tmp_path / search.candidate_name(row)
    work.mkdir()
    (work / "result.json").write_text('{"name": "L2')
    (work / "metrics.jsonl").write_text("{}\n")
    setup = search.SearchSetup(dir=tmp_path, job=None)
    with pytest.raises(UserError) as e:
        search.run_candidate(None, None, None, row, {}, None, setup, None)
    one_line(e, work / "result.json", f"remove {work}")
    assert (work / "metrics.jsonl").read_text() == "{}\n"


# ----------------------------------------------------------------------------- metrics.jsonl
def test_metrics_line_refused_by_the_curve(tmp_path):
    from minitron_nemo.eval.report import valid_curve

    m = tmp_path / "metrics.jsonl"
    m.write_text('{"kind": "valid", "iteration": 0, "student_lm": 3.0}\n{"kind": "val')
    with pytest.raises(UserError) as e:
        valid_curve(m)
    one_line(e, m, "line 2")


def test_metrics_line_skips_the_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from minitron_nemo.training.metrics import plot_losses

    m = tmp_path / "metrics.jsonl"
    m.write_text('{"kind": "train", "iteration": 1, "total": 3.0}\n{"kind": "tr\n')
    assert plot_losses(m, tmp_path / "loss.png") is None
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "line 2" in out[0] and "loss plot not drawn" in out[0], out
    assert not (tmp_path / "loss.png").exists()


# ----------------------------------------------------------------------------- experiments (refused)
def test_experiment_seconds_refused(tmp_path, monkeypatch):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    try:
        from recipes.experiments import common
    finally:
        sys.path.pop(0)
    script = common.ROOT / "recipes" / "x.py"
    monkeypatch.setattr(common.children, "run", lambda *a, **k: 0)
    times = tmp_path / "logs" / "seconds.json"
    times.parent.mkdir()
    times.write_text('{"prune": 1')
    with pytest.raises(UserError) as e:
        common.run(script, [], tmp_path / "logs" / "prune.log")
    one_line(e, times, f"remove {times}")
    assert times.read_text() == '{"prune": 1'
    with pytest.raises(UserError) as e:
        common.load(times)
    one_line(e, times)


# ----------------------------------------------------------------------------- the reading layer
def test_read_cache(tmp_path):
    from minitron_nemo.readers import read_cache

    said = []
    f = tmp_path / "c.json"
    assert read_cache(f, "cache", log=said.append) is None and said == []
    f.write_text("[1, 2]")
    assert read_cache(f, "cache", list, log=said.append) == [1, 2] and said == []
    f.write_text("[1, ")
    assert read_cache(f, "cache", list, log=said.append) is None
    assert len(said) == 1 and str(f) in said[0] and "JSONDecodeError" in said[0], said


# ----------------------------------------------------------------------------- distill (recomputed)
@pytest.fixture(scope="module")
def distilled(small_llama, tmp_path_factory):
    """A finished two-step distillation of the session's tiny Llama, pruned in-job to half its width."""
    from conftest import module_dir, run_main

    tmp, ckpt = module_dir(small_llama, tmp_path_factory.mktemp("records"))
    args = ["teacher.corrected_checkpoint=null", f"teacher.checkpoint={ckpt}", "~model",
            "teacher.max_loss_fraction=10", "teacher.held_out=false", "data=text", f"data.train_text={tmp / 'calib.txt'}",
            f"data.valid_text={tmp / 'valid.txt'}", f"data.test_text={tmp / 'valid.txt'}", "data.seq_length=32",
            "data.valid_samples=2", "data.test_tokens=64", "dtype=float32", "prune.grid=16",
            "prune.target_hidden_size=16", "prune.target_ffn_hidden_size=32", "prune.calibration.num_samples=4",
            "prune.calibration.seq_length=32", "prune.calibration.micro_batch_size=2", "trainer.micro_batch_size=2",
            "trainer.global_batch_size=2", "trainer.train_iters=2", "trainer.warmup_iters=1",
            "trainer.eval_interval=0", "trainer.tensorboard=false", "checkpointing.save_interval=null"]
    p = run_main("recipes/distill.py", f"workdir={tmp / 'w'}", *args, env={"OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    return tmp, args


@pytest.mark.parametrize("how", BAD)
def test_distill_zero_shot_recomputed(distilled, tmp_path, how):
    import shutil

    from conftest import run_main

    tmp, args = distilled
    work = tmp_path / "w"
    shutil.copytree(tmp / "w", work, symlinks=True)
    zs = work / "zero_shot.json"
    want = json.loads(zs.read_text())
    zs.write_text(BAD[how])
    p = run_main("recipes/distill.py", f"workdir={work}", *args, env={"OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    notes = [line for line in p.stdout.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and str(zs) in notes[0] and notes[0].endswith("recomputing it"), notes
    assert json.loads(zs.read_text()) == pytest.approx(want)


@pytest.mark.parametrize("text", ["", '{"prune": {'])
def test_recorded_settings_that_cannot_be_read_are_one_line(tmp_path, text):
    """stage.json / search.json as a re-run compares them (outputs.settings_difference)."""
    from minitron_nemo import outputs
    from minitron_nemo.errors import UserError

    f = tmp_path / "stage" / "stage.json"
    f.parent.mkdir()
    f.write_text(text)
    with pytest.raises(UserError) as e:
        outputs.settings_difference(f, {"prune": {}})
    msg = str(e.value)
    assert str(f) in msg and f"remove {f.parent}" in msg and "\n" not in msg
    assert f.read_text() == text
