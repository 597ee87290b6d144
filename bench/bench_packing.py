"""Training throughput on chat data, packed vs one conversation per sample: real (non-padding) tokens per
second, measured in one run with the two sides interleaved step by step; median and spread.

    python bench/bench_packing.py [--rounds 6] [--seq 256] [--mbs 4] [--conversations 400]

Conversations: Shakespeare's lines from the cached plays (a line as the question, the next 1-12 lines
as the answer), in SmolLM2-135M-Instruct's real chat template. Model: a random 4-layer student (hidden
256, FFN 768, 4 heads / 2 groups) with SmolLM2's vocabulary. Unpacked: micro-batch ``mbs`` x ``seq``,
one padded conversation per row; packed: micro-batch 1 x ``mbs * seq`` (the same positions per step).
Both take full training steps through the project's loop with the answer-only LM loss.
"""

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from minitron_nemo import runtime
from minitron_nemo.data import assets
from minitron_nemo.data.chat import ChatOptions, ChatRenderer, write_chat_dataset
from minitron_nemo.data.chat_samples import build_chat_datasets
from minitron_nemo.data.indexed import HFTokenizer, batches
from minitron_nemo.models.builder import build_model
from minitron_nemo.models.config import ModelConfig
from minitron_nemo.training import optim
from minitron_nemo.training.loop import lm_forward, lm_loss, setup_schedule, train_step

PAD = None
OPT = OmegaConf.create({"lr": 1e-4, "min_lr": 1e-5, "weight_decay": 0.0, "adam_beta1": 0.9, "adam_beta2": 0.95,
                        "adam_eps": 1e-8, "clip_grad": 1.0, "decay_style": "constant"})


def conversations(n: int, seed: int = 0):
    lines = [x.strip() for x in assets.shakespeare_splits()["train"].read_text().splitlines() if len(x.strip()) > 20]
    rng = random.Random(seed)
    for i in range(n):
        at = rng.randrange(len(lines) - 20)
        answer = " ".join(lines[at + 1: at + 2 + rng.randrange(12)])
        yield f"bench:{i}", [{"role": "user", "content": lines[at]}, {"role": "assistant", "content": answer}]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--mbs", type=int, default=4)
    ap.add_argument("--conversations", type=int, default=400)
    a = ap.parse_args()
    runtime.init_distributed(1, 1)
    tok_dir = assets.smollm2_hf_dir()
    tok = HFTokenizer(tok_dir)
    work = Path(tempfile.mkdtemp(prefix="bench_packing-"))
    renderer = ChatRenderer(tok.hf, tok_dir, ChatOptions(max_length=a.seq, overlong="truncate"))
    write_chat_dataset(conversations(a.conversations), renderer, work / "chat", log=None)
    global PAD
    PAD = len(tok.hf) - 1  # padding: the last id of the vocabulary, which these conversations never use
    mc = ModelConfig(num_layers=4, hidden_size=256, ffn_hidden_size=768, num_attention_heads=4, num_query_groups=2,
                     vocab_size=len(tok.hf), share_embeddings_and_output_weights=True)
    sides = {}
    for name, packing, mbs, seq in (("unpacked", False, a.mbs, a.seq), ("packed", True, 1, a.mbs * a.seq)):
        dcfg = OmegaConf.create({"blend": str(work / "chat"), "valid_blend": None, "split": "1,0,0", "seq_length": seq,
                                 "answer_only": True, "packing": packing})
        ds, _ = build_chat_datasets(dcfg, PAD, (10 ** 6, None), seed=0, log=print)
        model = build_model(mc)
        ddp = optim.wrap_ddp(model, distributed_optimizer=False)
        opt = optim.build_optimizer(ddp, OPT, torch.float32, False)
        sides[name] = dict(ddp=ddp, opt=opt, sched=optim.build_scheduler(opt, OPT, 1000, 1),
                           data=batches(ds, mbs, cycle=True), rates=[], real=[])
    for r in range(a.rounds + 1):  # round 0 warms up
        for name, s in sides.items():
            b = [next(s["data"])]
            real = int((b[0]["tokens"] != PAD).sum())
            setup_schedule(s["ddp"], s["ddp"], s["opt"])
            t0 = time.perf_counter()
            train_step(s["ddp"], s["ddp"], s["opt"], s["sched"], b, lm_forward, lm_loss)
            if r:
                s["rates"].append(real / (time.perf_counter() - t0))
                s["real"].append(real / b[0]["tokens"].numel())
    for name, s in sides.items():
        x = s["rates"]
        print(f"{name:<9} real tokens/s: median {statistics.median(x):8.0f}  min {min(x):8.0f}  max {max(x):8.0f}  "
              f"(real tokens: {statistics.mean(s['real']):.0%} of the positions)")
    ratios = [p / u for p, u in zip(sides["packed"]["rates"], sides["unpacked"]["rates"])]
    print(f"packed / unpacked (per round, interleaved): median {statistics.median(ratios):.2f}x  "
          f"min {min(ratios):.2f}x  max {max(ratios):.2f}x over {a.rounds} rounds")


if __name__ == "__main__":
    main()
