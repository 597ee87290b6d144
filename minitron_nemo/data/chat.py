"""Conversations -> the tokens of the tokenizer's own chat template and an answer-token loss mask.

Records come from JSONL (one JSON object per line) or Parquet files (what ``datasets``' ``to_parquet``
writes), each with ``messages: [{"role": ..., "content": ...}, ...]``; roles system, user, assistant,
tool; an assistant message may carry ``reasoning_content`` (a reasoning model's thinking, rendered by
templates that know it).

The tokens are exactly what ``transformers``' ``apply_chat_template`` gives for the conversation. The
loss mask marks answer tokens: ``mask[t] = 1`` when the prediction of token ``t`` counts. By default
every assistant turn counts, from the first token after the assistant header through its end-of-turn
token (the tokenizer's EOS); nothing of the system, user or tool turns, or of the headers. Options:
the last assistant turn only (``mask=last_assistant``), and the reasoning left out
(``reasoning=false``: the turn counts from its final answer on).

Spans: a template with generation markers (``{% generation %}``) gives them directly. Otherwise each
assistant turn's span is found by rendering prefixes of the conversation: the text up to the turn with
the generation prompt, and up to the end of the turn. Both must be prefixes of the whole rendering
(templates that render earlier turns differently in longer conversations are refused in one line).

Written as two Megatron indexed datasets with one document per conversation, ``PREFIX.bin/.idx``
(tokens) and ``PREFIX.mask.bin/.idx`` (uint8 mask), and ``PREFIX.chat.json`` (the tokenizer, options
and counts). ``read_example`` gives a document's tokens and mask back.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from minitron_nemo.errors import UserError

ROLES = ("system", "user", "assistant", "tool")
MASKS = ("assistant", "last_assistant")
OVERLONG = ("drop", "truncate")
_GENERATION = re.compile(r"{%-?\s*generation\s*-?%}")


@dataclass
class ChatOptions:
    mask: str = "assistant"          # which assistant turns count: assistant (all) | last_assistant
    reasoning: bool = True           # an assistant turn's reasoning counts as answer
    max_length: int | None = None    # longer conversations: dropped or truncated (``overlong``)
    overlong: str = "drop"

    def check(self) -> "ChatOptions":
        if self.mask not in MASKS:
            raise UserError(f"mask={self.mask!r}; allowed: {', '.join(MASKS)}")
        if self.overlong not in OVERLONG:
            raise UserError(f"overlong={self.overlong!r}; allowed: {', '.join(OVERLONG)}")
        if self.max_length is not None and self.max_length < 2:
            raise UserError(f"max_length={self.max_length}; allowed: an integer >= 2, or none")
        return self


# ---------------------------------------------------------------------------------------------- records

def check_messages(messages, where: str) -> list:
    """The ``messages`` of one record, checked: a list of {role, content[, reasoning_content]}."""
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: 'messages' is {_kind(messages)}; allowed: a non-empty list of "
                        f"{{'role', 'content'}} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise UserError(f"{where}: message {i} is {_kind(m)}; allowed: an object with 'role' and 'content'")
        role = m.get("role")
        if role not in ROLES:
            raise UserError(f"{where}: message {i} has role {role!r}; allowed: {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str):
            raise UserError(f"{where}: message {i} ({role}) has content {_kind(m.get('content'))}; "
                            f"allowed: a string")
        r = m.get("reasoning_content")
        if r is not None and (role != "assistant" or not isinstance(r, str)):
            raise UserError(f"{where}: message {i} ({role}) has reasoning_content {_kind(r)}; allowed: a "
                            f"string, on assistant messages only")
    return [{k: v for k, v in m.items() if v is not None} for m in messages]


def _kind(v) -> str:
    if v is None:
        return "missing"
    return f"a {type(v).__name__}" if not isinstance(v, (str, list)) or v else f"an empty {type(v).__name__}"


def _jsonl_records(p: Path) -> Iterator[tuple]:
    from minitron_nemo.readers import jsonl_records

    return jsonl_records(p, "conversations", "one JSON object per line with 'messages'")


def _parquet_records(p: Path) -> Iterator[tuple]:
    import pyarrow.parquet as pq

    from minitron_nemo.readers import reading

    with reading(p, "conversations (Parquet)"):
        f = pq.ParquetFile(p)
        if "messages" not in f.schema_arrow.names:
            raise UserError(f"{p}: no column 'messages' (columns: {', '.join(f.schema_arrow.names)}); "
                            f"allowed: a Parquet file of conversations")
        batches = list(f.iter_batches(batch_size=1024, columns=["messages"]))
    n = 0
    for b in batches:
        for rec in b.to_pylist():
            n += 1
            yield f"{p} row {n}", rec


def read_conversations(paths: Iterable) -> Iterator[tuple]:
    """``(where, messages)`` for every record of JSONL / Parquet files; bad records are one line naming
    the file and line (or row)."""
    for p in map(Path, paths):
        records = _parquet_records(p) if p.suffix == ".parquet" else _jsonl_records(p)
        for where, rec in records:
            if not isinstance(rec, dict) or "messages" not in rec:
                got = f"keys {', '.join(map(repr, list(rec)[:8]))}" if isinstance(rec, dict) else _kind(rec)
                raise UserError(f"{where}: a record without 'messages' ({got}); allowed: an object with "
                                f"'messages': [{{'role', 'content'}}, ...]")
            yield where, check_messages(rec["messages"], where)


# ---------------------------------------------------------------------------------------------- rendering

class ChatRenderer:
    """Tokens and answer mask of a conversation in the chat template of ``hf`` (a Hugging Face tokenizer
    loaded from ``path``)."""

    def __init__(self, hf, path, opts: ChatOptions):
        self.hf, self.path, self.opts = hf, str(path), opts.check()
        template = getattr(hf, "chat_template", None)
        if not template:
            raise UserError(f"tokenizer {path} has no chat template (chat_template.jinja, or chat_template in "
                            f"tokenizer_config.json); allowed: the tokenizer of a chat model")
        self.markers = bool(_GENERATION.search(template if isinstance(template, str) else str(template)))
        self.eos = hf.eos_token

    def _text(self, messages, where, **kw) -> str:
        try:
            return self.hf.apply_chat_template(messages, tokenize=False, **kw)
        except Exception as e:  # the template's own checks (jinja raise_exception, a role it does not know)
            raise UserError(f"{where}: the chat template of {self.path} cannot render this conversation: "
                            f"{' '.join(str(e).split())[:200]}") from None

    def render(self, messages: list, where: str) -> tuple:
        """``(token ids, mask)`` as int lists of equal length; the mask may be all zero (no assistant turn)."""
        text = self._text(messages, where)
        enc = self.hf(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if self.opts.mask == "last_assistant":
            turns = turns[-1:]
        spans = (self._marked_spans(messages, where, offsets, len(turns)) if self.markers
                 else [self._prefix_span(messages, i, text, where) for i in turns])
        spans = [self._answer_only(messages[i], s, text) for i, s in zip(turns, spans)]
        mask = [0] * len(ids)
        for s, e in spans:
            for t, (a, b) in enumerate(offsets):
                if s <= a < e and b > a:
                    mask[t] = 1
        return ids, mask

    def _prefix_span(self, messages, i, text, where) -> tuple:
        """Characters of assistant turn ``i`` in ``text``: after the generation prompt, through the EOS."""
        head = self._text(messages[:i], where, add_generation_prompt=True)
        upto = self._text(messages[:i + 1], where)
        if not (upto.startswith(head) and text.startswith(upto)):
            raise UserError(f"{where}: the chat template of {self.path} is not prefix-stable (the rendering up "
                            f"to assistant message {i} is not the start of the whole conversation's); allowed: a "
                            f"template with {{% generation %}} markers, or mask=last_assistant")
        end = upto.rfind(self.eos, len(head)) if self.eos else -1
        return len(head), (end + len(self.eos) if end >= 0 else len(upto))

    def _marked_spans(self, messages, where, offsets, n) -> list:
        try:
            out = self.hf.apply_chat_template(messages, tokenize=True, return_dict=True,
                                              return_assistant_tokens_mask=True)
        except Exception as e:
            raise UserError(f"{where}: the chat template of {self.path} cannot render this conversation: "
                            f"{' '.join(str(e).split())[:200]}") from None
        runs, start = [], None
        for t, m in enumerate(list(out["assistant_masks"]) + [0]):
            if m and start is None:
                start = t
            elif not m and start is not None:
                runs.append((offsets[start][0], offsets[t - 1][1]))
                start = None
        return runs[-n:] if n else []

    def _answer_only(self, message: dict, span: tuple, text: str) -> tuple:
        """Without reasoning, the turn counts from its final answer (its content) on."""
        if self.opts.reasoning or not message.get("reasoning_content") or not message["content"].strip():
            return span
        at = text.rfind(message["content"].strip(), span[0], span[1])
        return (at, span[1]) if at >= 0 else span


# ---------------------------------------------------------------------------------------------- writing

def write_chat_dataset(conversations: Iterable[tuple], renderer: ChatRenderer, prefix,
                       log: Callable[[str], None] | None = None, source: str = "the input") -> dict:
    """Render ``(where, messages)`` pairs into ``PREFIX.bin/.idx``, ``PREFIX.mask.bin/.idx`` and
    ``PREFIX.chat.json`` (all or nothing); returns the counts. Conversations without an answer token are
    skipped and counted; none left is a ``UserError``."""
    from megatron.core.datasets.indexed_dataset import DType

    from minitron_nemo.data.indexed import atomic_indexed
    from minitron_nemo.outputs import write_text_atomic

    prefix, opts = str(prefix), renderer.opts
    dtype = DType.optimal_dtype(len(renderer.hf))
    n = {"conversations": 0, "written": 0, "no_answer": 0, "dropped_overlong": 0, "truncated": 0,
         "tokens": 0, "answer_tokens": 0}
    t0 = last = time.time()
    with atomic_indexed({prefix: dtype, mask_prefix(prefix): np.uint8}) as builders:
        for where, messages in conversations:
            n["conversations"] += 1
            ids, mask = renderer.render(messages, where)
            if opts.max_length and len(ids) > opts.max_length:
                if opts.overlong == "drop":
                    n["dropped_overlong"] += 1
                    continue
                ids, mask = ids[:opts.max_length], mask[:opts.max_length]
                n["truncated"] += 1
            if not any(mask):
                n["no_answer"] += 1
                continue
            builders[prefix].add_document(np.asarray(ids, dtype=dtype), [len(ids)])
            builders[mask_prefix(prefix)].add_document(np.asarray(mask, dtype=np.uint8), [len(mask)])
            n["written"] += 1
            n["tokens"] += len(ids)
            n["answer_tokens"] += sum(mask)
            if log and time.time() - last > 5:
                last = time.time()
                log(f"{n['written']} conversations, {n['tokens']} tokens, {n['tokens'] / (last - t0):.0f} tokens/s")
        if n["written"] == 0:
            raise UserError(f"{source} holds no conversation with an answer token ({n['conversations']} read: "
                            f"{n['no_answer']} without an assistant turn, {n['dropped_overlong']} longer than "
                            f"max_length={opts.max_length}); allowed: conversations with assistant messages")
        record = {"format": "chat", "tokenizer": renderer.path, "template_markers": renderer.markers,
                  "mask": opts.mask, "reasoning": opts.reasoning, "max_length": opts.max_length,
                  "overlong": opts.overlong, "counts": n}
        write_text_atomic(chat_record(prefix), json.dumps(record, indent=1) + "\n")
    n["seconds"] = max(time.time() - t0, 1e-9)
    return n


def mask_prefix(prefix) -> str:
    return f"{prefix}.mask"


def chat_record(prefix) -> Path:
    return Path(f"{prefix}.chat.json")


def read_example(prefix, index: int) -> dict:
    """Document ``index`` of a dataset: ``{"tokens", "loss_mask"}`` (the mask all ones for text data, whose
    every token counts)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from minitron_nemo.data.indexed import check_indexed_prefix

    prefix = str(prefix)
    docs = check_indexed_prefix(prefix)["documents"]
    if not 0 <= index < docs:
        raise UserError(f"index={index} is out of range; allowed: 0..{docs - 1} ({prefix} holds {docs} documents)")
    tokens = _document(IndexedDataset(prefix), index)
    if not chat_record(prefix).is_file():
        return {"tokens": tokens, "loss_mask": [1] * len(tokens)}
    check_indexed_prefix(mask_prefix(prefix))
    mask = _document(IndexedDataset(mask_prefix(prefix)), index)
    if len(mask) != len(tokens):
        raise UserError(f"{mask_prefix(prefix)}.bin document {index} has {len(mask)} mask values for {len(tokens)} "
                        f"tokens; allowed: the pair written by recipes/preprocess_data.py format=chat (re-run it)")
    return {"tokens": tokens, "loss_mask": mask}


def _document(ds, index: int) -> list:
    """A document as a list, copied while ``ds`` (whose memory map the array views) is still alive."""
    return ds[index].tolist()
