"""Mixture-of-experts families (Qwen3-MoE, Mixtral, Qwen2-MoE with its shared expert): HF -> Megatron -> HF at TP=1, TP=2, EP=2 and PP=2,
logits against transformers, resharding between the layouts, parameter counts, bad layouts."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_py, run_torchrun, ROOT
from hf_models import MOE_FAMILIES, make_hf_model

WORKERS = ROOT / "tests" / "workers"
LAYOUTS = ("tp1pp1ep1", "tp2pp1ep1", "tp1pp1ep2", "tp1pp2ep1")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("moe")
    for i, fam in enumerate(MOE_FAMILIES):
        make_hf_model(fam, d / f"hf_{fam}", seed=10 + i)
    # Each multi-rank layout also loads the checkpoint the previous layout saved (resharding).
    run_py(WORKERS / "convert_worker.py", d, 1, 1, 1)
    run_torchrun(WORKERS / "convert_worker.py", 2, d, 2, 1, 1, "tp1pp1ep1")
    run_torchrun(WORKERS / "convert_worker.py", 2, d, 1, 1, 2, "tp2pp1ep1")
    run_torchrun(WORKERS / "convert_worker.py", 2, d, 1, 2, 1, "tp1pp1ep2")
    run_py(WORKERS / "export_worker.py", d)
    return d


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_round_trip_is_bitwise(work, family, layout):
    src = load_file(str(work / f"hf_{family}" / "model.safetensors"))
    out = load_file(str(work / f"rt_{family}_{layout}" / "model.safetensors"))
    assert sorted(src) == sorted(out)
    assert any(".experts.3." in k for k in src)
    for k in src:
        assert torch.equal(src[k], out[k]), k


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_exported_config_is_the_source_config(work, family):
    import transformers

    src = json.loads((work / f"hf_{family}" / "config.json").read_text())
    out = json.loads((work / f"rt_{family}_tp1pp1ep2" / "config.json").read_text())
    for k in ("num_experts_per_tok", "router_aux_loss_coef", "intermediate_size", "moe_intermediate_size",
              "norm_topk_prob", "num_key_value_heads", "head_dim", "shared_expert_intermediate_size", "qkv_bias"):
        assert src.get(k) == out.get(k), k
    assert src.get("num_experts", src.get("num_local_experts")) == out.get("num_experts",
                                                                           out.get("num_local_experts"))
    model = transformers.AutoModelForCausalLM.from_pretrained(work / f"rt_{family}_tp1pp1ep2")
    assert type(model).__name__ == src["architectures"][0]


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_parameter_counts_match_transformers(work, family):
    """Total = every parameter of the transformers model; active = total minus the routed experts a token
    does not use (num_experts - top_k of them per layer; a shared expert is always used)."""
    import transformers

    from minitron_nemo.checkpoint import hf as hfconv
    from minitron_nemo.models.builder import count_parameters

    mc = hfconv.hf_model_config(work / f"hf_{family}")
    model = transformers.AutoModelForCausalLM.from_pretrained(work / f"hf_{family}")
    total = sum(p.numel() for p in model.parameters())
    per_expert = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n) // (
        mc.num_layers * mc.num_moe_experts)
    assert count_parameters(mc) == total
    unused = mc.num_layers * (mc.num_moe_experts - mc.moe_router_topk) * per_expert
    assert count_parameters(mc, active=True) == total - unused < total


def test_expert_parallel_must_divide_experts(work, tmp_path):
    r = run_py(ROOT / "recipes" / "import_hf.py", f"source={work / 'hf_mixtral'}", f"output={tmp_path / 'ck'}",
               "parallel.expert_model_parallel_size=3", check=False)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == ("error: expert_model_parallel_size=3 does not divide num_moe_experts=4; "
                                "allowed: a divisor of 4"), r.stderr
    assert not (tmp_path / "ck").exists()


# ----------------------------------------------------------------------------- pruning
@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    d = tmp_path_factory.mktemp("moe_prune")
    families = ",".join(MOE_FAMILIES)  # each launch checks every family
    run_py(WORKERS / "moe_prune_worker.py", d, families)
    run_torchrun(WORKERS / "moe_prune_worker.py", 2, d, families)
    run_torchrun(WORKERS / "moe_prune_worker.py", 2, d, "qwen3_moe", "tp2")
    run_torchrun(WORKERS / "moe_prune_worker.py", 4, d, "mixtral,qwen2_moe", "tp2")  # TP=2 x EP=2 on 4 ranks
    return d


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_expert_pruning_is_masking_and_layout_invariant(pruned, family):
    """The worker asserts, at EP=1, EP=2, and TP=2 (Qwen3-MoE) or TP=2 x EP=2 (Mixtral, Qwen2-MoE): expert scores recomputed
    independently (EP=1), frequency sums, pruned logits == masked-model logits. Here: every layout's scores
    and pruned logits equal EP=1's. Qwen2-MoE also prunes its shared expert's neurons (scores recomputed
    independently, masking equivalence with the dropped neurons zeroed)."""
    one = torch.load(pruned / f"{family}_ep1.pt")
    assert ("shared_ffn" in one["scores"]) == (family == "qwen2_moe")
    assert ("experts+shared" in one["logits"]) == (family == "qwen2_moe")
    for layout in ("ep2",) + (("tp2",) if family == "qwen3_moe" else ("tp2ep2",)):
        _same(one, torch.load(pruned / f"{family}_{layout}.pt"))


def _same(one, two):
    assert sorted(one["scores"]) == sorted(two["scores"])
    for k in ("expert_routed_l2", "expert_output_l2", "expert_router_mass", "expert_frequency", "expert_ffn",
              "hidden", "heads", "layer_bi") + (("shared_ffn",) if "shared_ffn" in one["scores"] else ()):
        a, b = one["scores"][k], two["scores"][k]
        assert a.shape == b.shape, k
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), (k, (a - b).abs().max())
    for case, logits in one["logits"].items():
        assert torch.allclose(logits, two["logits"][case], atol=1e-4), case


def test_moe_targets_bad_input():
    from minitron_nemo.errors import UserError
    from minitron_nemo.models.config import ModelConfig
    from minitron_nemo.prune.targets import Targets, validate

    moe = ModelConfig(family="mixtral", num_moe_experts=8, moe_router_topk=2, moe_ffn_hidden_size=32).validate()
    dense = ModelConfig(family="qwen3", qk_layernorm=True).validate()
    shared = ModelConfig(family="qwen2_moe", num_moe_experts=8, moe_router_topk=2, moe_ffn_hidden_size=32,
                         moe_shared_expert_intermediate_size=64, moe_shared_expert_gate=True).validate()
    cases = [
        (moe, Targets(target_num_moe_experts=1), 1,
         "prune.target_num_moe_experts=1 is fewer than the experts each token uses (moe_router_topk=2); "
         "allowed: 2..8"),
        (moe, Targets(target_num_moe_experts=6), 4,
         "target num_moe_experts=6 is not divisible by expert_model_parallel_size=4; allowed: a multiple of 4"),
        (moe, Targets(target_num_moe_experts=9), 1,
         "prune.target_num_moe_experts=9 is larger than the source num_moe_experts=8; allowed: 1..8"),
        (moe, Targets(target_ffn_hidden_size=64), 1, "prune.target_ffn_hidden_size=64: every MLP of this model is "
         "a mixture of experts; allowed: prune.target_moe_ffn_hidden_size (each expert's width)"),
        (dense, Targets(target_num_moe_experts=4), 1,
         "prune.target_num_moe_experts=4 but the source model (qwen3) has no experts; allowed: unset for a "
         "dense model"),
        (moe, Targets(target_moe_shared_expert_intermediate_size=16), 1,
         "prune.target_moe_shared_expert_intermediate_size=16 but the source model (mixtral) has no shared "
         "expert; allowed: unset"),
        (shared, Targets(target_moe_shared_expert_intermediate_size=128), 1,
         "prune.target_moe_shared_expert_intermediate_size=128 is larger than the source "
         "moe_shared_expert_intermediate_size=64; allowed: 1..64"),
        (shared, Targets(target_moe_shared_expert_intermediate_size=20, grid=8), 1,
         "target moe_shared_expert_intermediate_size=20 is off the grid; allowed: a multiple of prune.grid=8 "
         "(e.g. 16), or set prune.grid"),
    ]
    for mc, t, ep, msg in cases:
        with pytest.raises(UserError) as e:
            validate(mc, t, 1, 1, ep)
        assert str(e.value) == msg
    assert validate(moe, Targets(target_num_moe_experts=4, target_moe_ffn_hidden_size=16, grid=8), 1, 1, 2) \
        .num_moe_experts == 4
    assert validate(shared, Targets(target_moe_shared_expert_intermediate_size=16, grid=8), 2, 1) \
        .moe_shared_expert_intermediate_size == 16


# ----------------------------------------------------------------------------- distillation
def test_moe_student_distils_logs_aux_loss_and_resumes_bitwise(tmp_path):
    """An MoE student (4 experts) distilled from an MoE teacher (8 experts): the router's load-balancing
    loss is logged beside the KD loss (weight x its value, about 0.01 for balanced routing), it changes
    the training (weight 0.01 vs 0 give other KD losses), and a run stopped at step 3 and resumed
    reaches step 6 with the uninterrupted run's losses, bit for bit (fp32, CPU)."""
    worker = WORKERS / "train_kd_worker.py"
    run_py(worker, "full", tmp_path / "full.json", tmp_path / "full", 1, "fp32", "moe")
    run_py(worker, "resume", tmp_path / "res.json", tmp_path / "res", 1, "fp32", "moe")
    run_py(worker, "full", tmp_path / "zero.json", tmp_path / "zero", 1, "fp32", "moe0")
    full, res, zero = (json.loads((tmp_path / f"{n}.json").read_text())["losses"] for n in ("full", "res", "zero"))
    assert [r["iteration"] for r in res] == list(range(1, 7))
    assert full == res
    assert all(0.005 < r["moe_aux"] < 0.05 for r in full)
    assert all("moe_aux" not in r for r in zero)
    assert full[0]["logits"] == zero[0]["logits"]  # same weights and data before the first update
    assert full[-1]["logits"] != zero[-1]["logits"]


