"""Supervised fine-tuning of a checkpoint (a distilled student) on conversations: the LM loss on the
answer tokens, with the training loop, checkpoints, resume and TP x PP x DP of recipes/distill.py.

    python recipes/sft.py checkpoint=CKPT data.blend=PREFIX workdir=DIR [data.valid_blend=PREFIX]
    torchrun --nproc_per_node=N recipes/sft.py ... parallel.tensor_model_parallel_size=T

PREFIX: conversations written by ``recipes/preprocess_data.py format=chat`` with the checkpoint's
tokenizer (its chat template and answer masks; ``data/chat.py``). P2's two SFT stages (math and code, then
instructions) are a chain of this recipe: ``conf/p2_align.yaml``, run by recipes/align.py.
Steps: checks (no compute) -> conversations -> model -> training loop (auto-resume from
WORKDIR/checkpoints; metric ``lm``, the answer-token loss, in WORKDIR/metrics.jsonl) -> WORKDIR/results.json.
"""

import json
import time
from pathlib import Path

from minitron_nemo import outputs, runtime, schemas
from minitron_nemo.checkpoint import store
from minitron_nemo.config import compose_job, dtype
from minitron_nemo.entry import user_errors_exit
from minitron_nemo.models.builder import build_model, grouped_gemm_default
from minitron_nemo.training import data as tdata
from minitron_nemo.training import optim
from minitron_nemo.training.loop import lm_forward, lm_loss
from minitron_nemo.training.setup import Step, build_trainer


@user_errors_exit
def main():
    cfg, job = compose_job("sft", schemas.SFTJob)
    par, t, d = cfg.parallel, cfg.trainer, cfg.data
    store.require_checkpoint(cfg.checkpoint)
    mc = store.load_model_config(cfg.checkpoint)
    mc.check_layout(par)
    work = Path(cfg.workdir)
    outputs.claim_workdir(work, sources={"checkpoint": cfg.checkpoint, "data.blend": d.blend,
                                         "data.valid_blend": d.valid_blend})

    runtime.init_parallel(par, cfg.seed)
    t0 = time.time()
    params_dtype = dtype(cfg.dtype)
    seq = int(d.seq_length)
    train_iters = optim.train_iterations(t, seq)
    train_ds, valid_ds = tdata.build(d, store.tokenizer_dir(cfg.checkpoint), work,
                                     train_iters * int(t.global_batch_size), cfg.seed)
    valid = tdata.valid_batches(valid_ds, int(t.micro_batch_size), int(d.valid_samples))
    model = build_model(mc, params_dtype=params_dtype, sequence_parallel=bool(par.sequence_parallel),
                        grouped_gemm=grouped_gemm_default(mc))
    store.load_weights(model, cfg.checkpoint)
    runtime.print0(f"[sft] {cfg.checkpoint}: {train_iters} iterations x {t.global_batch_size} samples x {seq} "
                   f"positions, loss on {'answer tokens' if d.answer_only else 'every token'}"
                   f"{', packed' if d.packing else ''}")
    trainer = build_trainer(model, mc, Step(lm_forward, lm_loss, lm_loss), tcfg=t, ccfg=cfg.checkpointing,
                            params_dtype=params_dtype, workdir=work,
                            train_batches=tdata.train_iterator(train_ds, int(t.micro_batch_size)), valid_batches=valid,
                            train_iters=train_iters, seq_length=seq, tokenizer_src=cfg.checkpoint,
                            meta={"sft_from": cfg.checkpoint, "data": str(d.blend), "answer_only": bool(d.answer_only)})
    trainer.resume()
    last = trainer.fit()
    results = {"final_checkpoint": str(trainer.ckpt_root / f"iter_{trainer.iteration:07d}"),
               "valid_loss": float(last["lm"]) if "lm" in last else None,
               "seconds": round(time.time() - t0, 1)}
    if runtime.is_rank0():
        outputs.write_text_atomic(work / "results.json", json.dumps(results, indent=2))
        print(f"[sft] done in {results['seconds']:.0f}s; checkpoint {results['final_checkpoint']}", flush=True)
    runtime.shutdown()


if __name__ == "__main__":
    main()
