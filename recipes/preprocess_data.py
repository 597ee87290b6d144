"""Tokenize text, JSONL or conversations into a Megatron indexed dataset (``PREFIX.bin`` / ``PREFIX.idx``).

    python recipes/preprocess_data.py input=FILE_OR_GLOB[,MORE] tokenizer=HF_DIR output_prefix=PREFIX \
        [doc=file|paragraph|line] [json_key=text] [eod=TOKEN]
    python recipes/preprocess_data.py format=chat input=CONVERSATIONS.jsonl|.parquet tokenizer=HF_DIR \
        output_prefix=PREFIX [mask=assistant|last_assistant] [reasoning=true|false] \
        [max_length=N overlong=drop|truncate]

* ``input``: text files (utf-8) and/or ``.jsonl`` files (one JSON object per line, text under ``json_key``).
* ``doc``: how text files split into documents: the whole file (default), blank-line separated
  paragraphs, or lines. Every JSONL record is one document.
* ``tokenizer``: a Hugging Face tokenizer or model dir (the model's own tokenizer).
* ``eod``: token appended after every document (default: the tokenizer's EOS token): a token string of
  the vocabulary or a token id ``0..vocab_size-1``.
* ``format=chat``: records with ``messages`` (JSONL, or Parquet as ``datasets`` writes it), rendered in
  the tokenizer's own chat template, one document per conversation, with an answer-token loss mask
  beside the tokens (``PREFIX.mask.bin/.idx``, ``PREFIX.chat.json``; ``minitron_nemo/data/chat.py``).
  ``mask``: every assistant turn (default) or the last one; ``reasoning=false`` leaves an assistant's
  ``reasoning_content`` out of the mask; conversations longer than ``max_length`` tokens are dropped
  (default) or truncated, and counted. ``recipes/inspect_data.py`` shows a document's tokens and mask.

The outputs are written under temp names and renamed at the end; bad input (a file that is not UTF-8,
a JSONL line that is not a JSON object with a string under ``json_key``, no documents at all, an eod
outside the vocabulary) or a failed write (disk full) exits with code 2 and a one-line error naming the
file (and line) or value, leaving existing outputs untouched and no temp files behind.
"""

import sys
from pathlib import Path

from minitron_nemo import outputs
from minitron_nemo.data.chat import ChatOptions, ChatRenderer, chat_record, read_conversations, write_chat_dataset
from minitron_nemo.data.indexed import (HFTokenizer, check_indexed_prefix, expand_inputs, iter_documents,
                                          write_indexed_dataset)
from minitron_nemo.entry import user_errors_exit
from minitron_nemo.errors import UserError
from minitron_nemo.readers import read_json

REQUIRED = ("input", "tokenizer", "output_prefix")
DEFAULTS = {"format": "text", "doc": "file", "json_key": "text", "eod": None, "mask": "assistant",
            "reasoning": "true", "max_length": None, "overlong": "drop"}
FORMATS = ("text", "chat")


def parse_args(argv) -> dict:
    """``key=value`` arguments; ``--help`` prints this recipe's usage and ``--cfg job`` its arguments (both exit 0)."""
    if "--help" in argv or "-h" in argv:
        print(__doc__.strip(), flush=True)
        sys.exit(0)
    show = "--cfg" in argv
    argv = [a for a in argv if a not in ("--cfg", "job")] if show else argv
    args = dict(DEFAULTS)
    for a in argv:
        key, eq, value = a.partition("=")
        if not eq or key not in REQUIRED + tuple(DEFAULTS):
            raise UserError(f"unknown argument {a!r}; allowed: " + ", ".join(f"{k}=..." for k in REQUIRED + tuple(DEFAULTS)))
        args[key] = value or DEFAULTS.get(key)
    if show:
        print("\n".join(f"{k}: {args.get(k, '???') if args.get(k) is not None else ('???' if k in REQUIRED else 'null')}"
                        for k in (*REQUIRED, *DEFAULTS)), flush=True)
        sys.exit(0)
    for k in REQUIRED:
        if not args.get(k):
            raise UserError(f"{k} is required; pass {k}=...")
    return args


