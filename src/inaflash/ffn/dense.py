"""The feed-forward block, and where its weights come from (DRAM or a read from flash per token).

Every provider holds and computes neuron *bundles as stored* (store/format.py: row i = [gate_i | up_i | down[:, i]],
float or compressed): `BundleMath` multiplies them in place with the native kernel (kernels.c), so no weight is
decoded into float, transposed or copied on the per-token path, and a cached neuron costs its flash size in DRAM.
Without the kernel (not built, OPT or off-grid palettes, an activation it lacks) BundleMath decodes the rows and uses torch:
the down projection then has to be [hidden, neurons] (float16 `F.linear(a, W)` runs 25-45x faster on this CPU than
`a @ D` with D [neurons, hidden]: 1.9 ms vs 53-94 ms at 8960 x 1536), so down columns are transposed per call.
"""

from __future__ import annotations

import numpy as np
import torch

from .kernels import BundleFFN
from ..ops import ACTIVATIONS, gather_rows_torch, linear
from ..reader import FlashReader, aligned_buffer
from ..store import checksum
from ..store.format import FlashStore

DOWN = {"llama": "down", "opt": "fc2"}
TRANSPOSE_TILE = 256  # tiled transposes run ~3x faster than one strided copy_ for large layers
# From this many tokens the rows are decoded once to float32 and multiplied by torch's GEMM; below it the kernel
# computes on the bundles as stored. Measured on a Qwen2.5-1.5B layer (2 threads): decoding costs ~125 ms, then the
# GEMM ~0.5-0.75 ms per token, where the kernel takes ~0.7 (int4), ~0.8 (int8) and ~1.15 ms (float16) per token at
# 128 tokens: the kernel is as fast or faster up to ~300 tokens for float16 and at any length for int4, and needs no
# float32 copy of the layer (165 MB for this one). So prompts (planner.PREFILL_CHUNK = 256 tokens a pass) always
# take the kernel. (At 64, before: 128 tokens took 212 vs 137 ms per int4 layer, 89 ms since the multi-token path.)
GEMM_FROM_TOKENS = 512


