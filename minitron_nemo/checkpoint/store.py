"""Self-describing Megatron checkpoints.

    CKPT/
      model.yaml     the ModelConfig (model shape; what pruning rewrites)
      meta.json      format version, the TP/PP it was saved at, provenance
      tokenizer/     the tokenizer files
      weights/       a Megatron-Core distributed checkpoint (loadable at any TP/PP)

Saving writes into a sibling temporary directory and renames it into place, so an interrupted
save never leaves a half-written checkpoint behind or damages an existing one; a failed save (a full
disk included) removes the temporary directory. Every read goes through ``minitron_nemo.readers``: a
truncated, corrupt or mismatched file is a one-line error naming it.
"""

from __future__ import annotations

import hashlib
import json
import queue
import shutil
from pathlib import Path

import torch
import yaml
from megatron.core import dist_checkpointing, parallel_state

from minitron_nemo import outputs, readers, runtime
from minitron_nemo.checkpoint import hf as hfconv
from minitron_nemo.data.windows import tokenizer_dir  # noqa: F401  (store.tokenizer_dir for callers)
from minitron_nemo.errors import UserError
from minitron_nemo.models import layout
from minitron_nemo.models.config import ModelConfig

FORMAT = "minitron_nemo/1"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja",
                   "generation_config.json")


def is_checkpoint(path) -> bool:
    p = Path(path)
    return (p / "model.yaml").is_file() and (p / "weights").is_dir()


def require_checkpoint(path, key: str = "checkpoint") -> None:
    """A UserError unless ``path`` is a checkpoint of this project (the recipes that start from one)."""
    if not is_checkpoint(path):
        raise UserError(f"{key}={path} is not a checkpoint of this project; allowed: a directory written by "
                        f"import_hf / prune / distill / sft / dpo (model.yaml and weights/)")


def load_model_config(ckpt_dir) -> ModelConfig:
    p = Path(ckpt_dir)
    if not is_checkpoint(p):
        raise UserError(f"checkpoint={ckpt_dir} is not a minitron_nemo checkpoint; "
                        f"allowed: a directory with model.yaml and weights/")
    return readers.typed_model_config(readers.read_yaml(p / "model.yaml", "model config"), p / "model.yaml")


def load_meta(ckpt_dir) -> dict:
    p = Path(ckpt_dir) / "meta.json"
    return readers.read_json(p, "checkpoint metadata") if p.is_file() else {}


def copy_tokenizer(src, dst) -> None:
    """Copy the tokenizer files found in ``src`` (an HF dir or a checkpoint) into ``dst``."""
    src = Path(src)
    if (src / "tokenizer").is_dir():
        src = src / "tokenizer"
    Path(dst).mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, Path(dst) / name)


def tokenizer_digest(path) -> str | None:
    """SHA-256 of the tokenizer file of an HF dir or checkpoint (None when it has none we know)."""
    d = tokenizer_dir(path)
    for name in ("tokenizer.json", "tokenizer.model", "vocab.json"):
        if (Path(d) / name).is_file():
            return hashlib.sha256((Path(d) / name).read_bytes()).hexdigest()
    return None


def _in_process_results_queue() -> None:
    """Give Megatron's filesystem writer a fresh in-process results queue for this save.

    Saves here are synchronous: the writer's results are put and read in this process (its forked
    workers report through their own queue), so no server process is needed. Megatron's default, a
    ``multiprocessing.Manager`` started with the spawn context, re-imports the entry script (seconds per
    saving process) and would outlive a killed run. A fresh queue per save leaves no result of a failed
    save for the next one.
    """
    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async as fa
    except ImportError:
        return
    if hasattr(fa, "_results_queue"):
        fa._results_queue = queue.Queue()


