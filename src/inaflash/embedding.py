"""The input embedding, read from flash one row per token: it is a lookup, so holding the whole table in DRAM
buys nothing (Qwen2.5-1.5B's untied table is 467 MB in float16; a token needs 3 KB of it)."""

from __future__ import annotations

import torch

from .reader import FlashReader, aligned_buffer
from .store.format import ALIGN, EMBED_BATCH, FlashStore, round_up


def read_rows(reader: FlashReader, buf: torch.Tensor, offset: int, row_bytes: int, ids: list[int]) -> torch.Tensor:
    """uint8 [len(ids), row_bytes]: rows `ids` of a table of `row_bytes` rows starting at `offset` in the reader's
    file, read EMBED_BATCH at a time into `buf` (EMBED_BATCH slots of round_up(row_bytes) + ALIGN bytes: the most
    pages a row can straddle)."""
    span = round_up(row_bytes) + ALIGN
    out = torch.empty(len(ids), row_bytes, dtype=torch.uint8)
    for s in range(0, len(ids), EMBED_BATCH):
        requests, starts = [], []
        for k, i in enumerate(ids[s:s + EMBED_BATCH]):
            first = offset + i * row_bytes
            aligned = first // ALIGN * ALIGN
            requests.append((aligned, buf[k * span:k * span + round_up(first + row_bytes) - aligned]))
            starts.append(k * span + first - aligned)
        reader.read(requests)
        for k, start in enumerate(starts):
            out[s + k] = buf[start:start + row_bytes]
    return out


class FlashEmbedding:
    def __init__(self, store: FlashStore, threads: int = 4, checksums: bool = True):
        e = store.embed
        path = store.path / e["file"]
        self.reader = FlashReader(path, threads=threads, pages=store.pages(path, checksums))
        self.rows, self.row_bytes, self.dtype = e["rows"], e["row_bytes"], store.dtype
        self.buf = aligned_buffer(EMBED_BATCH * (round_up(self.row_bytes) + ALIGN))

    def __getitem__(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows [T, hidden] (float32) of token ids [T]."""
        ids = ids.reshape(-1).tolist()
        if any(not 0 <= i < self.rows for i in ids):
            raise IndexError(f"token id out of range 0..{self.rows - 1}")
        return read_rows(self.reader, self.buf, 0, self.row_bytes, ids).view(self.dtype).float()

    def close(self) -> None:
        self.reader.close()
