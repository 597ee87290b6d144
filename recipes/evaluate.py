"""Held-out perplexity (and lm-eval tasks) of a minitron_nemo checkpoint or a Hugging Face directory.

    python recipes/evaluate.py checkpoint=CKPT_OR_HF_DIR eval.text_file=FILE eval.seq_length=N \
        eval.output=OUT.json
    torchrun --nproc_per_node=2 recipes/evaluate.py ... parallel.pipeline_model_parallel_size=2

Writes {"loss": mean next-token NLL in nats, "perplexity": exp(loss), "tokens": count}.
On the HF form of the model (a checkpoint is exported to a temporary directory first), single process:
  eval.lm_eval_tasks=[shakespeare_mc,shakespeare_lastword]  lm-evaluation-harness -> "lm_eval": {task: {metric: v}}
  eval.generate.prompts=["To be, or not", ...]            greedy samples -> "samples"
  eval.throughput.enabled=true                            generation tokens/s (eval.throughput.*) -> "throughput"
"""

import json
import os
import time
from pathlib import Path

from minitron_nemo import outputs, runtime, schemas
from minitron_nemo.checkpoint import store
from minitron_nemo.config import compose, dtype
from minitron_nemo.data.windows import load_tokenizer, tiled_windows
from minitron_nemo.entry import user_errors_exit
from minitron_nemo.errors import UserError
from minitron_nemo.eval import perplexity as ppl


RECIPE = "evaluate"


def is_result_file(path) -> bool:
    """An ``eval.output`` written by this recipe (it may be replaced by a re-run)."""
    try:
        return json.loads(Path(path).read_text()).get("recipe") == RECIPE
    except (OSError, ValueError, AttributeError):
        return False


def windows(cfg):
    return tiled_windows(load_tokenizer(cfg.checkpoint), cfg.eval.text_file, cfg.eval.seq_length,
                         cfg.eval.max_tokens)


def hf_results(cfg) -> dict:
    """lm-eval, greedy samples and throughput on the HF form of the model (a checkpoint is exported to a
    temp dir first)."""
    import tempfile

    from minitron_nemo.checkpoint.export import export_hf
    from minitron_nemo.eval import generate
    from minitron_nemo.eval.harness import run_lm_eval

    ev = cfg.eval
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("eval.lm_eval_tasks, eval.generate and eval.throughput run in a single process "
                        "(transformers); run them without torchrun")
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = cfg.checkpoint
        if store.is_checkpoint(cfg.checkpoint):
            hf_dir = export_hf(cfg.checkpoint, Path(tmp) / "hf")
        if ev.lm_eval_tasks:
            out["lm_eval"] = run_lm_eval(hf_dir, list(ev.lm_eval_tasks), ev.text_file, tmp, limit=ev.lm_eval_limit,
                                         batch_size=ev.lm_eval_batch_size, seed=cfg.seed)
        if ev.generate.prompts or ev.throughput.enabled:
            model, tok = generate.load_hf(hf_dir, dtype(cfg.dtype))
            if ev.generate.prompts:
                out["samples"] = generate.greedy_samples(model, tok, list(ev.generate.prompts),
                                                         int(ev.generate.max_new_tokens))
            if ev.throughput.enabled:
                th = ev.throughput
                out["throughput"] = generate.throughput(model, th.batch_size, th.prompt_length, th.generation_length,
                                                        th.repeats, cfg.seed)
    return out


@user_errors_exit
def main():
    cfg = compose("evaluate", schema=schemas.EvaluateJob)
    mc = store.model_config_of(cfg.checkpoint)
    par, ev = cfg.parallel, cfg.eval
    mc.check_layout(par)
    if not Path(ev.text_file).is_file():
        raise UserError(f"eval.text_file={ev.text_file} does not exist; allowed: a UTF-8 text file")
    if ev.output:
        outputs.claim_file(ev.output, key="eval.output", is_ours=is_result_file,
                           sources={"checkpoint": cfg.checkpoint, "eval.text_file": ev.text_file})
    t0 = time.time()
    result = {}
    if ev.lm_eval_tasks or ev.generate.prompts or ev.throughput.enabled:
        result.update(hf_results(cfg))
    if ev.perplexity and ev.backend == "transformers":
        if store.is_checkpoint(cfg.checkpoint):
            raise UserError("eval.backend=transformers needs an HF directory; export the checkpoint first")
        result.update(ppl.hf_perplexity(cfg.checkpoint, windows(cfg), ev.micro_batch_size, dtype(cfg.dtype)))
    elif ev.perplexity:
        runtime.init_parallel(par, cfg.seed)
        model = store.load_model(cfg.checkpoint, mc, dtype(cfg.dtype))
        result.update(ppl.megatron_perplexity(model, windows(cfg), ev.micro_batch_size))
    result.update(recipe=RECIPE, backend=ev.backend, seq_length=ev.seq_length, text_file=str(ev.text_file),
                  checkpoint=str(cfg.checkpoint), seconds=round(time.time() - t0, 2))
    if runtime.is_rank0() and "loss" in result:
        print(f"loss {result['loss']:.4f}  perplexity {result['perplexity']:.3f}  tokens {result['tokens']}  "
              f"({result['tokens'] / max(result['seconds'], 1e-9):.0f} tokens/s)", flush=True)
    if runtime.is_rank0():
        for task, metrics in result.get("lm_eval", {}).items():
            print(f"lm-eval {task}: " + "  ".join(f"{k} {v:.4g}" for k, v in metrics.items()), flush=True)
        for s in result.get("samples", []):
            print(f"--- {s['prompt']!r} ->\n{s['completion']}", flush=True)
        if "throughput" in result:
            th = result["throughput"]
            print(f"throughput (batch {th['batch_size']}, prompt {th['prompt_length']}, generate "
                  f"{th['generation_length']}, {th['device']}): prefill {th['prefill_tokens_per_s']:.0f} tokens/s, "
                  f"generation {th['generation_tokens_per_s']:.1f} tokens/s", flush=True)
        if ev.output:
            outputs.write_text_atomic(ev.output, json.dumps(result, indent=2))
    if ev.perplexity and ev.backend == "megatron":
        runtime.shutdown()


if __name__ == "__main__":
    main()
