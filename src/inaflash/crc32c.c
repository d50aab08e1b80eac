/* Built into the same library as kernels.c (setup.py), loaded once by native.py. */
#include <stdint.h>
#include <string.h>

/* CRC-32C (Castagnoli; the checksum of ext4, btrfs and iSCSI) of store data, checked as it is read (store/checksum.py).
 * SSE4.2 has an instruction for it: 8 bytes per instruction, latency 3 cycles, throughput 1, so three independent
 * pages are hashed at once to keep the unit busy (one chain: ~8 GB/s here; three: see docs/measurements.md). Returns -1
 * where the CPU has no SSE4.2 (Python then uses google-crc32c). */
#ifdef __SSE4_2__
#include <nmmintrin.h>
static inline uint32_t crc32c_run(uint32_t crc, const uint8_t *p, int64_t n) {
    uint64_t c = crc;
    for (; n >= 8; p += 8, n -= 8) { uint64_t v; memcpy(&v, p, 8); c = _mm_crc32_u64(c, v); }
    uint32_t c32 = (uint32_t)c;
    for (; n > 0; p++, n--) c32 = _mm_crc32_u8(c32, *p);
    return c32;
}

int inaflash_crc32c(const uint8_t *p, int64_t n, uint32_t *out) {
    *out = ~crc32c_run(0xFFFFFFFFu, p, n);
    return 0;
}

/* out[i] = crc32c of bytes [i * page, (i + 1) * page) for i < npages; page a multiple of 8 */
int inaflash_crc32c_pages(const uint8_t *p, int64_t npages, int64_t page, uint32_t *out) {
    if (page % 8) return -1;
    int64_t i = 0;
    for (; i + 3 <= npages; i += 3) {
        const uint8_t *a = p + i * page, *b = a + page, *c = b + page;
        uint64_t x = 0xFFFFFFFFu, y = 0xFFFFFFFFu, z = 0xFFFFFFFFu;
        for (int64_t k = 0; k < page; k += 8) {
            uint64_t va, vb, vc;
            memcpy(&va, a + k, 8); memcpy(&vb, b + k, 8); memcpy(&vc, c + k, 8);
            x = _mm_crc32_u64(x, va); y = _mm_crc32_u64(y, vb); z = _mm_crc32_u64(z, vc);
        }
        out[i] = ~(uint32_t)x; out[i + 1] = ~(uint32_t)y; out[i + 2] = ~(uint32_t)z;
    }
    for (; i < npages; i++) out[i] = ~crc32c_run(0xFFFFFFFFu, p + i * page, page);
    return 0;
}
#else
int inaflash_crc32c(const uint8_t *p, int64_t n, uint32_t *out) { (void)p; (void)n; (void)out; return -1; }
int inaflash_crc32c_pages(const uint8_t *p, int64_t npages, int64_t page, uint32_t *out) {
    (void)p; (void)npages; (void)page; (void)out; return -1;
}
#endif
