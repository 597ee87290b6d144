"""Read NeMo 2 checkpoints (Llama, Mistral, Qwen2, Nemotron) into the canonical layout.

A NeMo 2 checkpoint is a directory

    NEMO2/context/model.yaml    the model's constructor arguments (``config`` = NeMo's GPTConfig subclass)
    NEMO2/context/io.json       the same, serialised for NeMo's io; not needed here
    NEMO2/context/nemo_tokenizer/   the HF tokenizer files (``llm.import_ckpt`` from HF writes them)
    NEMO2/context/artifacts/generation_config.json
    NEMO2/weights/              a Megatron-Core torch_dist checkpoint

The weights carry NeMo's ``module.`` prefix and Megatron-Core's layer stacking: every decoder layer
parameter is one tensor of shape ``[num_layers, ...]`` (``module.decoder.layers.mlp.linear_fc2.weight``)
whose slice ``[i]`` is global layer ``i`` at TP=1, i.e. exactly the canonical tensor
``decoder.layers.{i}.mlp.linear_fc2.weight`` of ``checkpoint.hf``. The fused norms use Transformer
Engine names (``self_attention.linear_qkv.layer_norm_weight``) whichever layer spec saved them.

``Nemo2Weights`` reads single layers out of the stacked tensors with torch.distributed.checkpoint
(no process group: each rank reads only the layers of its pipeline stage), so import runs at any
TP x PP exactly as the Hugging Face path does, and yields the same canonical dict.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict

import torch

from minitron_nemo import readers
from minitron_nemo.checkpoint import store
from minitron_nemo.errors import UserError
from minitron_nemo.models import layout
from minitron_nemo.models.config import ModelConfig

# NeMo 2 model classes -> our family
MODEL_CLASSES = {
    "LlamaModel": "llama",
    "MistralModel": "mistral",
    "Qwen2Model": "qwen2",
    "NemotronModel": "nemotron",
}
_LAYERS = "decoder.layers."
# Llama-3.1 rope scaling (NeMo's Llama31Config fields) that our ModelConfig supports
_LLAMA31_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "old_context_len": 8192}
_ALLOWED = "a NeMo 2 checkpoint directory (context/model.yaml and weights/)"


def check_nemo2_dir(path) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise UserError(f"source={path} does not exist; allowed: {_ALLOWED}")
    if not (p / "context").is_dir():
        raise UserError(f"source={path} has no context/ directory; allowed: {_ALLOWED}")
    if not (p / "context" / "model.yaml").is_file():
        raise UserError(f"source={path} has no context/model.yaml; allowed: {_ALLOWED}")
    if not (p / "weights").is_dir():
        raise UserError(f"source={path} has no weights/ directory; allowed: {_ALLOWED}")
    return p


# ----------------------------------------------------------------------------- config
def read_model_yaml(nemo_dir) -> dict:
    p = check_nemo2_dir(nemo_dir) / "context" / "model.yaml"
    doc = readers.read_yaml(p, "NeMo 2 model config")
    if not isinstance(doc.get("config"), dict):
        raise UserError(f"{p} has no model config (a 'config' mapping); allowed: the context/model.yaml "
                        f"NeMo 2 writes")
    return doc


def _target(node) -> str:
    return node.get("_target_", "") if isinstance(node, dict) else ""


def family_of(doc: dict) -> str:
    cls = _target(doc).rsplit(".", 1)[-1]
    if cls not in MODEL_CLASSES:
        raise UserError(f"NeMo model {cls or '?'!r} is not supported; allowed: {', '.join(MODEL_CLASSES)}")
    return MODEL_CLASSES[cls]


def _activation(c: dict, family: str) -> str:
    fn = _target(c.get("activation_func")).rsplit(".", 1)[-1]
    gated = bool(c.get("gated_linear_unit"))
    if fn == "silu" and gated:
        act = "swiglu"
    elif fn == "squared_relu" and not gated:
        act = "squared_relu"
    else:
        act = f"{fn or '?'}{' (gated)' if gated else ''}"
    want = "squared_relu" if family == "nemotron" else "swiglu"
    if act != want:
        raise UserError(f"activation {act} is not supported for NeMo {family}; allowed: {want}")
    return act


def _rope_scaling(c: dict):
    if "scale_factor" in c:  # Llama31Config and its subclasses (Llama 3.1 / 3.2)
        for k, v in _LLAMA31_ROPE.items():
            if c.get(k) is not None and float(c[k]) != v:
                raise UserError(f"rope scaling {k}={c[k]} is not supported; allowed: {v} (Llama-3.1)")
        return float(c["scale_factor"])
    if c.get("rope_scaling"):  # Megatron-Core's own Llama-3.1 flag
        return float(c.get("rope_scaling_factor") or 8.0)
    return None


def tokenizer_dir(nemo_dir) -> Path | None:
    """The HF tokenizer files NeMo keeps under context/ (``nemo_tokenizer/`` for ``import_ckpt``)."""
    ctx = Path(nemo_dir) / "context"
    for d in [ctx / "nemo_tokenizer", ctx / "artifacts", ctx]:
        if d.is_dir() and any((d / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
            return d
    found = sorted(ctx.rglob("tokenizer.json")) + sorted(ctx.rglob("tokenizer.model"))
    return found[0].parent if found else None


def _tokenizer_vocab_size(nemo_dir) -> int | None:
    """len(tokenizer) of NeMo's HF tokenizer: what NeMo uses when the config leaves vocab_size null."""
    d = tokenizer_dir(nemo_dir)
    if d is None:
        return None
    try:
        import transformers

        return len(transformers.AutoTokenizer.from_pretrained(str(d)))
    except Exception:  # noqa: BLE001 - an unreadable tokenizer only loses this fallback
        return None


