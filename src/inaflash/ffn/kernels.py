"""The native FFN kernel (kernels.c): the FFN computed from neuron bundles as stored, compressed or not.

Built by `pip install -e .` (setup.py; -O3 -march=native -fopenmp) into inaflash/_kernels*.so (loaded by native.py)
and called through ctypes (which releases the GIL, so the I/O threads keep reading meanwhile). Where it was not built
(no compiler, a CPU without AVX2/FMA/F16C) or INAFLASH_KERNEL=torch is set, `available()` is False and the FFN
providers decode bundles and multiply with torch instead (several times slower; see docs/measurements.md).
"""

from __future__ import annotations

import ctypes
import os
import warnings

import numpy as np
import torch

from .. import native
from ..store.quant import PALETTE_BITS, PALETTE_LEVELS, book_levels, kernel_layout
from ..ops import gather_rows_torch

FIELD_SLOTS = {"gate": 0, "fc1": 0, "up": 1, "down": 2, "fc2": 2, "fc1_bias": 3}
ACTS = {"silu": 0, "relu": 1}


class _Layout(ctypes.Structure):
    _fields_ = [("fmt", ctypes.c_int32), ("d", ctypes.c_int32), ("gated", ctypes.c_int32), ("act", ctypes.c_int32),
                ("row_bytes", ctypes.c_int64), ("code_off", ctypes.c_int64 * 4), ("group_base", ctypes.c_int32 * 4),
                ("group", ctypes.c_int32 * 4), ("scale_off", ctypes.c_int64), ("min_off", ctypes.c_int64),
                ("qx", ctypes.c_int32), ("lut", (ctypes.c_uint8 * 16) * 4), ("level", ctypes.c_float)]


# int8/int4 bundles: gate/up dot products against activations quantized to int8 per weight group (llama.cpp's Q8
# activations; integer multiply-adds). INAFLASH_KERNEL=exact keeps float activations: exact to float32 rounding,
# 36% slower on Qwen2.5's int4 store (docs/measurements.md).
QUANTIZED_ACTIVATIONS = os.environ.get("INAFLASH_KERNEL", "").lower() != "exact"


def _typed(lib):
    """The library with the FFN entry points' signatures declared (None stays None)."""
    if lib is None:
        return None
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.inaflash_bundle_ffn.argtypes = [ctypes.POINTER(_Layout), p, p, i64, p, i64, p, p, p, ctypes.c_int, p, i64]
    lib.inaflash_bundle_ffn.restype = ctypes.c_int
    lib.inaflash_decode_rows.argtypes = [ctypes.POINTER(_Layout), p, p, i64, p, i64, ctypes.c_int]
    lib.inaflash_decode_rows.restype = ctypes.c_int
    lib.inaflash_gather_rows.argtypes = [p, i64, p, p, i64, i64]
    lib.inaflash_move_rows.argtypes = [p, i64, p, p, i64]
    return lib


LIB = _typed(native.LIB)


def available() -> bool:
    return LIB is not None


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


