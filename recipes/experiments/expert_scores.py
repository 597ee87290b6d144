"""Which expert score prunes a trained mixture of experts best? Measured, not assumed.

    python recipes/experiments/expert_scores.py [--iters 600] [--out docs/moe_expert_scores.md]

1. Train a small MoE language model (Mixtral-style: 8 experts, top-2, load-balancing weight 0.01) from
   scratch on Shakespeare's training plays with the SmolLM2 tokenizer, so that its experts specialise.
2. One calibration pass (training plays, other windows) computes every expert score of
   ``prune/experts.py``.
3. For each score, and for random expert choices (several seeds, the baseline a score must beat), prune
   every layer to K experts (no retraining) and measure the held-out loss on the test plays.

Writes a Markdown table and a PNG (held-out loss against experts kept, one line per score) to ``--out``
and the raw numbers beside them (``.json``). Progress lines show tokens/s and ETA.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from minitron_nemo import runtime
from minitron_nemo.data import assets
from minitron_nemo.data.windows import load_tokenizer, random_windows, to_batches
from minitron_nemo.eval import perplexity as ppl
from minitron_nemo.models.builder import build_model, count_parameters
from minitron_nemo.models.config import ModelConfig
from minitron_nemo.prune import experts as ex
from minitron_nemo.prune import importance as imp
from minitron_nemo.prune.targets import Targets, validate
from minitron_nemo.prune.trim import Plan, make_plan, trim_model
from minitron_nemo.training import optim
from minitron_nemo.training.loop import lm_forward, lm_loss, setup_schedule, train_step


def parse():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=600, help="training iterations")
    ap.add_argument("--batch", type=int, default=16, help="sequences per iteration")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--expert-ffn", type=int, default=256)
    ap.add_argument("--keep", type=int, nargs="+", default=[6, 4, 2], help="experts kept per layer")
    ap.add_argument("--calib", type=int, default=64, help="calibration windows")
    ap.add_argument("--test", type=int, default=128, help="held-out windows (test plays)")
    ap.add_argument("--random-seeds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--out", default="docs/moe_expert_scores.md")
    return ap.parse_args()


def model_config(a, vocab: int) -> ModelConfig:
    return ModelConfig(family="mixtral", num_layers=a.layers, hidden_size=a.hidden, ffn_hidden_size=a.expert_ffn,
                       num_attention_heads=4, num_query_groups=2, kv_channels=a.hidden // 4, vocab_size=vocab,
                       max_position_embeddings=a.seq, rotary_base=10000.0, num_moe_experts=a.experts,
                       moe_router_topk=2, moe_ffn_hidden_size=a.expert_ffn, moe_aux_loss_coeff=0.01).validate()


def train(model, mc, windows, a):
    """Plain LM training (AdamW, cosine) of ``model`` on ``windows``, one pass in order."""
    ocfg = OmegaConf.create({"lr": 3e-3, "min_lr": 3e-4, "decay_style": "cosine", "weight_decay": 0.01,
                             "adam_beta1": 0.9, "adam_beta2": 0.95, "adam_eps": 1e-8, "clip_grad": 1.0})
    ddp = optim.wrap_ddp(model, distributed_optimizer=False)
    opt = optim.build_optimizer(ddp, ocfg, torch.float32, False)
    sched = optim.build_scheduler(opt, ocfg, a.iters, max(1, a.iters // 20))
    setup_schedule(ddp, ddp, opt)
    batches = to_batches(windows, a.batch)
    for b in batches:
        b["position_ids"] = torch.arange(b["tokens"].shape[1]).expand_as(b["tokens"])
    t0, log = time.perf_counter(), []
    for it in range(a.iters):
        losses, _ = train_step(ddp, ddp, opt, sched, [batches[it % len(batches)]], lm_forward, lm_loss)
        log.append({"iteration": it + 1, **{k: float(v) for k, v in losses.items()}})
        if (it + 1) % max(1, a.iters // 20) == 0 or it + 1 == a.iters:
            dt = time.perf_counter() - t0
            tps = (it + 1) * a.batch * a.seq / dt
            runtime.print0(f"[train] iter {it + 1}/{a.iters} | lm {losses['lm']:.4f} | moe_aux "
                           f"{losses.get('moe_aux', 0):.4f} | {tps:.0f} tok/s | ETA "
                           f"{dt / (it + 1) * (a.iters - it - 1):.0f}s")
    model.eval()
    return log


def pruned_loss(model, mc, new_mc, plan: Plan, test, mbs) -> float:
    pruned = trim_model(model, mc, new_mc, plan)
    pruned.eval()
    return ppl.megatron_perplexity(pruned, test, mbs)["loss"]


def random_plan(mc, new_mc, scores, seed) -> Plan:
    g = torch.Generator().manual_seed(seed)
    fake = dict(scores)
    fake["expert_random"] = torch.rand(scores["expert_frequency"].shape, generator=g)
    return make_plan(mc, new_mc, fake, list(range(mc.num_layers)), "random")


def write(out: Path, res: dict, mc: ModelConfig, a) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    keep = res["keep"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in ex.EXPERT_SCORES:
        ax.plot(keep, [res["loss"][name][str(k)] for k in keep], "o-", label=name)
    rnd = [res["loss"]["random"][str(k)] for k in keep]
    ax.errorbar(keep, [r["median"] for r in rnd], yerr=[[r["median"] - r["min"] for r in rnd],
                                                       [r["max"] - r["median"] for r in rnd]],
                fmt="s--", color="grey", label=f"random ({a.random_seeds} seeds: median, range)")
    ax.axhline(res["full_loss"], color="k", lw=0.8, label=f"all {a.experts} experts")
    ax.set_xlabel("experts kept per layer (no retraining)")
    ax.set_ylabel("held-out loss (test plays)")
    ax.set_title("Expert pruning by score, trained 8-expert top-2 MoE")
    ax.invert_xaxis()
    ax.legend(fontsize=8)
    fig.tight_layout()
    png = out.with_suffix(".png")
    fig.savefig(png, dpi=90)
    plt.close(fig)
    rows = ["| score | " + " | ".join(f"keep {k}" for k in keep) + " |", "|---" * (len(keep) + 1) + "|"]
    for name in ex.EXPERT_SCORES:
        rows.append(f"| `{name}` | " + " | ".join(f"{res['loss'][name][str(k)]:.4f}" for k in keep) + " |")
    rows.append(f"| random ({a.random_seeds} seeds) | " + " | ".join(
        f"{r['median']:.4f} [{r['min']:.4f}, {r['max']:.4f}]" for r in rnd) + " |")
    best = {str(k): min(ex.EXPERT_SCORES, key=lambda n: res["loss"][n][str(k)]) for k in keep}
    t = res["train"]
    text = f"""# Expert scores on a trained mixture of experts

