"""A hybrid Mamba-Transformer's training step against a dense Transformer's of the same size, in one run.

    python bench/bench_hybrid_step.py [--hidden 512] [--layers 24] [--seq 512] [--mbs 2] [--rounds 5] [--steps 1]
                                      [--dtype float32] [--json PATH]

The hybrid has Nemotron-H's make-up at a small width: ``--layers`` layers in its repeating pattern (Mamba-2 and
MLP layers alternating, one attention layer in every 12; ``M-M-M*-M-M-`` for 12), Mamba-2 mixers of
``hidden / 32`` heads of 64 (twice the hidden width inside, as Nemotron-H-8B) in 4 groups, state 64, chunks of
128, relu² MLP of 4 x hidden, 8 attention heads in 4 groups. The dense model is a Transformer with the same
width, heads and vocabulary and half as many layers (each has attention and an MLP), its FFN width chosen so
that its parameter count is the hybrid's to within a multiple of 64 channels. Both are trained on the LM loss
through the project's loop (Megatron schedule over two micro-batches, DDP, Megatron Adam). Each round times
``--steps`` steps of each model in turn, so load changes hit both alike; the ratio hybrid / dense is reported
as median [min, max] over the rounds.

In CPU mode the Mamba-2 mixer runs the project's torch stand-ins (minitron_nemo/models/mamba_cpu.py: the
chunked SSD scan, the causal conv1d, the gated norm); on a GPU it would run mamba_ssm's kernels.
"""

import argparse

import torch

from benchlib import device_name, fmt, interleaved, lm_step, random_batches, summary, write_json
from minitron_nemo import runtime
from minitron_nemo.models.builder import count_parameters
from minitron_nemo.models.config import ModelConfig

VOCAB = 16384


def pattern(layers: int) -> str:
    """Nemotron-H's rhythm: Mamba-2 and MLP alternating, the 4th Mamba of every 6 followed by attention instead."""
    unit = "M-M-M*-M-M-"  # 11 symbols; padded with an MLP to 12
    out = (unit + "-") * (layers // 12 + 1)
    return out[:layers]


def hybrid_config(hidden: int, layers: int, seq: int) -> ModelConfig:
    return ModelConfig(family="nemotron_h", num_layers=layers, hybrid_pattern=pattern(layers), hidden_size=hidden,
                       ffn_hidden_size=4 * hidden, num_attention_heads=8, num_query_groups=4, kv_channels=hidden // 8,
                       vocab_size=VOCAB, max_position_embeddings=seq, activation="squared_relu",
                       mamba_num_heads=hidden // 32, mamba_head_dim=64, mamba_num_groups=4, mamba_state_dim=64,
                       mamba_conv_kernel=4, mamba_chunk_size=128, share_embeddings_and_output_weights=False).validate()


def dense_config(hybrid: ModelConfig) -> ModelConfig:
    """A Transformer of the hybrid's width with half its layers, FFN widened to match its parameter count."""
    base = ModelConfig(num_layers=hybrid.num_layers // 2, hidden_size=hybrid.hidden_size, ffn_hidden_size=64,
                       num_attention_heads=hybrid.num_attention_heads, num_query_groups=hybrid.num_query_groups,
                       kv_channels=hybrid.kv_channels, vocab_size=VOCAB, max_position_embeddings=hybrid.max_position_embeddings,
                       share_embeddings_and_output_weights=False)
    target = count_parameters(hybrid)
    per_64 = count_parameters(base.replace(ffn_hidden_size=128)) - count_parameters(base)
    ffn = 64 * max(1, round((target - count_parameters(base)) / per_64) + 1)
    return base.replace(ffn_hidden_size=ffn).validate()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--mbs", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--json", default=None, help="also write the results as JSON here")
    a = ap.parse_args()
    if a.hidden % 64 or a.layers < 12:
        ap.error(f"--hidden={a.hidden} must be a multiple of 64 and --layers={a.layers} at least 12")
    runtime.init_distributed(1, 1)
    torch.manual_seed(0)
    dt = getattr(torch, a.dtype)
    hyb = hybrid_config(a.hidden, a.layers, a.seq)
    den = dense_config(hyb)
    batches = random_batches(VOCAB, a.mbs, a.seq)
    per = interleaved({"hybrid": lm_step(hyb, dt), "dense": lm_step(den, dt)}, batches, a.rounds, a.steps)
    tokens = len(batches) * a.mbs * a.seq
    res = {"device": device_name(), "dtype": a.dtype, "seq": a.seq, "tokens_per_step": tokens,
           "hybrid": {"pattern": hyb.hybrid_pattern, "params": count_parameters(hyb), "hidden": hyb.hidden_size,
                      "mamba_heads": hyb.mamba_num_heads, "ffn": hyb.ffn_hidden_size},
           "dense": {"layers": den.num_layers, "params": count_parameters(den), "hidden": den.hidden_size,
                     "ffn": den.ffn_hidden_size},
           "rounds": a.rounds, "steps_per_round": a.steps,
           "step_seconds": {m: summary(per[m]) for m in per},
           "tokens_per_s": {m: summary(tokens / t for t in per[m]) for m in per},
           "hybrid_over_dense": summary(h / d for h, d in zip(per["hybrid"], per["dense"]))}
    print(f"device {res['device']}  {a.dtype}  seq {a.seq}  tokens/step {tokens}")
    print(f"  hybrid {hyb.hybrid_pattern} ({hyb.num_layers} layers): {res['hybrid']['params'] / 1e6:.2f}M parameters, "
          f"step {fmt(res['step_seconds']['hybrid'])} s, {res['tokens_per_s']['hybrid']['median']:,.0f} tokens/s")
    print(f"  dense  {den.num_layers} layers, FFN {den.ffn_hidden_size}: {res['dense']['params'] / 1e6:.2f}M parameters, "
          f"step {fmt(res['step_seconds']['dense'])} s, {res['tokens_per_s']['dense']['median']:,.0f} tokens/s")
    print(f"  hybrid / dense step time = {fmt(res['hybrid_over_dense'])}")
    write_json(a.json, res)
    runtime.shutdown()


if __name__ == "__main__":
    main()
