"""Plan DRAM use from a budget: resident part + predictors + KV cache + staging + per-layer neuron caches.

The budget covers the model's data (what grows with the model); the Python/torch runtime itself is not in it. A
whole-process limit (a container, a cgroup) needs the runtime plus the plan: the runtime (Python, torch with its
kernels warmed up, the tokenizer) is ~280 MB for SmolLM2 here (`runtime_rss_bytes`), reported per generation next to
`budget_bytes`, `planned_bytes` and `peak_rss_bytes`. Every mode plans within the budget or is refused with its
minimum: the resident part, the KV cache, read buffers, resident FFN layers or neuron caches, and the working memory
of one prefill chunk (working_bytes).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from .errors import BudgetError, InaflashError
from .paths import load_max_gap
from .store.format import FlashStore

UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9,
         "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30}
STAGING_BYTES = 4 << 20  # reads of missing neurons land here before joining the cache
# A cache smaller than what one token needs still runs: that layer's neurons are then read and computed in rounds
# of the cache's size, every token (no reuse), which is what a tight budget on a model with a weak predictor gets
# (Qwen2.5-1.5B under 900 MB). Below 1/16 of the need, the budget is refused.
MAX_STREAM_ROUNDS = 16
# Prompts are prefilled in chunks of this many tokens (generate.py; cancellation is checked between them): the working
# memory of a pass is planned for this many tokens.
PREFILL_CHUNK = 256


def model_bytes(store: FlashStore) -> int:
    return store.resident_bytes + store.ffn_bytes


def parse_memory(spec: str | int, store: FlashStore) -> int:
    """'50%' (of the model's weight bytes), '300MiB', '4GB' or a byte count."""
    if isinstance(spec, int) and spec > 0:
        return spec
    s = str(spec).strip().lower()
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*(%|[a-z]*)", s)
    if m and (m.group(2) == "%" or m.group(2) in UNITS):
        value = float(m.group(1)) * (model_bytes(store) / 100 if m.group(2) == "%" else UNITS[m.group(2)])
        if 0 < value < 1 << 62:
            return int(value)
    raise InaflashError(f"cannot read memory budget {spec!r}: use e.g. 50%, 300MiB or 4GB")


@dataclass
class MemoryPlan:
    budget_bytes: int
    resident_bytes: int
    predictor_bytes: int
    kv_bytes: int
    staging_bytes: int  # read buffers: sparse's staging, naive/hybrid's two whole-layer buffers
    cache_capacity: int  # neurons per layer (sparse); 0 in the other modes
    window: int  # effective window (may be below the requested one when capacity is short)
    cache_bytes: int  # all layers' neuron caches (sparse); the FFN layers held in DRAM (dram, hybrid)
    working_bytes: int = 0  # activations and temporaries of one prefill chunk
    pinned: list | None = None  # per layer, the hot neurons pinned in its cache (hot_neurons); None: window only
    predicted_read_bundles: float | None = None  # per token, all layers, by hot_split's model
    ffn_layers: int = 0  # dram/hybrid: the layers whose FFN is in DRAM
    draft_bytes: int = 0  # speculation "draft": what loading the draft model took (the target plans in the rest)

    @property
    def planned_bytes(self) -> int:
        return self.resident_bytes + self.predictor_bytes + self.kv_bytes + self.staging_bytes + self.cache_bytes \
            + self.working_bytes + self.draft_bytes


def kv_bytes(store: FlashStore, context: int, sequences: int = 1) -> int:
    """KV caches of `context` tokens for `sequences` sequences decoded together (--parallel: each its own)."""
    c = store.config
    return 2 * c.num_layers * context * c.num_kv_heads * c.head_dim * 4 * sequences


# Per engine, whatever the model: the reader threads' stacks and rings, glibc's per-thread arenas, the kernel's
# OpenMP threads. Measured: every mode of SmolLM2 held 2-5.4 MB of peak RSS beyond its parts without this (on an
# AVX-512 Xeon; torch's kernels and their scratch differ by CPU): twice the most seen.
SCRATCH_BYTES = 10 << 20


def working_bytes(store: FlashStore, context: int, chunk: int = PREFILL_CHUNK, vocab: int | None = None) -> int:
    """What one forward pass of a `chunk`-token chunk allocates beside the plan's buffers (float32): the
    hidden states, q/k/v and attention output, the FFN's activations (gate, up, h), one row of attention scores per
    head and token over the context, the last token's logits, and a float16 attention matrix converted to float32
    for a pass of many tokens (ops.linear); and SCRATCH_BYTES. Measured against it (tests/test_memory.py): SmolLM2
    in naive and hybrid held 10-18 MB beyond its resident part, KV cache, buffers and resident layers over a
    121-token prompt and 120 tokens (this formula at 256 tokens of context: 23.0 MB)."""
    c, T = store.config, chunk
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    hidden = T * (4 * c.hidden_size + 2 * q + 2 * kv) * 4
    ffn = T * 3 * c.intermediate_size * 4
    scores = c.num_heads * T * min(context, c.max_position_embeddings) * 4
    widest = max(q, c.hidden_size) * c.hidden_size * 4
    return hidden + ffn + scores + (vocab or c.vocab_size) * 4 + widest + SCRATCH_BYTES


def plan_memory(store: FlashStore, budget: int | None, context: int, predictor_bytes: int, window: int,
                active_neurons: int, cache_format: str = "store", sequences: int = 1) -> MemoryPlan:
    """`active_neurons`: neurons one token needs in the busiest layer (from calibration); caches that cannot hold
    them all (a tight budget) work in rounds, at the cost of re-reading (see MAX_STREAM_ROUNDS)."""
    from .ffn.cache import NeuronCache

    c = store.config
    n, per_neuron = c.intermediate_size, NeuronCache.slot_bytes(store, cache_format)
    staging = 2 * min(max(e.span for e in store.layers), STAGING_BYTES)  # two buffers (see SparseFlashFFN)
    kv, work = kv_bytes(store, context, sequences), working_bytes(store, context)
    fixed = store.resident_bytes + predictor_bytes + kv + staging + work
    if budget is None:
        capacity = n
    else:
        capacity = min(n, max(0, budget - fixed) // (c.num_layers * per_neuron))
        least = math.ceil(active_neurons / MAX_STREAM_ROUNDS)
        if capacity < least:
            caches = c.num_layers * least * per_neuron
            raise BudgetError(
                f"memory budget {budget / 1e6:.1f} MB is too small: this model needs at least "
                f"{(fixed + caches) / 1e6:.1f} MB (resident {store.resident_bytes / 1e6:.1f} + predictors "
                f"{predictor_bytes / 1e6:.1f} + KV cache for {context} tokens {kv / 1e6:.1f} + staging "
                f"{staging / 1e6:.1f} + working {work / 1e6:.1f} + neuron caches {caches / 1e6:.1f} MB for {least} "
                f"neurons per layer, 1/{MAX_STREAM_ROUNDS} of the {active_neurons} a token needs)")
    cache_bytes = c.num_layers * capacity * per_neuron
    effective = window if window == 0 else max(1, min(window, capacity // max(active_neurons, 1)))
    return MemoryPlan(budget or fixed + cache_bytes, store.resident_bytes, predictor_bytes, kv, staging, capacity,
                      effective, cache_bytes, work)


# What computing one neuron costs against reading it, for hot_split: Qwen2.5-1.5B int4, the kernel's 56-63 ms per
# token over 28 x 8960 neurons is ~0.24 us a neuron (bench/kernel_hash_cost.py); its 2880-byte bundle read at the
# 1.3-2.3 GB/s measured while blocked (bench rows' mb_per_s_while_blocked) is 1.3-2.2 us.
COMPUTE_OVER_READ = 0.12


# A split with more pins is taken only where its modelled cost is this much lower: pins that save less than the
# model's error only add compute (its bytes were within 1% of what merged reads read: SmolLM2 and Qwen2.5 at 50%,
# bench rows' predicted_bytes_read_per_token).
SPLIT_MARGIN = 0.02


def coalesced_reads(miss: torch.Tensor, gap: int) -> torch.Tensor:
    """Expected bundles read for a layer whose neuron i (in file order) is missing with probability miss[..., i], when
    reads merge across gaps of at most `gap` bundles (reader.plan_bundle_reads): a bundle not missing is read too
    where missing ones lie close on both sides (within gap/2 each: an approximation). gap <= 0: each missing one
    alone. Leading dimensions are independent layers (or splits); returns their sums."""
    miss = miss.double()
    if gap <= 0:
        return miss.sum(-1)
    n, k = miss.shape[-1], max(1, gap // 2)
    s = torch.nn.functional.pad(torch.cumsum(torch.log1p(-miss.clamp(max=1 - 1e-9)), -1), (1, 0))
    i = torch.arange(n)
    none_before = torch.exp(s[..., i] - s[..., (i - k).clamp(min=0)])
    none_after = torch.exp(s[..., (i + 1 + k).clamp(max=n)] - s[..., i + 1])
    return (miss + (1 - miss) * (1 - none_before) * (1 - none_after)).sum(-1)


def hot_split(freq: torch.Tensor, capacity: int, window: int, compute_cost: float = COMPUTE_OVER_READ, gap: int = 0,
              steps: int = 32) -> tuple[int, float]:
    """How many of a layer's `capacity` cache slots to pin to its hottest neurons (the rest hold the window), and the
    bundles per token it is then expected to read: the split of least cost (bundles read, plus `compute_cost` per
    neuron computed: compute="cached" computes every neuron the cache holds; 0 where only the selected are), tried
    in 1/`steps` of the capacity. `freq` [neurons], in file order: how often each is selected (calibration
    statistics); `gap`: the reader's coalescing gap in bundles.
    A model of independent tokens: a cold neuron is missing when selected and not selected by the window-1 tokens
    before (if the window's union fits its part of the cache, else in proportion), and whenever selected when more
    are selected than that part holds (streaming); reads then merge across gaps (coalesced_reads), so a pinned
    neuron between missing ones is read all the same. Where few are selected, pins save reads; where half or more
    are (SwiGLU here), merged reads cover the layer whatever is pinned, and pinning only adds compute.
    Every split is evaluated at once ([splits, neurons]): Qwen2.5's 28 layers take 0.6 s of start-up so, 0.9 s one
    by one."""
    f = freq.double()
    rank = torch.empty(f.numel(), dtype=torch.long)
    rank[torch.argsort(f, descending=True)] = torch.arange(f.numel())
    held = 1 - (1 - f) ** max(window, 1)  # in the window's union
    seen = 1 - (1 - f) ** (window - 1 if window >= 2 else 0)  # selected by one of the window-1 tokens before
    pins = torch.tensor(sorted({capacity * k // steps for k in range(steps + 1)}), dtype=torch.float64)
    cold = (rank >= pins[:, None]).double()  # [splits, neurons]
    need, union, room = (f * cold).sum(1), (held * cold).sum(1), capacity - pins
    stream = need > room
    kept = torch.where(stream, 0.0, (room / union.clamp(min=1e-9)).clamp(max=1.0))  # the window's share of its union
    miss = f * cold * (1 - seen * kept[:, None])
    computed = pins + torch.where(stream, need, torch.minimum(union, room))
    reads = coalesced_reads(miss, gap)
    cost = reads + compute_cost * computed
    best = 0
    for j in range(1, pins.numel()):  # more pins must pay by more than the model's error
        if cost[j] < cost[best] * (1 - SPLIT_MARGIN):
            best = j
    return int(pins[best]), float(reads[best])


def hot_neurons(store: FlashStore, sparsity, capacity: int, window: int, compute: str = "cached",
                max_gap: int = 0) -> tuple[list, float] | None:
    """Per layer, the neuron ids to pin (hot_split over the predictors' estimated selection frequencies, with the
    reader's coalescing gap `max_gap` in bytes), and the bundles per token all layers are expected to read; None where
    the calibration has no score statistics."""
    if sparsity is None or not sparsity.predictors or sparsity.predictors[0].mean is None:
        return None
    gap = max(max_gap, 0) // store.bundle_bytes
    pins, reads = [], 0.0
    for p in sparsity.predictors:
        freq = p.frequencies()
        h, r = hot_split(freq, capacity, window, COMPUTE_OVER_READ if compute == "cached" else 0.0, gap)
        pins.append(torch.argsort(freq, descending=True)[:h])
        reads += r
    return pins, reads


def active_neurons_per_token(store: FlashStore, sparsity) -> int:
    """The busiest layer's predicted (or true) active count per token, from the calibration report."""
    n = store.config.intermediate_size
    if sparsity is not None and sparsity.density is not None:
        return math.ceil(sparsity.density * n)
    layers = (sparsity.info or {}).get("layers") if sparsity is not None else None
    if not layers:
        return n // 2
    key = "predicted_fraction" if sparsity.predictors else "true_fraction"
    return math.ceil(max(layer.get(key, 0.5) for layer in layers) * n)


def streaming_bytes(store: FlashStore, context: int, sequences: int = 1) -> int:
    """What streaming every layer's FFN needs (naive mode's plan): the resident part, the two read buffers, the KV
    cache for `context` tokens and the working memory of a pass."""
    return plan_dense(store, "naive", None, context, sequences).planned_bytes


def dram_bytes(store: FlashStore, context: int, sequences: int = 1) -> int:
    """dram mode's plan: the whole model, its KV cache and the working memory of a pass."""
    return plan_dense(store, "dram", None, context, sequences).planned_bytes


def plan_dense(store: FlashStore, mode: str, budget: int | None, context: int, sequences: int = 1) -> MemoryPlan:
    """dram, naive or hybrid within `budget` (None: no budget; hybrid then holds every layer): what each part
    holds, or an error naming the minimum. naive and hybrid hold the two whole-layer read buffers (dram reads
    nothing per token); hybrid holds as many layers' FFN as fit beside them."""
    from .ffn.dense import BundleMath, NaiveFlashFFN

    n, layer = store.config.num_layers, max(e.nbytes for e in store.layers)
    kv, work = kv_bytes(store, context, sequences), working_bytes(store, context)
    buffers = BundleMath.decode_bytes(store) if mode == "dram" else NaiveFlashFFN.dram_bytes(store)
    fixed = store.resident_bytes + kv + work + buffers
    least = fixed + (store.ffn_bytes if mode == "dram" else 0)
    if budget is not None and budget < least:
        raise BudgetError(
            f"memory budget {budget / 1e6:.1f} MB is too small for {mode} mode: it needs at least {least / 1e6:.1f} MB "
            f"(resident {store.resident_bytes / 1e6:.1f} + KV cache for {context} tokens"
            f"{f' x {sequences} sequences' if sequences > 1 else ''} {kv / 1e6:.1f} + "
            + (f"FFN {store.ffn_bytes / 1e6:.1f} + decoding {buffers / 1e6:.1f}" if mode == "dram"
               else f"streaming buffers {buffers / 1e6:.1f}")
            + f" + working {work / 1e6:.1f} MB)")
    layers = n if mode == "dram" else 0 if mode == "naive" else \
        n if budget is None else min(n, (budget - fixed) // layer)
    ffn = store.ffn_bytes if mode == "dram" else layers * layer
    return MemoryPlan(budget if budget is not None else fixed + ffn, store.resident_bytes, 0, kv, buffers, 0, 0,
                      ffn, work, ffn_layers=layers)


def plan_hybrid(store: FlashStore, budget: int | None, context: int, sequences: int = 1) -> int:
    """Hybrid mode: how many layers' FFN fit in DRAM next to what streaming needs (all of them without a budget)."""
    return plan_dense(store, "hybrid", budget, context, sequences).ffn_layers


@dataclass
class Choice:
    mode: str
    reason: str
    budget: int  # bytes the chosen mode plans within
    context: int  # tokens of KV cache it plans for


def available_bytes() -> int:
    """DRAM this process may still use: the smaller of the system's MemAvailable and what a cgroup memory limit on
    this process leaves (v1 or v2)."""
    free = None
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
    except OSError:
        pass
    free = free if free is not None else 1 << 62
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                         ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            cap = open(limit).read().strip()
            if cap != "max" and int(cap) < 1 << 60:
                free = min(free, int(cap) - int(open(usage).read()))
        except (OSError, ValueError):
            continue
    return max(free, 0)


MIN_AUTO_CONTEXT = 256  # auto shrinks a default context (not one asked for) down to this before refusing a budget


def choose_mode(store: FlashStore, budget: int | None, context: int, sparsity, window: int,
                cache_format: str = "store", context_given: bool = True, sequences: int = 1,
                head_freed: int = 0) -> Choice:
    """`--mode auto`: the fastest mode whose plan fits `budget` (None: 80% of the DRAM available now).
    dram if the whole model fits; else sparse if the store's calibration passed its quality gate (calibrate.py:
    within the bounds on the validation text), the caches fit, and the neurons it computes per token are fewer bytes
    than hybrid would stream; else hybrid, as many layers resident as fit (naive if none). Sparse is never chosen on a
    calibration without a passed gate: its text would leave dense's.
    Where even streaming does not fit and the context was not asked for, the KV cache is planned for fewer tokens
    (down to MIN_AUTO_CONTEXT; the default model's float16 store at --memory 50%: 1024 tokens need 47 MB of its
    135). `head_freed`: what reading the output head from flash frees, already in `budget` (the reasons name
    the budget given)."""
    given = budget is not None
    budget = budget if given else int(0.8 * available_bytes())
    whole = dram_bytes(store, context, sequences)
    where = f"--memory {(budget - head_freed) / 1e6:.0f} MB" if given else \
        f"80% of the {budget / 0.8e6:.0f} MB available"
    if whole <= budget:
        return Choice("dram", f"the whole model ({whole / 1e6:.0f} MB with its KV cache) fits in {where}", budget,
                      context)
    gate = ((sparsity.info or {}).get("quality") or {}) if sparsity is not None else {}
    why_not_sparse = ("the store is not calibrated (inaflash calibrate)" if sparsity is None or not sparsity.predictors
                      else "its calibration has no quality gate (calibrated before gating: recalibrate)" if not gate
                      else f"its sparsity failed the quality gate ({gate.get('failed')})" if not gate.get("ok")
                      else None)
    sparse, computed = None, gate.get("fraction_computed", 1.0)  # of the FFN per token, by the gate's measure
    expected = None  # bytes sparse is expected to read per token (hot_neurons' model), where the statistics allow
    if why_not_sparse is None:
        try:
            plan = plan_memory(store, budget, context, sparsity.predictor_bytes, window,
                               active_neurons_per_token(store, sparsity), cache_format, sequences)
            hot = hot_neurons(store, sparsity, plan.cache_capacity, plan.window, "cached", load_max_gap())
            expected = None if hot is None else hot[1] * store.bundle_bytes
            sparse = Choice("sparse", f"the model needs {whole / 1e6:.0f} MB, over {where}; its calibration passed the "
                                      f"quality gate, computes {computed:.0%} of the FFN per token, and caches of "
                                      f"{plan.cache_capacity} neurons per layer fit", budget, context)
        except InaflashError as e:
            why_not_sparse = f"sparse does not fit ({e})"
    try:
        layers = plan_hybrid(store, budget, context, sequences)
        shrunk = ""
    except BudgetError:
        if sparse is not None:
            return sparse
        fits = None  # the longest context that streaming fits (its bytes grow with the context)
        lo, hi = MIN_AUTO_CONTEXT, context
        while lo <= hi:
            mid = (lo + hi) // 2
            if streaming_bytes(store, mid, sequences) <= budget:
                fits, lo = mid, mid + 1
            else:
                hi = mid - 1
        if context_given or fits is None:
            least = context if context_given else MIN_AUTO_CONTEXT
            raise BudgetError(
                f"memory budget {budget / 1e6:.1f} MB is too small for this model in any mode: the smallest plan "
                f"(naive: every layer's FFN streamed) needs at least {streaming_bytes(store, least, sequences) / 1e6:.1f} MB "
                f"(resident {store.resident_bytes / 1e6:.1f}, buffers, and KV cache and working memory for {least} "
                "tokens)") from None
        context = fits
        layers = plan_hybrid(store, budget, context, sequences)
        shrunk = f"; KV cache planned for {context} tokens (prompt + answer; more needs more --memory or --context)"
    if sparse is not None:
        # Sparse is chosen where it is expected to read less than hybrid streams (else hybrid: exact, and as fast):
        # the planner's expected bytes (merged reads included: at half the neurons selected they cover the layer), or
        # without score statistics the neurons the gate says it computes (a floor on its reads). A Qwen2.5
        # calibration that passed the gate computes 98% of its FFN, 709 MB per token; hybrid at 530 MB streams 568.
        most = expected if expected is not None else computed * store.ffn_read_bytes
        streamed = sum(e.span for e in store.layers[layers:])
        if most < streamed:
            return sparse
        why_not_sparse = (f"its selection computes {computed:.0%} of the FFN per token (quality gate), "
                          f"{'expected to read' if expected is not None else 'at least'} {most / 1e6:.0f} MB per "
                          f"token, not less than hybrid's {streamed / 1e6:.0f} MB")
    mode = "hybrid" if layers > 0 else "naive"
    return Choice(mode, f"the model needs {whole / 1e6:.0f} MB, over {where}; not sparse: {why_not_sparse}; "
                        f"{layers} of {store.config.num_layers} layers' FFN fit in DRAM, the rest are read per token"
                        f"{shrunk}", budget, context)
