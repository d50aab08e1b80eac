"""Keep the process's resident memory close to what the planner accounts for.

glibc raises its mmap threshold each time a large block is freed (up to 32 MiB), after which per-token temporaries
of a few MB come from the heap, whose freed space is rarely given back: measured here, RSS settled ~40 MB above the
plan on SmolLM2 (tests/test_calibrate.py). Fixing the threshold keeps large temporaries mmapped, returned on free.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_MMAP_THRESHOLD = -3  # from glibc's malloc.h
MMAP_THRESHOLD = 128 << 10  # glibc's initial value; setting it explicitly turns the dynamic raise off

_done = False


def pin_mmap_threshold() -> bool:
    """Once per process; a no-op (False) where the C library is not glibc."""
    global _done
    if _done:
        return True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        _done = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError):
        return False
    return _done


def release_free_heap() -> None:
    """Give the heap's free pages back to the system (glibc malloc_trim): loading leaves tens of MB of them
    (Qwen2.5's tokenizer: RSS 389 -> 296 MB), which a whole-process memory limit would otherwise count."""
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


MADV_DONTNEED = 4  # from the Linux kernel's mman-common.h


def drop_pages(t) -> None:
    """Give back the whole pages under tensor `t`, about to be dropped: the resident part's tensors map
    resident.safetensors (safetensors' load_file: one shared mapping of the file, so a tensor freed alone keeps its
    pages resident while any other tensor of the file lives: the draft model's cut head stayed 76 MB of RSS above
    its plan). Only pages wholly inside `t` (an edge page may hold a neighbour's bytes); a no-op where madvise is
    not there."""
    page = 4096
    start, end = -(-t.data_ptr() // page) * page, (t.data_ptr() + t.nbytes) // page * page
    if end <= start:
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_DONTNEED)
    except (OSError, AttributeError):
        pass


def _status_bytes(field: str) -> int | None:
    """A size line of /proc/self/status (e.g. VmRSS) in bytes; None where /proc is not there."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))
    except (OSError, StopIteration):
        return None


def rss_bytes() -> int:
    """This process's resident set now (VmRSS; 0 where /proc is not there)."""
    return _status_bytes("VmRSS") or 0


def reset_peak_rss() -> bool:
    """Start this process's peak (VmHWM) again from its RSS now (Linux: /proc/self/clear_refs 5), so the peak
    measures what comes after, e.g. the model data above the runtime (loading the tokenizer peaks higher than it
    stays). False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """The process's peak resident set: VmHWM (which bench resets per configuration), else ru_maxrss."""
    peak = _status_bytes("VmHWM")
    if peak is not None:
        return peak
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