def is_dataset(path) -> bool:
    """An existing ``PREFIX.bin`` / ``PREFIX.idx`` that is a readable indexed dataset (a re-run may replace it)."""
    try:
        check_indexed_prefix(str(path)[: -len(Path(path).suffix)])
        return True
    except UserError:
        return False


def is_chat_record(path) -> bool:
    try:
        return read_json(path, "chat dataset record").get("format") == "chat"
    except UserError:
        return False


def claim_outputs(out: Path, inputs, tokenizer, chat: bool) -> None:
    """The output policy for ``PREFIX.bin`` / ``PREFIX.idx`` (and for chat data its mask and record):
    never an input or the tokenizer, never a file that is not ours; locked for the run."""
    sources = {f"input {p}": p for p in inputs}
    sources["tokenizer"] = tokenizer
    suffixes = (".bin", ".idx", ".mask.bin", ".mask.idx") if chat else (".bin", ".idx")
    for suffix in suffixes:
        outputs.claim_file(f"{out}{suffix}", key=f"output_prefix ({suffix})", sources=sources, is_ours=is_dataset)
    if chat:
        outputs.claim_file(chat_record(out), key="output_prefix (.chat.json)", sources=sources,
                           is_ours=is_chat_record)


def log(message: str) -> None:
    print(message, flush=True)


def chat_options(args: dict) -> ChatOptions:
    flag = {"true": True, "false": False}
    if str(args["reasoning"]).lower() not in flag:
        raise UserError(f"reasoning={args['reasoning']!r}; allowed: true, false")
    n = args["max_length"]
    if n is not None and not str(n).isdigit():
        raise UserError(f"max_length={n!r}; allowed: an integer >= 2")
    return ChatOptions(mask=args["mask"], reasoning=flag[str(args["reasoning"]).lower()],
                       max_length=None if n is None else int(n), overlong=args["overlong"]).check()


@user_errors_exit
def main():
    args = parse_args(sys.argv[1:])
    paths = expand_inputs(args["input"])
    if args["doc"] not in ("file", "paragraph", "line"):
        raise UserError(f"doc={args['doc']!r}; allowed: file, paragraph, line")
    out = Path(args["output_prefix"])
    if out.is_dir() or str(args["output_prefix"]).endswith("/"):
        raise UserError(f"output_prefix={out} is a directory; give a file prefix such as {out}/train")
    if args["format"] not in FORMATS:
        raise UserError(f"format={args['format']!r}; allowed: {', '.join(FORMATS)}")
    chat = args["format"] == "chat"
    opts = chat_options(args) if chat else None
    tok = HFTokenizer(args["tokenizer"], eod=args["eod"])
    renderer = ChatRenderer(tok.hf, args["tokenizer"], opts) if chat else None
    claim_outputs(out, paths, args["tokenizer"], chat)  # before any tokenizing
    source = f"input {paths[0]}" if len(paths) == 1 else \
        f"input ({len(paths)} files: {', '.join(map(str, paths[:3]))}{', ...' if len(paths) > 3 else ''})"
    if chat:
        print(f"rendering conversations from {len(paths)} file(s) in the chat template of {args['tokenizer']} "
              f"({'generation markers' if renderer.markers else 'spans from prefix renderings'}; mask={opts.mask}, "
              f"reasoning={str(opts.reasoning).lower()})", flush=True)
        n = write_chat_dataset(read_conversations(paths), renderer, out, log=log, source=source)
        print(f"wrote {out}.bin/.idx, {out}.mask.bin/.idx: {n['written']} of {n['conversations']} conversations "
              f"({n['no_answer']} without an answer, {n['dropped_overlong']} dropped and {n['truncated']} truncated "
              f"at max_length={opts.max_length}), {n['tokens']} tokens of which {n['answer_tokens']} answer "
              f"tokens, {n['tokens'] / n['seconds']:.0f} tokens/s", flush=True)
        return
    print(f"tokenizing {len(paths)} file(s) with {args['tokenizer']} (eod id {tok.eod})", flush=True)
    stats = write_indexed_dataset(iter_documents(paths, args["doc"], args["json_key"]), tok, out, log=log,
                                  source=source)
    print(f"wrote {out}.bin/.idx: {stats['docs']} docs, {stats['tokens']} tokens, "
          f"{stats['tokens_per_s']:.0f} tokens/s", flush=True)

if __name__ == "__main__":
    main()
