"""Print one document of an indexed dataset as a JSON line: its tokens, loss mask and text.

    python recipes/inspect_data.py prefix=PREFIX index=N [tokenizer=HF_DIR]

``{"index": N, "tokens": [...], "loss_mask": [...], "answer_tokens": K, "text": "...", "answer": "..."}``:
``loss_mask[t] = 1`` when the prediction of token ``t`` counts (chat data written by
``recipes/preprocess_data.py format=chat``; text data counts every token). ``text`` and ``answer`` (the
masked tokens, turns joined by newlines) are decoded with ``tokenizer`` (default: the one that wrote chat
data; text data needs ``tokenizer=``, else they are left out).
"""

import json
import sys

from minitron_nemo import key_values
from minitron_nemo.data.chat import chat_record, read_example
from minitron_nemo.entry import user_errors_exit
from minitron_nemo.errors import UserError
from minitron_nemo.readers import read_json

ARGS = ("prefix", "index", "tokenizer")


def parse_args(argv) -> dict:
    args = key_values.parse(argv, ARGS, __doc__)
    for k in ("prefix", "index"):
        if not args.get(k):
            raise UserError(f"{k} is required; pass {k}=...")
    if not args["index"].lstrip("-").isdigit():
        raise UserError(f"index={args['index']!r}; allowed: a document number >= 0")
    return args


def answer_runs(tokens: list, mask: list) -> list:
    runs, cur = [], []
    for t, m in zip(tokens, mask):
        if m:
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    return runs + [cur] if cur else runs


@user_errors_exit
def main():
    args = parse_args(sys.argv[1:])
    ex = read_example(args["prefix"], int(args["index"]))
    out = {"index": int(args["index"]), **ex, "answer_tokens": sum(ex["loss_mask"])}
    tok = args.get("tokenizer")
    if not tok and chat_record(args["prefix"]).is_file():
        tok = read_json(chat_record(args["prefix"]), "chat dataset record").get("tokenizer")
    if tok:
        from minitron_nemo.data.indexed import HFTokenizer

        hf = HFTokenizer(tok).hf
        out["text"] = hf.decode(ex["tokens"])
        out["answer"] = "\n".join(hf.decode(r) for r in answer_runs(ex["tokens"], ex["loss_mask"]))
    print(json.dumps(out, ensure_ascii=False), flush=True)


if __name__ == "__main__":
    main()
