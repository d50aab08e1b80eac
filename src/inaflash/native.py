"""The native library (kernels.c + crc32c.c, built by `pip install -e .` into inaflash/_kernels*.so): the FFN kernel
that computes from bundles as stored (ffn/kernels.py) and the CRC-32C of store pages (store/checksum.py), loaded once
for both.

Absent (no compiler, a CPU without AVX2/FMA/F16C) or INAFLASH_KERNEL=torch: LIB is None and both fall back to
libraries (torch, google-crc32c), slower.

The library is built in variants (setup.py) and the one this CPU runs is loaded: with AVX-VNNI, with AVX512-VNNI
(256-bit vectors), or the x86-64-v3 (AVX2) build. INAFLASH_KERNEL=avx2 (or avx-vnni, avx512-vnni) takes that build
only, where the CPU runs it (for comparisons). VARIANT names the one loaded.
"""

from __future__ import annotations

import ctypes
import os
import tempfile
from pathlib import Path


# what setup.py builds for (-march=x86-64-v3) and the kernels use: a CPU without them would die on the first call
REQUIRED_FLAGS = ("avx2", "fma", "f16c", "bmi2", "sse4_2")


def cpu_flags() -> set[str] | None:
    """This CPU's feature flags (Linux /proc/cpuinfo); None where they cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


# variants, best first: (library name, the CPU flags it needs beyond REQUIRED_FLAGS, its name)
VARIANTS = (("_kernels_avxvnni", ("avx_vnni",), "avx-vnni"),
            ("_kernels_avx512vnni", ("avx512f", "avx512vl", "avx512bw", "avx512_vnni"), "avx512-vnni"),
            ("_kernels", (), "avx2"))


LABELS = [label for _, _, label in VARIANTS]


def _choose(flags: set[str] | None, forced: str) -> list[tuple[Path, str]]:
    """The libraries this CPU can run, best first (`forced`: a variant's name, that one only)."""
    here = Path(__file__).parent
    out = []
    for name, needs, label in VARIANTS:
        if forced in LABELS and label != forced:
            continue
        if needs and (flags is None or not set(needs) <= flags):
            continue
        out += [(path, label) for path in sorted(here.glob(f"{name}.*so"))]
    return out


def _load():
    forced = os.environ.get("INAFLASH_KERNEL", "").lower()
    if forced == "torch":
        return None, None
    flags = cpu_flags()
    if flags is not None and not set(REQUIRED_FLAGS) <= flags:
        return None, None  # an older x86-64 CPU: torch's path (warn_if_missing says so)
    for path, label in _choose(flags, forced):
        # load a private copy: rebuilding the package (pip install -e .) then never rewrites a library that a
        # running process has mapped (which kills it with SIGBUS)
        with tempfile.NamedTemporaryFile(prefix="inaflash-kernels-", suffix=".so", delete=False) as copy:
            copy.write(path.read_bytes())
        try:
            lib = ctypes.CDLL(copy.name)
        finally:
            os.unlink(copy.name)
        # 0: built without AVX2/FMA/F16C; below 3: built from an older kernels.c (other signatures, a layout without
        # palette levels: it would take a palette for int4): not used
        if lib.inaflash_kernel_version() >= 3:
            return lib, label
    return None, None


LIB, VARIANT = _load()


def function(name: str, *argtypes, restype=ctypes.c_int):
    """The library's function `name` with its signature declared, or None where the library (or this function in
    it) is absent: the caller then takes its library path."""
    fn = getattr(LIB, name, None) if LIB is not None else None
    if fn is not None:
        fn.argtypes, fn.restype = list(argtypes), restype
    return fn
