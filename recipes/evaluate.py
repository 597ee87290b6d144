"""Held-out perplexity of a minitron_nemo checkpoint or a Hugging Face directory.

    python recipes/evaluate.py checkpoint=CKPT_OR_HF_DIR eval.text_file=FILE eval.seq_length=N \
        eval.output=OUT.json
    torchrun --nproc_per_node=2 recipes/evaluate.py ... parallel.pipeline_model_parallel_size=2

Writes {"loss": mean next-token NLL in nats, "perplexity": exp(loss), "tokens": count}.
"""

import json
import os
import time
from pathlib import Path

from minitron_nemo import runtime
from minitron_nemo.checkpoint import store
from minitron_nemo.config import compose, dtype, require
from minitron_nemo.errors import UserError, user_errors_exit
from minitron_nemo.eval import perplexity as ppl


def write_json(path, obj):
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, p)


@user_errors_exit
def main():
    cfg = compose("evaluate")
    require(cfg, "checkpoint", "eval.text_file")
    mc = store.model_config_of(cfg.checkpoint)
    par, ev = cfg.parallel, cfg.eval
    if ev.backend not in ("megatron", "transformers"):
        raise UserError(f"eval.backend={ev.backend!r}; allowed: megatron, transformers")
    mc.check_parallel(par.tensor_model_parallel_size, par.pipeline_model_parallel_size)
    windows = ppl.text_windows(ppl.load_tokenizer(cfg.checkpoint), ev.text_file, ev.seq_length, ev.max_tokens)
    t0 = time.time()
    if ev.backend == "transformers":
        if store.is_checkpoint(cfg.checkpoint):
            raise UserError("eval.backend=transformers needs an HF directory; export the checkpoint first")
        result = ppl.hf_perplexity(cfg.checkpoint, windows, ev.micro_batch_size, dtype(cfg.dtype))
    else:
        runtime.init_distributed(par.tensor_model_parallel_size, par.pipeline_model_parallel_size, cfg.seed)
        model = store.load_model(cfg.checkpoint, mc, dtype(cfg.dtype))
        result = ppl.megatron_perplexity(model, windows, ev.micro_batch_size)
    result.update(backend=ev.backend, seq_length=ev.seq_length, text_file=str(ev.text_file),
                  checkpoint=str(cfg.checkpoint), seconds=round(time.time() - t0, 2))
    if runtime.is_rank0():
        print(f"loss {result['loss']:.4f}  perplexity {result['perplexity']:.3f}  tokens {result['tokens']}  "
              f"({result['tokens'] / max(result['seconds'], 1e-9):.0f} tokens/s)", flush=True)
        if ev.output:
            write_json(ev.output, result)
    if ev.backend == "megatron":
        runtime.shutdown()


if __name__ == "__main__":
    main()
