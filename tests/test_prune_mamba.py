"""Pruning a hybrid Mamba-Transformer (Nemotron-H) on the tiny random model of tests/hf_models.py ("M-M*-M", hidden
64, 8 Mamba heads of 16 in 2 groups, FFN 96, 4 attention heads in 2 groups): Mamba heads (``prune.target_mamba_num_heads``,
kept within their groups) and head channels (``prune.target_mamba_head_dim``), hidden (the Mamba layers' pre-norms
join the channel score), FFN, attention heads and depth (the kept layers' pattern).

tests/workers/prune_mamba_worker.py scores and prunes at TP=2 (scores identical on both ranks) and at TP=1: the
scores and the pruned models' logits equal across the layouts, the pruned model equals the masked one, the parameter
count is the built model's. The recipe's pruned model exports to HF and loads in transformers with our logits; what is
not supported yet, and targets that do not fit the model or the layout, are one-line errors before any compute.

The parameter-budget search varies the Mamba axes too and counts each candidate with the layers depth pruning keeps
(a hybrid's layers differ in size by kind); ranked by short distillation runs, its winner is the pruned checkpoint."""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import ROOT, run_main, run_py, run_torchrun, tiny_imported

WORKER = ROOT / "tests" / "workers" / "prune_mamba_worker.py"
RECIPE = ROOT / "recipes" / "prune.py"
SMALL = ["prune.grid=16", "prune.calibration.num_samples=8", "prune.calibration.seq_length=32",
         "prune.calibration.micro_batch_size=4"]


@pytest.fixture(scope="module")
def nemo_h(tmp_path_factory):
    return tiny_imported(tmp_path_factory, "nemotron_h")


@pytest.fixture(scope="module")
def pruned_pp2(nemo_h, tmp_path_factory):
    """recipes/prune.py at PP=2: depth (the default block criterion: 6 -> 4 layers, layers move between the two
    stages), hidden, FFN, Mamba heads and head_dim; exported to HF. ``(checkpoint, HF dir, stdout)``."""
    d, ck = nemo_h
    tmp = tmp_path_factory.mktemp("pruned_pp2")
    out, hf = tmp / "pruned", tmp / "pruned_hf"
    p = run_torchrun(RECIPE, 2, f"checkpoint={ck}", f"output={out}", f"prune.calibration.data={d / 'calib.txt'}", *SMALL,
                     "prune.calibration.loss_samples=8", "prune.target_num_layers=4", "prune.target_hidden_size=48",
                     "prune.target_ffn_hidden_size=64", "prune.target_mamba_num_heads=4", "prune.target_mamba_head_dim=12",
                     "parallel.pipeline_model_parallel_size=2")
    e = run_main(ROOT / "recipes" / "export_hf.py", f"checkpoint={out}", f"output={hf}")
    assert e.returncode == 0, e.stderr[-3000:]
    return out, hf, p.stdout


def test_recipe_at_pp2_prunes_depth_and_every_mamba_axis(pruned_pp2):
    out, hf, stdout = pruned_pp2
    assert "layers 6->4, hidden 64->48, ffn 96->64" in stdout and "mamba heads x head_dim 8x16->4x12" in stdout, stdout
    mc = yaml.safe_load((out / "model.yaml").read_text())
    assert stdout.count("[block-loss k=2]") == 5 and f"pattern M-M*-M->{mc['hybrid_pattern']}" in stdout
    assert (mc["num_layers"], len(mc["hybrid_pattern"]), mc["hidden_size"], mc["ffn_hidden_size"],
            mc["mamba_num_heads"], mc["mamba_num_groups"], mc["mamba_head_dim"]) == (4, 4, 48, 64, 4, 2, 12)
    assert (out / "prune" / "importance.safetensors").is_file()
    cfg = json.loads((hf / "config.json").read_text())
    assert (cfg["hidden_size"], cfg["mamba_num_heads"], cfg["mamba_head_dim"], cfg["n_groups"],
            cfg["intermediate_size"], len(cfg["layers_block_type"])) == (48, 4, 12, 2, 64, 4)


