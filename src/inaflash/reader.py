"""Reads byte ranges of the FFN file from flash, bypassing the page cache.

O_DIRECT needs the file offset, the length and the destination address aligned (4096 here), so destinations are
mmap-backed buffers (page aligned) and callers ask for aligned spans. Reads are issued by long-lived worker threads
(os.preadv releases the GIL): one queue hand-off costs a few microseconds, where an executor task per read costs ~40.
Where O_DIRECT is refused (tmpfs), reads go through the page cache and are dropped from it right after
(posix_fadvise DONTNEED), so repeated runs still read from the device where there is one.

Every read is checked before its caller uses it: given the file's page checksums (store/format.py), the thread that
waits for a batch hashes each piece's pages as the piece lands (checksum.py; ~14 GB/s natively, beside reads of ~2-3
GB/s), in time it would otherwise spend blocked, and re-reads once on a mismatch (a transient fault passes the second
time); a page still wrong raises CorruptStoreError naming the file and the byte range, so damage never becomes an
answer. I/O errors (EIO, EINTR, short reads) are retried a bounded number of times, then named.

Buffers that carry most bytes (naive/hybrid's layer buffers, the sparse path's staging) are registered with the
reader (`register`): each worker thread then reads into them through its own io_uring ring with the buffers fixed
(uring.c), which skips the per-request page pinning of O_DIRECT (naive mode on Qwen2.5: the process's system CPU 54
-> 16-22 ms per token; fio alone showed 8x less per MB). Where io_uring, the registration or a read is refused (an
old kernel, a container's seccomp filter, a locked-memory limit), or without the native library, the same reads go
through preadv.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import queue
import threading
import time
import warnings
import weakref
from dataclasses import dataclass

import numpy as np
import torch

from . import native
from .store import checksum
from .errors import CorruptStoreError, StoreError
from .ops import gather_rows_torch
from .store.format import ALIGN


_p = ctypes.c_void_p
_URING_OPEN = native.function("inaflash_uring_open", restype=_p)
_URING_REGISTER = native.function("inaflash_uring_register", _p, _p, _p, ctypes.c_int)
_URING_READ = native.function("inaflash_uring_read", _p, ctypes.c_int, ctypes.c_int, _p, ctypes.c_uint64,
                              ctypes.c_uint64, restype=ctypes.c_int64)
_URING_CLOSE = native.function("inaflash_uring_close", _p, restype=None)
log = logging.getLogger("inaflash")


def aligned_buffer(nbytes: int) -> torch.Tensor:
    """A page-aligned, zeroed uint8 tensor of at least `nbytes` (rounded up to ALIGN), usable as an O_DIRECT target."""
    size = max(ALIGN, (nbytes + ALIGN - 1) // ALIGN * ALIGN)
    return torch.frombuffer(mmap.mmap(-1, size), dtype=torch.uint8)


@dataclass
class ReadStats:
    bytes: int = 0  # bytes requested from the device (aligned spans)
    requests: int = 0  # read requests (pieces of at most chunk_bytes)
    wait_s: float = 0.0  # time the caller spent issuing reads and blocked waiting for them to finish
    fixed: int = 0  # of the requests, those read into a registered buffer through io_uring

    def copy(self) -> "ReadStats":
        return ReadStats(self.bytes, self.requests, self.wait_s, self.fixed)

    def __sub__(self, other: "ReadStats") -> "ReadStats":
        return ReadStats(self.bytes - other.bytes, self.requests - other.requests, self.wait_s - other.wait_s,
                         self.fixed - other.fixed)


class ReadBatch:
    """A set of submitted reads; wait() blocks until all are in their buffers, checked.

    The workers only read; the thread that waits checks each piece against its page checksums as it lands. A caller
    waits where it has nothing else to do, so the hashing fills time it would spend blocked, where in the workers it
    ran beside the caller's compute on the same two cores. (Whole layers are checked by the FFN kernel instead:
    submit(check=False), then verify(); see NaiveFlashFFN.)"""

    def __init__(self, reader: "FlashReader", count: int, check: bool = True):
        self._reader, self._left, self.check = reader, count, check and reader.pages is not None
        self._cond = threading.Condition()
        self._landed: list[tuple[int, torch.Tensor]] = []  # read, not yet checked
        self.error: BaseException | None = None

    def _finish_one(self, error: BaseException | None, piece: tuple[int, torch.Tensor] | None = None) -> None:
        with self._cond:
            if error is not None and self.error is None:
                self.error = error
            if piece is not None:
                self._landed.append(piece)
            self._left -= 1
            self._cond.notify()

    def _next(self) -> tuple[int, torch.Tensor] | None:
        """A landed piece to check; None once every piece has landed and been taken."""
        with self._cond:
            while not self._landed and self._left:
                self._cond.wait()
            return self._landed.pop() if self._landed else None

    def wait(self) -> None:
        t0 = time.perf_counter()
        while (piece := self._next()) is not None:
            if self.error is None:  # after an error the rest only has to land (its buffers may be reused)
                try:
                    self._reader._check_piece(*piece)
                except BaseException as e:
                    self.error = e
        self._reader.stats.wait_s += time.perf_counter() - t0
        if self.error is not None:
            raise self.error


READ_ATTEMPTS = 4  # per piece, for I/O errors (EIO, EINTR, EAGAIN, a read returning 0 bytes)
RETRY_DELAY_S = 0.01  # doubled after each failed attempt


class FlashReader:
    """Reads of one file. `pages`: its uint32 CRC-32C per 4096-byte page (None: unchecked)."""

    # The file layer: (fd, [buffer], offset) -> bytes read. Faults are injected here in the tests (flipped bits,
    # short reads, EINTR, EIO on the Nth read), below everything the engine does; a replaced pread takes every read
    # (io_uring's included), so that the faults reach them.
    pread = staticmethod(os.preadv)

    # chunk_bytes: longer reads are split into pieces this long, one per worker. 4 MiB: O_DIRECT costs this VM
    # ~0.09 ms of CPU per MB read in 4 MiB pieces against ~0.12 in 1 MiB ones (page pinning and a request each), CPU
    # that naive/hybrid take from the kernel on the same cores; the device's throughput was the same.
    def __init__(self, path, threads: int = 8, chunk_bytes: int = 4 << 20, direct: bool = True,
                 pages: np.ndarray | None = None, fixed_buffers: bool = True):
        self.path = str(path)
        self.fixed_buffers = fixed_buffers and _URING_OPEN is not None
        # buffers read into through io_uring (weak: a provider's buffers go with it), a new version per change
        self._registered: list[weakref.ref] = []
        self._version = 0
        self._fixed_lock = threading.Lock()  # stats.fixed is counted by the workers
        self.pages = pages
        self.chunk_bytes = chunk_bytes
        self.direct = False
        if direct:
            try:
                self.fd = os.open(self.path, os.O_RDONLY | os.O_DIRECT)
                self.direct = True
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                warnings.warn(f"O_DIRECT refused on {self.path}; using buffered reads + fadvise(DONTNEED)",
                              RuntimeWarning, stacklevel=2)
        if not self.direct:
            self.fd = os.open(self.path, os.O_RDONLY)
        self.size = os.fstat(self.fd).st_size
        self.stats = ReadStats()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._workers = [threading.Thread(target=self._work, daemon=True, name=f"inaflash-io-{i}")
                         for i in range(threads)]
        for w in self._workers:
            w.start()

    def register(self, *buffers: torch.Tensor) -> None:
        """Buffers (aligned_buffer) that reads will land in for the reader's life: each worker's ring takes them as
        fixed buffers before its next read. Where that is refused, reads into them go through preadv."""
        if self.fixed_buffers and self.direct:
            live = [r for r in self._registered if r() is not None]  # the dead ones leave the rings with this
            self._registered = live + [weakref.ref(b) for b in buffers]
            self._version += 1

    def submit(self, requests: list[tuple[int, torch.Tensor]], check: bool = True) -> ReadBatch:
        """Start reading each (file offset, destination uint8 tensor) pair; offsets/lengths/addresses ALIGN-ed.
        check=False: wait() does not check the pages; the caller must (check(), or verify() with hashes of its own)
        before anything read is used."""
        t0 = time.perf_counter()
        pieces, nbytes = [], 0
        for offset, dest in requests:
            n = dest.numel()
            if offset % ALIGN or n % ALIGN or dest.data_ptr() % ALIGN:
                raise ValueError(f"unaligned read: offset {offset}, length {n}")
            if offset + n > self.size:
                raise StoreError(f"read past the end of {self.path} ({offset + n} > {self.size} bytes): truncated store?")
            nbytes += n
            if n <= self.chunk_bytes:
                pieces.append((offset, dest))
            else:
                pieces.extend((offset + s, dest[s:s + self.chunk_bytes]) for s in range(0, n, self.chunk_bytes))
        batch = ReadBatch(self, len(pieces), check)
        self.stats.requests += len(pieces)
        self.stats.bytes += nbytes
        for offset, dest in pieces:
            self._queue.put((offset, dest, batch))
        self.stats.wait_s += time.perf_counter() - t0  # issuing reads is I/O time too (100k+ small reads add up)
        return batch

    def read(self, requests: list[tuple[int, torch.Tensor]]) -> None:
        self.submit(requests).wait()

    def _work(self) -> None:
        ring = _Ring() if self.fixed_buffers and self.direct else None
        try:
            while (item := self._queue.get()) is not None:
                offset, dest, batch = item
                error = None
                try:
                    if self._read(offset, dest, ring):
                        with self._fixed_lock:
                            self.stats.fixed += 1
                except BaseException as e:  # handed to the waiting thread
                    error = e
                batch._finish_one(error, (offset, dest) if error is None and batch.check else None)
        finally:
            if ring is not None:
                ring.close()

    def _fixed_index(self, ring, dest: torch.Tensor) -> int | None:
        """Which registered buffer `dest` lies in, once this worker's ring holds the current ones; None: preadv."""
        if ring is None or not self._registered or self.pread is not os.preadv:
            return None
        version, registered = self._version, [r() for r in self._registered]
        if any(t is None for t in registered) or not ring.holds(registered, version):
            return None  # a registered buffer has gone (until the next register()), or no io_uring here
        a, b = dest.data_ptr(), dest.data_ptr() + dest.numel()
        return next((i for i, t in enumerate(registered) if t.data_ptr() <= a and b <= t.data_ptr() + t.numel()),
                    None)

    def _read(self, offset: int, dest: torch.Tensor, ring=None) -> bool:
        """Read dest's bytes from offset; True if all of it went through io_uring's fixed buffers."""
        view = memoryview(dest.numpy())
        done, failures, delay = 0, 0, RETRY_DELAY_S
        fixed = self._fixed_index(ring, dest)
        while done < len(view):
            try:
                if fixed is not None:
                    n = _URING_READ(ring.ptr, self.fd, fixed, dest.data_ptr() + done, len(view) - done, offset + done)
                    if n < 0:  # this ring is done with (a completion may still be due); preadv retries, and
                        ring.fail(f"failed a read ({os.strerror(-n)})")  # names a device error itself
                        fixed = None
                        continue
                else:
                    n = self.pread(self.fd, [view[done:]], offset + done)
                if n <= 0:
                    raise OSError(errno.EIO, f"no bytes at {offset + done} (file shorter than its manifest says?)")
                done += n
            except OSError as e:
                failures += 1
                if failures >= READ_ATTEMPTS:
                    raise StoreError(f"cannot read bytes {offset}-{offset + len(view)} of {self.path} after "
                                     f"{READ_ATTEMPTS} attempts: {e.strerror or e}") from None
                time.sleep(delay)
                delay *= 2
        if not self.direct:
            os.posix_fadvise(self.fd, offset, len(view), os.POSIX_FADV_DONTNEED)
        return fixed is not None

    def check(self, offset: int, dest: torch.Tensor, crcs: np.ndarray | None = None) -> None:
        """Check dest, read from offset with check=False (and landed), as wait() would have: one re-read if a page
        is wrong, CorruptStoreError if it still is. Counted as I/O time."""
        t0 = time.perf_counter()
        try:
            if self.pages is not None:
                self._check_piece(offset, dest, crcs)
        finally:
            self.stats.wait_s += time.perf_counter() - t0

    def verify(self, offset: int, dest: torch.Tensor, crcs: np.ndarray) -> bool:
        """Compare crcs, dest's page CRCs as hashed by its user (the FFN kernel hashes what it computes on), with the
        file's. False: they match. True: dest was damaged and has been read again and checked (whatever was computed
        from it must be computed again); a page still wrong raises CorruptStoreError."""
        first = offset // checksum.PAGE
        if np.array_equal(crcs, self.pages[first:first + crcs.size]):
            return False
        self.check(offset, dest, crcs)
        return True

    def _check_piece(self, offset: int, dest: torch.Tensor, crcs: np.ndarray | None = None) -> None:
        """Hash dest's pages (read from offset) against the file's; one re-read (preadv) if any differ."""
        first = offset // checksum.PAGE
        for attempt in range(2):
            got = checksum.page_crcs(dest) if crcs is None or attempt else crcs
            bad = np.flatnonzero(got != self.pages[first:first + dest.numel() // checksum.PAGE])
            if bad.size == 0:
                return
            if attempt == 0:
                self._read(offset, dest)  # once more from the device: a transient fault passes
        a = offset + int(bad[0]) * checksum.PAGE
        b = offset + (int(bad[-1]) + 1) * checksum.PAGE
        raise CorruptStoreError(f"{self.path}: bytes {a}-{b} do not match their checksums (the store is damaged: "
                                "re-convert it; inaflash info STORE --verify checks it whole)")

    def close(self) -> None:
        for _ in self._workers:
            self._queue.put(None)
        for w in self._workers:
            w.join()
        os.close(self.fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


_SAID: set[str] = set()  # the causes _Ring.fail has logged


class _Ring:
    """One worker thread's io_uring ring (uring.c) and the version of the registered buffers it holds."""

    def __init__(self):
        self.ptr, self.version, self.failed = None, 0, False

    def holds(self, buffers: list[torch.Tensor], version: int) -> bool:
        """Register `buffers` if this ring holds an older set; False if io_uring is refused here (then for good)."""
        if self.failed or self.version == version:
            return not self.failed
        if self.ptr is None:
            self.ptr = _URING_OPEN()
        rc = -1 if not self.ptr else _URING_REGISTER(
            self.ptr, (ctypes.c_uint64 * len(buffers))(*[t.data_ptr() for t in buffers]),
            (ctypes.c_uint64 * len(buffers))(*[t.numel() for t in buffers]), len(buffers))
        if rc != 0:
            self.fail("unavailable" if not self.ptr else f"refused the buffers ({os.strerror(-rc)})")
            return False
        self.version = version
        return True

    def fail(self, why: str) -> None:
        """Reads of this ring's thread go through preadv from now on; said once per process and cause (not once
        per worker thread)."""
        self.failed = True
        if why not in _SAID:
            _SAID.add(why)
            log.info("io_uring %s: reads go through preadv (more CPU per MB)", why)

    def close(self) -> None:
        if self.ptr:
            _URING_CLOSE(self.ptr)
            self.ptr = None


# merge neighbouring reads when fewer bytes than this lie between them: on the reference machine's disk requests stop
# dominating at ~8-25 KiB (~70 us per 4 KiB read at queue depth 1, 40-60k IOPS at 16-32 in flight); `inaflash probe`
# measures this machine's and saves it (bench/results/2026-11-24-probe.json: 48 KiB that day)
DEFAULT_MAX_GAP = 16 << 10


@dataclass
class ReadPlan:
    """Aligned spans covering a sorted set of bundles, and where each bundle lands in the staging buffer."""

    spans: list[tuple[int, int]]  # (file offset, length), both ALIGN-ed
    element_offsets: torch.Tensor  # [m] offset of each bundle in the staging buffer, in dtype elements

    @property
    def nbytes(self) -> int:
        return sum(length for _, length in self.spans)


def plan_bundle_reads(layer_offset: int, bundle_bytes: int, itemsize: int, neurons: torch.Tensor,
                      max_gap: int = DEFAULT_MAX_GAP) -> ReadPlan:
    """Cover bundles `neurons` (sorted ids) of a layer with aligned spans, merging spans at most max_gap apart.
    (numpy: a few hundred ids per call, where torch's per-op overhead would dominate.)"""
    if neurons.numel() == 0:
        return ReadPlan([], torch.zeros(0, dtype=torch.long))
    starts = layer_offset + neurons.numpy().astype(np.int64) * bundle_bytes
    lo = starts // ALIGN * ALIGN
    hi = (starts + bundle_bytes + ALIGN - 1) // ALIGN * ALIGN
    breaks = np.ones(lo.size, dtype=bool)
    if max_gap >= 0:  # negative: no coalescing at all, one read per bundle (the ablation)
        breaks[1:] = lo[1:] - hi[:-1] > max_gap  # hi is non-decreasing: a gap only opens between neighbours
    group = np.cumsum(breaks) - 1
    first = np.flatnonzero(breaks)
    last = np.append(first[1:] - 1, lo.size - 1)
    span_lo, span_hi = lo[first], hi[last]
    lengths = span_hi - span_lo
    staging_pos = np.cumsum(lengths) - lengths
    element_offsets = (staging_pos[group] + starts - span_lo[group]) // itemsize
    return ReadPlan(list(zip(span_lo.tolist(), lengths.tolist())), torch.from_numpy(element_offsets))


class BundleReader:
    """Reads sets of neuron bundles of one layer through a staging buffer, as stored (compressed stays compressed).

    Bundled layout: one coalesced plan over the bundles; finish() hands back the staging buffer and each bundle's
    byte offset in it (no copy). Unbundled (the ablation): one plan per field block (gate rows, up rows, down
    columns), all submitted together, then reassembled into bundle rows."""

    def __init__(self, store, reader: FlashReader, staging_bytes: int | None = None,
                 max_gap: int = DEFAULT_MAX_GAP):
        self.store, self.reader, self.max_gap = store, reader, max_gap
        layer_span = max(e.span for e in store.layers)
        self.staging = aligned_buffer(min(layer_span, staging_bytes or layer_span))
        reader.register(self.staging)

    def plan(self, layer: int, neurons: torch.Tensor, max_gap: int | None = None
             ) -> list[tuple[tuple[int, int], ReadPlan]]:
        """(bundle columns, plan) per region read: one for bundled stores (offsets in bytes), one per field for
        unbundled ones (offsets in elements)."""
        offset, gap = self.store.layers[layer].offset, self.max_gap if max_gap is None else max_gap
        return [(columns, plan_bundle_reads(offset + start, nbytes, unit, neurons, gap))
                for columns, start, nbytes, unit in self.store.regions]

    def fitting_plan(self, layer: int, neurons: torch.Tensor):
        """The plan with the configured gap, or with smaller gaps until it fits the staging buffer (wide gaps over
        a dense set of neurons can add up to more than the buffer); None if not even a gap of 0 fits."""
        gap = self.max_gap
        while True:
            plans = self.plan(layer, neurons, gap)
            if sum(p.nbytes for _, p in plans) <= self.staging.numel():
                return plans
            if gap <= 0:
                return None
            gap = gap // 4 if gap >= 4 * ALIGN else 0

    def planned_bytes(self, layer: int, neurons: torch.Tensor) -> int:
        """What reading `neurons` costs: the plans start() will use, over the chunks() that fit the buffer."""
        return sum(sum(p.nbytes for _, p in plans) for _, plans in self.chunks(layer, neurons))

    def chunks(self, layer: int, neurons: torch.Tensor) -> list[tuple[torch.Tensor, list]]:
        """`neurons` (sorted ids) split into runs whose reads each fit the staging buffer, each with its plan (pass
        both to start())."""
        if neurons.numel() == 0:
            return []
        plans = self.fitting_plan(layer, neurons)
        if plans is not None:
            return [(neurons, plans)]
        if neurons.numel() == 1:
            raise RuntimeError(f"staging buffer of {self.staging.numel()} bytes cannot hold one bundle")
        half = neurons.numel() // 2
        return self.chunks(layer, neurons[:half]) + self.chunks(layer, neurons[half:])

    def start(self, layer: int, neurons: torch.Tensor, plans: list | None = None):
        """Submit the reads (planned here unless `plans` from chunks()) and return at once (None if they do not
        fit the staging buffer: see chunks()). The staging buffer holds one batch: finish() it before starting
        another."""
        plans = plans if plans is not None else self.fitting_plan(layer, neurons)
        if plans is None:
            return None
        requests, pos, bases = [], 0, []
        for (_, plan), (_, _, _, unit) in zip(plans, self.store.regions):
            bases.append(pos // unit)
            for offset, length in plan.spans:
                requests.append((offset, self.staging[pos:pos + length]))
                pos += length
        return self.reader.submit(requests), plans, bases, neurons.numel()

    def finish(self, pending) -> tuple[torch.Tensor, torch.Tensor]:
        """Wait for a started batch: (uint8 buffer, int64 byte offset of each bundle in it), bundles as stored."""
        batch, plans, bases, m = pending
        batch.wait()
        s = self.store
        if len(plans) == 1:
            return self.staging, plans[0][1].element_offsets
        elements = self.staging.view(s.dtype)
        out = torch.empty(m, s.bundle_width, dtype=s.dtype)
        for ((a, b), plan), base in zip(plans, bases):
            out[:, a:b] = gather_rows_torch(elements, base + plan.element_offsets, b - a)
        return out.view(torch.uint8).view(-1), torch.arange(m) * s.bundle_bytes

    def read_raw(self, layer: int, neurons: torch.Tensor) -> torch.Tensor:
        """Bundles of `neurons` (sorted ids) as stored, rows [m, bundle_bytes] uint8."""
        parts = []
        for chunk, plans in self.chunks(layer, neurons):
            src, offsets = self.finish(self.start(layer, chunk, plans))
            parts.append(gather_rows_torch(src, offsets, self.store.bundle_bytes))
        return torch.cat(parts) if parts else torch.empty(0, self.store.bundle_bytes, dtype=torch.uint8)

    def read(self, layer: int, neurons: torch.Tensor) -> torch.Tensor:
        """Bundles of `neurons` (sorted ids), decoded to float rows [m, width] (for checks and the oracle)."""
        return self.store.decode(self.read_raw(layer, neurons), layer)