RECIPE_CASES = {  # family: (extra targets, expected message, expected HF config values)
    "qwen3_moe": ((), "experts 4->3 (expert FFN 32->16)", {"num_experts": 3, "moe_intermediate_size": 16}),
    "qwen2_moe": (("prune.target_moe_shared_expert_intermediate_size=16",),
                  "experts 4->3 (expert FFN 32->16, shared expert 48->16)",
                  {"num_experts": 3, "moe_intermediate_size": 16, "shared_expert_intermediate_size": 16}),
}


@pytest.mark.parametrize("family", sorted(RECIPE_CASES))
def test_prune_recipe_tp2_then_export_matches_transformers(tmp_path, family):
    """The README's MoE pruning command at TP=2 (each expert, and the shared expert, split over both ranks):
    experts 4 -> 3 and expert FFN 32 -> 16 on Qwen3-MoE and Qwen2-MoE, the shared expert 48 -> 16 too; the
    HF export loads in transformers with our logits."""
    import sys

    import yaml

    sys.path.insert(0, str(ROOT / "tests" / "workers"))
    from prune_common import small_checkpoint

    extra, message, want = RECIPE_CASES[family]
    ckpt = small_checkpoint(tmp_path, family)
    out, hf = tmp_path / "pruned", tmp_path / "pruned_hf"
    p = run_torchrun(ROOT / "recipes" / "prune.py", 2, f"checkpoint={ckpt}", f"output={out}",
                     f"prune.calibration.data={tmp_path / 'calib.txt'}", "prune.calibration.num_samples=8",
                     "prune.calibration.seq_length=32", "prune.calibration.micro_batch_size=4", "prune.grid=8",
                     "prune.target_num_moe_experts=3", "prune.target_moe_ffn_hidden_size=16",
                     "parallel.tensor_model_parallel_size=2", *extra)
    assert message in p.stdout, p.stdout
    mc = yaml.safe_load((out / "model.yaml").read_text())
    assert (mc["num_moe_experts"], mc["moe_ffn_hidden_size"], mc["moe_router_topk"]) == (3, 16, 2)
    assert (out / "prune" / "importance.png").is_file()
    run_py(ROOT / "recipes" / "export_hf.py", f"checkpoint={out}", f"output={hf}")
    cfg = json.loads((hf / "config.json").read_text())
    assert {k: cfg[k] for k in want} == want
    p = run_py(WORKERS / "logits_worker.py", out, hf, 1, 1, "1e-4")
    assert "max|logits diff|" in p.stdout


