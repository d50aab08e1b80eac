"""`sparse` mode: per token, decide which FFN neurons matter, read only those not cached, compute only on those.

Which neurons are active (the definition the predictor learns and the oracle applies):
  ReLU models (OPT): relu(fc1 x + b) > 0, exactly.
  SwiGLU models: |act(gate x) * (up x)| > t_layer, with t_layer calibrated on real text (`inaflash calibrate`).
What is computed (`compute`):
  "cached" (default): every neuron the cache holds, i.e. the union of the selections of the last `window` tokens.
            Those rows are in DRAM anyway and contiguous, so this costs no I/O and no gather; it is never further
            from dense than "active". On SmolLM2 it is what keeps predictor-sparse perplexity near dense
            (a weak predictor's misses for this token are usually selected by one of the previous ones).
  "active": only this token's selected neurons (the paper's definition): the FFN output is the dense FFN restricted
            to them, whatever the cache holds, so the window and the read pattern change I/O only.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import torch

from .cache import NeuronCache
from ..errors import InaflashError
from .dense import BundleMath, ResidentFFN
from .predictor import Predictor
from ..reader import DEFAULT_MAX_GAP, BundleReader, FlashReader
from ..store.format import ALIGN, FlashStore

SPARSITY_FILE = "sparsity.safetensors"
COMPUTE = {
    "cached": "every neuron in the window cache (no extra I/O; closer to dense)",
    "active": "only the neurons selected for this token (the paper's definition)",
}


@dataclass
class Sparsity:
    kind: str  # "relu" or "threshold"
    thresholds: list[float]
    predictors: list[Predictor] | None = None
    info: dict = field(default_factory=dict)  # calibration report (target, metrics, perplexities)
    density: float | None = None  # set by at_density: the fraction of neurons the predictors select per token

    def at_density(self, density: float) -> "Sparsity":
        """These predictors with each threshold moved so that they select `density` of a layer's neurons per token
        (estimated from the calibration's score statistics): a sparsity level chosen at run time, for measuring
        speed against quality (`--density`)."""
        if not self.predictors or self.predictors[0].mean is None:
            raise InaflashError("--density needs a calibration with score statistics: recalibrate the store "
                                "(inaflash calibrate STORE)")
        return replace(self, predictors=[replace(p, tau=p.tau_at(density)) for p in self.predictors],
                       density=density)

    def true_active(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        return h > 0 if self.kind == "relu" else h.abs() > self.thresholds[layer]

    @property
    def predictor_bytes(self) -> int:
        return sum(p.nbytes for p in self.predictors) if self.predictors else 0


def window_union(mask: torch.Tensor, window: int) -> torch.Tensor:
    """[T, n] -> [T, n]: row t is the OR of rows t-window+1 .. t, what a window-`window` cache holds while decoding
    token by token (given room): how `compute="cached"` is simulated over a whole text in one pass."""
    if window <= 1:
        return mask
    m = torch.nn.functional.pad(mask.T.unsqueeze(0).float(), (window - 1, 0))
    return torch.nn.functional.max_pool1d(m, window, stride=1)[0].T > 0


class WindowHistory:
    """window_union across calls: per layer, the last window-1 selections of the sequence being decoded, so that
    token-by-token decoding gets each token's union with the tokens before it (what a window cache holds).
    `reset()` starts a new sequence."""

    def __init__(self, window: int):
        self.window, self.last = window, {}

    def reset(self) -> None:
        self.last = {}

    def union(self, layer: int, mask: torch.Tensor) -> torch.Tensor:
        """[T, n] this call's selections -> [T, n] each token's union with the window-1 selections before it."""
        if self.window <= 1:
            return mask
        prev = self.last.get(layer)
        full = mask if prev is None else torch.cat([prev, mask])
        self.last[layer] = full[-(self.window - 1):]
        return window_union(full, self.window)[-mask.shape[0]:]


def load_sparsity(store: FlashStore) -> Sparsity | None:
    """The calibrated sparsity of a store; for ReLU models without calibration, exact zeros (no predictor)."""
    info = store.manifest.get("sparsity")
    if info is None:
        if store.config.hidden_act == "relu":
            return Sparsity("relu", [0.0] * store.config.num_layers)
        return None
    from safetensors.torch import load

    predictors = None
    if info.get("predictor"):
        t = load(store.read_verified(SPARSITY_FILE))
        taus = info["predictor"]["tau"]
        predictors = [Predictor(t[f"{i}.down"], t[f"{i}.up"], t[f"{i}.bias"], taus[i], t.get(f"{i}.mean"),
                                t.get(f"{i}.std")) for i in range(store.config.num_layers)]
    return Sparsity(info["kind"], info["thresholds"], predictors, info)


@dataclass
class SparseCounters:
    neurons_needed: int = 0
    neurons_read: int = 0
    predictor_s: float = 0.0
    update_s: float = 0.0  # cache bookkeeping + reads of missing neurons (I/O wait included; see generate.py)

    def copy(self) -> "SparseCounters":
        return SparseCounters(**self.__dict__)

    def __sub__(self, other: "SparseCounters") -> "SparseCounters":
        return SparseCounters(**{k: v - getattr(other, k) for k, v in self.__dict__.items()})


class SparseFlashFFN:
    def __init__(self, store: FlashStore, reader: FlashReader, sparsity: Sparsity, capacity: int, window: int,
                 use_predictor: bool = True, max_gap: int = DEFAULT_MAX_GAP, staging_bytes: int | None = None,
                 compute: str = "cached", cache_format: str = "store", pins: list[torch.Tensor] | None = None):
        """pins: per layer, the hot neurons to hold for good (the planner's split of each cache; none by default)."""
        if use_predictor and not sparsity.predictors:
            raise InaflashError(f"store {store.path} has no predictors: run  inaflash calibrate {store.path}  "
                                "(or use --no-predictor for the oracle)")
        self.store, self.sparsity, self.math = store, sparsity, BundleMath(store)  # math: over reads as stored
        self.predictors = sparsity.predictors if use_predictor else None
        # the oracle needs every neuron's activation, so it holds the whole FFN: for measuring only
        self.oracle = None if use_predictor else ResidentFFN(store, reader)
        self.caches = [NeuronCache(store, capacity, window, cache_format) for _ in store.layers]
        self.bundles = BundleReader(store, reader, staging_bytes=staging_bytes, max_gap=max_gap)
        # a second staging buffer, so that streaming (more neurons than the cache holds) reads the next group
        # while computing this one; the planner counts both
        self.next_bundles = BundleReader(store, reader, staging_bytes=staging_bytes, max_gap=max_gap)
        self.counters = SparseCounters()
        self.step = 0
        self.compute = compute
        for layer, ids in enumerate(pins or []):
            for chunk, plan in self.bundles.chunks(layer, ids.sort().values):
                src, offsets = self.bundles.finish(self.bundles.start(layer, chunk, plan))
                self.caches[layer].pin(chunk, src, offsets)

    @property
    def cache_bytes(self) -> int:
        return sum(c.nbytes for c in self.caches)

    def begin_forward(self) -> None:
        self.step += 1

    def active(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """[T, neurons] bool: the neurons this layer computes for each token."""
        if self.predictors is not None:
            t0 = time.perf_counter()
            mask = self.predictors[layer](x)
            self.counters.predictor_s += time.perf_counter() - t0
            return mask
        return self.sparsity.true_active(layer, self.oracle.hidden(layer, x))

    def __call__(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        active = self.active(layer, x)
        needed = active.any(0).nonzero().squeeze(1)
        cache = self.caches[layer]
        self.counters.neurons_needed += needed.numel()
        cold = cache.cold(needed) if cache.pinned else needed
        if cold.numel() > cache.capacity - cache.pinned:  # the window's part of the cache cannot hold them
            return self._stream(layer, x, active, cold, cache)
        # the cache update of NeuronCache.update, split so that the missing neurons' reads overlap the FFN over
        # the neurons already cached; the new rows' part is added when they arrive (the same sum, reordered)
        t0 = time.perf_counter()
        missing = cache.prepare(needed, self.step)
        chunks = self.bundles.chunks(layer, missing)  # one, unless more than the staging buffer (a long prompt)
        pending = self.bundles.start(layer, *chunks[0]) if chunks else None
        self.counters.neurons_read += missing.numel()
        self.counters.update_s += time.perf_counter() - t0
        out = self._compute(x, active, layer, cache, 0, cache.n)
        for k, (chunk, _) in enumerate(chunks):
            t0 = time.perf_counter()
            src, offsets = self.bundles.finish(pending)
            start = cache.n
            cache.append(chunk, src, offsets, self.step)
            if k + 1 < len(chunks):
                pending = self.bundles.start(layer, *chunks[k + 1])
            self.counters.update_s += time.perf_counter() - t0
            out += self._compute(x, active, layer, cache, start, cache.n)
        return out

    def _compute(self, x: torch.Tensor, active: torch.Tensor, layer: int, cache: NeuronCache, start: int, end: int):
        mask = active[:, cache.neuron_of_slot[start:end]] if self.compute == "active" else None
        return cache.ffn(x, layer, start, end, mask)

    def _stream(self, layer: int, x: torch.Tensor, active: torch.Tensor, needed: torch.Tensor, cache: NeuronCache
                ) -> torch.Tensor:
        """More neurons than the cache holds (a long prompt, a tight budget): read them in groups, the next group's
        reads in flight while this one is computed in the staging buffer as read, and sum the partial FFNs; the
        pinned neurons are computed while the first group is read (`needed` excludes them). A group
        is the needed neurons among a range of the layer whose whole span fits a staging buffer (so its plan fits at
        the first try, whatever the gaps), at most half the layer (so two groups overlap). (Groups of the cache's
        capacity, before, cost SmolLM2 at 50% ~7 plans, reads and kernel calls per layer and token for 87 neurons
        each; halves of the needed neurons, which did not fit Qwen2.5's buffer at 530 MB, were re-planned with
        smaller gaps and split: memory management 7.6% -> 12.2% of its time.)"""
        t0 = time.perf_counter()
        s = self.store
        span = max(1, min((self.bundles.staging.numel() - 2 * ALIGN) // s.bundle_bytes,
                          -(-s.config.intermediate_size // 2)))
        cuts = torch.searchsorted(needed, torch.arange(span, s.config.intermediate_size, span))
        sizes = torch.diff(cuts, prepend=torch.zeros(1, dtype=cuts.dtype), append=torch.tensor([needed.numel()]))
        groups = [c for g in needed.split(sizes.tolist()) if g.numel() for c in self.bundles.chunks(layer, g)]
        readers = (self.bundles, self.next_bundles)
        pending = readers[0].start(layer, *groups[0])
        self.counters.update_s += time.perf_counter() - t0
        out = (self._compute(x, active, layer, cache, 0, cache.pinned) if cache.pinned
               else torch.zeros(x.shape[0], self.store.config.hidden_size))
        t0 = time.perf_counter()
        for k, (group, _) in enumerate(groups):
            ahead = readers[(k + 1) % 2].start(layer, *groups[k + 1]) if k + 1 < len(groups) else None
            src, offsets = readers[k % 2].finish(pending)
            self.counters.update_s += time.perf_counter() - t0
            mask = active[:, group] if self.compute == "active" else None
            out += self.math(x, src, group.numel(), layer, offsets=offsets, mask=mask)
            self.counters.neurons_read += group.numel()
            t0 = time.perf_counter()
            pending = ahead
        return out
