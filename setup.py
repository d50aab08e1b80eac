"""Builds the native library: the FFN kernel (src/inaflash/kernels.c), the store pages' CRC-32C (crc32c.c), the
attention block's small per-token operations (ops.c) and reads into registered buffers via io_uring (uring.c).
Optional: without a compiler the install still succeeds and inaflash computes with torch (slower)."""
from setuptools import Extension, setup

setup(ext_modules=[Extension("inaflash._kernels", ["src/inaflash/kernels.c", "src/inaflash/crc32c.c",
                                                    "src/inaflash/ops.c", "src/inaflash/uring.c"],
                             extra_compile_args=["-O3", "-march=native", "-fopenmp", "-std=c11"],
                             extra_link_args=["-fopenmp"], optional=True)])
