"""Greedy generation samples and inference throughput of an HF model (the deployed form of a student).

Both run transformers' ``generate`` with its KV cache on the hardware at hand (CUDA when present),
single process. Throughput feeds seeded random prompts of a fixed length and forces exactly
``generation_length`` new tokens (no early stop at EOS), so every model does the same work.
"""

from __future__ import annotations

import time

import torch

from minitron_nemo.errors import UserError


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_hf(hf_dir, dtype: torch.dtype = torch.float32):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=dtype).to(_device()).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    return model, tok


def check_counts(prefix: str, values: dict) -> None:
    """Each value must be an integer >= 1 (one-line error naming ``prefix.key``)."""
    for k, v in values.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise UserError(f"{prefix}.{k}={v!r}; allowed: an integer >= 1")


def greedy_samples(model, tok, prompts, max_new_tokens: int = 32) -> list[dict]:
    """One greedy completion per prompt: [{"prompt", "completion"}]."""
    check_counts("eval.generate", {"max_new_tokens": max_new_tokens})
    out = []
    for prompt in prompts:
        ids = tok(str(prompt), return_tensors="pt").input_ids.to(model.device)
        with torch.no_grad():
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=max_new_tokens, pad_token_id=tok.eos_token_id)
        out.append({"prompt": str(prompt), "completion": tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)})
    return out


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def throughput(model, batch_size: int = 1, prompt_length: int = 128, generation_length: int = 64,
               repeats: int = 3, seed: int = 0) -> dict:
    """Prefill and end-to-end generation tokens/s (median of ``repeats`` after one warm-up run)."""
    check_counts("eval.throughput", {"batch_size": batch_size, "prompt_length": prompt_length,
                                     "generation_length": generation_length, "repeats": repeats})
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    ids = torch.randint(100, vocab, (batch_size, prompt_length), generator=g).to(model.device)
    mask = torch.ones_like(ids)

    def prefill():
        with torch.no_grad():
            model(ids, attention_mask=mask, use_cache=True)

    def generate():
        with torch.no_grad():
            model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=generation_length,
                           min_new_tokens=generation_length, pad_token_id=0)

    def timed(fn):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        return time.perf_counter() - t0

    prefill(), generate()  # warm-up
    t_pre = sorted(timed(prefill) for _ in range(repeats))[repeats // 2]
    t_gen = sorted(timed(generate) for _ in range(repeats))[repeats // 2]
    return {"batch_size": batch_size, "prompt_length": prompt_length, "generation_length": generation_length,
            "prefill_tokens_per_s": batch_size * prompt_length / t_pre,
            "generation_tokens_per_s": batch_size * generation_length / t_gen,
            "seconds_per_generate": t_gen, "device": device_name()}


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    import platform

    name = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} ({torch.get_num_threads()} threads)"
