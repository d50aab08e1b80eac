"""An opened store ready to run: resident weights in DRAM, the FFN served by the chosen mode."""

from __future__ import annotations

import warnings

import torch

from .errors import InaflashError
from .memory import pin_mmap_threshold, release_free_heap, rss_bytes
from .ffn import HybridFFN, NaiveFlashFFN, ResidentFFN
from .kernels import warn_if_missing
from .models import build_model
from .paths import load_max_gap
from .planner import active_neurons_per_token, choose_mode, parse_memory, plan_hybrid, plan_memory
from .reader import FlashReader, ReadStats
from .sparse import SparseFlashFFN, load_sparsity
from .store import FlashStore

MODES = {
    "auto": "the fastest of the modes below that fits --memory (dram when the model fits)",
    "dram": "whole model in memory: the upper bound",
    "naive": "every layer's whole FFN read from flash for every token: the paper's baseline",
    "hybrid": "as many layers' FFN in DRAM as --memory allows, the others read whole every token",
    "sparse": "only predicted-active neurons, cached over a window of recent tokens, read from flash",
}
DEFAULT_CONTEXT = 1024


class Engine:
    def __init__(self, store: FlashStore, mode: str = "naive", memory: str | int | None = None, window: int = 4,
                 use_predictor: bool = True, context: int | None = None, max_gap: int | None = None,
                 io_threads: int = 8, compute: str = "cached", cache_format: str = "store", checksums: bool = True):
        if mode not in MODES:
            raise InaflashError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        if window < 0:
            raise InaflashError("window must be >= 0")
        pin_mmap_threshold()
        warn_if_missing()
        # what the process holds before any model data (Python, torch, libraries): a whole-process memory limit
        # needs this plus the plan; stats report both, so what the plan leaves out is visible
        self.runtime_bytes = rss_bytes()
        self.store, self.config = store, store.config
        self.context = min(context or DEFAULT_CONTEXT, self.config.max_position_embeddings)
        self.choice = None
        sparsity = load_sparsity(store) if mode in ("auto", "sparse") else None  # read once (predictors included)
        if mode == "auto":
            budget = None if memory is None else parse_memory(memory, store)
            self.choice = choose_mode(store, budget, self.context, sparsity, window, cache_format,
                                      context_given=context is not None)
            mode, memory, self.context = self.choice.mode, self.choice.budget, self.choice.context
        self.mode = mode
        # checksums: every page read from flash and every resident tensor checked against the store's checksums
        # (README: the cost, measured); off only when asked, and then said
        if not checksums:
            warnings.warn("checksums off: data read from the store is not verified", RuntimeWarning, stacklevel=2)
        self.reader = FlashReader(store.ffn_path, threads=io_threads, pages=store.pages(store.ffn_path, checksums))
        self.plan = None
        if mode == "sparse":
            if max_gap is None:  # the gap `inaflash probe` measured on this machine, else the default
                max_gap = load_max_gap()
            if sparsity is None:
                raise InaflashError(f"store {store.path} is not calibrated for sparsity: run  "
                                    f"inaflash calibrate {store.path}")
            budget = None if memory is None else parse_memory(memory, store)
            self.plan = plan_memory(store, budget, self.context, sparsity.predictor_bytes if use_predictor else 0,
                                    window, active_neurons_per_token(store, sparsity), cache_format)
            self.ffn = SparseFlashFFN(store, self.reader, sparsity, self.plan.cache_capacity, self.plan.window,
                                      use_predictor=use_predictor, max_gap=max_gap,
                                      staging_bytes=self.plan.staging_bytes // 2, compute=compute,
                                      cache_format=cache_format)
        elif mode == "dram":
            self.ffn = ResidentFFN(store, self.reader)
        elif mode == "hybrid":
            budget = None if memory is None else parse_memory(memory, store)
            self.ffn = HybridFFN(store, self.reader, plan_hybrid(store, budget, self.context))
        else:
            self.ffn = NaiveFlashFFN(store, self.reader)
        self.reader.stats = ReadStats()  # loading (dram mode, the oracle) is not generation I/O
        self.weights = store.resident_weights(check=checksums)
        self.embedding = None
        if store.embed is not None:
            from .embedding import FlashEmbedding

            self.embedding = FlashEmbedding(store, checksums=checksums)
            self.embedding.reader.stats = self.reader.stats  # its reads count with the FFN's
            self.weights[store.embed["name"]] = self.embedding
        self.tokenizer = store.tokenizer()
        release_free_heap()
        self.model = None
        self.max_seq = 0
        # a plan within a budget holds a KV cache of self.context tokens, no more
        self.bounded = self.plan is not None or (memory is not None and mode in ("hybrid", "naive"))

    def reset(self, max_seq: int) -> None:
        """A fresh KV cache for `max_seq` positions (keeps the model when it is already large enough)."""
        limit = self.config.max_position_embeddings
        if max_seq > limit:
            raise InaflashError(f"{max_seq} tokens exceed the model's context of {limit} (prompt + max tokens)")
        if self.bounded and max_seq > self.context:
            raise InaflashError(f"{max_seq} tokens exceed the planned context of {self.context} "
                                "(prompt + max tokens; raise --context, or --memory)")
        if self.model is None or max_seq > self.max_seq:
            self.model = None  # free the old cache first
            self.model = build_model(self.config, self.weights, self.ffn, max_seq)
            self.max_seq = max_seq

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, pos: int, last_only: bool = False) -> torch.Tensor:
        return self.model.forward(ids, pos, last_only=last_only)

    def close(self) -> None:
        self.reader.close()
        if self.embedding is not None:
            self.embedding.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
