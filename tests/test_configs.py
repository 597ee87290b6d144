"""Every shipped job config composes; teacher and student shapes and parameter counts match SPEC §5."""

import pytest
from omegaconf import OmegaConf

from minitron_nemo.config import compose, model_config
from minitron_nemo.distill.config import DistillationConfig
from minitron_nemo.models.builder import count_parameters
from minitron_nemo.prune.targets import Targets, validate

# name: (teacher params, student (layers, hidden, ffn, heads, groups), student params, GBS, seq, lr, min_lr)
JOBS = {
    "llama31_minitron_4b_width": (8.03e9, (32, 3072, 9216, 32, 8), 4.51e9, 1152, 8192, 1e-4, 1e-5),
    "llama31_minitron_4b_depth": (8.03e9, (16, 4096, 14336, 32, 8), 4.54e9, 1152, 8192, 1e-4, 1e-5),
    "mn_minitron_8b": (12.25e9, (40, 4096, 11520, 32, 8), 8.41e9, 768, 8192, 1e-4, 4.5e-7),
    "minitron_8b": (15.7e9, (32, 4096, 16384, 48, 8), 8.27e9, 1152, 4096, 2e-4, 4.5e-7),
    "minitron_4b": (15.7e9, (32, 3072, 9216, 24, 8), 4.19e9, 1152, 4096, 2e-4, 4.5e-7),
    "smollm2_demo": (134.5e6, (30, 384, 768, 9, 3), 63.1e6, 4, 128, 1e-3, 1e-4),
    "qwen3_30b_a3b_minitron": (30.5e9, (48, 2048, 6144, 32, 4), 16.0e9, 1024, 4096, 1e-4, 1e-5),
    "gemma3_12b_minitron_6b": (11.77e9, (48, 3072, 8192, 16, 8), 6.24e9, 768, 8192, 1e-4, 1e-5),
    "nemotron_h_4b": (8.10e9, (52, 3072, 12288, 32, 8), 4.49e9, 768, 8192, 1e-4, 1e-5),
    # the 9B-v2's own count (conf/model/nemotron_nano_9b_v2.yaml); which layers depth pruning keeps, and so the
    # student's exact count, is decided by the calibration data
    "nemotron_nano_9b_v2": (12.31e9, (56, 4480, 15680, 40, 8), 8.89e9, 768, 8192, 1e-4, 1e-5),
}
# hybrid jobs: (Mamba heads, head_dim) of the student
MAMBA = {"nemotron_h_4b": (112, 64), "nemotron_nano_9b_v2": (128, 80)}

# Model cards: total parameters, active parameters (MoE), parameters without the embeddings (where given).
# Qwen3-8B: 8.2B, non-embedding 6.95B; Qwen3-30B-A3B: 30.5B, 3.3B activated, non-embedding 29.9B;
# Mixtral-8x7B: 46.7B, 12.9B active per token; Qwen1.5-MoE-A2.7B: 14.3B, 2.7B activated (shared expert
# included). Gemma 3 text models: the Gemma 3 technical report's Table 1, embedding + non-embedding parameters
# (1B: 302M + 698M; 4B: 675M + 3,209M; 12B: 1,012M + 10,759M; the 4B and 12B embedding figures include their
# vision projection, which the text models lack).
MODEL_CARDS = {"qwen3_8b": (8.2e9, 8.2e9, 6.95e9), "qwen3_30b_a3b": (30.5e9, 3.3e9, 29.9e9),
               "mixtral_8x7b": (46.7e9, 12.9e9, None), "qwen15_moe_a2_7b": (14.3e9, 2.7e9, None),
               "gemma3_1b": (1.000e9, 1.000e9, 698e6), "gemma3_4b": (3.884e9, 3.884e9, 3209e6),
               "gemma3_12b": (11.771e9, 11.771e9, 10759e6), "gpt_oss_20b": (20.91e9, None, None)}
# gpt-oss-20b's card: 20.91B in all, 3.61B active per token, counting the unembedding but not the embedding table.


