"""Parameter-budget search ranked by a short distillation (P1: rankings after ~300 steps of light
retraining are reliable; zero-shot rankings are not).

``prune.search.distill_iters=K`` (> 0) with ``prune.target_params(_ratio)``, in recipes/prune.py: the grid
candidates are ranked zero-shot (``api.prune_model``); then the ``prune.search.top_k`` best are
each pruned from the source and distilled K iterations from it (the source is the teacher, already in
memory), all on the same tokens, in the same job (any TP x PP x DP), with the job's ``trainer`` /
``data`` / ``distill`` / ``checkpointing`` groups (``trainer.train_iters`` becomes K, the warm-up is
capped at K / 10). They are ranked by the student's LM loss on the validation data after K iterations;
the winner, as pruned (not the short-distilled weights), is the recipe's output. Files:

    SEARCH/search.json          the settings the search started with (a re-run with others stops)
    SEARCH/zero_shot/           importance scores and the zero-shot table (a re-run skips that phase)
    SEARCH/L<l>_H<h>_F<f>_A<a>_G<g>[_E<e>_Fe<fe>][_M<m>_D<d>]/
                                one candidate's run (MoE: experts per layer, each expert's width; hybrid: Mamba
                                heads per layer, channels per head): checkpoints/, metrics.jsonl, loss.png, and
                                result.json once finished (a re-run skips it; an unfinished run resumes)
    OUTPUT/prune/candidates.md|csv, search.png   both rankings (prune/artifacts.py writes the table); validation
                                loss over the K iterations

SEARCH is ``prune.search.workdir`` (default: ``OUTPUT_search``). MoE sources (budget
``target_params`` or ``target_active_params``) rank candidates that differ in experts per layer and expert
width too; each short run adds the student's load-balancing loss as a distillation job does. Hybrid sources
(Nemotron-H) rank candidates that differ in Mamba heads and head channels too, each counted with the layers depth
pruning keeps. Each short
run is the distillation step of recipes/distill.py (``distill/step.py``) in its trainer
(``training/setup.build_trainer``).
"""

from __future__ import annotations

import gc
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import OmegaConf, open_dict

from minitron_nemo import outputs, runtime
from minitron_nemo.errors import UserError
from minitron_nemo.models.config import ModelConfig
from minitron_nemo.prune import api, from_config
from minitron_nemo.prune.artifacts import counted_column, load_scores, save_scores, write_candidates
from minitron_nemo.prune.targets import Targets, budget, new_config
from minitron_nemo.readers import read_cache, read_json, read_own_record

SHAPE = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups")
MOE_SHAPE = ("num_moe_experts", "moe_ffn_hidden_size", "active_params")  # in the rows of MoE candidates
HYBRID_SHAPE = ("mamba_num_heads", "mamba_head_dim", "hybrid_pattern")  # in the rows of hybrid candidates


def shape_of(row: dict) -> dict:
    """A table row's architecture columns (and active parameters for MoE)."""
    return {k: row[k] for k in SHAPE + MOE_SHAPE + HYBRID_SHAPE if k in row}


def enabled(p) -> bool:
    return int(p.search.distill_iters) > 0


def search_dir(cfg) -> Path:
    return Path(cfg.prune.search.workdir or f"{str(cfg.output).rstrip('/')}_search")


# ----------------------------------------------------------------------------- checks (no compute)
@dataclass
class SearchSetup:
    """What the checks found: the search directory, the typed job and the teacher cache the short runs read."""
    dir: Path                   # SEARCH
    job: object                 # the typed job (schemas.PruneJob): its prune and distill groups
    cache: object = None        # distill.teacher_cache opened (distill/offline.py), or None


