"""The per-layer windowed neuron cache (paper section 3.3): neurons used in the last `window` steps stay in DRAM.

Preallocated once; never reallocated. Live neurons occupy slots 0..n-1, so compute runs on a contiguous block:
  rows  [capacity, slot_bytes]  each slot's bundle as stored on flash (float, int8 or int4 codes with their
                                scales), multiplied in place by the native kernel (ffn.BundleMath)
Eviction moves the last live slots into the freed ones (no holes, no reallocation); insertion appends at n. Both
are byte copies of whole bundles: nothing is decoded, transposed or requantized on the way in.

Slots 0..pinned-1 may hold a static set of hot neurons (`pin`, at setup: the planner's choice from calibration
statistics, as PowerInfer's hot/cold split): never evicted, never moved; the window's neurons live after them.

`fmt="int8"` on a float store holds each neuron as an int8 bundle (quant.py's format: a float16 scale per 64
weights), encoded as it joins: about half of float16's bytes per neuron.
"""

from __future__ import annotations

import torch

from ..errors import InaflashError
from .dense import BundleMath, row_bytes
from .kernels import gather_rows, move_rows
from ..store.format import FlashStore
from ..store import quant

CACHE_FORMATS = {"store": "neurons as stored on flash (no transcoding)",
                 "int8": "int8 bundles, a scale per 64 weights (a float store's neurons in ~half the DRAM)"}


def cache_format(store: FlashStore, fmt: str) -> str:
    """The bundle format a cache of `fmt` holds: the store's own, or int8 for a float store."""
    if fmt == "int8" and store.ffn_format != "float":
        raise InaflashError(f"--cache-format int8 re-encodes a float store's neurons; this store's FFN is already "
                            f"{store.ffn_format} and is cached as stored")
    return store.ffn_format if fmt == "store" else fmt


