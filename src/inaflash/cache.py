"""The per-layer windowed neuron cache (paper section 3.3): neurons used in the last `window` steps stay in DRAM.

Preallocated once; never reallocated. Live neurons occupy slots 0..n-1, so compute runs on a contiguous block:
  rows    [capacity, row_width]  each slot's bundle minus its down column: [gate_i | up_i] (OPT: [fc1_i | b_i])
  down_t  [hidden, capacity]     each slot's down column, stored transposed: float16 `F.linear(h, down_t[:, :n])`
                                 is 25-45x faster on this CPU than `h @ down_rows` (see ffn.py)
Eviction moves the last live slots into the freed ones (no holes, no reallocation); insertion appends at n.

`int8=True` (SwiGLU models) holds each neuron in half the bytes: rows and down_t as int8 codes, with a bfloat16 scale
per gate row, up row and down column, quantized as the neuron joins. Gate/up then multiply with torch's weight-only
int8 kernel (as fast as float16 here); down_t's live columns are converted to bfloat16 for their product.
"""

from __future__ import annotations

import torch

from .ffn import DOWN
from .errors import InaflashError
from .quant import Int8Columns, Int8Matrix, quantize_rows
from .store import FlashStore

CACHE_FORMATS = {"float": "neurons as read, in the store's dtype", "int8": "int8 + a scale per row (half the DRAM)"}


def _raw(t: torch.Tensor) -> torch.Tensor:
    """t viewed as the widest integers its rows' byte width allows: torch moves those much faster than float16
    (index_put on float16 is slow)."""
    row_bytes = t[0].numel() * t.element_size()
    word = next(w for w in (torch.int64, torch.int32, torch.int16, torch.uint8) if row_bytes % w.itemsize == 0)
    return t.view(word)


