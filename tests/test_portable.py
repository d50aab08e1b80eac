"""The native library's portable path on another architecture (ARM64, as the paper's Apple M1): the C sources compile
with a cross-compiler, and a harness run under qemu-user checks what that build does there: the FFN kernel and the
resident matrix products decline (-1: Python takes torch), the CRC declines where there is no SSE4.2 (google-crc32c
then), and what it does compute (RMSNorm, RoPE, the cache's row moves) against plain C references. Skipped where
Debian's gcc-aarch64-linux-gnu and qemu-user are not installed (CI on a fresh machine)."""

import shutil
import subprocess
from pathlib import Path

import pytest

CC, QEMU = shutil.which("aarch64-linux-gnu-gcc"), shutil.which("qemu-aarch64")
SRC = Path(__file__).resolve().parents[1] / "src" / "inaflash"

HARNESS = r"""
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
int inaflash_kernel_version(void);
int inaflash_bundle_ffn(const void *L, const uint8_t *base, const int64_t *offsets, int64_t m, const float *x,
                        int64_t T, const float *mask, float *out, float *hidden, int nthreads, uint32_t *crcs,
                        int64_t npages);
int inaflash_int4_matvec(const uint8_t *w, int64_t rows, int64_t cols, int64_t row_bytes, const float *x, int64_t T,
                         float *out, int nthreads);
int inaflash_int8_matvec(const int8_t *codes, const uint16_t *scales, int64_t rows, int64_t cols, const float *x,
                         int64_t T, float *out, int nthreads);
int inaflash_crc32c(const uint8_t *p, int64_t n, uint32_t *out);
void inaflash_rms_norm(const float *x, const float *w, int64_t T, int64_t d, float eps, float *out);
void inaflash_rope(float *x, int64_t T, int64_t heads, int64_t hd, const float *cos, const float *sin);
void inaflash_move_rows(uint8_t *rows, int64_t stride, const int64_t *from, const int64_t *to, int64_t count);

int main(void) {
    int bad = 0;
    float x[2 * 8], w[8], out[2 * 8], y[16];
    uint32_t crc = 0;
    for (int i = 0; i < 16; i++) x[i] = (float)(i % 7) - 2.5f;
    for (int i = 0; i < 8; i++) w[i] = 0.5f + 0.1f * i;
    bad |= inaflash_kernel_version() != 0;
    bad |= inaflash_bundle_ffn(NULL, NULL, NULL, 1, x, 1, NULL, out, NULL, 1, NULL, 0) != -1;
    bad |= inaflash_int4_matvec(NULL, 1, 64, 40, x, 1, out, 1) != -1;
    bad |= inaflash_int8_matvec(NULL, NULL, 1, 32, x, 1, out, 1) != -1;
    bad |= inaflash_crc32c((const uint8_t *)"123456789", 9, &crc) != -1;
    inaflash_rms_norm(x, w, 2, 8, 1e-6f, out);
    for (int t = 0; t < 2; t++) {
        double ss = 0;
        for (int i = 0; i < 8; i++) ss += (double)x[t * 8 + i] * x[t * 8 + i];
        for (int i = 0; i < 8; i++) {
            double want = x[t * 8 + i] / sqrt(ss / 8 + 1e-6) * w[i];
            bad |= fabs(out[t * 8 + i] - want) > 1e-5 * (1 + fabs(want));
        }
    }
    float c[4] = {0.6f, 0.8f, 0.6f, 0.8f}, s[4] = {0.8f, -0.6f, 0.8f, -0.6f};
    memcpy(y, x, sizeof(float) * 8);  /* 2 heads of 4 at one position */
    inaflash_rope(y, 1, 2, 4, c, s);
    for (int h = 0; h < 2; h++)
        for (int i = 0; i < 2; i++) {
            float a = x[h * 4 + i], b = x[h * 4 + i + 2];
            bad |= fabsf(y[h * 4 + i] - (a * c[i] - b * s[i])) > 1e-6f;
            bad |= fabsf(y[h * 4 + i + 2] - (b * c[i + 2] + a * s[i + 2])) > 1e-6f;
        }
    uint8_t rows[4 * 3] = {1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4};
    int64_t from[1] = {3}, to[1] = {1};
    inaflash_move_rows(rows, 3, from, to, 1);
    bad |= rows[3] != 4 || rows[5] != 4 || rows[0] != 1 || rows[6] != 3;
    printf("%s\n", bad ? "FAIL" : "OK");
    return bad;
}
"""


@pytest.mark.skipif(not (CC and QEMU), reason="needs gcc-aarch64-linux-gnu and qemu-user (Debian packages)")
def test_the_portable_build_runs_on_arm64(tmp_path):
    harness = tmp_path / "harness.c"
    harness.write_text(HARNESS)
    exe = tmp_path / "harness"
    sources = [str(SRC / name) for name in ("kernels.c", "crc32c.c", "ops.c", "uring.c")]
    build = subprocess.run([CC, "-O2", "-std=c11", "-fopenmp", "-Wall", "-o", str(exe),
                            str(harness), *sources, "-lm"], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-3000:]
    assert "warning" not in build.stderr, build.stderr[-3000:]
    sysroot = Path("/usr/aarch64-linux-gnu")
    run = subprocess.run([QEMU, "-L", str(sysroot), str(exe)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "OK", run.stdout + run.stderr
