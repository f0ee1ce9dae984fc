"""Built-in tiny models and tokenizers, for the CPU main job and the tests.

Everything is built locally from configs (no hub access): a Llama-style dense
model, a GPT-OSS-style MoE model, and a byte-level BPE tokenizer trained on
text the caller provides.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch
from transformers import AutoModelForCausalLM, GptOssConfig, LlamaConfig, PretrainedConfig


def tiny_llama_config(vocab_size: int, hidden_size: int = 64, num_layers: int = 4, num_heads: int = 4,
                      num_kv_heads: int = 2, intermediate_size: int = 128, max_positions: int = 1024) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, num_key_value_heads=num_kv_heads, intermediate_size=intermediate_size,
        max_position_embeddings=max_positions, tie_word_embeddings=False, rms_norm_eps=1e-5,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )


def tiny_gpt_oss_config(vocab_size: int, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
                        num_kv_heads: int = 2, num_experts: int = 4, experts_per_token: int = 2,
                        max_positions: int = 1024, sliding_window: int = 16) -> GptOssConfig:
    """GPT-OSS geometry in miniature: MoE MLP, alternating sliding/full attention, sinks."""
    return GptOssConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        head_dim=hidden_size // num_heads, num_local_experts=num_experts, num_experts_per_tok=experts_per_token,
        max_position_embeddings=max_positions, sliding_window=sliding_window,
        layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)],
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )


def build_model(config: PretrainedConfig, seed: int = 0, dtype: torch.dtype = torch.float32,
                lm_head_scale: float = 24.0):
    """Random-initialised model from a config, deterministic in `seed`.

    Default init gives near-uniform outputs; scaling the lm_head makes an
    untrained model's distributions peaked like a trained teacher's. Use
    `lm_head_scale=1` for a model that will be trained.
    """
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(lm_head_scale)
    return model.eval()


def save_model(model, out_dir: Path, tokenizer=None) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return out_dir


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: Path | None = None):
    """Byte-level BPE trained locally; returns a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>")
    if out_dir is not None:
        fast.save_pretrained(out_dir)
    return fast
