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


def bundle_views(store: FlashStore, buf: torch.Tensor) -> dict[str, torch.Tensor]:
    """bundle_rows of a whole layer read into `buf` (uint8), from either layout."""
    n = store.config.intermediate_size
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
    """`dram` mode: every layer's weights held in memory in compute layout (the upper bound on speed)."""

    def __init__(self, store: FlashStore, reader: FlashReader):
        self.math = FFNMath(store)
        down = self.math.down
        buf = aligned_buffer(max(e.span for e in store.layers))
        self.weights = []
        for e in store.layers:
            reader.read([(e.offset, buf[:e.span])])
            views = bundle_views(store, buf)
            w = {k: v.contiguous().clone() for k, v in views.items() if k != down}
            w[down] = views[down].T.contiguous()
            self.weights.append(w)

    def begin_forward(self) -> None:
        pass

    def __call__(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        return self.math(x, self.weights[layer])


class NaiveFlashFFN:
    """`naive` mode (the paper's baseline): every layer's whole FFN is read from flash for every forward pass.

    Two buffers alternate: layer l+1 is read while layer l's FFN and layer l+1's attention compute.
    """

    def __init__(self, store: FlashStore, reader: FlashReader):
        self.store, self.reader, self.math = store, reader, FFNMath(store)
        span = max(e.span for e in store.layers)
        self.buffers = [aligned_buffer(span), aligned_buffer(span)]
        self.down_t = torch.empty(store.config.hidden_size, store.config.intermediate_size, dtype=store.dtype)
        self.pending: dict[int, object] = {}

    def _start_read(self, layer: int) -> None:
        e = self.store.layers[layer]
        self.pending[layer] = self.reader.submit([(e.offset, self.buffers[layer % 2][: e.span])])

    def begin_forward(self) -> None:
        for layer in range(min(2, len(self.store.layers))):
            self._start_read(layer)

    def __call__(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        self.pending.pop(layer).wait()
        w = bundle_views(self.store, self.buffers[layer % 2])
        w[self.math.down] = transpose_into(self.down_t, w[self.math.down])
        out = self.math(x, w)
        if layer + 2 < len(self.store.layers):
            self._start_read(layer + 2)  # this buffer is free again; layer + 1 is already on its way
        return out
