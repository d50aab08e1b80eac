"""Compute primitives shared by the attention and the FFN."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Decode (a few tokens) is memory-bound: float16/bfloat16 weights multiply as they are, ~2.3x faster than float32 for
# large matrices on the reference machine (2 cores, torch 2.13; converting to float32 per token is ~20x slower).
# Prefill of many tokens is compute-bound and float32 GEMM is ~3x faster, so the weight block is converted once per
# call from this many tokens on.
FLOAT32_FROM_TOKENS = 16

ACTIVATIONS = {
    "silu": F.silu,
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


def linear(x: torch.Tensor, w, b: torch.Tensor | None = None) -> torch.Tensor:
    """float32 x [T, in] @ w[out, in].T (+ b), w in its stored dtype (or a quant.Int8Matrix); the result is float32."""
    if not isinstance(w, torch.Tensor):
        y = w.linear(x)
        return y if b is None else y + b
    if w.dtype != torch.float32 and x.shape[0] >= FLOAT32_FROM_TOKENS:
        w = w.float()
    y = F.linear(x.to(w.dtype), w)
    y = y.float() if y.dtype != torch.float32 else y
    return y if b is None else y + b


def gather_rows_torch(elements: torch.Tensor, offsets: torch.Tensor, width: int) -> torch.Tensor:
    """[m, width]: row i = elements[offsets[i] : offsets[i] + width]. A sliding-window view makes this one
    index_select (~25x faster than advanced indexing with an [m, width] index)."""
    return elements[: offsets.max() + width].unfold(0, width, 1).index_select(0, offsets)
