"""Compute primitives shared by the attention and the FFN."""

from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F

from . import native

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


_p, _i64 = ctypes.c_void_p, ctypes.c_int64
_RMS_NORM = native.function("inaflash_rms_norm", _p, _p, _i64, _i64, ctypes.c_float, _p, restype=None)
_ROPE = native.function("inaflash_rope", _p, _i64, _i64, _i64, _p, _p, restype=None)


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of float32 rows x [T, d] with weight w [d] (ops.c where built and w is float32: ~40x less per-call
    overhead than F.rms_norm's ~40 us on a decode step's vector)."""
    if _RMS_NORM is None or w.dtype != torch.float32 or not x.is_contiguous() or x.dtype != torch.float32:
        return F.rms_norm(x, (x.shape[-1],), w, eps)
    out = torch.empty_like(x)
    _RMS_NORM(x.data_ptr(), w.contiguous().data_ptr(), x.numel() // x.shape[-1], x.shape[-1], eps, out.data_ptr())
    return out


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding (half-split form) of x [T, heads, hd] float32 with tables cos, sin [T, hd]: in place where
    ops.c is built (x is a fresh projection), a new tensor otherwise."""
    if _ROPE is not None and x.is_contiguous() and x.dtype == torch.float32 and cos.is_contiguous() \
            and sin.is_contiguous():
        _ROPE(x.data_ptr(), x.shape[0], x.shape[1], x.shape[2], cos.data_ptr(), sin.data_ptr())
        return x
    half = x.shape[-1] // 2
    return x * cos[:, None] + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin[:, None]


def gather_rows_torch(elements: torch.Tensor, offsets: torch.Tensor, width: int) -> torch.Tensor:
    """[m, width]: row i = elements[offsets[i] : offsets[i] + width]. A sliding-window view makes this one
    index_select (~25x faster than advanced indexing with an [m, width] index)."""
    return elements[: offsets.max() + width].unfold(0, width, 1).index_select(0, offsets)


_warm = False


def warm_up() -> None:
    """Run each torch kernel a forward uses once on tiny tensors (float16/bfloat16/float32 linear, attention with
    and without a mask and with grouped heads, softmax): torch allocates its kernels' state on first use (~11 MB of
    RSS here), which would otherwise land in the model's budget on the first prompt. Once per process."""
    global _warm
    if _warm:
        return
    with torch.inference_mode():
        for T in (1, FLOAT32_FROM_TOKENS):
            x = torch.randn(T, 64)
            for dtype in (torch.float16, torch.bfloat16, torch.float32):
                F.linear(x.to(dtype), torch.randn(64, 64).to(dtype))
            q, k = torch.randn(1, 4, T, 16), torch.randn(1, 2, T + 3, 16)
            mask = torch.ones(T, T + 3, dtype=torch.bool) if T > 1 else None
            F.scaled_dot_product_attention(q, k, k, attn_mask=mask, enable_gqa=True)
            torch.softmax(x.double(), -1).argmax()
    _warm = True
