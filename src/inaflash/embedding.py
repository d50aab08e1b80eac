"""The input embedding, read from flash one row per token: it is a lookup, so holding the whole table in DRAM
buys nothing (Qwen2.5-1.5B's untied table is 467 MB in float16; a token needs 3 KB of it)."""

from __future__ import annotations

import torch

from .reader import FlashReader, aligned_buffer
from .store.format import ALIGN, EMBED_BATCH, FlashStore, round_up


class FlashEmbedding:
    def __init__(self, store: FlashStore, threads: int = 4, checksums: bool = True):
        e = store.embed
        path = store.path / e["file"]
        self.reader = FlashReader(path, threads=threads, pages=store.pages(path, checksums))
        self.rows, self.row_bytes, self.dtype = e["rows"], e["row_bytes"], store.dtype
        self.span = round_up(self.row_bytes) + ALIGN  # the most pages one row can straddle
        self.buf = aligned_buffer(EMBED_BATCH * self.span)

    def __getitem__(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows [T, hidden] (float32) of token ids [T]."""
        ids = ids.reshape(-1).tolist()
        if any(not 0 <= i < self.rows for i in ids):
            raise IndexError(f"token id out of range 0..{self.rows - 1}")
        out = torch.empty(len(ids), self.row_bytes // self.dtype.itemsize)
        for s in range(0, len(ids), EMBED_BATCH):
            batch, requests, starts, pos = ids[s:s + EMBED_BATCH], [], [], 0
            for i in batch:
                first = i * self.row_bytes
                aligned = first // ALIGN * ALIGN
                length = round_up(first + self.row_bytes) - aligned
                requests.append((aligned, self.buf[pos:pos + length]))
                starts.append(pos + first - aligned)
                pos += length
            self.reader.read(requests)
            for k, start in enumerate(starts):
                out[s + k] = self.buf[start:start + self.row_bytes].view(self.dtype)
        return out

    def close(self) -> None:
        self.reader.close()
