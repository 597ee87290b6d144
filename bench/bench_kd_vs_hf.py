"""Our KD training step against a plain transformers KD loop on the same shapes and device, in one run.

    python bench/bench_kd_vs_hf.py [--shape small|tiny|1b] [--dtype bfloat16|float32] [--rounds 3] [--steps 2]
                                   [--seq N] [--mbs N] [--json PATH]

Ours: the project's KD step (bench_kd_step.py's): Megatron schedule over two micro-batches, teacher forward
and student forward/backward in ``KDStage``, the chunked KL loss, DDP, Megatron Adam (bf16 parameters with
fp32 main parameters under bf16), gradients clipped at 1. The plain loop: two ``LlamaForCausalLM`` built
from the same configs (``checkpoint.hf.hf_config_from_model_config``), SDPA attention; per micro-batch the
teacher's forward under ``no_grad``, the student's forward and backward on the mean per-token KL(teacher ||
student) in fp32, then gradient clipping at 1 and ``torch.optim.AdamW``; under bf16 the teacher's weights
are bf16 and the student's fp32 under ``torch.autocast`` (the usual mixed-precision loop). The two alternate
for ``--rounds`` rounds of ``--steps`` steps; the ratio ours / plain per round, as median [min, max]
(below 1: our step is faster).
"""

import argparse
import contextlib

import torch
import torch.nn.functional as F

from bench_kd_step import trainer
from benchlib import OPT, device_name, fmt, interleaved, random_batches, shape, summary, write_json
from minitron_nemo import runtime
from minitron_nemo.checkpoint.hf import hf_config_from_model_config
from minitron_nemo.distill import online as kd
from minitron_nemo.models.builder import build_model


def hf_model(mc, dtype, dev):
    import transformers as tf

    cfg = tf.LlamaConfig.from_dict(hf_config_from_model_config(mc))
    with torch.device(dev):
        return tf.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=dtype)


def kl_mean(student_logits, teacher_logits):
    """Mean over tokens of KL(teacher || student) over the vocabulary, in fp32."""
    s = F.log_softmax(student_logits.float().flatten(0, 1), -1)
    t = F.log_softmax(teacher_logits.float().flatten(0, 1), -1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean")


def hf_trainer(sh, dt):
    """One step of the plain transformers KD loop on the given micro-batches, as a function."""
    dev = runtime.device()
    teacher = hf_model(sh.teacher, dt, dev).eval().requires_grad_(False)
    student = hf_model(sh.student, torch.float32, dev).train()
    opt = torch.optim.AdamW(student.parameters(), lr=OPT.lr, betas=(OPT.adam_beta1, OPT.adam_beta2),
                            eps=OPT.adam_eps, weight_decay=OPT.weight_decay)
    autocast = (lambda: torch.autocast(dev.type, dtype=dt)) if dt != torch.float32 else contextlib.nullcontext

    def step(batches):
        opt.zero_grad(set_to_none=True)
        for b in batches:
            tokens = b["tokens"].to(dev)
            with torch.no_grad(), autocast():
                t_logits = teacher(tokens).logits
            with autocast():
                s_logits = student(tokens).logits
            (kl_mean(s_logits, t_logits) / len(batches)).backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), OPT.clip_grad)
        opt.step()

    return step


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="small", choices=["tiny", "small", "1b"])
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--mbs", type=int, default=None)
    ap.add_argument("--json", default=None, help="also write the results as JSON here")
    a = ap.parse_args()
    dt = getattr(torch, a.dtype)
    sh = shape(a.shape, a.seq, a.mbs)
    runtime.init_distributed(1, 1)
    teacher = build_model(sh.teacher, params_dtype=dt)
    kd.freeze(teacher)
    steps = {"ours": trainer("kd", sh, teacher, dt), "transformers": hf_trainer(sh, dt)}
    batches = random_batches(sh.teacher.vocab_size, sh.mbs, sh.seq)
    per = interleaved(steps, batches, a.rounds, a.steps)
    tokens = len(batches) * sh.mbs * sh.seq
    res = {"device": device_name(), "shape": a.shape, "dtype": a.dtype, "tokens_per_step": tokens,
           "rounds": a.rounds, "steps_per_round": a.steps, "step_seconds": {m: summary(per[m]) for m in per},
           "ours_over_transformers": summary(o / h for o, h in zip(per["ours"], per["transformers"]))}
    print(f"device {res['device']}  dtype {a.dtype}  shape {a.shape}  tokens/step {tokens}")
    for m in per:
        print(f"  {m:<12} step {fmt(res['step_seconds'][m])} s")
    print(f"  ours / transformers = {fmt(res['ours_over_transformers'])}")
    write_json(a.json, res)
    runtime.shutdown()


if __name__ == "__main__":
    main()
