"""Tiny random transformers models, saved as safetensors, for exact checks against transformers."""

from __future__ import annotations

import torch


def tiny_config(kind: str, **overrides):
    from transformers import LlamaConfig, OPTConfig, Qwen2Config

    if kind == "llama":  # GQA, tied embeddings
        return LlamaConfig(**{**dict(vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                     rope_theta=10000.0, tie_word_embeddings=True), **overrides})
    if kind == "qwen2":  # q/k/v biases, untied head
        return Qwen2Config(vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                           tie_word_embeddings=False)
    if kind in ("opt", "opt-postnorm"):
        return OPTConfig(vocab_size=96, hidden_size=64, ffn_dim=160, num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=64, word_embed_proj_dim=64,
                         do_layer_norm_before=(kind == "opt"))
    raise ValueError(kind)


def make_tiny(kind: str, path, seed: int = 0, **overrides):
    """Build, randomise (biases and norms too, so they are exercised) and save a tiny model; return it.
    `overrides`: config fields (Llama only), e.g. num_hidden_layers."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(kind, **overrides), attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
            elif "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0, 0.1)
    model.save_pretrained(path, safe_serialization=True)
    return model