def model_config_from_nemo(nemo_dir, doc: dict | None = None, weights: "Nemo2Weights | None" = None) -> ModelConfig:
    """Translate context/model.yaml into a ``ModelConfig``; unsupported features raise ``UserError``."""
    doc = doc or read_model_yaml(nemo_dir)
    family = family_of(doc)
    c = doc["config"]

    where = Path(nemo_dir) / "context" / "model.yaml"

    def need(key, kind=int):
        if c.get(key) is None:
            raise UserError(f"{where} lacks config.{key}")
        return number(key, kind)

    def number(key, kind, default=None):
        """``config.KEY`` as ``kind`` (``default`` when unset); a value of another type is one line."""
        v = c.get(key)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and v != int(v)):
            raise UserError(f"{where}: config.{key}={v!r} is not {'an integer' if kind is int else 'a number'}; "
                            f"allowed: {'a whole number' if kind is int else 'a number'}")
        return kind(v)

    unsupported = {
        "num_moe_experts": "MoE", "multi_latent_attention": "multi-latent attention",
        "qk_layernorm": "QK layernorm", "seq_len_interpolation_factor": "position interpolation",
        "add_bias_linear": "linear biases", "mtp_num_layers": "multi-token prediction",
    }
    for key, what in unsupported.items():
        if c.get(key):
            raise UserError(f"config.{key}={c[key]} ({what}) is not supported; allowed: null/false")
    if c.get("position_embedding_type", "rope") != "rope":
        raise UserError(f"position_embedding_type={c['position_embedding_type']!r} is not supported; "
                        f"allowed: rope")
    heads = need("num_attention_heads")
    hidden = need("hidden_size")
    seq = number("seq_length", int)
    window = c.get("window_size")
    if window is not None and (not isinstance(window, (list, tuple)) or window[0] is None or window[0] < 0
                               or (seq is not None and window[0] < seq) or seq is None):
        raise UserError(f"window_size={window} (sliding-window attention) is not supported; allowed: null")
    norm = c.get("normalization", "LayerNorm")
    want_norm = "LayerNorm" if family == "nemotron" else "RMSNorm"
    if norm != want_norm:
        raise UserError(f"normalization={norm!r} is not supported for NeMo {family}; allowed: {want_norm}")
    vocab = number("vocab_size", int)
    if vocab is None:  # NeMo then takes the tokenizer's size (e.g. its Mistral importer)
        vocab = _tokenizer_vocab_size(nemo_dir)
    if vocab is None and weights is not None:
        vocab = weights.shape("embedding.word_embeddings.weight")[0]
    if vocab is None:
        raise UserError(f"{Path(nemo_dir) / 'context' / 'model.yaml'} has vocab_size null and no readable "
                        f"tokenizer under context/")
    return ModelConfig(
        family=family,
        num_layers=need("num_layers"),
        hidden_size=hidden,
        ffn_hidden_size=need("ffn_hidden_size"),
        num_attention_heads=heads,
        num_query_groups=number("num_query_groups", int) or heads,
        kv_channels=number("kv_channels", int) or hidden // heads,
        vocab_size=int(vocab),
        max_position_embeddings=seq or 4096,
        normalization=norm,
        norm_epsilon=number("layernorm_epsilon", float, 1e-5),
        layernorm_zero_centered_gamma=bool(c.get("layernorm_zero_centered_gamma", False)),
        activation=_activation(c, family),
        add_qkv_bias=bool(c.get("add_qkv_bias", False)),
        add_bias_linear=False,
        rotary_base=number("rotary_base", float, 10000.0),
        rotary_percent=number("rotary_percent", float, 1.0),
        rope_scaling_factor=_rope_scaling(c),
        share_embeddings_and_output_weights=bool(c.get("share_embeddings_and_output_weights", False)),
    ).validate()


