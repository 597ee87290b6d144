"""Import a NeMo 2 checkpoint into a self-describing Megatron-Core checkpoint.

    python recipes/import_nemo.py source=NEMO2_DIR output=CKPT_DIR
    torchrun --nproc_per_node=2 recipes/import_nemo.py source=NEMO2_DIR output=CKPT_DIR \
        parallel.tensor_model_parallel_size=2

NEMO2_DIR is what NeMo 2 writes (``llm.import_ckpt``, a training run's checkpoint): ``context/``
(``model.yaml``, ``nemo_tokenizer/``) and ``weights/`` (a torch_dist checkpoint with every decoder layer
stacked into one ``[L, ...]`` tensor). Supports NeMo's LlamaModel, MistralModel, Qwen2Model and
NemotronModel; the result is the same checkpoint recipes/import_hf.py makes from the same model on
Hugging Face. Each rank reads only the layers of its own pipeline stage, so any TP x PP works.
"""

import shutil
from pathlib import Path

from minitron_nemo import outputs, runtime, schemas
from minitron_nemo.checkpoint import nemo2
from minitron_nemo.checkpoint import store
from minitron_nemo.config import compose, dtype
from minitron_nemo.entry import user_errors_exit
from minitron_nemo.errors import UserError
from minitron_nemo.models.builder import build_model


def tokenizer_source(cfg, src: Path) -> Path:
    """The tokenizer files to copy: ``tokenizer=HF_DIR`` when given, else the checkpoint's own under context/;
    none is one line (every later recipe needs the tokenizer)."""
    files = ("tokenizer.json", "tokenizer.model", "vocab.json")
    if cfg.tokenizer:
        t = Path(cfg.tokenizer)
        if not any((t / f).is_file() for f in files):
            raise UserError(f"tokenizer={t} holds no tokenizer files ({', '.join(files)}); allowed: a Hugging Face "
                            f"tokenizer or model directory")
        return t
    tok = nemo2.tokenizer_dir(src)
    if tok is None:
        raise UserError(f"source={src} has no tokenizer files under context/ ({', '.join(files)}); allowed: a NeMo 2 "
                        f"checkpoint with its tokenizer, or pass tokenizer=HF_DIR (the model's Hugging Face tokenizer)")
    return tok


@user_errors_exit
def main():
    cfg = compose("import_nemo", schema=schemas.ImportNemoJob)
    src = nemo2.check_nemo2_dir(cfg.source)
    doc = nemo2.read_model_yaml(src)
    nemo2.family_of(doc)  # unsupported model class: fail before reading any weights
    weights = nemo2.Nemo2Weights(src)  # fail early on unreadable weights
    mc = nemo2.model_config_from_nemo(src, doc, weights)
    nemo2.check_tensors(mc, weights)  # weights vs context/model.yaml, both ways
    tok = tokenizer_source(cfg, src)
    par = cfg.parallel
    mc.check_layout(par)
    params_dtype = dtype(cfg.dtype)
    outputs.claim_dir(cfg.output, sources={"source": src}, overwrite=cfg.overwrite)
    runtime.init_parallel(par, cfg.seed)
    model = build_model(mc, params_dtype=params_dtype)
    nemo2.load_nemo2_into_model(model, src, mc, weights)
    gen = src / "context" / "artifacts" / "generation_config.json"

    def add_generation_config(tmp: Path) -> None:  # part of the output (listed in its manifest)
        if gen.is_file() and tok is not None:
            shutil.copy2(gen, tmp / "tokenizer" / gen.name)

    store.save_checkpoint(model, cfg.output, mc, tokenizer_src=tok, before_commit=add_generation_config,
                          meta={"source": str(src.resolve()), "source_format": "nemo2",
                                "dtype": cfg.dtype, "hf_token_ids": nemo2.token_ids(src)})
    runtime.print0(f"imported {src} (NeMo 2 {mc.family}, {mc.num_layers} layers, hidden {mc.hidden_size}) "
                   f"-> {cfg.output}")
    runtime.shutdown()


if __name__ == "__main__":
    main()
