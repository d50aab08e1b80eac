"""Llama family forward (Llama, SmolLM2, Mistral, Qwen2): RMSNorm, RoPE, GQA attention, SwiGLU FFN from `ffn`."""

from __future__ import annotations

import torch

from ..config import ModelConfig
from ..ops import linear, rms_norm, rope
from .common import KVCache, attend, last_of_each, token_spans


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
        """A fresh KV cache (the model's own, for forward() without one) and RoPE tables for `max_seq` positions."""
        self.cache = None  # the old cache is freed before the new one is allocated
        self.cache = self.new_cache(max_seq)

    def new_cache(self, max_seq: int) -> KVCache:
        """A KV cache of one more sequence (batched decoding: each sequence has its own); RoPE tables grow to fit."""
        cfg, hd = self.cfg, self.cfg.head_dim
        if self.cos is None or self.cos.shape[0] < max_seq:
            inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
            freqs = torch.outer(torch.arange(max_seq).float(), inv_freq)
            emb = torch.cat([freqs, freqs], dim=-1)
            self.cos, self.sin = emb.cos(), emb.sin()
        return KVCache(cfg.num_layers, max_seq, cfg.num_kv_heads, hd)

    def _rope(self, x: torch.Tensor, pos: int) -> torch.Tensor:
        return rope(x, self.cos[pos:pos + x.shape[0]], self.sin[pos:pos + x.shape[0]])

    def forward(self, ids: torch.Tensor, pos: int, last_only: bool = False, cache: KVCache | None = None):
        """Logits [T, vocab] (float32) for token ids [T] at positions pos..pos+T-1, filling the KV cache."""
        return self.forward_batch([(ids, pos, cache)], last_only)[0]

    def forward_batch(self, segments: list, last_only: bool = False) -> list[torch.Tensor]:
        """One pass over the weights for several sequences: segments [(ids [T_i], pos_i, cache_i or None for the
        model's own)] -> logits [T_i, vocab] each. Every matrix (and the FFN, read once under a budget) takes all
        tokens together; attention is each sequence's own, over its own KV cache."""
        cfg = self.cfg
        H, KVH, hd, eps = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.norm_eps
        spans = token_spans(segments)
        x = self.embed[torch.cat([ids for ids, _, _ in segments])].float()
        self.ffn.begin_forward()
        for i, L in enumerate(self.layers):
            h = rms_norm(x, L["ln1"], eps)
            q, k, v = linear(h, L["q"], L["qb"]), linear(h, L["k"], L["kb"]), linear(h, L["v"], L["vb"])
            out = []
            for (_, pos, cache), (a, b) in zip(segments, spans):
                T = b - a
                k_all, v_all = (cache or self.cache).update(i, pos, self._rope(k[a:b].view(T, KVH, hd), pos),
                                                            v[a:b].view(T, KVH, hd))
                out.append(attend(self._rope(q[a:b].view(T, H, hd), pos), k_all, v_all, pos))
            x = x + linear(out[0] if len(out) == 1 else torch.cat(out), L["o"], L["ob"])
            x = x + self.ffn(i, rms_norm(x, L["ln2"], eps))
        if last_only:
            x, spans = last_of_each(x, spans)
        logits = linear(rms_norm(x, self.norm, eps), self.head)
        return [logits[a:b] for a, b in spans]
