"""Cost of the importance calibration pass relative to a plain forward pass on the same data.

    python bench/bench_calibration.py [--hf HF_DIR | --shape tiny|small|1b] [--samples 16] [--seq 256] [--mbs 4]
                                      [--repeats 3] [--json PATH]
    torchrun --nproc_per_node=2 bench/bench_calibration.py --tp 2

Model: ``--hf``; else a random model of ``--shape``'s teacher (bench/benchlib.py; its sequence length and
micro-batch size unless given); else SmolLM2-135M (``minitron_nemo.data.assets``) when its assets exist, else
a random Llama-shaped model. Timings alternate plain / calibration ``--repeats`` times after one warm-up of
each, so load changes on a shared machine hit both alike; the ratio of each repeat is reported as median
[min, max].
"""

import argparse
import statistics
import time

import torch

from benchlib import SHAPES, summary, write_json
from minitron_nemo import runtime
from minitron_nemo.data.windows import to_batches
from minitron_nemo.models.builder import build_model
from minitron_nemo.models.config import ModelConfig
from minitron_nemo.models.forward import run_forward
from minitron_nemo.prune import importance as imp


def load_model(hf_dir, shape_name=None):
    from minitron_nemo.checkpoint import hf as hfconv
    from minitron_nemo.checkpoint import store

    if hf_dir is None and shape_name is not None:
        mc = SHAPES[shape_name].teacher
        return build_model(mc), mc, f"random model of shape {shape_name}"
    if hf_dir is None:
        try:
            from minitron_nemo.data.assets import cache_dir

            d = cache_dir() / "smollm2-135m-instruct-hf"
            hf_dir = d if (d / "config.json").is_file() else None
        except ImportError:
            hf_dir = None
    if hf_dir is None:
        mc = ModelConfig(num_layers=8, hidden_size=512, ffn_hidden_size=1536, num_attention_heads=8,
                         num_query_groups=4, vocab_size=32000).validate()
        return build_model(mc), mc, "random Llama-shaped model"
    mc = hfconv.model_config_from_hf(hfconv.read_hf_config(hf_dir))
    model = build_model(mc)
    store.load_hf_into_model(model, hf_dir, mc)
    return model, mc, str(hf_dir)


def timed(fn):
    if torch.cuda.is_available() and not runtime.cpu_mode():
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if torch.cuda.is_available() and not runtime.cpu_mode():
        torch.cuda.synchronize()
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hf", default=None)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--shape", default=None, choices=sorted(SHAPES))
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--mbs", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--json", default=None, help="also write the results as JSON here (rank 0)")
    a = ap.parse_args()
    sh = SHAPES[a.shape] if a.shape and not a.hf else None
    a.seq = a.seq or (sh.seq if sh else 256)
    a.mbs = a.mbs or (sh.mbs if sh else 4)
    runtime.init_distributed(a.tp, a.pp)
    from megatron.core import parallel_state as ps

    model, mc, name = load_model(a.hf, a.shape)
    g = torch.Generator().manual_seed(0)
    windows = torch.randint(0, mc.vocab_size, (a.samples, a.seq + 1), generator=g)
    batches = to_batches(windows, a.mbs, ps.get_data_parallel_rank(), ps.get_data_parallel_world_size())
    plain = lambda: run_forward(model, batches, lambda out, b: None)  # noqa: E731
    calib = lambda: imp.estimate(model, batches, progress=False)  # noqa: E731
    plain(), calib()  # warm-up
    tp_, tc = [], []
    for _ in range(a.repeats):
        tp_.append(timed(plain))
        tc.append(timed(calib))
    p, c = statistics.median(tp_), statistics.median(tc)
    runtime.print0(f"model {name}: {a.samples} samples x {a.seq} tokens, micro-batch {a.mbs}, TP={a.tp} PP={a.pp}")
    runtime.print0(f"plain forward     {p:.3f}s  (runs {', '.join(f'{x:.2f}' for x in tp_)})")
    runtime.print0(f"calibration pass  {c:.3f}s  (runs {', '.join(f'{x:.2f}' for x in tc)})")
    ratios = summary(c_ / p_ for c_, p_ in zip(tc, tp_))
    runtime.print0(f"ratio calibration / plain forward = {c / p:.3f} (median of medians); per repeat "
                   f"{ratios['median']:.3f} [{ratios['min']:.3f}, {ratios['max']:.3f}]")
    if runtime.is_rank0():
        write_json(a.json, {"device": "cpu" if runtime.cpu_mode() else torch.cuda.get_device_name(), "model": name,
                            "samples": a.samples, "seq": a.seq, "mbs": a.mbs, "tp": a.tp, "pp": a.pp,
                            "plain_seconds": summary(tp_), "calibration_seconds": summary(tc),
                            "calibration_over_plain": ratios})
    runtime.shutdown()


if __name__ == "__main__":
    main()
