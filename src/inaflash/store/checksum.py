"""Checksums of store data: CRC-32C per 4096-byte page of the files read from flash, per tensor of the resident file.

Pages are the unit of every O_DIRECT read (offsets and lengths are multiples of 4096), so each read can be checked
whole, as it lands, without reading a byte more. CRC-32C because x86 computes it in hardware (SSE4.2): the native
kernel hashes three pages at a time; where the kernel is not built, google-crc32c (also hardware, one call per page)
computes the same values, slower.
"""

from __future__ import annotations

import ctypes
import hashlib
from pathlib import Path

import numpy as np
import torch

from .. import native

PAGE = 4096
ALGORITHM = "crc32c"


_P, _I64 = ctypes.c_void_p, ctypes.c_int64
_CRC = native.function("inaflash_crc32c", _P, _I64, _P)
_PAGES = native.function("inaflash_crc32c_pages", _P, _I64, _I64, _P)


def _u8(data) -> np.ndarray:
    if isinstance(data, torch.Tensor):
        data = data.contiguous().view(torch.uint8).reshape(-1).numpy()
    return np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data.reshape(-1).view(np.uint8)


def crc32c(data) -> int:
    """CRC-32C of a bytes-like object, numpy array or tensor (its raw bytes)."""
    a = np.ascontiguousarray(_u8(data))
    if _CRC is not None:
        out = np.zeros(1, dtype=np.uint32)
        if _CRC(a.ctypes.data, a.size, out.ctypes.data) == 0:
            return int(out[0])
    import google_crc32c

    return google_crc32c.value(a.tobytes())


def page_crcs(data, page: int = PAGE) -> np.ndarray:
    """uint32 CRC-32C of each `page`-byte piece of `data` (its length a multiple of `page`; the store's pages, or a
    matrix's rows)."""
    a = np.ascontiguousarray(_u8(data))
    if a.size % page:
        raise ValueError(f"{a.size} bytes is not a whole number of {page}-byte pages")
    out = np.empty(a.size // page, dtype=np.uint32)
    if _PAGES is not None and _PAGES(a.ctypes.data, out.size, page, out.ctypes.data) == 0:
        return out
    import google_crc32c

    for i in range(out.size):
        out[i] = google_crc32c.value(a[i * page:(i + 1) * page].tobytes())
    return out


def file_page_crcs(path: Path, chunk: int = 1 << 22) -> np.ndarray:
    """Page CRCs of a whole file (a final partial page is hashed zero-padded; store files are padded anyway)."""
    parts = []
    with open(path, "rb") as f:
        while data := f.read(chunk):
            if len(data) % PAGE:
                data += bytes(PAGE - len(data) % PAGE)
            parts.append(page_crcs(data))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint32)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def native() -> bool:
    return _PAGES is not None
