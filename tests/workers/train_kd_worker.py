"""KD training worker on tiny random models: ``train_kd_worker.py MODE OUT_JSON WORKDIR [PP] [DTYPE] [inter]``.

``inter``: add a cosine intermediate loss on the final norms (student hidden 48 != teacher 64, so
through the student's learned projection). ``moe``: teacher and student are mixtures of experts (8 and
4 experts, top-2) whose router load-balancing loss has weight 0.01; ``moe0``: the same with weight 0.

MODE ``full``: 6 steps. ``resume``: 3 steps (checkpoint), then fresh objects resume to 6.
``init``: save random teacher/student checkpoints to WORKDIR/{teacher,student}. ``run``: load them, 3 steps.
Writes the per-iteration losses to OUT_JSON (rank 0).
"""

import json
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from minitron_nemo import runtime
from minitron_nemo.checkpoint import store
from minitron_nemo.distill import online as kd
from minitron_nemo.distill.config import DistillationConfig
from minitron_nemo.models.builder import build_model
from minitron_nemo.models.config import ModelConfig
from minitron_nemo.training import optim
from minitron_nemo.training.loop import Trainer

T_MC = ModelConfig(num_layers=4, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2,
                   vocab_size=256)
S_MC = T_MC.replace(hidden_size=48, ffn_hidden_size=64)
TCFG = OmegaConf.create({"eval_interval": 3, "peak_tflops": None, "tensorboard": False,
                         "optim": {"lr": 1e-2, "min_lr": 1e-3, "decay_style": "cosine", "weight_decay": 0.01,
                                   "adam_beta1": 0.9, "adam_beta2": 0.95, "adam_eps": 1e-8, "clip_grad": 1.0}})
CCFG = OmegaConf.create({"save_interval": 3, "keep_last": 2})
SEQ, GBS, MBS, ITERS = 32, 4, 2, 6


def sample(i):
    g = torch.Generator().manual_seed(i)
    w = torch.randint(0, 256, (SEQ + 1,), generator=g)
    return w


def batches_from(consumed):
    from megatron.core import parallel_state as ps

    dp, r = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    i = consumed
    while True:
        ws = torch.stack([sample(i + r * MBS + j) for j in range(MBS)])
        yield {"tokens": ws[:, :-1], "labels": ws[:, 1:], "loss_mask": torch.ones(MBS, SEQ),
               "position_ids": torch.arange(SEQ).expand(MBS, SEQ)}
        i += MBS * dp


INTER = False


def kd_config():
    pairs = [["decoder.final_layernorm", "decoder.final_layernorm", "cosine"]] if INTER else []
    return DistillationConfig(intermediate_layer_pairs=pairs)


def make_trainer(work, dtype, teacher=None, student=None):
    if teacher is None:
        teacher, student = build_model(T_MC, params_dtype=dtype), build_model(S_MC, params_dtype=dtype)
    cfg = kd_config()
    kd.attach_projection(student, S_MC, T_MC, cfg, dtype)
    ddp = optim.wrap_ddp(student, distributed_optimizer=False)
    opt = optim.build_optimizer(ddp, TCFG.optim, dtype, False)
    sched = optim.build_scheduler(opt, TCFG.optim, ITERS, 1)
    chunk = kd.KDStage(ddp, teacher, S_MC, T_MC, cfg)
    valid = [next(batches_from(1000 + k)) for k in range(2)]
    return Trainer(chunk=chunk, ddp=ddp, optimizer=opt, scheduler=sched, mc=S_MC, train_batches=batches_from,
                   valid_batches=valid, forward=kd.kd_forward, loss=lambda b, o: kd.kd_loss(cfg, b, o),
                   valid_loss=lambda b, o: kd.kd_valid_loss(cfg, b, o), tcfg=TCFG, ccfg=CCFG, workdir=Path(work),
                   train_iters=ITERS, num_microbatches=optim.batch_layout(MBS, GBS), global_batch_size=GBS,
                   seq_length=SEQ)


def use_moe(coeff: float) -> None:
    global T_MC, S_MC
    T_MC = T_MC.replace(family="mixtral", num_moe_experts=8, moe_router_topk=2, moe_ffn_hidden_size=32,
                        moe_aux_loss_coeff=coeff)
    S_MC = T_MC.replace(hidden_size=48, num_moe_experts=4, moe_ffn_hidden_size=16)


def losses(tr):
    return [{k: r[k] for k in ("iteration", "total", "logits", "lm", "intermediate", "moe_aux") if k in r}
            for r in tr.history if r["kind"] == "train"]


def main():
    mode, out, work = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    pp = int(sys.argv[4]) if len(sys.argv) > 4 else 1
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[sys.argv[5] if len(sys.argv) > 5 else "bf16"]
    global INTER
    INTER = len(sys.argv) > 6 and sys.argv[6] == "inter"
    if len(sys.argv) > 6 and sys.argv[6].startswith("moe"):
        use_moe(0.0 if sys.argv[6] == "moe0" else 0.01)
    runtime.init_distributed(1, pp, 1234)
    result = {}
    if mode == "full":
        tr = make_trainer(work, dtype)
        tr.fit()
        result = {"losses": losses(tr)}
    elif mode == "resume":
        tr = make_trainer(work, dtype)
        tr.fit(stop_at=3)
        first = losses(tr)
        torch.manual_seed(999)  # the resumed objects start from other random weights and RNG
        tr2 = make_trainer(work, dtype, tr.chunk.teacher[0], build_model(S_MC, params_dtype=dtype))
        assert tr2.resume(), "no checkpoint to resume from"
        tr2.fit()
        result = {"losses": first + losses(tr2)}
    elif mode == "init":
        t, s = build_model(T_MC, params_dtype=dtype), build_model(S_MC, params_dtype=dtype)
        store.save_checkpoint(t, work / "teacher", T_MC)
        store.save_checkpoint(s, work / "student", S_MC)
    elif mode == "run":
        t, s = build_model(T_MC, params_dtype=dtype), build_model(S_MC, params_dtype=dtype)
        store.load_weights(t, work / "teacher")
        store.load_weights(s, work / "student")
        tr = make_trainer(work / f"run_pp{pp}", dtype, t, s)
        tr.fit(stop_at=3)
        result = {"losses": losses(tr)}
    if runtime.is_rank0() and result:
        Path(out).write_text(json.dumps(result))
    runtime.shutdown()


if __name__ == "__main__":
    main()
