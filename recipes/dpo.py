"""Direct preference optimization of a checkpoint (a distilled student), its start frozen as the reference.

    python recipes/dpo.py checkpoint=CKPT data.preference_file=PAIRS.jsonl workdir=DIR [dpo.beta=0.1]
    torchrun --nproc_per_node=N recipes/dpo.py ... parallel.tensor_model_parallel_size=T

PAIRS.jsonl lines: ``{"prompt": [messages] or "text", "chosen": "..." or [messages], "rejected": ...}``,
rendered in the checkpoint's own chat template, the loss on the responses' tokens (``align/preferences.py``).
Steps: checks (no compute) -> pairs rendered and checked -> policy and frozen reference -> training loop
(auto-resume from WORKDIR/checkpoints; metrics ``dpo``, ``reward_chosen``, ``reward_rejected``, ``margin``,
``reward_accuracy`` in WORKDIR/metrics.jsonl) -> WORKDIR/results.json. The same loop, checkpoints and
parallelism as recipes/distill.py (``align/dpo.py``).
"""

import json
import time
from pathlib import Path

from minitron_nemo import outputs, runtime, schemas
from minitron_nemo.align import dpo
from minitron_nemo.align.preferences import PreferenceSamples, chat_renderer, read_pairs
from minitron_nemo.checkpoint import store
from minitron_nemo.config import compose_job, dtype
from minitron_nemo.data.indexed import HFTokenizer
from minitron_nemo.entry import user_errors_exit
from minitron_nemo.models.builder import build_model
from minitron_nemo.training import data as tdata
from minitron_nemo.training.setup import build_trainer


@user_errors_exit
def main():
    cfg, job = compose_job("dpo", schemas.DPOJob)
    par, t, d = cfg.parallel, cfg.trainer, cfg.data
    store.require_checkpoint(cfg.checkpoint)
    mc = store.load_model_config(cfg.checkpoint)
    mc.check_layout(par)
    tok_dir = store.tokenizer_dir(cfg.checkpoint)
    renderer = chat_renderer(tok_dir)
    seq = int(d.seq_length)
    pairs = read_pairs(d.preference_file, renderer, seq)
    held_out = read_pairs(d.valid_file, renderer, seq) if d.valid_file else pairs
    work = Path(cfg.workdir)
    outputs.claim_workdir(work, sources={"checkpoint": cfg.checkpoint, "data.preference_file": d.preference_file,
                                         "data.valid_file": d.valid_file})

    runtime.init_parallel(par, cfg.seed)
    t0 = time.time()
    params_dtype = dtype(cfg.dtype)
    tok = HFTokenizer(tok_dir)
    pad = tok.pad if tok.pad >= 0 else tok.eod
    train_iters = int(t.train_iters)
    train_ds = PreferenceSamples(pairs, seq, pad, train_iters * int(t.global_batch_size))
    valid_ds = PreferenceSamples(held_out, seq, pad, max(int(d.valid_samples), 1))
    valid = tdata.valid_batches(valid_ds, int(t.micro_batch_size), int(d.valid_samples))
    runtime.print0(f"[dpo] {len(pairs)} pairs ({len(held_out)} held out{' (the training file)' if not d.valid_file else ''})"
                   f", beta {job.dpo.beta}; policy and reference {cfg.checkpoint}")
    reference = store.load_model(cfg.checkpoint, mc, params_dtype)
    policy = build_model(mc, params_dtype=params_dtype, sequence_parallel=bool(par.sequence_parallel))
    store.load_weights(policy, cfg.checkpoint)
    step = dpo.build(job.dpo, policy, reference, mc)
    trainer = build_trainer(policy, mc, step, tcfg=t, ccfg=cfg.checkpointing, params_dtype=params_dtype, workdir=work,
                            train_batches=tdata.train_iterator(train_ds, int(t.micro_batch_size)), valid_batches=valid,
                            train_iters=train_iters, seq_length=2 * seq, tokenizer_src=cfg.checkpoint,
                            meta={"dpo_from": cfg.checkpoint, "beta": job.dpo.beta,
                                  "preference_file": str(d.preference_file)})
    trainer.resume()
    trainer.fit()
    results = {"final_checkpoint": str(trainer.ckpt_root / f"iter_{trainer.iteration:07d}"),
               "seconds": round(time.time() - t0, 1)}
    if runtime.is_rank0():
        outputs.write_text_atomic(work / "results.json", json.dumps(results, indent=2))
        print(f"[dpo] done in {results['seconds']:.0f}s; checkpoint {results['final_checkpoint']}", flush=True)
    runtime.shutdown()


if __name__ == "__main__":
    main()
