"""Teacher correction (P2): LM-loss fine-tuning of the unpruned teacher on the distillation data.

    python recipes/correct_teacher.py [--config-name JOB] [correction.train_iters=N] [key=value ...]

Same job config, data and training loop as distillation. Defaults: peak LR = ``correction.lr_fraction``
(1/5) x ``correction.original_lr``, ``correction.warmup_iters`` (120) warm-up steps; batch size, min LR
and decay from ``trainer``. Checkpoints and auto-resume under ``correction.workdir``; the result is
written to ``teacher.corrected_checkpoint``, which prune/distill in the same config then use as teacher.
"""

import math
import time
from pathlib import Path

from omegaconf import OmegaConf, open_dict

from minitron_nemo import outputs, runtime, schemas
from minitron_nemo.checkpoint import store
from minitron_nemo.config import compose, dtype, require
from minitron_nemo.entry import user_errors_exit
from minitron_nemo.errors import UserError
from minitron_nemo.models.builder import grouped_gemm_default
from minitron_nemo.models.forward import lm_loss_sums
from minitron_nemo.training import data as tdata
from minitron_nemo.training import optim
from minitron_nemo.training.loop import lm_forward, lm_loss
from minitron_nemo.training.setup import Step, build_trainer, check_model_shape, resolve_source


@user_errors_exit
def main():
    cfg = compose("smollm2_demo", schema=schemas.TrainingJob)
    require(cfg, "teacher.corrected_checkpoint", "correction.workdir")
    par, c = cfg.parallel, cfg.correction
    t = OmegaConf.create(OmegaConf.to_container(cfg.trainer, resolve=True))
    with open_dict(t):  # P2: peak LR / 5, 120 warm-up steps; batch, min LR and decay unchanged
        t.optim.lr = float(c.original_lr) * float(c.lr_fraction)
        t.optim.min_lr = min(float(t.optim.min_lr), t.optim.lr)
        t.warmup_iters = int(c.warmup_iters)
        t.train_iters, t.train_tokens = c.train_iters, c.train_tokens
    params_dtype = dtype(cfg.dtype)
    src = resolve_source(cfg.teacher.checkpoint)
    mc = store.model_config_of(src)
    check_model_shape(cfg, mc, f"teacher {src}")
    mc.check_layout(par)
    out, work = Path(cfg.teacher.corrected_checkpoint), Path(c.workdir)
    if store.is_checkpoint(out):
        runtime.print0(f"[correct] {out} already exists; nothing to do")
        return
    tdata.claim_cache(cfg.data, {"teacher.checkpoint": src})
    outputs.claim_workdir(cfg.workdir, sources={"teacher.checkpoint": src})
    outputs.claim_workdir(work, key="correction.workdir", sources={"teacher.checkpoint": src})
    outputs.claim_dir(out, key="teacher.corrected_checkpoint", overwrite=cfg.overwrite,
                      sources={"teacher.checkpoint": src, "correction.workdir": work}, within={"workdir": cfg.workdir})

    runtime.init_parallel(par, cfg.seed)
    t0 = time.time()
    model = store.load_model(src, mc, params_dtype, grouped_gemm=grouped_gemm_default(mc),
                             sequence_parallel=bool(par.sequence_parallel))
    optim.batch_layout(int(t.micro_batch_size), int(t.global_batch_size))  # checked before the data is built
    seq = int(cfg.data.seq_length)
    iters = optim.train_iterations(t, seq)
    train_ds, valid_ds = tdata.build(cfg.data, store.tokenizer_dir(src), cfg.workdir, iters * int(t.global_batch_size),
                                     cfg.seed)
    valid = tdata.valid_batches(valid_ds, int(t.micro_batch_size), int(cfg.data.valid_samples))
    if not valid:
        raise UserError("teacher correction reports the validation loss; allowed: a data config with validation data")
    before = lm_loss_sums(model, valid)
    before = before[0] / max(before[1], 1)
    runtime.print0(f"[correct] teacher {src}: validation loss before {before:.4f}; peak LR {t.optim.lr:.2e}, "
                   f"{t.warmup_iters} warm-up, {iters} iterations")

    trainer = build_trainer(model, mc, Step(lm_forward, lm_loss, lm_loss), tcfg=t, ccfg=cfg.checkpointing,
                            params_dtype=params_dtype, workdir=work,
                            train_batches=tdata.train_iterator(train_ds, int(t.micro_batch_size)), valid_batches=valid,
                            train_iters=iters, seq_length=seq, tokenizer_src=src, meta={"corrected_from": src})
    trainer.resume()
    trainer.fit()

    after = lm_loss_sums(model, valid)
    after = after[0] / max(after[1], 1)
    store.save_checkpoint(model, out, mc, tokenizer_src=src,
                          meta={"corrected_from": src, "iterations": iters, "valid_loss_before": before,
                                "valid_loss_after": after, "hf_token_ids": store.load_meta(src).get("hf_token_ids")})
    runtime.print0(f"[correct] validation loss {before:.4f} -> {after:.4f} ({100 * (before - after) / before:.1f}% "
                   f"lower; ppl {math.exp(before):.2f} -> {math.exp(after):.2f}) in {time.time() - t0:.0f}s; "
                   f"corrected teacher {out}")
    runtime.shutdown()


if __name__ == "__main__":
    main()