Generated by `python recipes/experiments/expert_scores.py {' '.join(res['argv'])}` (CPU, fp32).

Model: Mixtral-style MoE trained from scratch, {a.layers} layers, hidden {a.hidden}, {a.experts} experts of
width {a.expert_ffn}, top-2, load-balancing weight 0.01, SmolLM2 tokenizer; {count_parameters(mc) / 1e6:.1f}M
parameters ({count_parameters(mc, active=True) / 1e6:.1f}M active). Trained {a.iters} iterations x {a.batch} x
{a.seq} tokens = {a.iters * a.batch * a.seq:,} tokens of the training plays in {t['seconds']:.0f} s; final training
LM loss {t['final_lm']:.4f}, load-balancing loss (weighted) {t['final_aux']:.4f}.
Scores from one calibration pass over {a.calib} windows of the training plays; every layer pruned to K
experts with no retraining; held-out loss on {a.test} windows of the test plays (all {a.experts} experts:
{res['full_loss']:.4f}).

{chr(10).join(rows)}

Lowest loss per K: {', '.join(f'keep {k}: `{v}`' for k, v in best.items())}.

![held-out loss against experts kept](moe_expert_scores.png)
"""
    out.write_text(text)
    runtime.print0(f"wrote {out}, {png}")


def main():
    a = parse()
    runtime.init_distributed(1, 1, a.seed)
    tok_dir = assets.smollm2_hf_dir()
    splits = assets.shakespeare_splits()
    tok = load_tokenizer(tok_dir)
    mc = model_config(a, len(tok))
    train_w = random_windows(splits["train"], tok, a.iters * a.batch, a.seq, a.seed)
    calib = random_windows(splits["train"], tok, a.calib, a.seq, a.seed + 1)
    test = random_windows(splits["test"], tok, a.test, a.seq, a.seed + 2)
    torch.manual_seed(a.seed)
    model = build_model(mc)
    runtime.print0(f"[moe] {count_parameters(mc):,} params ({count_parameters(mc, active=True):,} active); "
                   f"training {a.iters} iterations of {a.batch} x {a.seq} tokens")
    t0 = time.perf_counter()
    log = train(model, mc, train_w, a)
    seconds = time.perf_counter() - t0
    mbs = 8
    full = ppl.megatron_perplexity(model, test, mbs)["loss"]
    scores = imp.estimate(model, to_batches(calib, mbs), progress=True)
    res = {"argv": sys.argv[1:], "model": mc.to_dict(), "keep": a.keep, "full_loss": full,
           "loss": {n: {} for n in (*ex.EXPERT_SCORES, "random")},
           "train": {"seconds": seconds, "final_lm": log[-1]["lm"], "final_aux": log[-1].get("moe_aux", 0.0),
                     "log": log}}
    for k in a.keep:
        new_mc = validate(mc, Targets(target_num_moe_experts=k), 1, 1)
        for name in ex.EXPERT_SCORES:
            plan = make_plan(mc, new_mc, scores, list(range(mc.num_layers)), name)
            res["loss"][name][str(k)] = pruned_loss(model, mc, new_mc, plan, test, mbs)
            runtime.print0(f"[prune] keep {k}: {name:<12} held-out loss {res['loss'][name][str(k)]:.4f}")
        rnd = [pruned_loss(model, mc, new_mc, random_plan(mc, new_mc, scores, s), test, mbs)
               for s in range(a.random_seeds)]
        res["loss"]["random"][str(k)] = {"median": sorted(rnd)[len(rnd) // 2], "min": min(rnd), "max": max(rnd),
                                         "all": rnd}
        runtime.print0(f"[prune] keep {k}: random       held-out loss median "
                       f"{res['loss']['random'][str(k)]['median']:.4f}")
    write(Path(a.out), res, mc, a)
    runtime.shutdown()


if __name__ == "__main__":
    main()
