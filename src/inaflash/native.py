"""The native library (kernels.c + crc32c.c, built by `pip install -e .` into inaflash/_kernels*.so): the FFN kernel
that computes from bundles as stored (ffn/kernels.py) and the CRC-32C of store pages (store/checksum.py), loaded once
for both.

Absent (no compiler, a CPU without AVX2/FMA/F16C) or INAFLASH_KERNEL=torch: LIB is None and both fall back to
libraries (torch, google-crc32c), slower.
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


def _load():
    if os.environ.get("INAFLASH_KERNEL", "").lower() == "torch":
        return None
    flags = cpu_flags()
    if flags is not None and not set(REQUIRED_FLAGS) <= flags:
        return None  # an older x86-64 CPU: torch's path (warn_if_missing says so)
    found = sorted(Path(__file__).parent.glob("_kernels*.so"))
    if not found:
        return None
    # load a private copy: rebuilding the package (pip install -e .) then never rewrites a library that a running
    # process has mapped (which kills it with SIGBUS)
    with tempfile.NamedTemporaryFile(prefix="inaflash-kernels-", suffix=".so", delete=False) as copy:
        copy.write(found[0].read_bytes())
    try:
        lib = ctypes.CDLL(copy.name)
    finally:
        os.unlink(copy.name)
    # 0: built without AVX2/FMA/F16C; below 2: built from an older kernels.c (other signatures): not used
    return lib if lib.inaflash_kernel_version() >= 2 else None


LIB = _load()


def function(name: str, *argtypes, restype=ctypes.c_int):
    """The library's function `name` with its signature declared, or None where the library (or this function in
    it) is absent: the caller then takes its library path."""
    fn = getattr(LIB, name, None) if LIB is not None else None
    if fn is not None:
        fn.argtypes, fn.restype = list(argtypes), restype
    return fn