class NeuronCache:
    def __init__(self, store: FlashStore, capacity: int, window: int, fmt: str = "store"):
        self.store, self.fmt = store, cache_format(store, fmt)
        self.neurons, self.capacity, self.window = store.config.intermediate_size, capacity, window
        self.math = BundleMath(store, self.fmt)
        self.source = BundleMath(store) if self.fmt != store.ffn_format else None  # what reads hand over
        self.row_bytes = self.math.row_bytes
        self.rows = torch.zeros(capacity, self.row_bytes, dtype=torch.uint8)
        self.neuron_of_slot = torch.full((capacity,), -1, dtype=torch.long)
        self.slot_of_neuron = torch.full((self.neurons,), -1, dtype=torch.long)
        self.last_used = torch.zeros(capacity, dtype=torch.long)  # step at which each slot's neuron was last needed
        self.n = 0
        self.pinned = 0  # slots 0..pinned-1: hot neurons, kept whatever the window says
        self.nbytes = capacity * self.row_bytes

    @staticmethod
    def slot_bytes(store: FlashStore, fmt: str = "store") -> int:
        """DRAM per cached neuron: its bundle's bytes in the cache's format."""
        return row_bytes(store, cache_format(store, fmt))

    def live_neurons(self) -> torch.Tensor:
        return self.neuron_of_slot[: self.n]

    def missing(self, needed: torch.Tensor) -> torch.Tensor:
        """The needed neuron ids that are not cached."""
        return needed[self.slot_of_neuron[needed] < 0]

    def cold(self, needed: torch.Tensor) -> torch.Tensor:
        """The needed neuron ids that are not pinned (the window's part of a token's need)."""
        slots = self.slot_of_neuron[needed]
        return needed[(slots < 0) | (slots >= self.pinned)]

    def pin(self, neurons: torch.Tensor, src: torch.Tensor, offsets: torch.Tensor) -> None:
        """Append neurons (read as stored, like append) as pinned: only before any unpinned neuron has joined."""
        if self.n != self.pinned:
            raise RuntimeError("neurons are pinned at setup, before the window's")
        self.append(neurons, src, offsets, step=0)
        self.last_used[self.pinned:self.n] = torch.iinfo(torch.long).max  # never outside the window, never LRU
        self.pinned = self.n

    def touch(self, needed: torch.Tensor, step: int) -> None:
        slots = self.slot_of_neuron[needed]
        self.last_used[slots[slots >= self.pinned]] = step

    def evict_outside_window(self, step: int) -> None:
        """Drop neurons not needed in the last `window` steps (step - window + 1 .. step)."""
        stale = (self.last_used[: self.n] <= step - self.window).nonzero().squeeze(1)
        self._evict(stale)

    def make_room(self, count: int, keep: torch.Tensor) -> None:
        """Evict least recently used neurons (never those in `keep`) until `count` slots are free."""
        short = self.n + count - self.capacity
        if short <= 0:
            return
        age = self.last_used[: self.n].clone()
        age[self.slot_of_neuron[keep][self.slot_of_neuron[keep] >= 0]] = torch.iinfo(torch.long).max
        self._evict(self.pinned + torch.argsort(age[self.pinned:], stable=True)[:short])

    def _evict(self, slots: torch.Tensor) -> None:
        if slots.numel() == 0:
            return
        new_n = self.n - slots.numel()
        self.slot_of_neuron[self.neuron_of_slot[slots]] = -1
        self.neuron_of_slot[slots] = -1
        holes = slots[slots < new_n]  # freed slots inside the new live block
        tail = torch.arange(new_n, self.n)
        movers = tail[self.neuron_of_slot[tail] >= 0]  # survivors beyond the new end: as many as holes
        move_rows(self.rows, movers, holes)
        self.last_used[holes] = self.last_used[movers]
        moved = self.neuron_of_slot[movers]
        self.neuron_of_slot[holes] = moved
        self.slot_of_neuron[moved] = holes
        self.neuron_of_slot[new_n: self.n] = -1
        self.n = new_n

    def append(self, neurons: torch.Tensor, src: torch.Tensor, offsets: torch.Tensor, step: int,
               encoded: bool = False) -> None:
        """Insert neurons (not cached) whose bundles lie in `src` (uint8) at byte `offsets`: as stored on flash,
        or (`encoded`) already in the cache's format."""
        m = neurons.numel()
        if self.n + m > self.capacity:
            raise RuntimeError(f"neuron cache overflow: {self.n} + {m} > {self.capacity}")
        end = self.n + m
        if encoded or self.fmt == self.store.ffn_format:
            gather_rows(self.rows[self.n:end], src, offsets, self.row_bytes)
        else:  # a float store cached as int8: encode the float rows as they join
            floats = self.source.gather(src, m, offsets).view(self.store.dtype)
            self.rows[self.n:end] = quant.encode(self.fmt, floats.float(), self.store.fields)[0]
        self._joined(neurons, end, step)

    def append_bundles(self, neurons: torch.Tensor, bundles: torch.Tensor, step: int) -> None:
        """Insert neurons from float bundle rows [m, width], encoded into the cache's format (not for palettes,
        whose codebooks were fitted at convert: their bundles join as read, through append)."""
        if self.fmt == "float":
            raw = bundles.to(self.store.dtype).contiguous().view(torch.uint8)
        elif self.fmt in quant.GROUP:
            raw = quant.encode(self.fmt, bundles.float(), self.store.fields)[0]
        else:
            raise ValueError(f"{self.fmt} bundles join the cache as read (append), not re-encoded")
        self.append(neurons, raw.view(-1), torch.arange(neurons.numel()) * raw.shape[1], step, encoded=True)

    def _joined(self, neurons: torch.Tensor, end: int, step: int) -> None:
        self.neuron_of_slot[self.n:end] = neurons
        self.slot_of_neuron[neurons] = torch.arange(self.n, end)
        self.last_used[self.n:end] = step
        self.n = end

    def update(self, needed: torch.Tensor, step: int, read_bundles) -> int:
        """One step: keep what the window covers, read what `needed` lacks (read_bundles(ids) -> float bundle
        rows [m, width]) and append it. Returns how many neurons were read."""
        missing = self.prepare(needed, step)
        if missing.numel():
            self.append_bundles(missing, read_bundles(missing), step)
        return missing.numel()

    def prepare(self, needed: torch.Tensor, step: int) -> torch.Tensor:
        """update() up to the read: refresh, evict outside the window, make room; returns the neurons to read and
        append (sparse mode reads them while it computes over what is cached)."""
        self.touch(needed, step)
        self.evict_outside_window(step)
        missing = self.missing(needed)
        if missing.numel():
            self.make_room(missing.numel(), keep=needed)
        return missing

    def bundle(self, slot: int, layer: int = 0) -> torch.Tensor:
        """The float bundle row of the neuron in `slot`, decoded from what the cache holds (for checks)."""
        return self.math.decode(self.rows[slot: slot + 1], layer)[0].float()

    def ffn(self, x: torch.Tensor, layer: int, start: int = 0, end: int | None = None,
            mask: torch.Tensor | None = None) -> torch.Tensor:
        """The FFN over live slots start..end, computed on the rows in place."""
        end = self.n if end is None else end
        return self.math(x, self.rows[start:end], end - start, layer, mask=mask)
