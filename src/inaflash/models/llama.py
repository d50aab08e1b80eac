"""Llama family forward (Llama, SmolLM2, Mistral, Qwen2): RMSNorm, RoPE, GQA attention, SwiGLU FFN from `ffn`."""

from __future__ import annotations

import torch

from ..config import ModelConfig
from ..ops import linear, rms_norm, rope
from .common import KVCache, attend


class Llama:
    def __init__(self, cfg: ModelConfig, w: dict[str, torch.Tensor], ffn):
        self.cfg, self.ffn = cfg, ffn
        self.embed = w["model.embed_tokens.weight"]
        self.head = w.get("lm_head.weight", self.embed)  # tied embeddings share the matrix
        self.norm = w["model.norm.weight"]
        self.layers = []
        for i in range(cfg.num_layers):
            p = f"model.layers.{i}."
            a = p + "self_attn."
            self.layers.append({
                "ln1": w[p + "input_layernorm.weight"], "ln2": w[p + "post_attention_layernorm.weight"],
                "q": w[a + "q_proj.weight"], "k": w[a + "k_proj.weight"], "v": w[a + "v_proj.weight"],
                "o": w[a + "o_proj.weight"],
                # Qwen2 has q/k/v biases; others have none (None is skipped by linear)
                "qb": w.get(a + "q_proj.bias"), "kb": w.get(a + "k_proj.bias"), "vb": w.get(a + "v_proj.bias"),
                "ob": w.get(a + "o_proj.bias"),
            })
        self.cache = self.cos = self.sin = None

    def setup_caches(self, max_seq: int) -> None:
        """A fresh KV cache and RoPE tables for `max_seq` positions."""
        cfg, hd = self.cfg, self.cfg.head_dim
        self.cache = None  # the old cache is freed before the new one is allocated
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
        freqs = torch.outer(torch.arange(max_seq).float(), inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        self.cos, self.sin = emb.cos(), emb.sin()
        self.cache = KVCache(cfg.num_layers, max_seq, cfg.num_kv_heads, hd)

    def _rope(self, x: torch.Tensor, pos: int) -> torch.Tensor:
        return rope(x, self.cos[pos:pos + x.shape[0]], self.sin[pos:pos + x.shape[0]])

    def forward(self, ids: torch.Tensor, pos: int, last_only: bool = False) -> torch.Tensor:
        """Logits [T, vocab] (float32) for token ids [T] at positions pos..pos+T-1, filling the KV cache."""
        cfg, T = self.cfg, ids.shape[0]
        H, KVH, hd, eps = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.norm_eps
        x = self.embed[ids].float()
        self.ffn.begin_forward()
        for i, L in enumerate(self.layers):
            h = rms_norm(x, L["ln1"], eps)
            q = self._rope(linear(h, L["q"], L["qb"]).view(T, H, hd), pos)
            k = self._rope(linear(h, L["k"], L["kb"]).view(T, KVH, hd), pos)
            v = linear(h, L["v"], L["vb"]).view(T, KVH, hd)
            k_all, v_all = self.cache.update(i, pos, k, v)
            x = x + linear(attend(q, k_all, v_all, pos), L["o"], L["ob"])
            x = x + self.ffn(i, rms_norm(x, L["ln2"], eps))
        if last_only:
            x = x[-1:]
        return linear(rms_norm(x, self.norm, eps), self.head)
