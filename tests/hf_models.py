"""Small random Hugging Face models of every supported family (head_dim != hidden/heads)."""

from pathlib import Path

import torch

FAMILIES = ("llama", "mistral", "qwen2", "nemotron", "qwen3")
MOE_FAMILIES = ("qwen3_moe", "mixtral", "qwen2_moe")


def hf_config(family: str):
    import transformers as tf

    common = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=24, vocab_size=250, max_position_embeddings=256,
                  bos_token_id=1, eos_token_id=2)
    if family == "llama":
        return tf.LlamaConfig(
            **common, tie_word_embeddings=True, rms_norm_eps=1e-5,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
            rope_theta=500000.0)
    if family == "mistral":
        return tf.MistralConfig(**common, tie_word_embeddings=False, rope_theta=1e6, sliding_window=None)
    if family == "qwen2":
        return tf.Qwen2Config(**common, tie_word_embeddings=False, rope_theta=1e6)
    if family == "nemotron":
        return tf.NemotronConfig(**common, tie_word_embeddings=False, partial_rotary_factor=0.5)
    if family == "qwen3":
        return tf.Qwen3Config(**common, tie_word_embeddings=True, rope_theta=1e6)
    # Gemma 3: windows of 8 on three of four layers (the second global), their own RoPE base, linear scaling
    # on the global layer, a query scalar other than head_dim (as Gemma-3-27B's)
    if family == "gemma3":
        return tf.Gemma3TextConfig(
            **common, tie_word_embeddings=True, rms_norm_eps=1e-6, sliding_window=8, query_pre_attn_scalar=20,
            layer_types=["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"],
            rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                             "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})
    # Four experts, top-2. Qwen3-MoE without norm_topk_prob (softmax over all experts, top-2 not
    # renormalised); Mixtral renormalises (softmax over the top-2 logits).
    if family == "qwen3_moe":
        return tf.Qwen3MoeConfig(**common, tie_word_embeddings=False, rope_theta=1e6, num_experts=4,
                                 num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=False,
                                 router_aux_loss_coef=0.01)
    if family == "mixtral":
        return tf.MixtralConfig(**{**common, "intermediate_size": 48}, tie_word_embeddings=False,
                                rope_theta=1e6, num_local_experts=4, num_experts_per_tok=2, sliding_window=None,
                                router_aux_loss_coef=0.02)
    # Qwen2-MoE: QKV bias, a gated shared expert beside four routed experts, top-2 renormalised.
    if family == "qwen2_moe":
        return tf.Qwen2MoeConfig(**common, tie_word_embeddings=False, rope_theta=1e6, num_experts=4,
                                 num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48,
                                 norm_topk_prob=True, router_aux_loss_coef=0.01)
    # gpt-oss: four biased experts (width 32), top-2 over the top-2 logits; its clamped GLU with a limit the
    # spread weights reach; sinks; windows of 8 on every other layer; YaRN stretching an original context of 16
    # by 16 (the sequences of the tests are longer than 16)
    if family == "gpt_oss":
        return tf.GptOssConfig(**{**common, "intermediate_size": 32}, tie_word_embeddings=False, rms_norm_eps=1e-5,
                               num_local_experts=4, num_experts_per_tok=2, swiglu_limit=1.0, sliding_window=8,
                               layer_types=["sliding_attention", "full_attention"] * 2, router_aux_loss_coef=0.01,
                               rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 16.0,
                                                "original_max_position_embeddings": 16, "beta_fast": 32.0,
                                                "beta_slow": 1.0, "truncate": False})
    # Nemotron-H: Mamba-2, MLP and attention blocks "M-M*-M" (each PP=2 stage holds a Mamba layer), 8 Mamba heads of 16
    # in 2 groups, state 16, chunks of 8 (the tests' 32-token sequences span four), the step clamped at
    # time_step_min=0.01, which the random steps cross
    if family == "nemotron_h":
        shape = {k: v for k, v in common.items() if k != "num_hidden_layers"}
        return tf.NemotronHConfig(**shape, tie_word_embeddings=False, layer_norm_epsilon=1e-5,
                                  layers_block_type=["linear_attention", "mlp", "linear_attention", "full_attention",
                                                     "mlp", "linear_attention"],
                                  mamba_num_heads=8, mamba_head_dim=16, n_groups=2, ssm_state_size=16, conv_kernel=4,
                                  chunk_size=8, time_step_min=0.01, time_step_max=0.1)
    raise ValueError(family)


def make_hf_model(family: str, path: Path, seed: int = 0, std: float | None = None, **overrides) -> Path:
    """Save a random fp32 model (norms and biases randomised too) to ``path``; ``std`` overrides the
    init std of the weights, ``overrides`` other config fields."""
    import transformers as tf

    cfg = hf_config(family)
    if std is not None:
        cfg.initializer_range = std
    if overrides:  # through the constructor: fields derived from others (Qwen2's layer_types) follow them
        d = {**cfg.to_dict(), **overrides}
        if "layer_types" not in overrides:
            d.pop("layer_types", None)
        cfg = type(cfg).from_dict(d)
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(("bias", "sinks", ".D")):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path, safe_serialization=True)
    return Path(path)


def make_chat_model(path: Path, seed: int = 0) -> Path:
    """The random tiny Llama with SmolLM2-135M-Instruct's real tokenizer files and chat template (its
    vocabulary of 49152), saved as an HF directory."""
    import shutil

    import transformers as tf

    from minitron_nemo.data import assets

    cfg = hf_config("llama")
    cfg.vocab_size = 49152
    cfg.max_position_embeddings = 16384  # longer than its rope scaling's original context
    torch.manual_seed(seed)
    tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(path)
    smol = assets.smollm2_hf_dir()
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(smol / f, Path(path) / f)
    return Path(path)
