"""Knowledge distillation of a pruned student from its (corrected) teacher, in one job.

    python recipes/distill.py                       # default: conf/smollm2_demo.yaml (2 CPU cores)
    torchrun --nproc_per_node=N recipes/distill.py --config-name llama31_minitron_4b_width \
        teacher.checkpoint=HF_OR_CKPT data.blend=PREFIX workdir=DIR

Steps: checks (no compute) -> teacher (the corrected one when ``teacher.corrected_checkpoint`` exists)
-> teacher sanity on validation data -> student (``student.checkpoint``, or pruned in-job from the
teacher and saved to ``student.init_checkpoint`` so a restart skips pruning) -> zero-shot student ->
training loop (auto-resume from WORKDIR/checkpoints) -> held-out perplexities of teacher, zero-shot
student and distilled student (WORKDIR/results.json). The teacher is frozen and never checkpointed.

Baselines of the same recipe (P1's comparisons): ``student.loss=lm`` trains the student on the LM loss
alone (no teacher forward); ``student.init=random`` starts from random weights of the pruned architecture.

Offline: ``distill.teacher_cache=DIR`` (written by recipes/cache_teacher.py with this config) replaces the
teacher's forward by a lookup of its cached top-K distribution; the teacher's weights are not loaded
(except to prune the student in-job once), the loss is the KL over the cached tokens plus a rest bucket
(``distill/bucket_kl.py``), and the teacher's numbers come from the cache.
"""

import json
import math
import time
from pathlib import Path

from minitron_nemo import outputs, runtime, schemas
from minitron_nemo.checkpoint import store
from minitron_nemo.config import compose_job, dtype
from minitron_nemo.data.windows import load_tokenizer, tiled_windows
from minitron_nemo.distill import online as kd
from minitron_nemo.distill import offline
from minitron_nemo.distill import step as kd_step
from minitron_nemo.entry import user_errors_exit
from minitron_nemo.errors import UserError
from minitron_nemo.eval import perplexity as ppl
from minitron_nemo.models.builder import build_model, count_parameters, grouped_gemm_default
from minitron_nemo.models.forward import lm_loss_sums
from minitron_nemo.readers import read_cache
from minitron_nemo.training import data as tdata
from minitron_nemo.training import optim
from minitron_nemo.training.setup import build_trainer, check_model_shape, teacher_source


def prune_config(cfg, job):
    """The typed ``prune`` group of in-job pruning: calibration on the training text unless
    ``prune.calibration.data`` is set."""
    p = job.prune.with_calibration_data(job.prune.calibration.data or tdata.text_files(cfg.data).get("train"))
    if not p.calibration.data:
        raise UserError("in-job pruning needs prune.calibration.data=TEXT_OR_PREFIX (or a text data source)")
    return p


def prune_student(cfg, job, teacher, t_mc, t_path):
    """Prune the teacher in-job to ``cfg.prune`` targets, as recipes/prune.py does, and save the student
    (once)."""
    from minitron_nemo.prune import from_config

    result = from_config.prune_from_config(teacher, t_mc, prune_config(cfg, job), store.tokenizer_dir(t_path))
    meta = {"pruned_from": t_path, "prune": {"kept_layers_1indexed": [i + 1 for i in result.kept_layers]},
            "dtype": cfg.dtype}
    store.save_checkpoint(result.model, cfg.student.init_checkpoint, result.config, tokenizer_src=t_path, meta=meta)
    return result.config


def perplexity(model, windows, mbs) -> float:
    return ppl.megatron_perplexity(model, windows, mbs)["perplexity"] if windows is not None else float("nan")


