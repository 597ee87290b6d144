"""One reading layer: every file the project reads from a user goes through these functions, which turn
parse, type, shape and I/O failures into a one-line ``UserError`` naming the file and what is wrong.

    with reading(path, "checkpoint weights"):   # any failure inside -> "cannot read ... PATH: why"
        ...
    read_json(path, "HF config")                 # a JSON object, or a UserError
    read_yaml(path, "model config")              # a YAML mapping, or a UserError
    typed_model_config(d, path)                  # a ModelConfig with checked types, or a UserError
    torch_load(path, "training state")
    read_jsonl(path, "training metrics")         # the JSON objects of a JSON-lines log, or a UserError

Records the project wrote itself and reads back on a re-run: ``read_cache`` for one that caches redoable
work (unreadable: a one-line note, and the caller computes it again), ``read_own_record`` for one that
cannot be redone safely (unreadable: a UserError that says what to remove).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from minitron_nemo.errors import UserError


def first_failure(e: BaseException) -> BaseException:
    """The per-rank exception inside torch.distributed.checkpoint's ``CheckpointException``."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        v = next(iter(failures.values()))
        v = v[0] if isinstance(v, tuple) and v else v
        if isinstance(v, BaseException):
            return first_failure(v)
    return e


def describe(e: BaseException) -> str:
    """A one-line reason: the exception's own first line, its type when it has no text."""
    e = first_failure(e)
    text = " ".join(str(e).split())
    if isinstance(e, FileNotFoundError):
        return f"missing file {e.filename}" if e.filename else "missing file"
    if isinstance(e, KeyError):
        return f"missing entry {text}"
    if isinstance(e, UnicodeDecodeError):
        return "not UTF-8 text"
    if len(text) > 300:
        text = text[:300] + " ..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


@contextlib.contextmanager
def reading(path, what: str):
    """Turn any failure while reading ``path`` into ``UserError("cannot read WHAT PATH: reason")``."""
    try:
        yield
    except (UserError, KeyboardInterrupt, SystemExit, GeneratorExit, MemoryError):
        raise
    except BaseException as e:  # the reader's own errors: parse, shape, I/O (torch.distributed.checkpoint's
        # CheckpointException is a BaseException); a user's interrupt passes through above
        if type(e).__name__ == "Interrupted":
            raise
        raise UserError(f"cannot read {what} {path}: {describe(e)}") from None


def read_json(path, what: str, kind=dict):
    p = Path(path)
    with reading(p, what):
        data = json.loads(p.read_text())
    if not isinstance(data, kind):
        raise UserError(f"{what} {p} holds a JSON {type(data).__name__}; allowed: a JSON "
                        f"{'object' if kind is dict else kind.__name__}")
    return data


def read_yaml(path, what: str, kind=dict):
    import yaml

    p = Path(path)
    with reading(p, what):
        data = yaml.safe_load(p.read_text())
    if not isinstance(data, kind):
        got = "nothing (empty file)" if data is None else f"a YAML {type(data).__name__}"
        raise UserError(f"{what} {p} holds {got}; allowed: a YAML mapping")
    return data


def typed_model_config(d: dict, source):
    """``ModelConfig`` from a dict, its types checked against the schema (a non-numeric size names the
    key and the file)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from minitron_nemo.models.config import ModelConfig

    try:
        merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.create(d))
        obj = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", "") or ""
        msg = str(getattr(e, "msg", None) or e).splitlines()[0]
        raise UserError(f"{source}: {key + ': ' if key else ''}{msg}") from None
    try:
        return obj.validate()
    except UserError as e:
        raise UserError(f"{source}: {e}") from None


def torch_load(path, what: str):
    import torch

    p = Path(path)
    with reading(p, what):
        return torch.load(p, map_location="cpu", weights_only=False)


def check_shapes(expected: dict, got: dict, source) -> None:
    """Tensors ``got`` against the shapes a config implies (``expected``: name -> shape); a mismatch
    names both shapes and the file."""
    for k, t in got.items():
        want = expected.get(k)
        if want is not None and tuple(t.shape) != tuple(want):
            raise UserError(f"{source}: tensor {k} has shape {tuple(t.shape)} but the model config implies "
                            f"{tuple(want)}; allowed: weights that match the config")


def read_jsonl(path, what: str) -> list:
    """Every non-blank line of a JSON-lines file, each a JSON object; a bad line is a UserError naming the
    file and the line number."""
    p = Path(path)
    with reading(p, what):
        lines = p.read_text().splitlines()
    out = []
    for n, line in enumerate(lines, 1):
        if line.strip():
            with reading(f"{p} line {n}", what):
                out.append(json.loads(line))
            if not isinstance(out[-1], dict):
                raise UserError(f"{what} {p} line {n} holds a JSON {type(out[-1]).__name__}; allowed: a JSON object")
    return out


def jsonl_records(path, what: str, allowed: str):
    """``(where, record)`` for every non-blank line of a JSONL file a user gives (``where``: ``FILE:LINE``);
    invalid JSON is a UserError naming the line and ``allowed``. The records' content is the caller's."""
    p = Path(path)
    with reading(p, what):
        lines = p.read_bytes().decode("utf-8-sig").splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{p}:{n}: invalid JSON ({e.msg}, column {e.colno}); allowed: {allowed}") from None
        yield f"{p}:{n}", rec


def read_own_record(path, what: str, redo: str):
    """A JSON object the project wrote itself that cannot be redone safely: unreadable, the UserError says
    what to remove (``redo``, e.g. "remove DIR to rerun the stage")."""
    try:
        return read_json(path, what)
    except UserError as e:
        raise UserError(f"{e}; {redo}") from None


def read_cache(path, what: str, kind=dict, log=print):
    """A JSON object the project wrote itself as a cache of redoable work: None when absent, and None with
    a one-line note (``log``) when unreadable, so that the caller recomputes it and writes it anew."""
    p = Path(path)
    if not p.is_file():
        return None
    try:
        return read_json(p, what, kind)
    except UserError as e:
        log(f"note: {e}; recomputing it")
        return None
