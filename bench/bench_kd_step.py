"""KD step time over student-only step time, against the FLOP-ideal ratio, measured in one run.

    python bench/bench_kd_step.py [--shape small|tiny|1b] [--steps 2] [--rounds 3] [--seq N] [--mbs N]
                                  [--dtype float32|bfloat16] [--json PATH]

Teacher and student: ``--shape`` (bench/benchlib.py; default ``small``: a random 8-layer model, hidden 512,
FFN 2048, 8 heads / 4 groups, vocab 16384, and its width-pruned shape, hidden 384, FFN 1024). Both take full
training steps through the project's loop (Megatron schedule, DDP, optimizer): KD = teacher forward +
student forward/backward + KL; student-only = student forward/backward + LM loss. The two alternate for
``--rounds`` rounds of ``--steps`` steps (so load changes hit both alike); each round gives a ratio,
reported as median [min, max]. Ideal ratio = (2 N_t + 6 N_s) / (6 N_s).
"""

import argparse

import torch

from benchlib import OPT, device_name, fmt, interleaved, random_batches, shape, summary, write_json
from minitron_nemo import runtime
from minitron_nemo.distill import online as kd
from minitron_nemo.distill.config import DistillationConfig
from minitron_nemo.models.builder import build_model, count_parameters
from minitron_nemo.training import optim
from minitron_nemo.training.loop import lm_forward, lm_loss, setup_schedule, train_step


def trainer(mode, sh, teacher, dt):
    """One optimizer step of ``mode`` (student / kd) on the given micro-batches, as a function."""
    student = build_model(sh.student, params_dtype=dt)
    ddp = optim.wrap_ddp(student, distributed_optimizer=False)
    opt = optim.build_optimizer(ddp, OPT, dt, False)
    sched = optim.build_scheduler(opt, OPT, 1000, 1)
    if mode == "kd":
        cfg = DistillationConfig()
        chunk, forward, loss = kd.KDStage(ddp, teacher, sh.student, sh.teacher, cfg), kd.kd_forward, \
            (lambda b, o: kd.kd_loss(cfg, b, o))
    else:
        chunk, forward, loss = ddp, lm_forward, lm_loss
    setup_schedule(chunk, ddp, opt)
    return lambda batches: train_step(chunk, ddp, opt, sched, batches, forward, loss)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="small", choices=["tiny", "small", "1b"])
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--mbs", type=int, default=None)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--json", default=None, help="also write the results as JSON here")
    a = ap.parse_args()
    dt = getattr(torch, a.dtype)
    sh = shape(a.shape, a.seq, a.mbs)
    runtime.init_distributed(1, 1)
    teacher = build_model(sh.teacher, params_dtype=dt)
    kd.freeze(teacher)
    batches = random_batches(sh.teacher.vocab_size, sh.mbs, sh.seq)
    steps = {m: trainer(m, sh, teacher, dt) for m in ("student", "kd")}
    per = interleaved(steps, batches, a.rounds, a.steps)
    n_t, n_s = count_parameters(sh.teacher), count_parameters(sh.student)
    ideal = (2 * n_t + 6 * n_s) / (6 * n_s)
    ratios = [k / s for k, s in zip(per["kd"], per["student"])]
    tokens = len(batches) * sh.mbs * sh.seq
    res = {"device": device_name(), "shape": a.shape, "dtype": a.dtype, "teacher_params": n_t, "student_params": n_s,
           "tokens_per_step": tokens, "rounds": a.rounds, "steps_per_round": a.steps,
           "step_seconds": {m: summary(per[m]) for m in per}, "kd_over_student": summary(ratios), "ideal": ideal,
           "measured_over_ideal": summary(r / ideal for r in ratios)}
    print(f"device {res['device']}  dtype {a.dtype}  teacher {n_t / 1e6:.1f}M  student {n_s / 1e6:.1f}M  "
          f"tokens/step {tokens}")
    for m in per:
        print(f"{m:<8} step {fmt(res['step_seconds'][m])} s "
              f"({tokens / res['step_seconds'][m]['median']:.0f} tokens/s)")
    print(f"KD / student-only = {fmt(res['kd_over_student'])}   FLOP-ideal = {ideal:.3f}   "
          f"measured / ideal = {fmt(res['measured_over_ideal'])}")
    write_json(a.json, res)
    runtime.shutdown()


if __name__ == "__main__":
    main()