@pytest.mark.parametrize("name", sorted(MODEL_CARDS))
def test_model_entry_matches_model_card(name):
    import yaml

    from conftest import ROOT

    from minitron_nemo.models.config import ModelConfig

    total, active, non_emb = MODEL_CARDS[name]
    mc = ModelConfig.from_dict(yaml.safe_load((ROOT / "conf" / "model" / f"{name}.yaml").read_text()))
    emb = mc.vocab_size * mc.hidden_size * (1 if mc.share_embeddings_and_output_weights else 2)
    # the cards give 2-3 significant digits
    assert abs(count_parameters(mc) - total) / total < 0.02, count_parameters(mc)
    if active is not None:
        assert abs(count_parameters(mc, active=True) - active) / active < 0.02, count_parameters(mc, active=True)
    if non_emb:
        assert abs(count_parameters(mc) - emb - non_emb) / non_emb < 0.001


def test_gpt_oss_active_parameters_as_its_card_counts_them():
    import yaml

    from conftest import ROOT

    from minitron_nemo.models.config import ModelConfig

    mc = ModelConfig.from_dict(yaml.safe_load((ROOT / "conf" / "model" / "gpt_oss_20b.yaml").read_text()))
    active = count_parameters(mc, active=True) - mc.vocab_size * mc.hidden_size
    assert abs(active - 3.61e9) / 3.61e9 < 0.005, active


def test_moe_job_config_prunes_experts():
    cfg = compose("qwen3_30b_a3b_minitron", [])
    t_mc = model_config(cfg.model)
    par = cfg.parallel
    s_mc = validate(t_mc, Targets.from_cfg(OmegaConf.to_container(cfg.prune, resolve=True)),
                    par.tensor_model_parallel_size, par.pipeline_model_parallel_size, par.expert_model_parallel_size)
    assert (s_mc.num_moe_experts, s_mc.moe_ffn_hidden_size, s_mc.moe_router_topk) == (96, 512, 8)
    assert count_parameters(s_mc, active=True) < count_parameters(t_mc, active=True)
    tp, ep = par.tensor_model_parallel_size, par.expert_model_parallel_size
    assert 256 % (tp * ep) == 0 and s_mc.num_moe_experts % ep == 0


@pytest.mark.parametrize("name", sorted(JOBS))
def test_job_config(name):
    t_params, shape, s_params, gbs, seq, lr, min_lr = JOBS[name]
    cfg = compose(name, [])
    t_mc = model_config(cfg.model)
    assert abs(count_parameters(t_mc) - t_params) / t_params < 0.02, count_parameters(t_mc)
    p = OmegaConf.to_container(cfg.prune, resolve=True)
    src = t_mc
    if name == "minitron_4b":  # iterative: the student comes from Minitron-8B
        src = validate(t_mc, Targets.from_cfg(OmegaConf.to_container(compose("minitron_8b", []).prune)), 1, 1)
    tp, pp = cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size
    s_mc = validate(src, Targets.from_cfg(p), tp, pp)
    got = (s_mc.num_layers, s_mc.hidden_size, s_mc.ffn_hidden_size, s_mc.num_attention_heads, s_mc.num_query_groups)
    assert got == shape
    assert abs(count_parameters(s_mc) - s_params) / s_params < 0.03, count_parameters(s_mc)
    assert s_mc.head_dim == t_mc.head_dim
    if name in MAMBA:
        assert (s_mc.mamba_num_heads, s_mc.mamba_head_dim) == MAMBA[name]
    t = cfg.trainer
    assert (t.global_batch_size, cfg.data.seq_length, t.optim.lr, t.optim.min_lr) == (gbs, seq, lr, min_lr)
    assert t.global_batch_size % t.micro_batch_size == 0
    DistillationConfig.from_dict(OmegaConf.to_container(cfg.distill))
    if name != "smollm2_demo":  # 32 nodes x 8 GPUs: DP = 256 / (TP x PP) divides the global batch
        assert t.global_batch_size % (256 // (tp * pp) * t.micro_batch_size) == 0
        assert cfg.correction.lr_fraction == 0.2 and cfg.correction.warmup_iters == 120