def write_checkpoint(tmp, model, mc: ModelConfig, *, tokenizer_src=None, meta: dict | None = None,
                     extra_state: dict | None = None) -> None:
    """Collectively write ``model`` (this rank's shard) as a self-describing checkpoint into ``tmp``, an
    existing directory every rank writes into (``outputs.atomic_dir(out, collective=True)``).

    ``extra_state`` is an optional sharded state dict merged into the weights checkpoint
    (e.g. optimizer state) under its own keys.
    """
    tmp = Path(tmp)
    if runtime.rank() == 0:
        (tmp / "weights").mkdir(parents=True)
        (tmp / "model.yaml").write_text(yaml.safe_dump(mc.to_dict(), sort_keys=False))
        info = {"format": FORMAT,
                "saved_tensor_model_parallel_size": parallel_state.get_tensor_model_parallel_world_size(),
                "saved_pipeline_model_parallel_size": parallel_state.get_pipeline_model_parallel_world_size(),
                "saved_expert_model_parallel_size": parallel_state.get_expert_model_parallel_world_size(),
                **(meta or {})}
        (tmp / "meta.json").write_text(json.dumps(info, indent=2))
        if tokenizer_src is not None:
            copy_tokenizer(tokenizer_src, tmp / "tokenizer")
    runtime.barrier()
    sharded = model.sharded_state_dict()
    if extra_state:
        sharded.update(extra_state)
    save_sharded(sharded, tmp / "weights")


def save_sharded(sharded: dict, directory) -> None:
    """Collectively write a sharded state dict (Megatron ``dist_checkpointing``, torch_dist format) into
    ``directory``, an existing empty directory."""
    _in_process_results_queue()
    dist_checkpointing.save(sharded, str(directory))


def load_sharded(sharded: dict, directory, what: str) -> dict:
    """Collectively read ``sharded`` (any TP/PP/DP layout) from a directory ``save_sharded`` wrote; an
    incomplete or unreadable one is a one-line error naming it."""
    directory = Path(directory)
    info = readers.read_json(directory / "metadata.json", f"{what} metadata")
    if info.get("sharded_backend") == "torch_dist" and not (directory / ".metadata").is_file():
        raise UserError(f"cannot read {what} {directory}: .metadata is missing; allowed: a complete checkpoint")
    with readers.reading(directory, what):
        return dist_checkpointing.load(sharded, str(directory))


def saved_keys(directory) -> set:
    """The keys of the tensors a ``save_sharded`` directory holds."""
    return set(dist_checkpointing.load_tensors_metadata(str(directory)).keys())


def save_checkpoint(model, ckpt_dir, mc: ModelConfig, *, tokenizer_src=None, meta: dict | None = None,
                    extra_state: dict | None = None, before_commit=None) -> Path:
    """Collectively save ``model`` (this rank's shard) as a self-describing checkpoint in ``ckpt_dir``
    (``write_checkpoint`` in a collective ``outputs.atomic_dir``); returns its resolved path.

    ``before_commit(tmp_dir)`` runs on rank 0 after the weights are written and before the rename, to add
    files that belong to the output (they are listed in its manifest like the rest). A recipe that writes
    more than the checkpoint can instead open the atomic dir itself and call ``write_checkpoint`` in it.
    """
    final = Path(ckpt_dir).resolve()
    with outputs.atomic_dir(final, collective=True) as tmp:
        write_checkpoint(tmp, model, mc, tokenizer_src=tokenizer_src, meta=meta, extra_state=extra_state)
        if before_commit is not None:
            runtime.barrier()
            if runtime.rank() == 0:
                before_commit(tmp)
    return final


def load_weights(model, ckpt_dir, extra_state: dict | None = None) -> dict | None:
    """Collectively load this rank's shard of the checkpoint into ``model`` (any TP/PP)."""
    sharded = model.sharded_state_dict()
    if extra_state:
        sharded.update(extra_state)
    weights = Path(ckpt_dir) / "weights"
    loaded = load_sharded(sharded, weights, "checkpoint weights")
    extra = {k: loaded.pop(k) for k in list(extra_state or {})}
    load_state_dict_checked(model, loaded, source=weights)
    return extra or None