def token_ids(nemo_dir) -> dict:
    """bos/eos/pad ids (what ``hf.token_ids`` gives on an HF dir): from NeMo's generation config, else
    from the tokenizer under context/ (NeMo's Nemotron importer keeps no generation config)."""
    ids = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    p = Path(nemo_dir) / "context" / "artifacts" / "generation_config.json"
    if p.is_file():
        try:
            g = json.loads(p.read_text())
            ids.update({k: g.get(k) for k in ids if g.get(k) is not None})
        except (OSError, ValueError):
            pass
    d = tokenizer_dir(nemo_dir)
    if d is not None and (ids["bos_token_id"] is None or ids["eos_token_id"] is None):
        try:
            import transformers

            tok = transformers.AutoTokenizer.from_pretrained(str(d))
            ids.update({k: getattr(tok, k, None) for k in ids if ids[k] is None})
        except Exception:  # noqa: BLE001 - an unreadable tokenizer only loses these ids
            pass
    return ids


# ----------------------------------------------------------------------------- weights
class Nemo2Weights:
    """Lazy reader of a NeMo 2 ``weights/`` torch_dist checkpoint in canonical names.

    ``w("decoder.layers.3.mlp.linear_fc1.weight")`` reads slice 3 of the stacked tensor only;
    ``w.read([...])`` reads several in one pass. Works with or without a process group."""

    def __init__(self, nemo_dir):
        from torch.distributed.checkpoint import FileSystemReader

        self.dir = Path(nemo_dir) / "weights"
        info = self.dir / "metadata.json"
        if info.is_file():
            backend = readers.read_json(info, "NeMo 2 weights metadata").get("sharded_backend")
            if backend != "torch_dist":
                raise UserError(f"{self.dir} uses sharded_backend={backend!r}; allowed: torch_dist")
        self._reader = FileSystemReader(str(self.dir))
        with readers.reading(self.dir, "NeMo 2 weights (a torch_dist checkpoint)"):
            self._md = self._reader.read_metadata()
        tensors = {k: v for k, v in self._md.state_dict_metadata.items()
                   if hasattr(v, "chunks") and "_extra_state" not in k}
        anchor = [k for k in tensors if k.endswith("decoder.final_layernorm.weight")]
        if not anchor:
            raise UserError(f"{self.dir} has no decoder.final_layernorm.weight; allowed: the weights of a "
                            f"NeMo 2 GPT model")
        self.prefix = anchor[0][: -len("decoder.final_layernorm.weight")]  # "module." for NeMo 2
        self._stored: Dict[str, str] = {}  # canonical name (layer part without index) -> stored key
        for k in tensors:
            if not k.startswith(self.prefix):
                continue
            name = k[len(self.prefix):]
            self._stored[layout.canonical_name(name)] = k
        self._meta = tensors

    # names -------------------------------------------------------------------------------------
    def _key(self, name: str):
        """(stored key, layer index or None) of a canonical name."""
        if name.startswith(_LAYERS):
            idx, rest = name[len(_LAYERS):].split(".", 1)
            stacked = _LAYERS + rest
            if stacked in self._stored:
                return self._stored[stacked], int(idx)
        if name in self._stored:
            return self._stored[name], None
        raise UserError(f"NeMo 2 checkpoint {self.dir.parent} lacks tensor {self.prefix}{name}")

    def __contains__(self, name: str) -> bool:
        try:
            self._key(name)
            return True
        except UserError:
            return False

    def shape(self, name: str) -> torch.Size:
        key, layer = self._key(name)
        size = self._meta[key].size
        return torch.Size(size[1:]) if layer is not None else torch.Size(size)

    def layer_names(self, i: int) -> list:
        """Canonical names of layer ``i`` present in the checkpoint."""
        return [f"{_LAYERS}{i}.{n[len(_LAYERS):]}" for n in self._stored if n.startswith(_LAYERS)]

    # reading -----------------------------------------------------------------------------------
    def read(self, names) -> Dict[str, torch.Tensor]:
        """fp32 tensors of the canonical ``names`` (one layer slice each for stacked parameters)."""
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
        from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

        requests = {}
        for name in names:
            key, layer = self._key(name)
            md = self._meta[key]
            size = tuple(md.size)
            if layer is not None:
                if not 0 <= layer < size[0]:
                    raise UserError(f"NeMo 2 checkpoint {self.dir.parent} has {size[0]} layers in {key}; "
                                    f"layer {layer} requested")
                offsets, sizes = (layer,) + (0,) * (len(size) - 1), (1,) + size[1:]
            else:
                offsets, sizes = (0,) * len(size), size
            buf = torch.empty(sizes, dtype=md.properties.dtype)
            requests.setdefault(key, []).append(
                (name, ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes)), buf))
        planner = _SlicePlanner(requests)
        with readers.reading(self.dir, "NeMo 2 weights"):
            _load_state_dict({}, self._reader, planner=planner, no_dist=True)
        out = {}
        for key, reqs in requests.items():
            for name, _, buf in reqs:
                layer = self._key(name)[1]
                out[name] = (buf[0] if layer is not None else buf).float()
        return out

    def __call__(self, name: str) -> torch.Tensor:
        return self.read([name])[name]


