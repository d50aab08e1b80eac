"""The output head kept on flash (`--head flash`, or `auto` where the budget cannot hold it): read in slices of rows
every forward pass, the next slice read while this one is multiplied, each page checked. A tied head is the input
embedding too: its lookups read one row per token. The head is the resident part's largest matrix (Qwen2.5-1.5B's
151936 x 1536 int4: 146 MB of 244), every pass needs all of it, so holding it is the right default; reading it
instead costs that many bytes more per pass and frees that much DRAM, which is what lets a draft model run beside
Qwen2.5-1.5B under a 900 MB limit."""

from __future__ import annotations

import google_crc32c
import numpy as np
import torch

from .errors import CorruptStoreError, InaflashError
from .ops import linear
from .embedding import read_rows
from .reader import FlashReader, aligned_buffer
from .store import checksum
from .store.format import ALIGN, EMBED_BATCH, FlashStore, round_up
from .store.quant import Int4Matrix

SLICE_BYTES = 8 << 20  # rows read per slice: two slices in DRAM (large reads for flash, ~1% of the head's time idle)


def dram_bytes(store: FlashStore, name: str) -> int:
    """What a FlashMatrix of `name` holds: two slices (one where one is all of it) and its lookups' row buffer."""
    _, nbytes, shape = store.resident_span(name)
    return _buffer_bytes(shape[0], nbytes // shape[0])


def _slice_rows(rows: int, row_bytes: int) -> int:
    return min(rows, max(1, SLICE_BYTES // row_bytes))


def _buffers(rows: int, row_bytes: int) -> int:
    return 1 if _slice_rows(rows, row_bytes) == rows else 2  # one slice: nothing to read beside it


def _buffer_bytes(rows: int, row_bytes: int) -> int:
    per = _slice_rows(rows, row_bytes)
    return _buffers(rows, row_bytes) * (round_up(per * row_bytes) + ALIGN) + EMBED_BATCH * (round_up(row_bytes) + ALIGN)


class FlashMatrix:
    """Matrix `name` of the resident part, read from resident.safetensors (never mapped): `linear(x)` for the
    head, `[ids]` for the embedding's rows. `like`: the same matrix as loaded (mapped, untouched): its kind."""

    def __init__(self, store: FlashStore, name: str, like, threads: int = 4, checksums: bool = True):
        if isinstance(like, Int4Matrix):
            self.int4, self.dtype, self.cols = True, torch.uint8, like.cols
        elif isinstance(like, torch.Tensor) and like.dim() == 2:
            self.int4, self.dtype, self.cols = False, like.dtype, like.shape[1]
        else:
            raise InaflashError(f"--head flash: {name} is stored as {type(like).__name__}; it reads float or int4 "
                                "heads (convert with --resident-format int4 or float)")
        path = store.path / "resident.safetensors"
        self.offset, nbytes, shape = store.resident_span(name)
        self.rows = shape[0]
        self.row_bytes = nbytes // self.rows
        if self.offset % max(1, self.dtype.itemsize):
            raise InaflashError(f"--head flash: {name} is not aligned to its dtype in {path}")
        per = _slice_rows(self.rows, self.row_bytes)
        self.slices = [(r, min(r + per, self.rows)) for r in range(0, self.rows, per)]
        self.bufs = [aligned_buffer(round_up(per * self.row_bytes) + ALIGN)
                     for _ in range(_buffers(self.rows, self.row_bytes))]
        self.row_buf = aligned_buffer(EMBED_BATCH * (round_up(self.row_bytes) + ALIGN))
        pages = None
        if checksums:
            size = path.stat().st_size
            pages = np.zeros(-(-size // checksum.PAGE), dtype=np.uint32)
        self.reader = FlashReader(path, threads=threads, pages=pages)
        self.reader.register(*self.bufs, self.row_buf)
        try:
            if checksums:
                self._hash_pages(store.manifest["resident"]["crc32c"][name], name)
        except BaseException:
            self.reader.close()
            raise

    def _span(self, r0: int, r1: int) -> tuple[int, int, int]:
        """(aligned file offset, aligned length, offset of row r0 in it) of rows r0..r1."""
        first = self.offset + r0 * self.row_bytes
        start = first // ALIGN * ALIGN
        return start, round_up(first + (r1 - r0) * self.row_bytes) - start, first - start

    def _hash_pages(self, want: int, name: str) -> None:
        """Once at open: every slice read unchecked, the matrix's CRC-32C against the manifest's, and the pages'
        CRCs kept for the reads of every later pass to be checked against."""
        crc = 0
        for r0, r1 in self.slices:
            start, length, skip = self._span(r0, r1)
            buf = self.bufs[0][:length]
            self.reader.submit([(start, buf)], check=False).wait()
            crc = google_crc32c.extend(crc, buf[skip:skip + (r1 - r0) * self.row_bytes].numpy())
            self.reader.pages[start // checksum.PAGE:(start + length) // checksum.PAGE] = checksum.page_crcs(buf)
        if crc != want:
            raise CorruptStoreError(f"{self.reader.path}: {name} does not match its checksum (the store is damaged: "
                                    "re-convert it)")

    def _matrix(self, raw: torch.Tensor, rows: int):
        if self.int4:
            return Int4Matrix(raw.view(rows, self.row_bytes))
        return raw.view(self.dtype).view(rows, self.cols)

    def _start(self, i: int):
        r0, r1 = self.slices[i]
        start, length, skip = self._span(r0, r1)
        buf = self.bufs[i % len(self.bufs)]
        return self.reader.submit([(start, buf[:length])]), buf[skip:skip + (r1 - r0) * self.row_bytes]

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, cols] -> [T, rows] float32, slice by slice as read (each row's products as the resident matrix's)."""
        x = x.float().contiguous()
        out = torch.empty(x.shape[0], self.rows)
        pending = self._start(0)
        try:
            for i, (r0, r1) in enumerate(self.slices):
                batch, raw = pending
                batch.wait()
                pending = None
                if i + 1 < len(self.slices):
                    pending = self._start(i + 1)  # into the other buffer, while this slice is multiplied
                out[:, r0:r1] = linear(x, self._matrix(raw, r1 - r0))
        except BaseException:
            if pending is not None:  # nothing may land in a buffer after this pass has given it up
                try:
                    pending[0].wait()
                except BaseException:
                    pass
            raise
        return out

    def __getitem__(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows [*, cols] float32 of token ids."""
        flat = ids.reshape(-1).tolist()
        if any(not 0 <= i < self.rows for i in flat):
            raise IndexError(f"token id out of range 0..{self.rows - 1}")
        rows = read_rows(self.reader, self.row_buf, self.offset, self.row_bytes, flat)
        out = Int4Matrix(rows).decode(rows) if self.int4 else rows.view(self.dtype).float()
        return out.view(*ids.shape, self.cols)

    def close(self) -> None:
        self.reader.close()