def test_moe_budget_search_by_active_parameters():
    """``target_active_params``: the grid varies experts per layer and each expert's width too; every
    candidate is within the tolerance of the active-parameter budget, keeps at least top-k experts."""
    from minitron_nemo.errors import UserError
    from minitron_nemo.models.builder import count_parameters
    from minitron_nemo.models.config import ModelConfig
    from minitron_nemo.prune.targets import SearchSpace, Targets, candidates

    mc = ModelConfig(family="qwen3_moe", num_layers=4, hidden_size=128, ffn_hidden_size=256, num_attention_heads=4,
                     num_query_groups=2, kv_channels=32, vocab_size=256, qk_layernorm=True, num_moe_experts=8,
                     moe_router_topk=2, moe_ffn_hidden_size=128).validate()
    budget = 0.75 * count_parameters(mc, active=True)
    cands = candidates(mc, Targets(target_active_params=budget, grid=16), SearchSpace(max_candidates=50), 1, 1, 2)
    assert cands
    for c in cands:
        assert abs(count_parameters(c, active=True) - budget) <= 0.05 * budget
        assert c.num_moe_experts >= c.moe_router_topk and c.num_moe_experts % 2 == 0
    assert len({c.num_moe_experts for c in cands}) > 1 and len({c.moe_ffn_hidden_size for c in cands}) > 1
    dense = ModelConfig(family="qwen3", qk_layernorm=True).validate()
    with pytest.raises(UserError, match="prune.target_active_params=1000 but the source model"):
        candidates(dense, Targets(target_active_params=1000), SearchSpace(), 1, 1)