def _SlicePlanner(requests):
    """A torch.distributed.checkpoint load planner that reads given chunks of stored tensors (one layer
    of a stacked ``[L, ...]`` tensor) into given buffers; ``requests``: stored key -> [(name, chunk, buf)]."""
    import dataclasses

    from torch.distributed._shard._utils import narrow_tensor_by_index
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.planner import LoadPlan
    from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

    class Planner(DefaultLoadPlanner):
        def create_local_plan(self):
            items, self._dest = [], {}
            for key, reqs in requests.items():
                md = self.metadata.state_dict_metadata[key]
                for j, (_, chunk, buf) in enumerate(reqs):
                    dest = f"{key}#{j}"  # each (key, chunk) request gets its own destination
                    self._dest[dest] = buf
                    for it in create_read_items_for_chunk_list(key, md, [chunk]):
                        items.append(dataclasses.replace(
                            it, dest_index=dataclasses.replace(it.dest_index, fqn=dest)))
            return LoadPlan(items)

        def resolve_tensor(self, read_item):
            return narrow_tensor_by_index(self._dest[read_item.dest_index.fqn], read_item.dest_offsets,
                                          read_item.lengths)

        def commit_tensor(self, read_item, tensor):
            pass

    return Planner()


# ----------------------------------------------------------------------------- into the model
TOP_LEVEL = ("embedding.word_embeddings.weight", "decoder.final_layernorm.weight", "decoder.final_layernorm.bias",
             "output_layer.weight")


