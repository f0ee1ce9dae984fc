"""The GPT-OSS-20B geometry the GPU benchmarks use, and its FLOP count.

One config.json for every benchmark: vLLM loads it with dummy weights (MXFP4
experts, as the real model ships), transformers builds it with random bf16
weights (`mxfp4=False`), and `num_layers` shrinks it to fit one card.
"""

from __future__ import annotations


def gpt_oss_config(num_layers: int = 24, mxfp4: bool = True, tiny: bool = False) -> dict:
    """openai/gpt-oss-20b's config.json with `num_layers` layers, or (`tiny`) a
    2-layer miniature without quantization for CPU smoke tests."""
    if tiny:
        num_layers, hidden, heads, kv_heads, experts, top_k, vocab, window = 2, 128, 2, 1, 4, 2, 1024, 16
        mxfp4 = False
    else:
        hidden, heads, kv_heads, experts, top_k, vocab, window = 2880, 64, 8, 32, 4, 201088, 128
    config = {
        "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss",
        "attention_bias": True, "attention_dropout": 0.0, "head_dim": 64, "hidden_act": "silu",
        "hidden_size": hidden, "intermediate_size": hidden, "initial_context_length": 4096,
        "initializer_range": 0.02,
        "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)],
        "max_position_embeddings": 131072, "num_attention_heads": heads, "num_hidden_layers": num_layers,
        "num_key_value_heads": kv_heads, "num_local_experts": experts,
        "experts_per_token": top_k, "num_experts_per_tok": top_k, "output_router_logits": False,
        "rms_norm_eps": 1e-05, "rope_theta": 150000, "router_aux_loss_coef": 0.9,
        "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0, "original_max_position_embeddings": 4096,
                         "rope_type": "yarn", "truncate": False},
        "sliding_window": window, "swiglu_limit": 7.0, "tie_word_embeddings": False, "use_cache": True,
        "vocab_size": vocab, "eos_token_id": 2 if tiny else 200002, "pad_token_id": 1 if tiny else 199999,
    }
    if mxfp4:
        config["quantization_config"] = {
            "quant_method": "mxfp4",
            "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                       "model.embed_tokens", "lm_head"],
        }
    return config


def flop_per_token(config: dict) -> tuple[float, float]:
    """(bare prefill, lm_head on every position) FLOP per token: 2 x active parameters."""
    h, head = config["hidden_size"], config["head_dim"]
    q, kv = config["num_attention_heads"] * head, config["num_key_value_heads"] * head
    attention = h * q + 2 * h * kv + q * h
    experts = config["num_experts_per_tok"] * 3 * h * config["intermediate_size"]
    router = h * config["num_local_experts"]
    body = config["num_hidden_layers"] * (attention + experts + router)
    lm_head = h * config["vocab_size"]
    return 2.0 * body, 2.0 * (body + lm_head)
