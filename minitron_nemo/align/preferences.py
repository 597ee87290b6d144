"""Preference pairs: ``PAIRS.jsonl`` lines ``{"prompt": [messages] or "text", "chosen": ..., "rejected": ...}``
(a response is a string or a list of messages), rendered in the tokenizer's own chat template.

Each side is the prompt's conversation followed by its response as assistant turn(s); the mask covers the
response only (``data/chat.py``'s renderer with ``mask=last_assistant`` for a string response, every
assistant turn after the prompt for a message list). A sample holds both sides, ``[2, seq_length]``
(chosen first), padded; a pair longer than ``seq_length`` is refused in one line naming the file and line.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from minitron_nemo.data.chat import ChatOptions, ChatRenderer, check_messages
from minitron_nemo.errors import UserError


def _messages(value, where: str, key: str) -> list:
    if isinstance(value, str):
        if not value.strip():
            raise UserError(f"{where}: {key!r} is an empty response; allowed: a non-empty string or message list")
        return [{"role": "assistant", "content": value}]
    msgs = check_messages(value, f"{where} ({key})")
    if not any(m["role"] == "assistant" and m["content"].strip() for m in msgs):
        raise UserError(f"{where}: {key!r} has no non-empty assistant message; allowed: a response")
    return msgs


def read_pairs(path, renderer: ChatRenderer, seq_length: int) -> list:
    """``[(chosen_ids, chosen_mask, rejected_ids, rejected_mask)]`` of every line of ``path``."""
    from minitron_nemo.readers import jsonl_records

    p = Path(path)
    pairs = []
    for where, rec in jsonl_records(p, "preference pairs", "one JSON object per line"):
        missing = [k for k in ("prompt", "chosen", "rejected") if not isinstance(rec, dict) or k not in rec]
        if missing:
            raise UserError(f"{where}: no {', '.join(repr(k) for k in missing)}; allowed: an object with 'prompt', "
                            f"'chosen' and 'rejected'")
        prompt = rec["prompt"]
        prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else check_messages(prompt, where)
        sides = []
        for key in ("chosen", "rejected"):
            ids, mask = renderer.render(prompt + _messages(rec[key], where, key), where)
            mask = _response_only(renderer, prompt, ids, mask, where)
            if len(ids) > seq_length + 1:
                raise UserError(f"{where}: the {key} side has {len(ids)} tokens, more than data.seq_length + 1 = "
                                f"{seq_length + 1}; allowed: shorter pairs or a longer data.seq_length")
            if not any(mask):
                raise UserError(f"{where}: the {key} response has no tokens after rendering; allowed: a response")
            sides += [ids, mask]
        pairs.append(tuple(sides))
    if not pairs:
        raise UserError(f"{p} holds no preference pairs; allowed: JSONL lines with 'prompt', 'chosen', 'rejected'")
    return pairs


def read_prompts(path) -> list:
    """The prompts of a JSONL file, each a message list ending with a user turn: lines
    ``{"prompt": "text" or [messages]}`` or conversations ``{"messages": [...]}`` (cut before their last
    assistant turn)."""
    from minitron_nemo.readers import jsonl_records

    p, out = Path(path), []
    for where, rec in jsonl_records(p, "prompts", "one JSON object per line with 'prompt' or 'messages'"):
        if not isinstance(rec, dict) or not ({"prompt", "messages"} & set(rec)):
            raise UserError(f"{where}: no 'prompt' or 'messages'; allowed: {{\"prompt\": \"text\" or [messages]}} or "
                            f"{{\"messages\": [...]}}")
        value = rec.get("prompt", rec.get("messages"))
        if isinstance(value, str):
            if not value.strip():
                raise UserError(f"{where}: an empty prompt; allowed: a non-empty string or message list")
            out.append([{"role": "user", "content": value}])
            continue
        msgs = check_messages(value, where)
        while msgs and msgs[-1]["role"] == "assistant":
            msgs = msgs[:-1]
        if not msgs or msgs[-1]["role"] != "user":
            raise UserError(f"{where}: the messages do not end with a user turn (before the answer); allowed: a "
                            f"conversation whose answer follows a user message")
        out.append(msgs)
    if not out:
        raise UserError(f"{p} holds no prompts; allowed: JSONL lines with 'prompt' or 'messages'")
    return out


def _response_only(renderer: ChatRenderer, prompt: list, ids: list, mask: list, where: str) -> list:
    """The mask without the assistant turns that are part of the prompt (the rendering of the prompt alone
    is a prefix of the pair's)."""
    if not any(m["role"] == "assistant" for m in prompt):
        return mask
    head = list(renderer.hf(renderer.hf.apply_chat_template(prompt, tokenize=False),
                            add_special_tokens=False)["input_ids"])
    n = len(head)
    if ids[:n] != head:
        raise UserError(f"{where}: the chat template renders the prompt differently before a response; allowed: a "
                        f"prefix-stable template")
    return [0] * n + mask[n:]


def chat_renderer(tokenizer_dir) -> ChatRenderer:
    from minitron_nemo.data.indexed import HFTokenizer

    return ChatRenderer(HFTokenizer(tokenizer_dir).hf, tokenizer_dir, ChatOptions(mask="assistant"))


class PreferenceSamples(torch.utils.data.Dataset):
    """Sample ``i``: pair ``i % len(pairs)`` as ``tokens``/``labels``/``loss_mask``/``position_ids`` ``[2, seq]``
    (chosen, rejected); ``num_samples`` of them (epochs repeat the file's order)."""

    def __init__(self, pairs: list, seq_length: int, pad_id: int, num_samples: int):
        self.pairs, self.seq, self.pad, self.n = pairs, seq_length, pad_id, num_samples

    def __len__(self) -> int:
        return self.n

    def _side(self, ids: list, mask: list) -> dict:
        n = len(ids) - 1
        tokens = np.full(self.seq, self.pad, dtype=np.int64)
        labels = np.full(self.seq, self.pad, dtype=np.int64)
        loss_mask = np.zeros(self.seq, dtype=np.float32)
        tokens[:n], labels[:n], loss_mask[:n] = ids[:-1], ids[1:], mask[1:]
        return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask}

    def __getitem__(self, i: int) -> dict:
        cw, mw, cl, ml = self.pairs[i % len(self.pairs)]
        a, b = self._side(cw, mw), self._side(cl, ml)
        out = {k: torch.from_numpy(np.stack([a[k], b[k]])) for k in a}
        out["position_ids"] = torch.arange(self.seq).expand(2, -1)
        return out
