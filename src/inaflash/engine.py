"""An opened store ready to run: resident weights in DRAM, the FFN served by the chosen mode."""

from __future__ import annotations

import torch

from .errors import InaflashError
from .ffn import NaiveFlashFFN, ResidentFFN
from .models import build_model
from .reader import FlashReader, ReadStats
from .store import FlashStore

MODES = {
    "dram": ResidentFFN,  # whole model in memory: the upper bound
    "naive": NaiveFlashFFN,  # every layer's whole FFN read from flash for every token: the paper's baseline
}


class Engine:
    def __init__(self, store: FlashStore, mode: str = "naive", io_threads: int = 8):
        if mode not in MODES:
            raise InaflashError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        self.store, self.mode, self.config = store, mode, store.config
        self.reader = FlashReader(store.ffn_path, threads=io_threads)
        self.ffn = MODES[mode](store, self.reader)
        self.reader.stats = ReadStats()  # loading (dram mode) is not generation I/O
        self.weights = store.resident_weights()
        self.tokenizer = store.tokenizer()
        self.model = None
        self.max_seq = 0

    def reset(self, max_seq: int) -> None:
        """A fresh KV cache for `max_seq` positions (keeps the model when it is already large enough)."""
        limit = self.config.max_position_embeddings
        if max_seq > limit:
            raise InaflashError(f"{max_seq} tokens exceed the model's context of {limit} (prompt + max tokens)")
        if self.model is None or max_seq > self.max_seq:
            self.model = None  # free the old cache first
            self.model = build_model(self.config, self.weights, self.ffn, max_seq)
            self.max_seq = max_seq

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, pos: int, last_only: bool = False) -> torch.Tensor:
        return self.model.forward(ids, pos, last_only=last_only)

    def close(self) -> None:
        self.reader.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