def test_tp2_scores_masking_equivalence_and_the_export_in_transformers(nemo_h, pruned_pp2, tmp_path):
    """The worker at TP=2, then at TP=1 (which also loads the recipe's exported model in transformers)."""
    _, ck = nemo_h
    out = run_torchrun(WORKER, 2, "tp", ck, tmp_path).stdout
    assert "OK scores identical on the 2 TP ranks" in out, out
    out = run_py(WORKER, "check", ck, tmp_path, *pruned_pp2[:2], env={"OMP_NUM_THREADS": "1"}).stdout
    assert "OK scores at TP=2 equal TP=1" in out, out
    for case in ("mamba_heads", "mamba_heads+ffn+heads", "mamba_head_dim", "mamba_heads+head_dim", "depth+mamba_heads",
                 "drop_layers"):
        assert f"OK {case}: " in out and "masking equivalence" in out.split(f"OK {case}: ")[1].splitlines()[0], out
    assert "OK hidden+mamba_heads: pattern M-M*-M mamba_num_heads=4 mamba_head_dim=16 hidden=48" in out, out
    assert "OK drop_layers: pattern -M-M " in out, out
    assert "OK the pruned export in transformers: max|logits diff|" in out, out


REFUSALS = {  # extra arguments: the one line
    "heads_not_per_group": (["prune.target_mamba_num_heads=5"],
                            "prune.target_mamba_num_heads=5 is not a multiple of mamba_num_groups=2 (every group keeps "
                            "the same number of heads); allowed: a multiple of 2"),
    "heads_above_source": (["prune.target_mamba_num_heads=10"],
                           "prune.target_mamba_num_heads=10 is larger than the source mamba_num_heads=8; allowed: 1..8"),
    "ffn_not_per_tp": (["prune.target_ffn_hidden_size=63", "prune.grid=1", "parallel.tensor_model_parallel_size=2"],
                       "target ffn_hidden_size=63 is not divisible by tensor_model_parallel_size=2; allowed: a multiple "
                       "of 2"),
    "head_dim_above_source": (["prune.target_mamba_head_dim=20"],
                              "prune.target_mamba_head_dim=20 is larger than the source mamba_head_dim=16; allowed: "
                              "1..16"),
    "layers_not_per_pp": (["prune.target_num_layers=3", "parallel.pipeline_model_parallel_size=2"],
                          "target num_layers=3 is not divisible by pipeline_model_parallel_size=2"),
    "budget_off_the_grid": (["prune.target_params_ratio=0.05", "prune.grid=16"],
                            "parameters within ±5% (source "),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_one_line_errors_before_any_compute(nemo_h, tmp_path, case):
    from test_user_errors import assert_one_line

    d, ck = nemo_h
    extra, line = REFUSALS[case]
    p = run_main(RECIPE, f"checkpoint={ck}", f"output={tmp_path / 'out'}", f"prune.calibration.data={d / 'calib.txt'}",
                 *extra)
    assert_one_line(p, 2, line)
    assert not (tmp_path / "out").exists()


def test_a_mamba_target_on_a_model_without_mamba_layers_is_one_line(nemo_h, tmp_path):
    """A dense checkpoint (its model.yaml is all the check reads before failing)."""
    from test_user_errors import assert_one_line

    d, ck = nemo_h
    dense = tmp_path / "dense"
    (dense / "weights").mkdir(parents=True)
    mc = yaml.safe_load((ck / "model.yaml").read_text())
    mc.update(family="llama", hybrid_pattern=None, activation="swiglu")
    (dense / "model.yaml").write_text(yaml.safe_dump(mc))
    p = run_main(RECIPE, f"checkpoint={dense}", f"output={tmp_path / 'out'}", f"prune.calibration.data={d / 'calib.txt'}",
                 "prune.target_mamba_num_heads=4")
    assert_one_line(p, 2, "prune.target_mamba_num_heads=4 but the source model (llama) has no Mamba layers; allowed: "
                          "unset for a model without Mamba layers")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- the parameter-budget search
def test_budget_candidates_vary_the_mamba_axes_and_count_the_kept_layers():
    """Nemotron-Nano-12B-v2 at TP=8: the grid varies Mamba heads (whole groups, over TP) and head channels; a
    candidate with fewer layers has the pattern depth pruning keeps (here random choices of layers) and its count
    within tolerance; the check before compute (no kept layers known yet) passes a superset of them."""
    import random

    from minitron_nemo.models.builder import count_parameters
    from minitron_nemo.models.config import ModelConfig
    from minitron_nemo.prune.targets import SearchSpace, Targets, budget, candidates

    mc = ModelConfig.from_dict(yaml.safe_load((ROOT / "conf" / "model" / "nemotron_nano_12b_v2.yaml").read_text()))
    t, space = Targets(target_params_ratio=0.73), SearchSpace(max_candidates=10 ** 6)
    target = budget(mc, t)
    for seed in range(3):
        rng, kept = random.Random(seed), {}

        def pattern_of(n):
            if n not in kept:
                kept[n] = "".join(mc.hybrid_pattern[i] for i in sorted(rng.sample(range(mc.num_layers), n)))
            return kept[n]

        exact = candidates(mc, t, space, 8, 1, pattern_of=pattern_of)
        provisional = candidates(mc, t, space, 8, 1)
        shape = lambda c: (c.num_layers, c.hidden_size, c.ffn_hidden_size, c.num_attention_heads,  # noqa: E731
                           c.mamba_num_heads, c.mamba_head_dim)
        assert {shape(c) for c in exact} <= {shape(c) for c in provisional}
        assert any(c.num_layers < mc.num_layers for c in exact)
        for c in exact:
            assert abs(count_parameters(c) - target) <= 0.05 * target
            if c.num_layers < mc.num_layers:
                assert c.hybrid_pattern == kept[c.num_layers]
            assert c.mamba_num_heads % 8 == 0 and c.mamba_head_dim % 8 == 0  # 8 groups, TP=8; channels by 8
        assert len({c.mamba_num_heads for c in exact}) > 1 and len({c.mamba_head_dim for c in exact}) > 1


def test_search_ranked_by_distillation_prunes_a_hybrid(nemo_h, tmp_path):
    """recipes/prune.py with a budget on the tiny hybrid, the default block criterion, two candidates distilled two
    iterations each: every row is counted with the layers the block scores keep, and the winner, its pattern
    included, is the pruned checkpoint."""
    import csv

    import torch

    from minitron_nemo.models.builder import count_parameters
    from minitron_nemo.models.config import ModelConfig
    from minitron_nemo.prune.depth import select_layers

    d, ck = nemo_h
    text = (d / "calib.txt").read_text()
    (tmp_path / "valid.txt").write_text(text[len(text) // 2: len(text) // 2 + 20000])
    out = tmp_path / "out"
    p = run_main(RECIPE, f"checkpoint={ck}", f"output={out}", f"prune.calibration.data={d / 'calib.txt'}", *SMALL,
                 "prune.calibration.loss_samples=4", "prune.target_params_ratio=0.75", "prune.search.tolerance=0.08",
                 "prune.search.eval_samples=4", "prune.search.distill_iters=2", "prune.search.top_k=2",
                 "data=text", f"data.train_text={d / 'calib.txt'}", f"data.valid_text={tmp_path / 'valid.txt'}",
                 "data.seq_length=32", "data.valid_samples=4", "trainer.micro_batch_size=2",
                 "trainer.global_batch_size=2", "trainer.tensorboard=false")
    assert p.returncode == 0, p.stderr[-3000:]
    rows = list(csv.DictReader(open(out / "prune" / "candidates.csv")))
    src = ModelConfig.from_dict(yaml.safe_load((ck / "model.yaml").read_text()))
    from safetensors.torch import load_file

    scores = {k: v for k, v in load_file(str(out / "prune" / "importance.safetensors")).items()}
    assert {(int(r["mamba_num_heads"]), int(r["mamba_head_dim"])) for r in rows} != {(8, 16)}, rows
    assert any(int(r["num_layers"]) < src.num_layers for r in rows), rows
    for r in rows:
        L = int(r["num_layers"])
        kept = select_layers(src, L, scores, "block")
        assert r["hybrid_pattern"] == "".join(src.hybrid_pattern[i] for i in kept), (r, kept)
        c = src.replace(num_layers=L, hidden_size=int(r["hidden_size"]), ffn_hidden_size=int(r["ffn_hidden_size"]),
                        num_attention_heads=int(r["num_attention_heads"]), num_query_groups=int(r["num_query_groups"]),
                        mamba_num_heads=int(r["mamba_num_heads"]), mamba_head_dim=int(r["mamba_head_dim"]),
                        hybrid_pattern=r["hybrid_pattern"])
        assert count_parameters(c) == int(r["params"]), r
    ranked = sorted((r for r in rows if r["rank"]), key=lambda r: int(r["rank"]))
    assert len(ranked) == 2, rows
    win = yaml.safe_load((out / "model.yaml").read_text())
    for k in ("num_layers", "hidden_size", "ffn_hidden_size", "mamba_num_heads", "mamba_head_dim", "hybrid_pattern"):
        assert str(win[k]) == ranked[0][k], (k, win, ranked[0])
    for r in ranked:
        name = "L{num_layers}_H{hidden_size}_F{ffn_hidden_size}_A{num_attention_heads}_G{num_query_groups}" \
               "_M{mamba_num_heads}_D{mamba_head_dim}".format(**r)
        assert (tmp_path / "out_search" / name / "result.json").is_file(), r
    assert "[search] rank 1 (zero-shot" in p.stdout and "mamba=" in p.stdout
    assert torch.isfinite(torch.tensor([float(r["valid_loss_end"]) for r in ranked])).all()