class FFNMath:
    """FFN(x) from compute-layout weights: {"gate", "up": [n, d] (or "gate_up": [2n, d], rows interleaved),
    "down": [d, n]} (SwiGLU) or {"fc1": [n, d], "fc1_bias": [n], "fc2": [d, n]} (OPT; fc2's bias is resident and
    added by the model). Split in two so sparse modes can mask the hidden activations in between."""

    def __init__(self, store: FlashStore):
        self.family = store.config.family
        self.act = ACTIVATIONS[store.config.hidden_act]
        self.down = DOWN[self.family]

    def hidden(self, x: torch.Tensor, w: dict[str, torch.Tensor]) -> torch.Tensor:
        """[T, n] neuron activations: act(gate x) * (up x), or relu(fc1 x + b)."""
        if self.family == "opt":
            return self.act(linear(x, w["fc1"], w["fc1_bias"]))
        if "gate_up" in w:
            y = linear(x, w["gate_up"]).view(x.shape[0], -1, 2)
            return self.act(y[..., 0]) * y[..., 1]
        return self.act(linear(x, w["gate"])) * linear(x, w["up"])

    def output(self, h: torch.Tensor, w: dict[str, torch.Tensor]) -> torch.Tensor:
        return linear(h, w[self.down])

    def __call__(self, x: torch.Tensor, w: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.output(self.hidden(x, w), w)


def bundle_rows(store: FlashStore, bundles: torch.Tensor) -> dict[str, torch.Tensor]:
    """Views of bundle rows [m, width]: each field as [m, field width] (down still as neuron rows)."""
    views = {name: bundles[:, a:b] for name, (a, b) in store.fields.items()}
    if "fc1_bias" in views:
        views["fc1_bias"] = views["fc1_bias"].squeeze(1).float()
    return views


def bundle_views(store: FlashStore, buf: torch.Tensor, layer: int) -> dict[str, torch.Tensor]:
    """bundle_rows of a whole layer read into `buf` (uint8), from either layout, dequantized if compressed."""
    return bundle_rows(store, store.decode(store.layer_rows(buf), layer))


def transpose_into(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """dst[:, i] = src[i, :], tile by tile."""
    for i in range(0, src.shape[0], TRANSPOSE_TILE):
        dst[:, i:i + TRANSPOSE_TILE].copy_(src[i:i + TRANSPOSE_TILE].T)
    return dst


def compute_layout(store: FlashStore, bundles: torch.Tensor) -> dict[str, torch.Tensor]:
    """FFNMath's weights from float bundle rows [m, width]: down transposed to [hidden, m]."""
    w = bundle_rows(store, bundles)
    down = DOWN[store.config.family]
    w[down] = transpose_into(torch.empty(w[down].shape[1], w[down].shape[0], dtype=bundles.dtype), w[down])
    return w


class BundleMath:
    """The FFN over bundles in one format (the store's, or `fmt` for an int8 cache of a float store):
    `(x, rows, m, offsets=None, mask=None) -> [T, hidden]` float32, rows = a uint8 tensor with bundles `row_bytes`
    apart, or a staging buffer with each bundle's byte offset. `mask` [T, m] multiplies the hidden activations."""

    @staticmethod
    def decode_bytes(store: FlashStore) -> int:
        """What a call holds beside its bundles: without the native kernel, the layer decoded and its down
        projection transposed (SmolLM2 dram on the torch path: +11 MB of peak RSS)."""
        return 0 if BundleMath(store).native else 2 * store.config.intermediate_size * store.row_bytes

    def __init__(self, store: FlashStore, fmt: str | None = None):
        self.store, self.fmt = store, fmt or store.ffn_format
        self.row_bytes = row_bytes(store, self.fmt)
        c = store.config
        self.kernel = BundleFFN(self.fmt, store.fields, store.dtype, self.row_bytes, c.hidden_size, c.hidden_act,
                                books=store.palettes if self.fmt == store.ffn_format else None)
        self.native = self.kernel.ok
        self.math = FFNMath(store)

    def decode(self, raw: torch.Tensor, layer: int) -> torch.Tensor:
        """Bundles in this format ([m, row_bytes] uint8) -> float rows [m, width] (store dtype)."""
        from ..store import quant

        s = self.store
        if self.fmt == s.ffn_format:
            return s.decode(raw, layer)
        return quant.decode(self.fmt, raw, s.fields, s.bundle_width, s.dtype)

    def gather(self, rows: torch.Tensor, m: int, offsets: torch.Tensor | None) -> torch.Tensor:
        """[m, row_bytes] uint8 rows (a view when they are already evenly spaced)."""
        if offsets is None:
            return rows[: m * self.row_bytes].view(m, self.row_bytes) if rows.dim() == 1 else rows[:m]
        return gather_rows_torch(rows.view(-1), offsets, self.row_bytes)

    def hashes(self, tokens: int) -> bool:
        """Whether a call for this many tokens can hash the pages under its rows (the `crcs` argument)."""
        return self.native and tokens < GEMM_FROM_TOKENS

    def __call__(self, x: torch.Tensor, rows: torch.Tensor, m: int, layer: int, offsets: torch.Tensor | None = None,
                 mask: torch.Tensor | None = None, hidden: torch.Tensor | None = None,
                 crcs: np.ndarray | None = None) -> torch.Tensor:
        """crcs (where hashes(T)): filled with the page CRCs of the bytes from rows' start (BundleFFN)."""
        if crcs is not None and not self.hashes(x.shape[0]):
            raise ValueError("this call cannot hash its rows' pages (see hashes())")
        if m == 0:
            return torch.zeros(x.shape[0], self.store.config.hidden_size)
        if self.native and x.shape[0] < GEMM_FROM_TOKENS:
            return self.kernel(x, rows, m, offsets=offsets, mask=mask, hidden=hidden, crcs=crcs, layer=layer)
        if self.kernel.decodes:  # many tokens: decode once (natively), then torch's float32 GEMM
            bundles = self.kernel.decode(rows, m, self.store.bundle_width, offsets)
        else:
            bundles = self.decode(self.gather(rows, m, offsets), layer)
        w = compute_layout(self.store, bundles)
        h = self.math.hidden(x, w)
        if hidden is not None:
            hidden.copy_(h)
        return self.math.output(h if mask is None else h * mask, w)


def row_bytes(store: FlashStore, fmt: str) -> int:
    """Bytes of one bundle of `store` in format `fmt` (its own: store.bundle_bytes)."""
    from ..store import quant

    return quant.bundle_bytes(fmt, store.bundle_width, store.fields, store.dtype.itemsize)


class ResidentFFN:
    """`dram` mode: every layer's bundles held in memory as stored (compressed stays compressed), the upper bound on
    speed. With `layers`, only those (hybrid mode's resident part)."""

    def __init__(self, store: FlashStore, reader: FlashReader, layers: list[int] | None = None):
        self.math = BundleMath(store)
        self.rows = {}
        for i in range(len(store.layers)) if layers is None else layers:
            # each layer read into its own buffer and kept there (a view; the unbundled layout reassembles a copy
            # and lets the buffer go): a shared read buffer cloned per layer held one layer more than the plan
            # (hybrid at 80% of SmolLM2: +6.5 MB of peak RSS over the budget)
            e = store.layers[i]
            buf = aligned_buffer(e.span)
            reader.read([(e.offset, buf)])
            self.rows[i] = store.layer_rows(buf)

    def begin_forward(self) -> None:
        pass

    def hidden(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """[T, neurons] activations of every neuron (for calibration and the oracle)."""
        rows = self.rows[layer]
        h = torch.empty(x.shape[0], rows.shape[0])
        self.math(x, rows, rows.shape[0], layer, hidden=h)
        return h

    def __call__(self, layer: int, x: torch.Tensor, mask: torch.Tensor | None = None,
                 hidden: torch.Tensor | None = None) -> torch.Tensor:
        """hidden [T, neurons]: filled with the activations of the same pass (calibration records them)."""
        rows = self.rows[layer]
        return self.math(x, rows, rows.shape[0], layer, mask=mask, hidden=hidden)


class NaiveFlashFFN:
    """`naive` mode (the paper's baseline): every layer's whole FFN is read from flash for every forward pass and
    computed in its read buffer as it lies. With `layers`, only those are streamed (hybrid mode's flash part).

    Two buffers alternate: the next streamed layer is read while this one's FFN and the next attention compute.
    A layer's pages are checked by the kernel as it computes on them (BundleMath's `crcs`): hashed apart they cost a
    pass over DRAM of their own (Qwen2.5's 722 MB in DRAM, one token: kernel 56-63 ms, kernel hashing 74-78, hashed
    apart then the kernel 119-145; bench/kernel_hash_cost.py). A layer found damaged is read again (checked) and
    computed again.
    """

    def __init__(self, store: FlashStore, reader: FlashReader, layers: list[int] | None = None):
        self.store, self.reader, self.math = store, reader, BundleMath(store)
        self.streamed = list(range(len(store.layers))) if layers is None else sorted(layers)
        self.order = {layer: k for k, layer in enumerate(self.streamed)}
        span = max(e.span for e in store.layers)
        self.buffers = [aligned_buffer(span), aligned_buffer(span)]
        reader.register(*self.buffers)
        self.pending: dict[int, object] = {}

    @staticmethod
    def dram_bytes(store: FlashStore) -> int:
        """Two read buffers (+ without the native kernel, the layer decoded and its down projection transposed)."""
        return 2 * max(e.span for e in store.layers) + BundleMath.decode_bytes(store)

    def _start_read(self, k: int) -> None:
        if k < len(self.streamed):
            e = self.store.layers[self.streamed[k]]
            self.pending[k] = self.reader.submit([(e.offset, self.buffers[k % 2][: e.span])], check=False)

    def begin_forward(self) -> None:
        self._start_read(0)
        self._start_read(1)

    def __call__(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        k = self.order[layer]
        self.pending.pop(k).wait()
        e = self.store.layers[layer]
        out = self._compute(layer, x, e.offset, self.buffers[k % 2][: e.span])
        self._start_read(k + 2)  # this buffer is free again; the next streamed layer is already on its way
        return out

    def _compute(self, layer: int, x: torch.Tensor, offset: int, buf: torch.Tensor) -> torch.Tensor:
        """The FFN of the layer read (unchecked) into buf, its pages checked before the result is used."""
        checked = self.reader.pages is not None
        fused = checked and self.math.hashes(x.shape[0]) and self.store.layout == "bundled"  # rows = buf's bytes
        if checked and not fused:
            self.reader.check(offset, buf)
        rows = self.store.layer_rows(buf)
        if not fused:
            return self.math(x, rows, rows.shape[0], layer)
        crcs = np.empty(buf.numel() // checksum.PAGE, dtype=np.uint32)
        out = self.math(x, rows, rows.shape[0], layer, crcs=crcs)
        if self.reader.verify(offset, buf, crcs):  # damaged: read again (checked), computed again
            out = self.math(x, rows, rows.shape[0], layer)
        return out


class HybridFFN:
    """`hybrid` mode (the paper's middle row): the first `resident` layers' FFN in DRAM, the rest read whole from
    flash every token. Streaming starts at begin_forward, so the first streamed reads overlap resident compute."""

    def __init__(self, store: FlashStore, reader: FlashReader, resident: int):
        n = len(store.layers)
        self.resident_layers = list(range(min(resident, n)))
        self.dram = ResidentFFN(store, reader, self.resident_layers)
        self.flash = NaiveFlashFFN(store, reader, list(range(len(self.resident_layers), n))) \
            if resident < n else None

    def begin_forward(self) -> None:
        if self.flash is not None:
            self.flash.begin_forward()

    def __call__(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        return self.dram(layer, x) if layer in self.dram.rows else self.flash(layer, x)


class RecordingFFN:
    """Another provider, watched: `record(layer, x, out)` sees each input and output (calibration keeps the inputs,
    simulation the activations, tests check the outputs); anything else is asked of the provider it wraps. Put in
    place with Engine.set_ffn."""

    def __init__(self, inner, record):
        self.inner, self.record = inner, record

    def begin_forward(self) -> None:
        self.inner.begin_forward()

    def __call__(self, layer: int, x: torch.Tensor, *args) -> torch.Tensor:
        out = self.inner(layer, x, *args)
        self.record(layer, x, out)
        return out

    def __getattr__(self, name: str):
        return getattr(self.inner, name)