class NeuronCache:
    def __init__(self, store: FlashStore, capacity: int, window: int, int8: bool = False):
        cfg = store.config
        if int8 and cfg.family == "opt":
            raise InaflashError("the int8 neuron cache is for SwiGLU models (Llama, Qwen2); OPT caches float rows")
        self.neurons, self.capacity, self.window, self.int8 = cfg.intermediate_size, capacity, window, int8
        self.family = cfg.family
        self.down_start = store.fields[DOWN[cfg.family]][0]
        dtype = torch.int8 if int8 else store.dtype
        self.rows = torch.zeros(capacity, self.down_start, dtype=dtype)
        self.down_t = torch.zeros(cfg.hidden_size, capacity, dtype=dtype)
        self.neuron_of_slot = torch.full((capacity,), -1, dtype=torch.long)
        self.slot_of_neuron = torch.full((self.neurons,), -1, dtype=torch.long)
        self.last_used = torch.zeros(capacity, dtype=torch.long)  # step at which each slot's neuron was last needed
        self.n = 0
        # eviction moves raw bytes: rows (dim 0) as wide integers, down_t's columns through numpy fancy indexing
        # (3-6x faster here than torch on float16)
        self._slot_rows = [_raw(self.rows), self.last_used]
        if int8:
            self.row_scales = torch.zeros(capacity, 2, dtype=torch.bfloat16)  # gate, up
            self.down_scales = torch.zeros(capacity, dtype=torch.bfloat16)
            self._slot_rows += [self.row_scales.view(torch.int32).view(capacity), self.down_scales.view(torch.int16)]
        self._down_raw = self.down_t.view({1: torch.int8, 2: torch.int16, 4: torch.int32}[self.down_t.element_size()]
                                          ).numpy()
        self.nbytes = capacity * self.slot_bytes(store, int8)

    @staticmethod
    def slot_bytes(store: FlashStore, int8: bool = False) -> int:
        """DRAM per cached neuron: its bundle in the store dtype, or int8 codes + three bfloat16 scales."""
        return store.bundle_width + 6 if int8 else store.row_bytes

    def live_neurons(self) -> torch.Tensor:
        return self.neuron_of_slot[: self.n]

    def missing(self, needed: torch.Tensor) -> torch.Tensor:
        """The needed neuron ids that are not cached."""
        return needed[self.slot_of_neuron[needed] < 0]

    def touch(self, needed: torch.Tensor, step: int) -> None:
        slots = self.slot_of_neuron[needed]
        self.last_used[slots[slots >= 0]] = step

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
        self._evict(torch.argsort(age, stable=True)[:short])

    def _evict(self, slots: torch.Tensor) -> None:
        if slots.numel() == 0:
            return
        new_n = self.n - slots.numel()
        self.slot_of_neuron[self.neuron_of_slot[slots]] = -1
        self.neuron_of_slot[slots] = -1
        holes = slots[slots < new_n]  # freed slots inside the new live block
        tail = torch.arange(new_n, self.n)
        movers = tail[self.neuron_of_slot[tail] >= 0]  # survivors beyond the new end: as many as holes
        for t in self._slot_rows:
            t.index_copy_(0, holes, t.index_select(0, movers))
        self._down_raw[:, holes.numpy()] = self._down_raw[:, movers.numpy()]
        moved = self.neuron_of_slot[movers]
        self.neuron_of_slot[holes] = moved
        self.slot_of_neuron[moved] = holes
        self.neuron_of_slot[new_n: self.n] = -1
        self.n = new_n

    def append(self, neurons: torch.Tensor, bundles: torch.Tensor, step: int) -> None:
        """Insert neurons (not cached) with their bundles [m, bundle_width] at the end of the live block."""
        m = neurons.numel()
        if self.n + m > self.capacity:
            raise RuntimeError(f"neuron cache overflow: {self.n} + {m} > {self.capacity}")
        end = self.n + m
        if self.int8:
            codes, scales = quantize_rows(bundles.float().view(m, 3, -1))  # gate, up, down: a scale each
            self.rows[self.n:end] = codes[:, :2].reshape(m, -1)
            self.row_scales[self.n:end] = scales[:, :2]
            self.down_t[:, self.n:end] = codes[:, 2].T
            self.down_scales[self.n:end] = scales[:, 2]
        else:
            self.rows[self.n:end] = bundles[:, : self.down_start]
            self.down_t[:, self.n:end] = bundles[:, self.down_start:].T
        self.neuron_of_slot[self.n:end] = neurons
        self.slot_of_neuron[neurons] = torch.arange(self.n, end)
        self.last_used[self.n:end] = step
        self.n = end

    def update(self, needed: torch.Tensor, step: int, read_bundles) -> int:
        """One step: keep what the window covers, read what `needed` lacks (read_bundles(ids) -> [m, width])
        and append it. Returns how many neurons were read."""
        missing = self.prepare(needed, step)
        if missing.numel():
            self.append(missing, read_bundles(missing), step)
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

    def bundle(self, slot: int) -> torch.Tensor:
        """The store's bundle row for the neuron in `slot` (int8: dequantized; for checks)."""
        if self.int8:
            d = self.down_start // 2
            scales = torch.cat([self.row_scales[slot].float().repeat_interleave(d), self.down_scales[slot].float()
                                .expand(self.down_t.shape[0])])
            return torch.cat([self.rows[slot], self.down_t[:, slot]]).float() * scales
        return torch.cat([self.rows[slot], self.down_t[:, slot]])

    def weights(self, start: int = 0, end: int | None = None) -> dict[str, torch.Tensor]:
        """Compute-layout views over live slots start..end (default: the whole live block; see ffn.FFNMath)."""
        end = self.n if end is None else end
        rows = self.rows[start:end]
        if self.family == "opt":
            d = self.down_start - 1
            return {"fc1": rows[:, :d], "fc1_bias": rows[:, d].float(), "fc2": self.down_t[:, start:end]}
        if self.int8:
            return {"gate_up": Int8Matrix(rows.view(2 * (end - start), -1), self.row_scales[start:end].view(-1)),
                    "down": Int8Columns(self.down_t[:, start:end], self.down_scales[start:end])}
        return {"gate_up": rows.view(2 * (end - start), -1), "down": self.down_t[:, start:end]}