def check(cfg, job, targets: Targets, src, mc: ModelConfig) -> SearchSetup:
    """Every check of the ranked search that needs no compute (with ``distill.teacher_cache``: the
    cache against this job, as recipes/distill.py checks it)."""
    p, s, d = cfg.prune, cfg.prune.search, cfg.data
    at = f"prune.search.distill_iters={s.distill_iters}"
    if not targets.is_budget():
        raise UserError(f"{at} ranks the candidates of a parameter-budget search; allowed: with "
                        f"prune.target_params=N or prune.target_params_ratio=R")
    if p.importance_only:
        raise UserError(f"{at} and prune.importance_only=true; allowed: one of them")
    if int(d.valid_samples) < 1 or (d.source == "text" and not d.valid_text):
        raise UserError(f"{at} ranks by validation loss; allowed: validation data (data.valid_text=FILE, "
                        f"data.valid_blend or a data.split with a validation part) and data.valid_samples >= 1")
    tc = None
    if job.distill.teacher_cache:  # the short runs read the source's cached distribution
        from minitron_nemo.distill import offline

        tc = offline.open_for_job(cfg, job.distill, src, mc)
    return SearchSetup(search_dir(cfg), job, tc)


def fingerprint(cfg, src) -> dict:
    """What a search's results depend on (``top_k`` is left out: a re-run may extend the search)."""
    c = OmegaConf.to_container(cfg, resolve=True)
    prune = {k: v for k, v in c["prune"].items() if k != "search"}
    search = {k: v for k, v in c["prune"]["search"].items() if k not in ("top_k", "workdir")}
    trainer = {k: v for k, v in c["trainer"].items() if k not in ("tensorboard", "peak_tflops")}
    return {"checkpoint": str(Path(src).resolve()), "prune": prune, "search": search, "trainer": trainer,
            "data": c["data"], "distill": c["distill"], "checkpointing": c["checkpointing"],
            "parallel": c["parallel"], "dtype": c["dtype"], "seed": c["seed"]}


def claim(cfg, src, setup: SearchSetup) -> None:
    """Claim (create, mark, lock) the search directory; a re-run must use the same settings."""
    from minitron_nemo.training import data as tdata

    sdir = setup.dir
    tdata.claim_cache(cfg.data, {"checkpoint": src})
    outputs.claim_workdir(sdir, key="prune.search.workdir", sources={"checkpoint": src})
    f, now = sdir / "search.json", fingerprint(cfg, src)
    diff = outputs.settings_difference(f, now)
    if diff:
        raise UserError(f"prune.search.workdir={sdir} holds a search started with other settings ({diff}); "
                        f"allowed: the same settings, or another prune.search.workdir")
    outputs.record_settings(f, now)  # rank 0, before torch.distributed starts


# ----------------------------------------------------------------------------- zero-shot phase
def zero_shot(p, model, mc: ModelConfig, tok, sdir: Path) -> tuple[dict, dict, list]:
    """(scores, importance meta, zero-shot table best first): computed once, then read from SEARCH/zero_shot."""
    from megatron.core import parallel_state as ps

    cache = sdir / "zero_shot"
    # table.json caches the zero-shot pass, which is redoable: unreadable, it is computed again
    table = read_cache(cache / "table.json", "zero-shot table", list, log=runtime.print0)
    if table is not None:
        scores, meta = load_scores(cache, mc)
        runtime.print0(f"[search] zero-shot ranking and importance read from {cache}")
        return scores, meta, table
    t, _, agg, loaded = from_config.check_config(mc, p, ps.get_tensor_model_parallel_world_size(),
                                         ps.get_pipeline_model_parallel_world_size(), ranked_search=True,
                                         ep=ps.get_expert_model_parallel_world_size())
    batches, loss_batches, eval_batches = from_config.calibration_batches(mc, p, tok, True)
    scores, meta = from_config.config_scores(model, mc, p, batches, agg, loaded)
    r = api.prune_model(model, mc, t, scores=scores, layer_criterion=p.layer_criterion, loss_batches=loss_batches,
                        eval_batches=eval_batches, search=p.search, expert_score=p.importance.expert_score)
    table = r.candidates
    del r
    gc.collect()
    if runtime.is_rank0():  # scores now hold every depth score the candidates need
        save_scores(cache, scores, meta)
        outputs.write_text_atomic(cache / "table.json", json.dumps(table, indent=1))
    runtime.barrier()
    return scores, meta, table


