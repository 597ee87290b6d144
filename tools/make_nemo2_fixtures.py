"""Build the tiny NeMo 2 checkpoints under tests/fixtures/nemo2/ with the real NeMo importer.

For each family (llama, mistral, qwen2, nemotron) this writes
  tests/fixtures/nemo2/<family>_hf/   a tiny random fp32 Hugging Face model with a tokenizer
  tests/fixtures/nemo2/<family>/      that model converted by NeMo 2 (``llm.import_ckpt``)
and tests/test_import_nemo.py checks that recipes/import_nemo.py on the second gives exactly the
weights and logits that recipes/import_hf.py gives on the first.

NeMo's pins conflict with the project's (transformers 4.57, numpy < 2, megatron-core 0.15), so this runs
in a throw-away venv outside the repo, never in the project's .venv. Generated with nemo_toolkit 2.7.3
(megatron-core 0.15.3, transformers 4.57.6, lightning 2.4.0, torch 2.13.0+cpu, Python 3.11), installed as:

    python3.11 -m venv /tmp/nemo_venv
    /tmp/nemo_venv/bin/pip install torch==2.13.0+cpu                  # any CPU torch >= 2.6
    /tmp/nemo_venv/bin/pip install "nemo_toolkit[lightning]==2.7.3" "megatron_core==0.15.3" einops \
        sentencepiece rich "numpy<2" "pandas==2.2.3" "pyarrow==21.0.0" "datasets==4.4.2" \
        "huggingface_hub>=0.34,<1.0" "fsspec==2024.12.0" "nemo_run==0.11.1" "leptonai==0.27.3" \
        "nvidia-modelopt==0.37.0" "protobuf~=5.29.5"
    /tmp/nemo_venv/bin/python tools/make_nemo2_fixtures.py [--out tests/fixtures/nemo2] [FAMILY ...]

(``from nemo.collections import llm`` needs rich, pandas, datasets, nemo_run (with a leptonai that still
has ``leptonai.api.v1``) and modelopt (for ``llm.import_ckpt``); newer pyarrow/datasets want numpy 2,
which megatron-core 0.15 refuses.)

NeMo's importer runs on the CPU (its ``nemo_setup`` builds ``Trainer(accelerator="cpu")`` with a gloo
process group). Without Transformer Engine and apex it builds Megatron's local layer spec; four small
patches below (each documented) let that CPU build through and copy every tensor (NeMo's mapping
names only the TE-fused norms); the
weights keep Megatron's TE-style sharded names (``linear_qkv.layer_norm_weight``) and the context keeps
NeMo's own config values. Every file NeMo wrote is kept (no optimizer state is written by the importer);
the four families with their HF sources take about 1.2 MB.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

FAMILIES = ("llama", "mistral", "qwen2", "nemotron")
VOCAB = 128  # tiny fp32 dims keep the four families (NeMo + HF) near 1 MB in the repo
COMMON = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128,
              bos_token_id=1, eos_token_id=2, initializer_range=0.05)


def hf_config(family: str):
    import transformers as tf

    if family == "llama":  # Llama-3.1 rope scaling and tied embeddings
        return tf.LlamaConfig(**COMMON, tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=500000.0,
                              rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    if family == "mistral":
        return tf.MistralConfig(**COMMON, tie_word_embeddings=False, rope_theta=1e6, sliding_window=None)
    if family == "qwen2":  # QKV biases
        return tf.Qwen2Config(**COMMON, tie_word_embeddings=False, rope_theta=1e6, use_sliding_window=False)
    if family == "nemotron":  # LayerNorm1P with biases, squared ReLU, partial rotary
        return tf.NemotronConfig(**COMMON, tie_word_embeddings=False, partial_rotary_factor=0.5,
                                 hidden_act="relu2", norm_eps=1e-5)
    raise ValueError(family)


def make_tokenizer(path: Path) -> None:
    """A word-level tokenizer with exactly VOCAB entries (ids 0/1/2 = unk/bos/eos)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(VOCAB - 3)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(path)


def make_hf(family: str, path: Path, seed: int) -> Path:
    import transformers as tf

    shutil.rmtree(path, ignore_errors=True)
    cfg = hf_config(family)
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32)
    with torch.no_grad():  # norms and biases random too, so a mapping mix-up cannot hide
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path, safe_serialization=True)
    tf.GenerationConfig(bos_token_id=1, eos_token_id=2).save_pretrained(path)
    make_tokenizer(path)
    return path


def allow_rope_fusion_flag_without_te() -> None:
    """NeMo's Llama-3.1 and Nemotron configs set ``apply_rope_fusion=True`` and Megatron-Core refuses that
    flag when Transformer Engine's fused RoPE kernel is missing (no TE on a CPU machine). The importer
    never runs a forward pass, so a stand-in kernel that raises if called lets the config through; the
    checkpoint then records ``apply_rope_fusion: true`` exactly as NeMo writes it on a GPU machine."""
    from megatron.core.models.common.embeddings import rope_utils

    if rope_utils.fused_apply_rotary_pos_emb is None:
        def fused_apply_rotary_pos_emb(*a, **k):
            raise RuntimeError("stand-in: fused RoPE needs Transformer Engine")

        rope_utils.fused_apply_rotary_pos_emb = fused_apply_rotary_pos_emb


