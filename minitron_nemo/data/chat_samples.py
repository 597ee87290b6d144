"""Training samples from chat data (``recipes/preprocess_data.py format=chat``): one conversation per
sample, padded to the sequence length, its loss on answer tokens only.

A sample holds ``tokens`` (the conversation's first ``seq_length`` tokens), ``labels`` (the next tokens),
``loss_mask`` (1 where the label is an answer token, ``answer_only``; or every real token) and
``position_ids``, as ``indexed.batches`` expects. Padding has loss mask 0. A conversation longer than
``seq_length + 1`` tokens is cut (counted when the datasets are built). Samples visit the conversations
in a seeded order, reshuffled every epoch, so a job's data order depends on the seed alone.

``data.packing=true`` (``PackedChatSamples``): consecutive conversations of that order fill a sample until
the next one does not fit, each with its own positions and labels (its last token predicts nothing), and
``segment_ids`` tell the model where each begins (``models/packing.py``: no attention across them).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from minitron_nemo.data.chat import chat_record, mask_prefix
from minitron_nemo.errors import UserError


def open_chat_prefix(prefix, key: str):
    """``(tokens, masks)`` ``IndexedDataset`` pair of a chat dataset; one line when ``prefix`` is not one."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from minitron_nemo.data.indexed import check_indexed_prefix

    prefix = str(prefix)
    if not chat_record(prefix).is_file():
        raise UserError(f"{key}={prefix} is not chat data ({chat_record(prefix).name} not found); allowed: a "
                        f"prefix written by recipes/preprocess_data.py format=chat")
    a, b = check_indexed_prefix(prefix), check_indexed_prefix(mask_prefix(prefix))
    if a["documents"] != b["documents"] or a["tokens"] != b["tokens"]:
        raise UserError(f"{key}={prefix}: the mask ({b['documents']} documents, {b['tokens']} values) does not "
                        f"match the tokens ({a['documents']} documents, {a['tokens']} tokens); allowed: the pair "
                        f"written by recipes/preprocess_data.py format=chat (re-run it)")
    return IndexedDataset(prefix), IndexedDataset(mask_prefix(prefix))


class ChatSamples(torch.utils.data.Dataset):
    def __init__(self, tokens, masks, docs: np.ndarray, seq_length: int, num_samples: int, seed: int,
                 pad_id: int, answer_only: bool = True):
        if len(docs) == 0:
            raise UserError("no conversations for this split; allowed: more conversations, or data.valid_blend")
        self.tokens, self.masks, self.docs = tokens, masks, docs
        self.seq, self.n, self.seed, self.pad, self.answer_only = seq_length, num_samples, seed, pad_id, answer_only
        self._epoch, self._order = -1, None

    def __len__(self) -> int:
        return self.n

    def doc_of(self, i: int) -> int:
        epoch, k = divmod(i, len(self.docs))
        if epoch != self._epoch:
            self._epoch = epoch
            self._order = np.random.RandomState((self.seed + 7919 * epoch) % 2 ** 32).permutation(self.docs)
        return int(self._order[k])

    def __getitem__(self, i: int) -> dict:
        d = self.doc_of(i)
        ids = np.asarray(self.tokens[d][: self.seq + 1], dtype=np.int64)
        answer = np.asarray(self.masks[d][: self.seq + 1], dtype=np.float32)
        n = len(ids) - 1  # positions with a label
        tokens = np.full(self.seq, self.pad, dtype=np.int64)
        labels = np.full(self.seq, self.pad, dtype=np.int64)
        loss_mask = np.zeros(self.seq, dtype=np.float32)
        tokens[:n], labels[:n] = ids[:-1], ids[1:]
        loss_mask[:n] = answer[1:] if self.answer_only else 1.0
        return {"tokens": torch.from_numpy(tokens), "labels": torch.from_numpy(labels),
                "loss_mask": torch.from_numpy(loss_mask), "position_ids": torch.arange(self.seq)}


