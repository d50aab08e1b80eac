"""OPT forward: learned positions, LayerNorm (pre- or post-norm), biased attention, ReLU FFN from `ffn`."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import ModelConfig
from ..ops import linear
from .common import KVCache, attend, last_of_each, token_spans

POSITION_OFFSET = 2  # OPT's learned position table starts at index 2 (a fairseq legacy)


class OPT:
    def __init__(self, cfg: ModelConfig, w: dict[str, torch.Tensor], ffn):
        self.cfg, self.ffn = cfg, ffn
        p = "model.decoder."
        self.embed = w[p + "embed_tokens.weight"]
        self.positions = w[p + "embed_positions.weight"]
        self.head = w.get("lm_head.weight", self.embed)
        self.final_ln = (w[p + "final_layer_norm.weight"], w[p + "final_layer_norm.bias"]) if cfg.pre_norm else None
        self.layers = []
        for i in range(cfg.num_layers):
            lp = f"{p}layers.{i}."
            a = lp + "self_attn."
            self.layers.append({
                "ln1": (w[lp + "self_attn_layer_norm.weight"], w[lp + "self_attn_layer_norm.bias"]),
                "ln2": (w[lp + "final_layer_norm.weight"], w[lp + "final_layer_norm.bias"]),
                **{f"{n}": w[f"{a}{n}_proj.weight"] for n in ("q", "k", "v")},
                **{f"{n}b": w[f"{a}{n}_proj.bias"] for n in ("q", "k", "v")},
                "o": w[a + "out_proj.weight"], "ob": w[a + "out_proj.bias"],
                "fc2b": w[lp + "fc2.bias"],  # the rest of the FFN lives in the flash store
            })
        self.cache = None

    def setup_caches(self, max_seq: int) -> None:
        """A fresh KV cache (the model's own) for `max_seq` positions (positions are learned: no tables to make)."""
        self.cache = None  # the old cache is freed before the new one is allocated
        self.cache = self.new_cache(max_seq)

    def new_cache(self, max_seq: int) -> KVCache:
        return KVCache(self.cfg.num_layers, max_seq, self.cfg.num_heads, self.cfg.head_dim)

    def forward(self, ids: torch.Tensor, pos: int, last_only: bool = False, cache: KVCache | None = None):
        return self.forward_batch([(ids, pos, cache)], last_only)[0]

    def forward_batch(self, segments: list, last_only: bool = False) -> list[torch.Tensor]:
        """As Llama.forward_batch: one pass for several sequences, each attending over its own KV cache."""
        cfg = self.cfg
        H, hd, d, eps = cfg.num_heads, cfg.head_dim, cfg.hidden_size, cfg.norm_eps

        def ln(t, wb):
            return F.layer_norm(t, (d,), wb[0], wb[1], eps)

        spans = token_spans(segments)
        x = self.embed[torch.cat([ids for ids, _, _ in segments])].float() + torch.cat(
            [self.positions[pos + POSITION_OFFSET:pos + POSITION_OFFSET + ids.shape[0]] for ids, pos, _ in segments]
        ).float()
        self.ffn.begin_forward()
        for i, L in enumerate(self.layers):
            h = ln(x, L["ln1"]) if cfg.pre_norm else x
            q, k, v = linear(h, L["q"], L["qb"]), linear(h, L["k"], L["kb"]), linear(h, L["v"], L["vb"])
            out = []
            for (_, pos, cache), (a, b) in zip(segments, spans):
                T = b - a
                k_all, v_all = (cache or self.cache).update(i, pos, k[a:b].view(T, H, hd), v[a:b].view(T, H, hd))
                out.append(attend(q[a:b].view(T, H, hd), k_all, v_all, pos))
            x = x + linear(out[0] if len(out) == 1 else torch.cat(out), L["o"], L["ob"])
            if not cfg.pre_norm:
                x = ln(x, L["ln1"])
            h = ln(x, L["ln2"]) if cfg.pre_norm else x
            x = x + self.ffn(i, h) + L["fc2b"]
            if not cfg.pre_norm:
                x = ln(x, L["ln2"])
        if last_only:
            x, spans = last_of_each(x, spans)
        if self.final_ln is not None:
            x = ln(x, self.final_ln)
        logits = linear(x, self.head)
        return [logits[a:b] for a, b in spans]
