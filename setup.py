"""Builds the native library: the FFN kernel (src/inaflash/kernels.c), the store pages' CRC-32C (crc32c.c), the
attention block's small per-token operations (ops.c) and reads into registered buffers via io_uring (uring.c).
Optional: without a compiler the install still succeeds and inaflash computes with torch (slower)."""
import platform

from setuptools import Extension, setup

# Built for x86-64-v3 (AVX2, FMA, F16C, BMI2; every x86-64 CPU since 2013-2015), not -march=native: a library built
# on an AVX-512 machine then ran nowhere else (SIGILL), and on this AVX-512 CPU the -march=native build measured the
# same kernel speed (Qwen-shaped layer, one token: float 12.0-12.7 vs 11.8-13.2, int8 19.5-20.8 vs 19.4-21.2, int4
# 25.4-27.2 vs 25.6-26.0 G weights/s, alternated twice: bench/march_ab.py): the kernels are AVX2 intrinsics either
# way. native.py loads it only where the CPU has those extensions.
X86 = platform.machine().lower() in ("x86_64", "amd64")
MARCH = "-march=x86-64-v3" if X86 else "-march=native"
SOURCES = ["src/inaflash/kernels.c", "src/inaflash/crc32c.c", "src/inaflash/ops.c", "src/inaflash/uring.c"]


def kernels(name: str, *flags: str) -> Extension:
    return Extension(name, SOURCES, extra_compile_args=["-O3", MARCH, *flags, "-fopenmp", "-std=c11"],
                     extra_link_args=["-fopenmp"], optional=True)


# Variants chosen at load by what the CPU has (native.py): the integer dot products with VNNI, one instruction where
# AVX2 takes two or three (kernels.c's DOT_U8S8), as AVX-VNNI (VEX: Intel since Alder Lake / Sapphire Rapids, Zen 5)
# and as AVX512-VNNI on 256-bit vectors (EVEX: Cascade Lake, Ice Lake, Zen 4). A compiler without them skips them.
VARIANTS = [kernels("inaflash._kernels_avxvnni", "-mavxvnni", "-DINAFLASH_VNNI=1"),
            kernels("inaflash._kernels_avx512vnni", "-mavx512f", "-mavx512vl", "-mavx512bw", "-mavx512vnni",
                    "-DINAFLASH_VNNI=2")] if X86 else []
setup(ext_modules=[kernels("inaflash._kernels"), *VARIANTS])