@user_errors_exit
def main():
    cfg, job = compose_job("smollm2_demo", schemas.TrainingJob)
    use_kd = cfg.student.loss == "kd"
    cached = use_kd and cfg.distill.teacher_cache is not None
    par, t = cfg.parallel, cfg.trainer
    kd.check_virtual_pipeline(par)
    kd_cfg = job.distill
    params_dtype = dtype(cfg.dtype)
    work = Path(cfg.workdir)
    t_path, corrected = teacher_source(cfg)
    t_mc = store.model_config_of(t_path)
    check_model_shape(cfg, t_mc, f"teacher {t_path}")
    t_mc.check_layout(par)
    s_path = cfg.student.checkpoint
    if s_path is not None:
        s_mc = store.load_model_config(s_path)
        kd.check_vocab(t_mc, s_mc)
        kd.check_tokenizers(t_path, s_path)
        s_mc.check_layout(par)
    elif cfg.student.init_checkpoint is None:
        raise UserError("student.init_checkpoint is required when the student is pruned in-job "
                        "(student.checkpoint=null); pass student.init_checkpoint=DIR")
    tc = offline.open_for_job(cfg, kd_cfg, t_path, t_mc) if cached else None
    tdata.claim_cache(cfg.data, {"teacher": t_path, "student.checkpoint": s_path})
    outputs.claim_workdir(work, sources={"teacher": t_path, "student.checkpoint": s_path,
                                         "distill.teacher_cache": kd_cfg.teacher_cache})
    prunes_in_job = s_path is None and not store.is_checkpoint(cfg.student.init_checkpoint)
    if prunes_in_job:
        from minitron_nemo.prune import from_config

        from_config.check_config(t_mc, prune_config(cfg, job), par.tensor_model_parallel_size,  # targets: before any compute
                         par.pipeline_model_parallel_size, ep=par.expert_model_parallel_size)
        outputs.claim_dir(cfg.student.init_checkpoint, key="student.init_checkpoint", overwrite=cfg.overwrite,
                          sources={"teacher": t_path}, within={"workdir": work})

    runtime.init_parallel(par, cfg.seed)
    from megatron.core import parallel_state as ps

    t0 = time.time()
    runtime.print0(f"[distill] teacher {t_path}{' (corrected)' if corrected else ''}: {count_parameters(t_mc):,} params"
                   + (f" ({count_parameters(t_mc, active=True):,} active)" if t_mc.is_moe else "")
                   + (f"; offline, from the cache {tc.root} (top {tc.topk} of {tc.layout.topk} cached tokens)"
                      if cached else ""))
    need_teacher = not cached or prunes_in_job
    teacher = store.load_model(t_path, t_mc, params_dtype,  # calibration hooks need the sequential experts
                               grouped_gemm=grouped_gemm_default(t_mc) and not prunes_in_job) if need_teacher else None
    if teacher is not None:
        kd.freeze(teacher)
    n_acc = optim.batch_layout(int(t.micro_batch_size), int(t.global_batch_size))
    seq = int(cfg.data.seq_length)
    train_iters = optim.train_iterations(t, seq)
    tok_dir = store.tokenizer_dir(t_path)
    train_ds, valid_ds = tdata.build(cfg.data, tok_dir, work, train_iters * int(t.global_batch_size), cfg.seed)
    valid = tdata.valid_batches(valid_ds, int(t.micro_batch_size), int(cfg.data.valid_samples))

    # teacher sanity: a teacher whose weights did not load is caught before any training
    if cached:  # checked when the cache was written; the data must be the cached samples
        offline.check_data(tc, offline.sample_counts(cfg, train_ds, valid_ds, train_iters * int(t.global_batch_size)),
                           train_ds, valid_ds)
        valid = offline.tag_valid(valid)
        teacher_loss = float(tc.manifest["teacher_loss"]["loss"])
    else:
        check = valid or tdata.valid_batches(train_ds, int(t.micro_batch_size), int(cfg.data.valid_samples))
        total, count = lm_loss_sums(teacher, check)
        teacher_loss = total / max(count, 1)
        kd.check_teacher_sane(teacher_loss, t_mc, float(cfg.teacher.max_loss_fraction), t_path)
    runtime.print0(f"[distill] teacher validation loss {teacher_loss:.4f} (ln vocab {math.log(t_mc.vocab_size):.2f})"
                   + (" (from the cache)" if cached else ""))

    # student: given, or pruned in-job once
    if s_path is None:
        s_path = str(cfg.student.init_checkpoint)
        if prunes_in_job:
            runtime.print0(f"[distill] pruning the teacher in-job -> {s_path}")
            prune_student(cfg, job, teacher, t_mc, t_path)
        s_mc = store.load_model_config(s_path)
        kd.check_vocab(t_mc, s_mc)
    if cached:
        teacher = None  # only needed to prune
    student = build_model(s_mc, params_dtype=params_dtype, sequence_parallel=bool(par.sequence_parallel),
                          grouped_gemm=grouped_gemm_default(s_mc))
    if cfg.student.init == "pruned":
        store.load_weights(student, s_path)
    runtime.print0(f"[distill] student {s_path}{' (architecture only: random init)' if cfg.student.init == 'random' else ''}"
                   f": {count_parameters(s_mc):,} params ({count_parameters(s_mc) / count_parameters(t_mc):.1%} of the "
                   f"teacher)" + (f", {count_parameters(s_mc, active=True):,} active" if s_mc.is_moe else "")
                   + f"; loss {'KD' if use_kd else 'LM only'}")

    test_text = cfg.data.test_text or (tdata.text_files(cfg.data).get("test") if cfg.data.source != "indexed" else None)
    windows = (tiled_windows(load_tokenizer(t_path), test_text, seq, cfg.data.test_tokens)
               if test_text else None)
    zs_file = work / "zero_shot.json"  # measured once: a resumed job reports the same zero-shot number
    # a cache of redoable work (the student is still its initial weights here): unreadable, measured again
    measured = read_cache(zs_file, "student zero-shot perplexity", log=runtime.print0)
    if isinstance(measured, dict) and isinstance(measured.get("student_zero_shot"), (int, float)):
        zero_shot = measured["student_zero_shot"]
    else:  # every rank takes part; rank 0 writes it after the collective, so no rank reads a partial file
        zero_shot = perplexity(student, windows, int(t.micro_batch_size))
        if runtime.is_rank0():
            outputs.write_text_atomic(zs_file, json.dumps({"student_zero_shot": zero_shot}))

    # step (online KD, offline KD from the cache, or the LM loss alone) -> trainer
    step = kd_step.build(kd_cfg, student, s_mc, params_dtype, teacher=teacher, t_mc=t_mc, cache=tc, kd=use_kd)
    trainer = build_trainer(student, s_mc, step, tcfg=t, ccfg=cfg.checkpointing, params_dtype=params_dtype,
                            workdir=work, train_batches=tdata.train_iterator(train_ds, int(t.micro_batch_size)),
                            valid_batches=valid, train_iters=train_iters, seq_length=seq, tokenizer_src=t_path,
                            meta={"distilled_from": t_path, "student_init": s_path, "init": cfg.student.init,
                                  "loss": cfg.student.loss, "teacher_cache": kd_cfg.teacher_cache})
    trainer.resume()
    runtime.print0(f"[distill] {train_iters} iterations x {t.global_batch_size} samples x {seq} tokens "
                   f"(micro-batch {t.micro_batch_size}, accumulation {n_acc}, DP {ps.get_data_parallel_world_size()})")
    last_valid = trainer.fit()

    if cached:
        t_ppl = offline.teacher_perplexity(tc, test_text, seq, cfg.data.test_tokens) if cfg.teacher.held_out \
            else float("nan")
    else:
        t_ppl = perplexity(teacher, windows, int(t.micro_batch_size)) if cfg.teacher.held_out else float("nan")
    results = {"teacher": t_ppl, "student_zero_shot": zero_shot,
               "student_distilled": perplexity(student, windows, int(t.micro_batch_size)),
               "tokens": 0 if windows is None else int((windows[:, 1:] >= 0).sum()),
               "valid": {k: float(v) for k, v in last_valid.items()},   # the last validation (e.g. answer tokens)
               "final_checkpoint": str(trainer.ckpt_root / f"iter_{trainer.iteration:07d}"),
               "seconds": round(time.time() - t0, 1)}
    if runtime.is_rank0():
        outputs.write_text_atomic(work / "results.json", json.dumps(results, indent=2))
        if windows is not None:
            print(f"\nheld-out perplexity ({results['tokens']} tokens of {test_text})", flush=True)
            for name, key in (("teacher" + (" (corrected)" if corrected else ""), "teacher"),
                              ("student, zero-shot (pruned)", "student_zero_shot"),
                              ("student, distilled", "student_distilled")):
                print(f"  {name:<32} {results[key]:>10.3f}", flush=True)
        else:  # no held-out text (e.g. conversations): the validation losses, on the loss-masked tokens
            print("\nvalidation at the end (no data.test_text for a held-out perplexity): "
                  + ", ".join(f"{k} {v:.4f}" for k, v in results["valid"].items()), flush=True)
        print(f"[distill] done in {results['seconds']:.0f}s; student checkpoint {results['final_checkpoint']}",
              flush=True)
    runtime.shutdown()


if __name__ == "__main__":
    main()
