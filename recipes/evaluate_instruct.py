"""Instruction following of a chat model, offline: greedy answers through its own chat template, scored
with IFEval's checkers on our own prompt set (``minitron_nemo/eval/instruct.py``; not Google's IFEval data).

    python recipes/evaluate_instruct.py model=HF_DIR [limit=N] [max_new_tokens=128] [samples=3] \
        [output=FILE.json]

``model``: a Hugging Face model directory with a chat template (a Megatron checkpoint: export it with
``recipes/export_hf.py`` first). Prints the four IFEval accuracies (prompt and instruction level,
strict and loose) and ``samples`` answers; ``output`` gets them all as JSON (with every answer).
"""

import json
import sys
import time
from pathlib import Path

from minitron_nemo import key_values, outputs
from minitron_nemo.entry import user_errors_exit
from minitron_nemo.errors import UserError
from minitron_nemo.readers import read_json

RECIPE = "evaluate_instruct"
DEFAULTS = {"model": None, "limit": None, "max_new_tokens": "128", "samples": "3", "output": None}


def parse_args(argv) -> dict:
    args = key_values.parse(argv, DEFAULTS, __doc__, DEFAULTS)
    if not args["model"]:
        raise UserError("model is required; pass model=HF_DIR")
    key_values.integers(args, {"limit": 1, "max_new_tokens": 1, "samples": 0})
    return args


def is_ours(path) -> bool:
    try:
        return read_json(path, "instruct evaluation").get("recipe") == RECIPE
    except UserError:
        return False


def load(model_dir: Path):
    from minitron_nemo.eval.generate import load_hf

    if not (model_dir / "config.json").is_file():
        raise UserError(f"model={model_dir} is not a Hugging Face model directory (no config.json); allowed: an "
                        f"HF dir, e.g. from recipes/export_hf.py")
    from transformers import AutoTokenizer

    if not getattr(AutoTokenizer.from_pretrained(str(model_dir)), "chat_template", None):
        raise UserError(f"model={model_dir} has no chat template; allowed: a chat model's directory")
    return load_hf(model_dir)


@user_errors_exit
def main():
    args = parse_args(sys.argv[1:])
    model_dir = Path(args["model"])
    out = outputs.claim_file(args["output"], key="output", sources={"model": model_dir}, is_ours=is_ours) \
        if args["output"] else None
    from minitron_nemo.eval import instruct

    model, tok = load(model_dir)
    prompts = instruct.prompt_set(args["limit"])
    t0 = time.time()
    answers = instruct.generate_chat(model, tok, [p["prompt"] for p in prompts], args["max_new_tokens"])
    result = instruct.score(prompts, answers)
    print(f"instruction following of {model_dir} ({result['prompts']} prompts, {result['instructions']} "
          f"instructions; our prompt set, IFEval's checkers):", flush=True)
    for k in ("prompt_strict", "instruction_strict", "prompt_loose", "instruction_loose"):
        print(f"  {k:<20} {result[k]:.3f}", flush=True)
    for p, a in list(zip(prompts, answers))[: args["samples"]]:
        print(f"\n[prompt] {p['prompt']}\n[answer] {a.strip()}", flush=True)
    if out is not None:
        record = {"recipe": RECIPE, "model": str(model_dir), "max_new_tokens": args["max_new_tokens"],
                  **{k: v for k, v in result.items() if k != "rows"}, "seconds": round(time.time() - t0, 1),
                  "answers": [{**p, "answer": a, **r} for p, a, r in zip(prompts, answers, result["rows"])]}
        outputs.write_text_atomic(out, json.dumps(record, indent=1) + "\n")
        print(f"\nwrote {out}", flush=True)


if __name__ == "__main__":
    main()