def test_expert_score_study_runs(tmp_path):
    """recipes/experiments/expert_scores.py end to end at a tiny scale (docs/moe_expert_scores.md is the
    full run): table rows for every score and the random baseline, the PNG and the raw numbers."""
    out = tmp_path / "moe_expert_scores.md"
    p = run_py(ROOT / "recipes" / "experiments" / "expert_scores.py", "--iters", 2, "--layers", 2, "--calib", 4,
               "--test", 4, "--random-seeds", 2, "--keep", 4, 2, "--out", out)
    assert "tok/s" in p.stdout and "ETA" in p.stdout
    text = out.read_text()
    for name in ("routed_l2", "output_l2", "router_mass", "frequency", "random (2 seeds)"):
        assert name in text
    res = json.loads(out.with_suffix(".json").read_text())
    assert set(res["loss"]["routed_l2"]) == {"4", "2"} and len(res["loss"]["random"]["2"]["all"]) == 2
    assert out.with_suffix(".png").stat().st_size > 1000


def test_distill_recipe_prunes_an_moe_teacher_in_job(tmp_path):
    """recipes/distill.py on a Qwen3-MoE teacher: in-job expert pruning (4 -> 2 experts, FFN 32 -> 16), KD
    with the load-balancing loss in the log, validation, a student checkpoint with the MoE shape."""
    import sys

    import yaml

    sys.path.insert(0, str(ROOT / "tests" / "workers"))
    from prune_common import small_checkpoint

    ckpt, text, work = small_checkpoint(tmp_path, "qwen3_moe"), tmp_path / "calib.txt", tmp_path / "w"
    p = run_py(ROOT / "recipes" / "distill.py", f"workdir={work}", f"teacher.checkpoint={ckpt}", "~model", "data=text",
               f"data.train_text={text}", f"data.valid_text={text}", "data.seq_length=32", "dtype=float32",
               "prune.target_hidden_size=null", "prune.target_ffn_hidden_size=null", "prune.target_num_moe_experts=2",
               "prune.target_moe_ffn_hidden_size=16", "prune.grid=8", f"prune.calibration.data={text}",
               "prune.calibration.num_samples=8", "prune.calibration.seq_length=32", "trainer.train_iters=3",
               "trainer.micro_batch_size=2", "trainer.global_batch_size=4", "trainer.eval_interval=3",
               "teacher.max_loss_fraction=10")
    assert "(156,672 active)" in p.stdout and "moe_aux" in p.stdout
    rec = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert [r["moe_aux"] for r in rec if r["kind"] == "train"] and any(r["kind"] == "valid" for r in rec)
    mc = yaml.safe_load((work / "checkpoints" / "iter_0000003" / "model.yaml").read_text())
    assert (mc["num_moe_experts"], mc["moe_ffn_hidden_size"]) == (2, 16)


