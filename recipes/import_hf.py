"""Import a Hugging Face model into a self-describing Megatron-Core checkpoint.

    python recipes/import_hf.py source=HF_DIR output=CKPT_DIR
    torchrun --nproc_per_node=2 recipes/import_hf.py source=HF_DIR output=CKPT_DIR \
        parallel.tensor_model_parallel_size=2

Supports LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM and NemotronForCausalLM. Each rank
reads only the tensors of its own shard (lazy safetensors), so any TP x PP works.
"""

from pathlib import Path

from minitron_nemo import outputs, runtime, schemas
from minitron_nemo.checkpoint import hf as hfconv
from minitron_nemo.checkpoint import store
from minitron_nemo.config import compose, dtype
from minitron_nemo.entry import user_errors_exit
from minitron_nemo.errors import UserError
from minitron_nemo.models.builder import build_model


@user_errors_exit
def main():
    cfg = compose("import_hf", schema=schemas.ImportHFJob)
    src = Path(cfg.source)
    if not src.is_dir():
        raise UserError(f"source={cfg.source} does not exist; allowed: a Hugging Face model directory")
    hf_cfg = hfconv.read_hf_config(src)
    mc = hfconv.hf_model_config(src)
    par = cfg.parallel
    mc.check_layout(par)
    params_dtype = dtype(cfg.dtype)
    hfconv.check_hf_tensors(mc, store.HFWeights(src).names(), src)  # complete weights, as config.json says
    outputs.claim_dir(cfg.output, sources={"source": src}, overwrite=cfg.overwrite)
    runtime.init_parallel(par, cfg.seed)
    model = build_model(mc, params_dtype=params_dtype)
    store.load_hf_into_model(model, src, mc)
    store.save_checkpoint(model, cfg.output, mc, tokenizer_src=src,
                          meta={"source": str(src.resolve()), "dtype": cfg.dtype,
                                "hf_token_ids": hfconv.token_ids(hf_cfg)})
    runtime.print0(f"imported {src} ({mc.family}, {mc.num_layers} layers, hidden {mc.hidden_size}) "
                   f"-> {cfg.output}")
    runtime.shutdown()


if __name__ == "__main__":
    main()