class BundleFFN:
    """The FFN over bundle rows in one format: `(x, rows, offsets=None, mask=None) -> [T, hidden] float32`.

    rows: a uint8 tensor holding bundles `row_bytes` apart (a cache's live block, a whole layer read from flash),
    or the staging buffer of a read with `offsets` (int64 byte offset of each bundle in it: no gather needed).
    Palettes: `books` [layer]{field: float16 codebook} (each layer's levels go to the kernel with its rows; books
    off quant's grid, from stores written before it, leave the kernel out: ok is False)."""

    def __init__(self, fmt: str, fields: dict[str, tuple[int, int]], dtype: torch.dtype, row_bytes: int,
                 hidden_size: int, act: str, quantized_activations: bool | None = None,
                 books: list[dict[str, torch.Tensor]] | None = None):
        layout = kernel_layout(fmt, fields, dtype)
        self.ok = LIB is not None and layout is not None and act in ACTS and (fmt not in PALETTE_BITS or bool(books))
        if not self.ok:
            return
        L = _Layout(fmt=layout["fmt"], d=hidden_size, gated=int("gate" in fields), act=ACTS[act], row_bytes=row_bytes,
                    scale_off=layout["scale_off"], min_off=layout["min_off"], level=1.0,
                    qx=int(QUANTIZED_ACTIVATIONS if quantized_activations is None else quantized_activations))
        for name, slot in FIELD_SLOTS.items():
            if name in fields:
                L.code_off[slot] = layout["code_off"][name]
                L.group_base[slot] = layout["group_base"][name]
                L.group[slot] = layout["group"][name]
        if not L.gated:
            L.code_off[1], L.group_base[1], L.group[1] = L.code_off[0], L.group_base[0], L.group[0]
        self.layout, self.hidden_size, self.row_bytes = L, hidden_size, row_bytes
        self._ref = ctypes.byref(L)
        self._refs = None  # palettes: one layout per layer, with that layer's levels
        if fmt in PALETTE_BITS:
            self._layers = []
            for book in books:
                Li = _Layout.from_buffer_copy(L)
                Li.level = 1.0 / PALETTE_LEVELS
                for name, slot in FIELD_SLOTS.items():
                    if name in fields:
                        levels = book_levels(book[name])
                        if levels is None:
                            self.ok = False
                            return
                        Li.lut[slot][:] = levels
                self._layers.append(Li)
            self._refs = [ctypes.byref(Li) for Li in self._layers]
            self._ref = self._refs[0]
        # the kernel refuses layouts it cannot compute (groups not whole vectors of 8, not dividing the width, too
        # many): ask it once, with no rows
        probe = torch.zeros(1, hidden_size)
        if LIB.inaflash_bundle_ffn(self._ref, None, None, 0, _ptr(probe), 1, None, _ptr(probe), None, 1, None, 0):
            self.ok = False

    def __call__(self, x: torch.Tensor, rows: torch.Tensor, m: int, offsets: torch.Tensor | None = None,
                 mask: torch.Tensor | None = None, hidden: torch.Tensor | None = None,
                 crcs: np.ndarray | None = None, layer: int = 0) -> torch.Tensor:
        """crcs (uint32, evenly spaced rows only): filled with the CRC-32C of each 4096-byte page from rows' start,
        hashed by the threads right after computing on those bytes. `layer`: whose codebooks (palettes)."""
        x = x.float().contiguous()
        T = x.shape[0]
        out = torch.zeros(T, self.hidden_size)
        if mask is not None:
            mask = mask.float().contiguous()
        if offsets is not None:
            offsets = offsets.contiguous()
        ref = self._ref if self._refs is None else self._refs[layer]
        rc = LIB.inaflash_bundle_ffn(ref, _ptr(rows), _ptr(offsets), m, _ptr(x), T, _ptr(mask), _ptr(out),
                                     _ptr(hidden), torch.get_num_threads(),
                                     None if crcs is None else crcs.ctypes.data, 0 if crcs is None else crcs.size)
        if rc != 0:
            raise RuntimeError(f"native FFN kernel failed ({rc})")
        return out

    @property
    def decodes(self) -> bool:
        """Whether decode() serves this format (palettes decode through torch)."""
        return self.ok and self._refs is None

    def decode(self, rows: torch.Tensor, m: int, width: int, offsets: torch.Tensor | None = None) -> torch.Tensor:
        """The m bundles as float32 rows [m, width] (the layout's fields in bundle order)."""
        out = torch.empty(m, width)
        if offsets is not None:
            offsets = offsets.contiguous()
        if LIB.inaflash_decode_rows(self._ref, _ptr(rows), _ptr(offsets), m, _ptr(out), width,
                                    torch.get_num_threads()) != 0:
            raise RuntimeError("native decode failed")
        return out


def gather_rows(dst: torch.Tensor, src: torch.Tensor, offsets: torch.Tensor, row_bytes: int) -> None:
    """dst's first len(offsets) rows (uint8 [*, stride]) = the row_bytes at each byte offset of src."""
    offsets = offsets.contiguous()
    if LIB is not None:
        LIB.inaflash_gather_rows(dst.data_ptr(), dst.stride(0), src.data_ptr(), offsets.data_ptr(), offsets.numel(),
                                 row_bytes)
        return
    dst[: offsets.numel(), :row_bytes] = gather_rows_torch(src, offsets, row_bytes)


def move_rows(rows: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
    """rows[dst[i]] = rows[src[i]] for a uint8 [slots, bytes] tensor (the slots never overlap)."""
    if LIB is not None:
        LIB.inaflash_move_rows(rows.data_ptr(), rows.stride(0), src.contiguous().data_ptr(),
                               dst.contiguous().data_ptr(), src.numel())
        return
    raw = rows.view(torch.int64) if rows.shape[1] % 8 == 0 else rows
    raw.index_copy_(0, dst, raw.index_select(0, src))


def warn_if_missing() -> None:
    """Say once per engine when the FFN falls back to torch without having been asked to."""
    if LIB is None and os.environ.get("INAFLASH_KERNEL", "").lower() != "torch":
        warnings.warn("inaflash's native FFN kernel is not in use (not built: no compiler at install; or this CPU "
                      "lacks AVX2/FMA/F16C/BMI2): computing with torch, several times slower; reinstall with  "
                      "pip install -e .  where gcc is present",
                      RuntimeWarning, stacklevel=3)