def test_search_ranked_by_distillation_covers_moe(tmp_path):
    """prune.search.distill_iters on a Qwen3-MoE source: candidates that differ in experts per layer and
    expert width are each distilled K=2 iterations (the load-balancing loss in their logs) and ranked by
    validation loss; the winner, with its MoE shape, is the pruned checkpoint."""
    import csv
    import sys

    import yaml

    sys.path.insert(0, str(ROOT / "tests" / "workers"))
    from prune_common import checkpoint_with_valid_text

    tmp, ckpt = checkpoint_with_valid_text(tmp_path, "qwen3_moe")
    out = tmp / "out"
    p = run_py(ROOT / "recipes" / "prune.py", f"checkpoint={ckpt}", f"output={out}",
               f"prune.calibration.data={tmp / 'calib.txt'}", "prune.grid=8", "prune.calibration.num_samples=8",
               "prune.calibration.seq_length=32", "prune.calibration.micro_batch_size=4",
               "prune.calibration.loss_samples=4", "prune.target_params_ratio=0.7", "prune.layer_criterion=bi",
               "prune.search.eval_samples=4", "prune.search.distill_iters=2", "prune.search.top_k=2",
               "prune.search.axes=[experts,ffn]", "prune.search.tolerance=0.15",
               "data=text", f"data.train_text={tmp / 'calib.txt'}", f"data.valid_text={tmp / 'valid.txt'}",
               "data.seq_length=32", "data.valid_samples=4", "trainer.micro_batch_size=2",
               "trainer.global_batch_size=2", "trainer.tensorboard=false", env={"OMP_NUM_THREADS": "1"})
    rows = list(csv.DictReader(open(out / "prune" / "candidates.csv")))
    ranked = [r for r in rows if r["rank"]]
    assert len(ranked) == 2, rows
    assert {"num_moe_experts", "moe_ffn_hidden_size", "active_params"} <= set(rows[0])
    mc = yaml.safe_load((out / "model.yaml").read_text())
    for k in ("num_layers", "hidden_size", "num_moe_experts", "moe_ffn_hidden_size"):
        assert mc[k] == int(ranked[0][k]), (k, mc, ranked[0])
    for r in ranked:
        name = ("L{num_layers}_H{hidden_size}_F{ffn_hidden_size}_A{num_attention_heads}_G{num_query_groups}"
                "_E{num_moe_experts}_Fe{moe_ffn_hidden_size}").format(**r)
        recs = [json.loads(x) for x in (tmp / "out_search" / name / "metrics.jsonl").read_text().splitlines()]
        assert [x["moe_aux"] for x in recs if x["kind"] == "train"], name
        assert json.loads((tmp / "out_search" / name / "result.json").read_text())["valid_loss_end"] == \
            pytest.approx(float(r["valid_loss_end"]))
    assert "[search] rank 1 (zero-shot" in p.stdout
