"""The feed-forward block, and where its weights come from (DRAM or a read from flash per token).

On disk a layer is a bundle matrix [neurons, width] (row i = neuron i's bundle, see store.py). For compute, the
down projection must be [hidden, neurons] (row-major over neurons): float16 `F.linear(a, W)` runs 25-45x faster on
this CPU than `a @ D` with D [neurons, hidden] (measured: 1.9 ms vs 53-94 ms at 8960 x 1536), so down columns are
transposed on their way into DRAM. Gate/up (and OPT's fc1) stay neuron rows.
"""

from __future__ import annotations

import torch

from .ops import ACTIVATIONS, linear
from .reader import FlashReader, aligned_buffer
from .store import FlashStore

DOWN = {"llama": "down", "opt": "fc2"}
TRANSPOSE_TILE = 256  # tiled transposes run ~3x faster than one strided copy_ for large layers


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
    n = store.config.intermediate_size
    if store.quantized:
        return bundle_rows(store, store.decode(buf[: n * store.bundle_bytes].view(n, store.bundle_bytes), layer))
    if store.layout == "bundled":
        return bundle_rows(store, buf[: n * store.bundle_bytes].view(store.dtype).view(n, store.bundle_width))
    views = {}
    for name, (a, b) in store.fields.items():
        start = store.blocks[name]
        views[name] = buf[start: start + n * (b - a) * store.dtype.itemsize].view(store.dtype).view(n, b - a)
    if "fc1_bias" in views:
        views["fc1_bias"] = views["fc1_bias"].squeeze(1).float()
    return views


def transpose_into(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """dst[:, i] = src[i, :], tile by tile."""
    for i in range(0, src.shape[0], TRANSPOSE_TILE):
        dst[:, i:i + TRANSPOSE_TILE].copy_(src[i:i + TRANSPOSE_TILE].T)
    return dst


class ResidentFFN:
    """`dram` mode: every layer's weights held in memory in compute layout (the upper bound on speed).
    With `layers`, only those (hybrid mode's resident part)."""

    def __init__(self, store: FlashStore, reader: FlashReader, layers: list[int] | None = None):
        self.math = FFNMath(store)
        down = self.math.down
        buf = aligned_buffer(max(e.span for e in store.layers))
        self.weights = {}
        for i in range(len(store.layers)) if layers is None else layers:
            e = store.layers[i]
            reader.read([(e.offset, buf[:e.span])])
            views = bundle_views(store, buf, i)
            w = {k: v.contiguous().clone() for k, v in views.items() if k != down}
            w[down] = views[down].T.contiguous()
            self.weights[i] = w

    def begin_forward(self) -> None:
        pass

    def __call__(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        return self.math(x, self.weights[layer])


class NaiveFlashFFN:
    """`naive` mode (the paper's baseline): every layer's whole FFN is read from flash for every forward pass.
    With `layers`, only those are streamed (hybrid mode's flash part).

    Two buffers alternate: the next streamed layer is read while this one's FFN and the next attention compute.
    """

    def __init__(self, store: FlashStore, reader: FlashReader, layers: list[int] | None = None):
        self.store, self.reader, self.math = store, reader, FFNMath(store)
        self.streamed = list(range(len(store.layers))) if layers is None else sorted(layers)
        self.order = {layer: k for k, layer in enumerate(self.streamed)}
        span = max(e.span for e in store.layers)
        self.buffers = [aligned_buffer(span), aligned_buffer(span)]
        self.down_t = torch.empty(store.config.hidden_size, store.config.intermediate_size, dtype=store.dtype)
        self.pending: dict[int, object] = {}

    @staticmethod
    def dram_bytes(store: FlashStore) -> int:
        """Two read buffers + the transposed down projection (+ the dequantized layer for compressed stores)."""
        c = store.config
        dequantized = c.intermediate_size * store.row_bytes if store.quantized else 0
        return 2 * max(e.span for e in store.layers) + c.hidden_size * c.intermediate_size * store.dtype.itemsize \
            + dequantized

    def _start_read(self, k: int) -> None:
        if k < len(self.streamed):
            e = self.store.layers[self.streamed[k]]
            self.pending[k] = self.reader.submit([(e.offset, self.buffers[k % 2][: e.span])])

    def begin_forward(self) -> None:
        self._start_read(0)
        self._start_read(1)

    def __call__(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        k = self.order[layer]
        self.pending.pop(k).wait()
        w = bundle_views(self.store, self.buffers[k % 2], layer)
        w[self.math.down] = transpose_into(self.down_t, w[self.math.down])
        out = self.math(x, w)
        self._start_read(k + 2)  # this buffer is free again; the next streamed layer is already on its way
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
        return self.dram(layer, x) if layer in self.dram.weights else self.flash(layer, x)