def build_with_torch_norms() -> None:
    """Without TE (and apex), Megatron's local spec builds its norms as ``WrappedTorchNorm``, which
    asserts that the kernel flag ``persist_layer_norm`` and ``layernorm_zero_centered_gamma`` are off
    (NeMo's Llama and Nemotron configs set the first, Nemotron the second). The importer only copies
    values into the norms (the stored weight means the same, 1 + w, with or without the flag, as in HF's
    Nemotron LayerNorm1P) and never runs them, so build the plain torch norm with both flags off; the
    config, and the saved context, keep NeMo's values."""
    import copy

    from megatron.core.transformer import torch_norm

    new = torch_norm.WrappedTorchNorm.__new__
    if getattr(new, "_cpu_norms", False):
        return

    def wrapped_new(cls, config, *a, **k):
        if config.persist_layer_norm or config.layernorm_zero_centered_gamma:
            config = copy.copy(config)
            config.persist_layer_norm = config.layernorm_zero_centered_gamma = False
        return new(cls, config, *a, **k)

    wrapped_new._cpu_norms = True
    torch_norm.WrappedTorchNorm.__new__ = staticmethod(wrapped_new)


def cpu_save() -> None:
    """Megatron-Core's filesystem writer calls ``torch.cuda.synchronize()`` before writing and all-reduces
    its status flags on ``torch.cuda.current_device()`` (gloo here): neither exists on a CPU-only torch.
    Make the synchronise a no-op, put the flags on the CPU (as the project's runtime does in CPU mode),
    and save synchronously (NeMo's default asynchronous save writes the same files)."""
    import functools

    from nemo.lightning.pytorch.strategies import megatron_strategy as ms

    if not torch.cuda.is_available():
        torch.cuda.synchronize = lambda *a, **k: None
        torch.cuda.current_device = lambda: "cpu"
    init = ms.MegatronStrategy.__init__
    if not getattr(init, "_sync_save", False):
        @functools.wraps(init)
        def sync_init(self, *a, **k):
            k["ckpt_async_save"] = False
            init(self, *a, **k)

        sync_init._sync_save = True
        ms.MegatronStrategy.__init__ = sync_init


# Transformer Engine fuses the pre-attention / pre-MLP norms into linear_qkv / linear_fc1; Megatron's
# local spec (what NeMo builds without TE) keeps them as separate modules.
_TE_TO_LOCAL = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_bias": "input_layernorm.bias",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
    "mlp.linear_fc1.layer_norm_bias": "pre_mlp_layernorm.bias",
}


def map_norms_to_local_spec() -> None:
    """NeMo's HF importers name the TE-fused norm parameters as targets; on the local spec those keys do
    not exist and NeMo would silently skip the norms ("No matches found"), leaving them at their init.
    Point those targets at the local-spec names when the target model has no TE-fused norms."""
    from nemo.lightning import io

    apply = io.apply_transforms
    if getattr(apply, "_local_norms", False):
        return

    def apply_transforms(source, target, mapping, transforms=[], *a, **k):
        keys = set(target.state_dict().keys())
        if not any(key.endswith("layer_norm_weight") for key in keys):
            new = {}
            for src, dst in mapping.items():
                for te, local in _TE_TO_LOCAL.items():
                    if dst.endswith(te):
                        dst = dst[: -len(te)] + local
                new[src] = dst
            mapping = new
        return apply(source, target, mapping, transforms, *a, **k)

    apply_transforms._local_norms = True
    io.apply_transforms = apply_transforms


def convert(family: str, hf_dir: Path, out: Path) -> None:
    """``llm.import_ckpt`` as NeMo's docs use it, with the config NeMo's own importer translates from the
    HF config.json (its ``init`` builds the model from that same ``config`` property)."""
    from nemo.collections import llm

    shutil.rmtree(out, ignore_errors=True)
    allow_rope_fusion_flag_without_te()
    cpu_save()
    map_norms_to_local_spec()
    build_with_torch_norms()
    model_cls = {"llama": llm.LlamaModel, "mistral": llm.MistralModel, "qwen2": llm.Qwen2Model,
                 "nemotron": llm.NemotronModel}[family]
    source = "hf://" + str(hf_dir.resolve())
    importer = model_cls.importer(source)
    if not hasattr(importer, "trust_remote_code"):  # Qwen2's importer sets it only inside apply()
        importer.trust_remote_code = False
    config = importer.config
    llm.import_ckpt(model=model_cls(config), source=source, output_path=out, overwrite=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "nemo2"))
    ap.add_argument("families", nargs="*", default=list(FAMILIES))
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import nemo

    for fam in args.families:
        hf_dir = make_hf(fam, out / f"{fam}_hf", seed=FAMILIES.index(fam))
        convert(fam, hf_dir, out / fam)
        size = sum(f.stat().st_size for f in (out / fam).rglob("*") if f.is_file())
        print(f"{fam}: NeMo {nemo.__version__} -> {out / fam} ({size / 1024:.0f} KiB)", flush=True)
    (out / "VERSION.json").write_text(json.dumps(
        {"nemo_toolkit": nemo.__version__, "torch": torch.__version__,
         "transformers": __import__("transformers").__version__, "python": sys.version.split()[0]}, indent=2))


if __name__ == "__main__":
    main()
