"""Export a minitron_nemo checkpoint (any TP/PP it was saved at) to a Hugging Face directory.

    python recipes/export_hf.py checkpoint=CKPT_DIR output=HF_DIR [dtype=bfloat16]

The output loads with ``transformers.AutoModelForCausalLM.from_pretrained``; ``head_dim`` is written
explicitly, so pruned models whose head_dim differs from hidden/heads convert too.
"""

from minitron_nemo import outputs, runtime, schemas
from minitron_nemo.checkpoint import export, store
from minitron_nemo.config import compose, dtype
from minitron_nemo.entry import user_errors_exit


@user_errors_exit
def main():
    cfg = compose("export_hf", schema=schemas.ExportHFJob)
    store.load_model_config(cfg.checkpoint)  # a checkpoint, readable
    outputs.claim_dir(cfg.output, sources={"checkpoint": cfg.checkpoint}, overwrite=cfg.overwrite)
    out = export.export_hf(cfg.checkpoint, cfg.output, dtype(cfg.dtype))
    runtime.print0(f"exported {cfg.checkpoint} -> {out}")


if __name__ == "__main__":
    main()
