"""On-policy preference pairs, offline ("distilled DPO"): for each prompt, the teacher's greedy answer is
``chosen`` and the student's is ``rejected``.

    python recipes/make_pairs.py teacher=T student=S prompts=PROMPTS.jsonl output=PAIRS.jsonl \
        [max_new_tokens=256] [min_new_tokens=1] [limit=N] [batch_size=8]

``teacher``, ``student``: Hugging Face model directories with a chat template, or checkpoints of this
project (exported to a temporary HF directory first). ``PROMPTS.jsonl`` lines: ``{"prompt": "text" or
[messages]}`` or conversations ``{"messages": [...]}`` (the answer after their last user turn is
regenerated; ``align/preferences.read_prompts``). Each model answers greedily in its own chat template, at
least ``min_new_tokens`` tokens (1: no pair of an empty answer). A prompt whose two answers are equal, or
either blank, gives no pair (counted). ``PAIRS.jsonl`` is what
recipes/dpo.py reads (``data.preference_file``).
"""

import json
import sys
import tempfile
import time
from pathlib import Path

from minitron_nemo import key_values, outputs
from minitron_nemo.entry import user_errors_exit
from minitron_nemo.errors import UserError

RECIPE = "make_pairs"
DEFAULTS = {"teacher": None, "student": None, "prompts": None, "output": None, "max_new_tokens": "256",
            "min_new_tokens": "1", "limit": None, "batch_size": "8"}


def parse_args(argv) -> dict:
    args = key_values.parse(argv, DEFAULTS, __doc__, DEFAULTS)
    for k in ("teacher", "student", "prompts", "output"):
        if not args[k]:
            raise UserError(f"{k} is required; usage: teacher=T student=S prompts=PROMPTS.jsonl output=PAIRS.jsonl")
    key_values.integers(args, {"max_new_tokens": 1, "min_new_tokens": 0, "limit": 1, "batch_size": 1})
    if args["min_new_tokens"] > args["max_new_tokens"]:
        raise UserError(f"min_new_tokens={args['min_new_tokens']} is more than max_new_tokens={args['max_new_tokens']}; "
                        f"allowed: min_new_tokens <= max_new_tokens")
    return args


def check_model(key: str, path: str) -> bool:
    """True for a checkpoint of ours, False for an HF directory; either needs a chat template."""
    from transformers import AutoTokenizer

    from minitron_nemo.checkpoint import store

    ours = store.is_checkpoint(path)
    if not ours and not (Path(path) / "config.json").is_file():
        raise UserError(f"{key}={path} is neither a Hugging Face model directory (config.json) nor a checkpoint of "
                        f"this project (model.yaml); allowed: either")
    tok_dir = store.tokenizer_dir(path) if ours else path
    if not getattr(AutoTokenizer.from_pretrained(str(tok_dir)), "chat_template", None):
        raise UserError(f"{key}={path} has no chat template; allowed: a chat model")
    return ours


def model_dir(key: str, path: str, ours: bool, tmp: Path) -> Path:
    """An HF directory: ``path`` itself, or a checkpoint of ours exported under ``tmp``."""
    if not ours:
        return Path(path)
    from minitron_nemo.checkpoint.export import export_hf

    return export_hf(path, tmp / key)


def is_ours(path) -> bool:
    try:
        with open(path) as f:
            return json.loads(f.readline()).get("made_by") == RECIPE
    except (OSError, ValueError, AttributeError):
        return False


def answers(hf_dir: Path, prompts: list, args: dict) -> list:
    from minitron_nemo.eval.generate import load_hf
    from minitron_nemo.eval.instruct import generate_chat

    model, tok = load_hf(hf_dir)
    print(f"[pairs] {hf_dir} answers {len(prompts)} prompts", flush=True)
    return [a.strip() for a in generate_chat(model, tok, prompts, args["max_new_tokens"], args["batch_size"],
                                             min_new_tokens=args["min_new_tokens"])]


@user_errors_exit
def main():
    args = parse_args(sys.argv[1:])
    from minitron_nemo.align.preferences import read_prompts

    prompts = read_prompts(args["prompts"])[: args["limit"]]
    ours = {k: check_model(k, args[k]) for k in ("teacher", "student")}
    out = outputs.claim_file(args["output"], key="output", is_ours=is_ours,
                             sources={"teacher": args["teacher"], "student": args["student"], "prompts": args["prompts"]})
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="make_pairs_") as tmp:
        dirs = {k: model_dir(k, args[k], ours[k], Path(tmp)) for k in ("teacher", "student")}
        chosen, rejected = (answers(dirs[k], prompts, args) for k in ("teacher", "student"))
    lines, same, empty = [], 0, 0
    for prompt, w, lose in zip(prompts, chosen, rejected):
        if not w or not lose:
            empty += 1
        elif w == lose:
            same += 1
        else:
            lines.append(json.dumps({"prompt": prompt, "chosen": w, "rejected": lose, "made_by": RECIPE}) + "\n")
    if not lines:
        raise UserError(f"no pairs: of {len(prompts)} prompts, {same} got equal answers and {empty} an empty one; "
                        f"allowed: a teacher and a student that answer differently")
    outputs.write_text_atomic(out, "".join(lines))
    print(f"[pairs] wrote {len(lines)} pairs to {out} ({same} prompts with equal answers and {empty} with an empty "
          f"one skipped) in {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
