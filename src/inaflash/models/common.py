"""Pieces both architectures share: the KV cache and causal attention over it."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class KVCache:
    """Preallocated keys/values for `max_seq` positions of every layer (float32)."""

    def __init__(self, num_layers: int, max_seq: int, kv_heads: int, head_dim: int):
        self.max_seq = max_seq
        self.k = torch.zeros(num_layers, max_seq, kv_heads, head_dim)
        self.v = torch.zeros(num_layers, max_seq, kv_heads, head_dim)

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    def update(self, layer: int, pos: int, k: torch.Tensor, v: torch.Tensor):
        """Store k, v [T, kv_heads, head_dim] at positions pos..pos+T; return all keys/values up to there."""
        end = pos + k.shape[0]
        self.k[layer, pos:end] = k
        self.v[layer, pos:end] = v
        return self.k[layer, :end], self.v[layer, :end]


def token_spans(segments: list) -> list[tuple[int, int]]:
    """Where each sequence's tokens lie among a batch's concatenated tokens: segments [(ids, pos, cache)]."""
    spans, at = [], 0
    for ids, _, _ in segments:
        spans.append((at, at + ids.shape[0]))
        at += ids.shape[0]
    return spans


def last_of_each(x: torch.Tensor, spans: list[tuple[int, int]]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Each sequence's last row of x, and the spans of those rows (a prompt's pass needs only its last logits)."""
    return x[torch.tensor([b - 1 for _, b in spans])], [(j, j + 1) for j in range(len(spans))]


# A pass of up to this many tokens (speculation's verification: 1 + MAX_DRAFT) attends token by token, each as a
# one-token pass would: torch's masked attention for several queries sums in another order than its one-query path
# (~3e-7 apart), and over 28 layers that moved greedy tokens of a verified draft away from plain decoding's. Costs
# ~60 us per token and layer (Qwen2.5-1.5B, 9 tokens: ~15 ms a pass); prompts keep the masked kernel.
PER_TOKEN_ATTENTION = 16


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: int) -> torch.Tensor:
    """q [T, H, hd] at positions pos.., k/v [S, KVH, hd] for positions 0..S-1 -> [T, H * hd], causal."""
    T, H, hd = q.shape
    if 1 < T <= PER_TOKEN_ATTENTION:
        return torch.cat([attend(q[i:i + 1], k[:pos + i + 1], v[:pos + i + 1], pos + i) for i in range(T)])
    mask = None
    if T > 1:  # query i (at pos + i) sees keys 0..pos + i
        mask = torch.arange(k.shape[0])[None, :] <= (pos + torch.arange(T))[:, None]
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
        attn_mask=mask, enable_gqa=k.shape[1] != H,
    )
    return out[0].transpose(0, 1).reshape(T, H * hd)
