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
}


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
    t = cfg.trainer
    assert (t.global_batch_size, cfg.data.seq_length, t.optim.lr, t.optim.min_lr) == (gbs, seq, lr, min_lr)
    assert t.global_batch_size % t.micro_batch_size == 0
    DistillationConfig.from_dict(OmegaConf.to_container(cfg.distill))
    if name != "smollm2_demo":  # 32 nodes x 8 GPUs: DP = 256 / (TP x PP) divides the global batch
        assert t.global_batch_size % (256 // (tp * pp) * t.micro_batch_size) == 0
        assert cfg.correction.lr_fraction == 0.2 and cfg.correction.warmup_iters == 120