def load_state_dict_checked(model, sd: dict, source="checkpoint") -> None:
    """``load_state_dict`` that tolerates only TE ``_extra_state`` differences (any TE version); a shape
    that does not match the model (its config) names both shapes and ``source``."""
    own = model.state_dict()
    keys = set(own.keys())
    sd = {k: v for k, v in sd.items() if k in keys or not k.endswith("_extra_state")}
    readers.check_shapes({k: v.shape for k, v in own.items() if isinstance(v, torch.Tensor)},
                         {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}, source)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    unexpected = [k for k in unexpected if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint does not match the model: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")


# ----------------------------------------------------------------------------- Hugging Face weights
class HFWeights:
    """Lazy reader of an HF directory's safetensors (single file or sharded with an index)."""

    def __init__(self, hf_dir):
        from safetensors import safe_open

        d = Path(hf_dir)
        index = d / "model.safetensors.index.json"
        if index.is_file():
            with readers.reading(index, "safetensors index"):
                files = sorted(set(readers.read_json(index, "safetensors index")["weight_map"].values()))
        elif (d / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            raise UserError(f"source={hf_dir} has no model.safetensors; allowed: an HF directory "
                            f"saved with safetensors")
        self._handles, self._where = [], {}
        for f in files:
            with readers.reading(d / f, "HF weights"):
                self._check_size(d / f)
                h = safe_open(str(d / f), framework="pt")
            self._handles.append(h)
            self._where.update({k: (h, d / f) for k in h.keys()})

    @staticmethod
    def _check_size(path: Path) -> None:
        """A truncated file: the header promises more bytes than the file has."""
        import struct

        with open(path, "rb") as f:
            header_len = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(header_len))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        size = path.stat().st_size
        if 8 + header_len + end > size:
            raise UserError(f"cannot read HF weights {path}: truncated ({size} bytes, the header describes "
                            f"{8 + header_len + end}); allowed: a complete safetensors file")

    def __contains__(self, name):
        return name in self._where

    def names(self) -> set:
        return set(self._where)

    def __call__(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise UserError(f"HF checkpoint lacks tensor {name!r}")
        handle, path = self._where[name]
        with readers.reading(path, "HF weights"):
            return handle.get_tensor(name).float()


def load_hf_into_model(model, hf_dir, mc: ModelConfig) -> None:
    """Fill this rank's shard of ``model`` from an HF directory."""
    get = HFWeights(hf_dir)
    hfconv.check_hf_tensors(mc, get.names(), hf_dir)
    with readers.reading(hf_dir, "HF weights (do they match config.json?)"):
        sd = hfconv.hf_to_local_state_dict(mc, get, **shard_layout(), **expert_layout())
    load_local_state_dict(model, sd, source=f"{hf_dir} (weights vs config.json)")


def shard_layout() -> dict:
    """This rank's ``tp_rank, tp, pp_rank, pp`` (what the converters slice by)."""
    return dict(tp_rank=parallel_state.get_tensor_model_parallel_rank(),
                tp=parallel_state.get_tensor_model_parallel_world_size(),
                pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
                pp=parallel_state.get_pipeline_model_parallel_world_size())


def expert_layout() -> dict:
    """This rank's ``ep_rank, ep`` (which experts it holds)."""
    return dict(ep_rank=parallel_state.get_expert_model_parallel_rank(),
                ep=parallel_state.get_expert_model_parallel_world_size())


def load_local_state_dict(model, sd: dict, source) -> None:
    """Load a converted (local-spec names) state dict of this rank's shard into ``model``, in its dtype."""
    keys = model.state_dict().keys()
    sd = {k: v for k, v in layout.to_model_names(sd, keys).items() if k in keys}
    dtype = next(model.parameters()).dtype
    load_state_dict_checked(model, {k: v.to(dtype) for k, v in sd.items()}, source=source)


def canonical_state_dict(model) -> dict:
    """Canonical-name state dict of a TP=1, PP=1 model (fp32 tensors)."""
    return {k: v.detach().float().cpu() for k, v in layout.to_canonical_names(model.state_dict()).items()
            if isinstance(v, torch.Tensor)}


# ----------------------------------------------------------------------------- either kind of source
def model_config_of(path) -> ModelConfig:
    """ModelConfig of a minitron_nemo checkpoint or of a Hugging Face directory."""
    p = Path(path)
    if not p.is_dir():
        raise UserError(f"checkpoint={path} does not exist; allowed: a minitron_nemo checkpoint or an "
                        f"HF model directory")
    if is_checkpoint(p):
        return load_model_config(p)
    return hfconv.hf_model_config(p)


def load_model(path, mc: ModelConfig, params_dtype: torch.dtype = torch.float32, grouped_gemm: bool = False,
               sequence_parallel: bool = False):
    """Build this rank's model shard and load it from a checkpoint or an HF directory (MoE: the grouped
    expert GEMM only from a checkpoint; HF tensors are named per expert, so they fill the sequential MLP)."""
    from minitron_nemo.models.builder import build_model

    model = build_model(mc, params_dtype=params_dtype, sequence_parallel=sequence_parallel,
                        grouped_gemm=grouped_gemm and is_checkpoint(path))
    if is_checkpoint(path):
        load_weights(model, path)
    else:
        load_hf_into_model(model, path, mc)
    return model