def check_tensors(mc: ModelConfig, w: "Nemo2Weights") -> None:
    """The stored tensors against context/model.yaml, both ways: every stacked layer tensor holds exactly
    ``num_layers`` layers, and the top-level tensors are those the config implies."""
    where = f"NeMo 2 checkpoint {w.dir.parent}"
    for name, key in sorted(w._stored.items()):
        if name.startswith(_LAYERS):
            n = int(w._meta[key].size[0])
            if n != mc.num_layers:
                raise UserError(f"{where}: {key} stacks {n} layers but context/model.yaml says num_layers="
                                f"{mc.num_layers}; allowed: weights that match the config")
    want = {TOP_LEVEL[0], TOP_LEVEL[1]} | ({TOP_LEVEL[2]} if mc.normalization == "LayerNorm" else set()) | (
        set() if mc.share_embeddings_and_output_weights else {TOP_LEVEL[3]})
    have = {n for n in w._stored if not n.startswith(_LAYERS)}
    if want - have:
        raise UserError(f"{where}: context/model.yaml implies {sorted(want - have)[0]}, which the weights lack; "
                        f"allowed: weights that match the config")
    extra = have - want - ({TOP_LEVEL[3]} if mc.share_embeddings_and_output_weights else set())
    if extra:
        raise UserError(f"{where}: {w.prefix}{sorted(extra)[0]} is not part of the model context/model.yaml "
                        f"describes; allowed: weights that match the config")


def nemo2_to_local_state_dict(mc: ModelConfig, w: Nemo2Weights, *, tp_rank: int, tp: int, pp_rank: int,
                              pp: int) -> Dict[str, torch.Tensor]:
    """This rank's model state dict (local layer numbers, local-spec names), as
    ``hf.hf_to_local_state_dict`` gives for the same model from Hugging Face."""
    per_stage = mc.num_layers // pp
    if f"{_LAYERS}0.self_attention.linear_qkv.weight" not in w:
        raise UserError(f"NeMo 2 checkpoint {w.dir.parent} lacks decoder layer tensors")
    check_tensors(mc, w)
    sd: Dict[str, torch.Tensor] = {}
    for j in range(per_stage):
        i = pp_rank * per_stage + j
        for name, t in w.read(w.layer_names(i)).items():
            sd[f"{_LAYERS}{j}.{name[len(_LAYERS):].split('.', 1)[1]}"] = t
    V = mc.vocab_size
    if pp_rank == 0:
        sd["embedding.word_embeddings.weight"] = layout.pad_vocab(mc, w("embedding.word_embeddings.weight")[:V])
    if pp_rank == pp - 1:
        sd["decoder.final_layernorm.weight"] = w("decoder.final_layernorm.weight")
        if mc.normalization == "LayerNorm":
            sd["decoder.final_layernorm.bias"] = w("decoder.final_layernorm.bias")
        head = "embedding.word_embeddings.weight" if mc.share_embeddings_and_output_weights else "output_layer.weight"
        sd["output_layer.weight"] = layout.pad_vocab(mc, w(head)[:V])
    _check_shapes(mc, sd, w)
    return {k: layout.shard_tensor(mc, k, v, tp_rank, tp) for k, v in sd.items()}


def _check_shapes(mc: ModelConfig, sd: dict, w: Nemo2Weights) -> None:
    d, g, h = mc.head_dim, mc.num_query_groups, mc.num_attention_heads
    fc1 = mc.ffn_hidden_size * (2 if mc.gated else 1)
    want = {"self_attention.linear_qkv.weight": ((h + 2 * g) * d, mc.hidden_size),
            "self_attention.linear_proj.weight": (mc.hidden_size, h * d),
            "mlp.linear_fc1.weight": (fc1, mc.hidden_size),
            "mlp.linear_fc2.weight": (mc.hidden_size, mc.ffn_hidden_size)}
    for k, v in sd.items():
        for suffix, shape in want.items():
            if k.endswith(suffix) and tuple(v.shape) != shape:
                raise UserError(f"NeMo 2 checkpoint {w.dir.parent}: {k} has shape {tuple(v.shape)} but "
                                f"context/model.yaml implies {shape}")


def load_nemo2_into_model(model, nemo_dir, mc: ModelConfig, weights: Nemo2Weights | None = None) -> None:
    """Fill this rank's shard of ``model`` from a NeMo 2 checkpoint (any TP x PP)."""
    w = weights or Nemo2Weights(nemo_dir)
    sd = nemo2_to_local_state_dict(mc, w, **store.shard_layout())
    store.load_local_state_dict(model, sd, source=f"{nemo_dir} (weights vs context/model.yaml)")