def candidate_config(mc: ModelConfig, row: dict) -> ModelConfig:
    return new_config(mc, Targets(target_num_layers=row["num_layers"], target_hidden_size=row["hidden_size"],
                                  target_ffn_hidden_size=row["ffn_hidden_size"],
                                  target_num_attention_heads=row["num_attention_heads"],
                                  target_num_query_groups=row["num_query_groups"],
                                  target_num_moe_experts=row.get("num_moe_experts"),
                                  target_moe_ffn_hidden_size=row.get("moe_ffn_hidden_size"),
                                  target_mamba_num_heads=row.get("mamba_num_heads"),
                                  target_mamba_head_dim=row.get("mamba_head_dim"))).validate()


def candidate_name(row: dict) -> str:
    name = "L{num_layers}_H{hidden_size}_F{ffn_hidden_size}_A{num_attention_heads}_G{num_query_groups}".format(**row)
    name += "_E{num_moe_experts}_Fe{moe_ffn_hidden_size}".format(**row) if "num_moe_experts" in row else ""
    return name + ("_M{mamba_num_heads}_D{mamba_head_dim}".format(**row) if "mamba_num_heads" in row else "")


# ----------------------------------------------------------------------------- one short run
def short_trainer(cfg):
    """The job's trainer group with ``train_iters`` = K, the warm-up capped at K / 10 and the search's
    validation interval (validation at 0, every interval and at K)."""
    k = int(cfg.prune.search.distill_iters)
    t = OmegaConf.create(OmegaConf.to_container(cfg.trainer, resolve=True))
    with open_dict(t):
        t.train_iters, t.train_tokens = k, None
        t.warmup_iters = min(int(t.warmup_iters), k // 10)
        t.eval_interval = int(cfg.prune.search.eval_interval or max(1, math.ceil(k / 4)))
    return t


@dataclass
class Data:
    """The tokens every candidate trains and is validated on (and the teacher cache, if any)."""
    train: object
    valid: list
    seq: int
    cache: object = None


def build_data(cfg, tok, setup: SearchSetup) -> Data:
    from minitron_nemo.training import data as tdata

    t = short_trainer(cfg)
    samples = int(t.train_iters) * int(t.global_batch_size)
    train_ds, valid_ds = tdata.build(cfg.data, tok, setup.dir, samples, cfg.seed)
    valid = tdata.valid_batches(valid_ds, int(t.micro_batch_size), int(cfg.data.valid_samples))
    if not valid:
        raise UserError("the distillation-ranked search ranks by validation loss, and the data has none; allowed: "
                        "data.valid_text=FILE, data.valid_blend, or a data.split with a validation part")
    if setup.cache is not None:
        from minitron_nemo.distill import offline

        offline.check_data(setup.cache, offline.sample_counts(cfg, train_ds, valid_ds, samples), train_ds, valid_ds)
        valid = offline.tag_valid(valid)
    return Data(tdata.train_iterator(train_ds, int(t.micro_batch_size)), valid, int(cfg.data.seq_length), setup.cache)


def distill_candidate(cfg, kd_cfg, teacher, t_mc: ModelConfig, student, s_mc: ModelConfig, data: Data, work: Path,
                      src) -> None:
    """Distil ``student`` K iterations from ``teacher`` in ``work`` (resuming from its checkpoints)."""
    from minitron_nemo.config import dtype
    from minitron_nemo.distill import step as kd_step
    from minitron_nemo.training.setup import build_trainer

    t, params_dtype = short_trainer(cfg), dtype(cfg.dtype)
    torch.manual_seed(int(cfg.seed))  # the same start for every candidate (e.g. the KD projection)
    step = kd_step.build(kd_cfg, student, s_mc, params_dtype, teacher=teacher, t_mc=t_mc, cache=data.cache)
    trainer = build_trainer(student, s_mc, step, tcfg=t, ccfg=cfg.checkpointing, params_dtype=params_dtype,
                            workdir=work, train_batches=data.train, valid_batches=data.valid,
                            train_iters=int(t.train_iters), seq_length=data.seq, tokenizer_src=src,
                            meta={"distilled_from": str(src), "search_candidate": work.name})
    trainer.resume()
    trainer.fit()


def valid_curve(work: Path) -> list:
    """[[iteration, student validation LM loss], ...] from the run's metrics.jsonl (latest per iteration)."""
    from minitron_nemo.eval.report import valid_curve as curve

    its, losses = curve(work / "metrics.jsonl", "student_lm")
    return [[i, v] for i, v in zip(its, losses)]


def run_candidate(cfg, teacher, mc: ModelConfig, row: dict, scores: dict, data: Data, setup: SearchSetup,
                  src) -> dict:
    """One candidate's result (``SEARCH/<name>/result.json``), trained now unless already finished."""
    from minitron_nemo.training.state import agree

    work = setup.dir / candidate_name(row)
    done = work / "result.json"
    if agree(done.is_file()):
        runtime.print0(f"[search] {work.name}: finished earlier ({done}); not retrained")
        # refused when unreadable, not retrained: the candidate's workdir holds its run, which a retrain would mix
        return read_own_record(done, "search candidate result", f"remove {work} to train the candidate again")
    outputs.claim_workdir(work, key="prune.search candidate workdir", lock=False)
    c_mc = candidate_config(mc, row)
    runtime.print0(f"[search] {work.name}: zero-shot rank {row['rank']}, {row['params']:,} params; distilling "
                   f"{cfg.prune.search.distill_iters} iterations")
    p = setup.job.prune
    student, c_mc, _ = api.prune_to(teacher, mc, c_mc, scores, layer_criterion=p.layer_criterion,
                                    progress=False, expert_score=p.importance.expert_score)
    distill_candidate(cfg, setup.job.distill, teacher, mc, student, c_mc, data, work, src)
    del student
    gc.collect()
    if runtime.is_rank0():
        curve = valid_curve(work)
        res = {"name": work.name, **shape_of(row), "params": row["params"], "zero_shot_rank": row["rank"],
               "zero_shot_loss": row["loss"], "distill_iters": int(cfg.prune.search.distill_iters),
               "valid_curve": curve, "valid_loss_start": curve[0][1] if curve and curve[0][0] == 0 else None,
               "valid_loss_end": curve[-1][1]}
        outputs.write_text_atomic(done, json.dumps(res, indent=1))
    runtime.barrier()
    return read_json(done, "search candidate result")


# ----------------------------------------------------------------------------- the search
@dataclass
class Outcome:
    """Both rankings: ``rows`` (every zero-shot candidate, distilled ones first by final rank), the
    distilled candidates' validation curves, the budget, K, and what the budget counts (``params``, or
    ``active_params`` for ``target_active_params``)."""
    rows: list
    curves: dict = field(default_factory=dict)
    budget: int = 0
    iters: int = 0
    counted: str = "params"

    @classmethod
    def of(cls, table: list, results: list, mc: ModelConfig, targets: Targets, iters: int) -> "Outcome":
        """Both rankings of the zero-shot ``table`` and the distilled ``results`` (``result.json``s), against
        the budget of ``targets`` on the source ``mc``."""
        return cls(ranked_rows(table, results), {r["name"]: r["valid_curve"] for r in results},
                   budget(mc, targets), iters, counted_column(targets))

    @property
    def winner(self) -> dict:
        return self.rows[0]

    def save(self, out_dir) -> None:
        """``candidates.csv`` / ``.md`` (both rankings, best after K first) and ``search.png`` (rank 0)."""
        if runtime.is_rank0():
            n = sum(1 for r in self.rows if r["rank"] != "")
            write_candidates(out_dir, self.rows, self.budget, self.counted, ranked_by=None, note=(
                f"Ranked by the student's validation LM loss after a {self.iters}-iteration distillation from the "
                f"source (`rank`, the {n} best by zero-shot calibration loss), and zero shot (`zero_shot_rank`). "
                f"`valid_loss_start` / `valid_loss_end`: validation loss before / after the {self.iters} iterations."))
            plot_curves(Path(out_dir) / "search.png", self)


def ranked_rows(table: list, results: list) -> list:
    """The zero-shot table with each distilled candidate's losses after 0 and K iterations and its
    final rank (by the loss after K; ties by zero-shot rank); distilled candidates first."""
    by_name = {r["name"]: r for r in results}
    order = sorted(results, key=lambda r: (r["valid_loss_end"], r["zero_shot_rank"]))
    final = {r["name"]: i + 1 for i, r in enumerate(order)}
    rows = []
    for z in table:
        r = by_name.get(candidate_name(z), {})
        rows.append({"rank": final.get(candidate_name(z), ""), "zero_shot_rank": z["rank"],
                     **shape_of(z), "params": z["params"], "zero_shot_loss": z["loss"],
                     "valid_loss_start": r.get("valid_loss_start", ""), "valid_loss_end": r.get("valid_loss_end", "")})
    return sorted(rows, key=lambda x: (x["rank"] == "", x["rank"] or 0, x["zero_shot_rank"]))


def search(cfg, model, mc: ModelConfig, src, setup: SearchSetup) -> tuple[api.PruneResult, Outcome]:
    """The ranked search on the loaded source ``model`` (every rank); returns the winner, pruned, and
    both rankings."""
    from minitron_nemo.checkpoint import store

    tok, sdir = store.tokenizer_dir(src), setup.dir
    p, k = setup.job.prune, int(cfg.prune.search.distill_iters)
    scores, meta, table = zero_shot(p, model, mc, tok, sdir)
    top = table[: int(p.search.top_k)]
    runtime.print0(f"[search] distilling the {len(top)} best of {len(table)} candidates by zero-shot loss, "
                   f"{k} iterations each, from {src}")
    data = build_data(cfg, tok, setup)
    results = [run_candidate(cfg, model, mc, row, scores, data, setup, src) for row in top]
    outcome = Outcome.of(table, results, mc, p.targets(), k)
    for r in outcome.rows[: len(top)]:
        runtime.print0(f"[search] rank {r['rank']} (zero-shot {r['zero_shot_rank']}): {candidate_name(r)} "
                       f"params={r['params']} zero-shot loss {r['zero_shot_loss']:.4f}, validation loss "
                       f"{r['valid_loss_start']:.4f} -> {r['valid_loss_end']:.4f} after {k} iterations")
    win_mc = candidate_config(mc, outcome.winner)
    new_model, win_mc, kept = api.prune_to(model, mc, win_mc, scores, layer_criterion=p.layer_criterion,
                                           progress=False, expert_score=p.importance.expert_score)
    meta = {**meta, "search": {"distill_iters": k, "top_k": len(top), "workdir": str(sdir.resolve()),
                               "winner": candidate_name(outcome.winner),
                               "winner_zero_shot_rank": outcome.winner["zero_shot_rank"]}}
    return api.PruneResult(new_model, win_mc, scores, kept, meta=meta), outcome


# ----------------------------------------------------------------------------- artifacts
def plot_curves(path, o: Outcome) -> None:
    """Each distilled candidate's validation loss over the K iterations (the winner drawn thicker)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in o.rows:
        name = candidate_name(r)
        if name not in o.curves:
            continue
        x, y = zip(*o.curves[name]) if o.curves[name] else ((), ())
        ax.plot(x, y, "o-", markersize=3, lw=2.5 if r is o.winner else 1,
                label=f"{name} ({r['params'] / 1e6:.2f}M): rank {r['rank']}, zero-shot {r['zero_shot_rank']}")
    ax.set_xlabel("distillation iteration")
    ax.set_ylabel("validation loss (nats)")
    ax.set_title(f"budget search: the zero-shot best, distilled {o.iters} iterations each", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