class PackedChatSamples(ChatSamples):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._bins: list = []   # the conversations of each packed sample, built in order on demand
        self._next = 0          # the next position in the conversation stream

    def bin(self, i: int) -> list:
        while len(self._bins) <= i:
            docs, used = [], 0
            while True:
                d = self.doc_of(self._next)
                n = min(int(self.tokens.sequence_lengths[d]), self.seq)
                if docs and used + n > self.seq:
                    break
                docs.append(d)
                used += n
                self._next += 1
            self._bins.append(docs)
        return self._bins[i]

    def __getitem__(self, i: int) -> dict:
        tokens = np.full(self.seq, self.pad, dtype=np.int64)
        labels = np.full(self.seq, self.pad, dtype=np.int64)
        loss_mask = np.zeros(self.seq, dtype=np.float32)
        positions = np.zeros(self.seq, dtype=np.int64)
        segments = np.zeros(self.seq, dtype=np.int64)
        at = 0
        for k, d in enumerate(self.bin(i)):
            ids = np.asarray(self.tokens[d][: self.seq], dtype=np.int64)
            n = len(ids)
            tokens[at:at + n], labels[at:at + n - 1] = ids, ids[1:]
            if self.answer_only:
                loss_mask[at:at + n - 1] = np.asarray(self.masks[d][1:n], dtype=np.float32)
            else:
                loss_mask[at:at + n - 1] = 1.0
            positions[at:at + n], segments[at:at + n] = np.arange(n), k
            at += n
        segments[at:] = len(self.bin(i))  # the padding: a segment of its own
        positions[at:] = np.arange(self.seq - at)
        return {"tokens": torch.from_numpy(tokens), "labels": torch.from_numpy(labels),
                "loss_mask": torch.from_numpy(loss_mask), "position_ids": torch.from_numpy(positions),
                "segment_ids": torch.from_numpy(segments)}


def padding_fractions(lengths: np.ndarray, seq: int) -> tuple:
    """The fraction of padding positions one epoch of these conversations has unpacked (one per sample)
    and packed (greedily, in this order)."""
    n = np.minimum(lengths, seq)
    unpacked = 1 - np.minimum(lengths - 1, seq).sum() / (len(lengths) * seq)
    bins, used = 1, 0
    for x in n:
        if used and used + x > seq:
            bins, used = bins + 1, 0
        used += x
    return float(unpacked), float(1 - n.sum() / (bins * seq))


def split_documents(n: int, split: str) -> tuple:
    """Document indices for train and valid from ``split`` weights ("969,30,1": the first two used)."""
    try:
        w = [float(x) for x in str(split).split(",")]
        assert len(w) <= 3 and all(x >= 0 for x in w) and sum(w) > 0
    except (ValueError, AssertionError):
        raise UserError(f"data.split={split!r}; allowed: up to 3 non-negative weights such as '969,30,1'") from None
    w = np.asarray(w + [0.0] * (3 - len(w))) / sum(w)
    bounds = np.round(np.cumsum(w) * n).astype(int)
    return np.arange(0, bounds[0]), np.arange(bounds[0], bounds[1])


def build_chat_datasets(dcfg, pad_id: int, samples: tuple, seed: int, log=print) -> tuple:
    """``(train, valid or None)`` ``ChatSamples`` of ``data.blend`` (a chat prefix; split by ``data.split``
    unless ``data.valid_blend`` gives the validation conversations)."""
    seq = int(dcfg.seq_length)
    tokens, masks = open_chat_prefix(dcfg.blend, "data.blend")
    train_docs, valid_docs = split_documents(len(tokens), dcfg.split)
    valid_source = (tokens, masks)
    if dcfg.valid_blend:
        valid_source = open_chat_prefix(dcfg.valid_blend, "data.valid_blend")
        train_docs, valid_docs = np.arange(len(tokens)), np.arange(len(valid_source[0]))
    answer_only = bool(dcfg.get("answer_only", True))
    cut = int((tokens.sequence_lengths[train_docs] > seq + 1).sum())
    log(f"[data] chat {Path(str(dcfg.blend)).name}: {len(train_docs)} train / {len(valid_docs)} valid "
        f"conversations, loss on {'answer tokens' if answer_only else 'all tokens'}"
        f"{f', {cut} longer than seq_length+1 cut' if cut else ''}")
    packing = bool(dcfg.get("packing", False))
    if packing:
        unpacked, packed = padding_fractions(tokens.sequence_lengths[train_docs], seq)
        log(f"[data] packing: padding {unpacked:.1%} of positions unpacked, {packed:.1%} packed")
    kind = PackedChatSamples if packing else ChatSamples
    train = kind(tokens, masks, train_docs, seq, samples[0] or len(train_docs), seed, pad_id, answer_only)
    valid = kind(*valid_source, valid_docs, seq, samples[1] or len(valid_docs), seed + 1, pad_id,
                 answer_only) if len(valid_docs) and samples[1] else None
    return train, valid
