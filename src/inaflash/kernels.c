/* inaflash's native kernel: the FFN computed straight from neuron bundles as they lie on flash.
 *
 * A bundle is one neuron's weights, contiguous: [in1 | in2 | out] (SwiGLU: gate row, up row, down column;
 * OPT: fc1 row, its bias, fc2 column), in float32/float16/bfloat16, or compressed (int8 with a float16 scale per
 * group; int4 with a float16 scale and minimum per group, two codes a byte, low nibble first; palette4/palette3:
 * int4's groups with 4/3-bit indices into the layer's levels, SwiGLU only). The byte layout is quant.py's; Python
 * hands it over as a bundle_layout.
 *
 * For each bundle r (rows at base + offsets[r], or base + r * row_bytes) and token t:
 *     h[t, r] = act(in1_r . x_t (+ bias_r)) (* in2_r . x_t)  (* mask[t, r])
 *     out[t, :] += h[t, r] * out_r
 * One pass over each bundle's bytes; codes are converted to float in registers (never to memory), group scales
 * multiply the group's partial sums, an int4 minimum contributes min * sum(x over the group). So a neuron costs the
 * bytes it has on flash, in DRAM and in the multiply alike: the cache holds bundles as read, no transcoding.
 * Rows are split between threads (OpenMP: torch's own runtime, the same libgomp), each with its own output rows,
 * summed at the end. Given `crcs`, each thread also hashes the store pages under the rows it just computed (a layer
 * read whole from flash is checked where its bytes are still in cache, not in a pass of its own over DRAM).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

enum { F32 = 0, F16 = 1, BF16 = 2, INT8 = 3, INT4 = 4, PAL4 = 5, PAL3 = 6 };
/* int4 and the palettes share the int4 paths: groups of 32 with a float16 scale and minimum, codes as nibbles
   (palette3's 3-bit indices are widened to nibbles as they load), palettes' nibbles looked up in the field's levels */
#define Q4(fmt) ((fmt) >= INT4)
#define PAL(fmt) ((fmt) > INT4)
enum { IN1 = 0, IN2 = 1, OUT = 2, BIAS = 3 };
enum { SILU = 0, RELU = 1 };
#define TB 8 /* tokens per pass over a bundle: each weight is loaded once per 8 tokens */
/* passes of up to this many tokens (speculation's verification: 1 + MAX_DRAFT, and a few sequences of a batch) give
   each token the bits a one-token pass gives it (models/common.py PER_TOKEN_ATTENTION: the same for attention) */
#define FEW_TOKENS 16

typedef struct {
    int32_t fmt, d, gated, act;
    int64_t row_bytes;
    int64_t code_off[4];  /* bytes from the bundle's start to each field's first code / element */
    int32_t group_base[4];  /* index of each field's first group in the scales (and minimums) arrays */
    int32_t group[4];  /* group size per field (floats: the field's width) */
    int64_t scale_off, min_off;  /* bytes from the bundle's start to the float16 scales / minimums */
    int32_t qx;  /* int8/int4: quantize activations to int8 per weight group (as llama.cpp's Q8 activations) for
                    the gate/up dot products: integer multiply-adds instead of converting every code to float */
    uint8_t lut[4][16];  /* palettes: each field's codebook as levels 0..127 (quant.py's PALETTE_LEVELS grid) */
    float level;  /* palettes: what a level is worth (1 / 127); int4: 1 */
} bundle_layout;

/* activations for one call: float x, and for qx its int8 codes (int4: per 32 the evens then the odds, the weights'
   nibble order) with a scale per weight group, and the sums of x over each group (int4's minimums multiply those) */
typedef struct { const float *x; const int8_t *q; const float *qs; const float *xsum; int64_t ngroups; } acts;

int inaflash_crc32c_pages(const uint8_t *p, int64_t npages, int64_t page, uint32_t *out);  /* crc32c.c */
#define CRC_PAGE 4096  /* store/checksum.py's PAGE */

/* A part's pages still to hash: [next, stop) of base, into out. rows_pass hashes those that lie wholly under the
   rows it has passed, three at a time (crc32c.c keeps three chains going), while their bytes are still in L1/L2:
   hashed after the whole part (3.2 MB on Qwen2.5) they came back from L3/DRAM and cost the kernel ~40 ms a token. */
typedef struct { const uint8_t *base; uint32_t *out; int64_t next, stop; int failed; } crc_job;

static inline void crc_upto(crc_job *c, int64_t end_byte, int all) {
    int64_t upto = all ? c->stop : end_byte / CRC_PAGE;
    if (upto > c->stop) upto = c->stop;
    int64_t n = upto - c->next;
    if (!all) n -= n % 3;
    if (n <= 0) return;
    if (inaflash_crc32c_pages(c->base + c->next * CRC_PAGE, n, CRC_PAGE, c->out + c->next)) c->failed = 1;
    c->next += n;
}

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#ifdef _OPENMP
#include <omp.h>
#endif

int inaflash_kernel_version(void) { return 3; }  /* 2: bundle_ffn hashes pages (crcs); 3: palettes */
#ifndef INAFLASH_VNNI
#define INAFLASH_VNNI 0
#endif
int inaflash_kernel_variant(void) { return INAFLASH_VNNI; }  /* 0: AVX2, 1: AVX-VNNI, 2: AVX512-VNNI (ymm) */

static inline float half_at(const uint8_t *p) { uint16_t h; memcpy(&h, p, 2); return _cvtsh_ss(h); }

/* 8 consecutive weights of a field, as floats (codes for int8/int4: their group's scale is applied outside) */
static inline __attribute__((always_inline)) __m256 load8(int fmt, const uint8_t *field, int64_t j) {
    switch (fmt) {
    case F32: return _mm256_loadu_ps((const float *)field + j);
    case F16: return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)field + j)));
    case BF16: return _mm256_castsi256_ps(_mm256_slli_epi32(
        _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)field + j))), 16));
    case INT8: return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(field + j))));
    default: {  /* INT4: weight j at bits 4j of the little-endian word */
        uint32_t v; memcpy(&v, field + j / 2, 4);
        const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
        return _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)v), shifts),
                                                   _mm256_set1_epi32(15)));
    }
    }
}

#define MAXG 1024  /* groups (and blocks of 32) per field the kernel handles: d <= 32768 */
#ifndef PREFETCH
#define PREFETCH 1  /* bundles ahead that rows_pass prefetches (1 measured faster than 2, 4, 8 on int4) */
#endif

/* 8 float16 values at p as floats */
static inline __m256 half8(const uint8_t *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }

/* n float16 values at p -> floats (8 at a time) */
static inline void halfs_to_floats(const uint8_t *p, int64_t n, float *out) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, half8(p + 2 * i));
    for (; i < n; i++) out[i] = half_at(p + 2 * i);
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

static inline float hmax(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}

/* 32 floats (4 vectors) times inv, rounded to nearest, as 32 int8 in order (|v * inv| <= 127) */
static inline __m256i pack_int8(const __m256 v[4], __m256 inv) {
    __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(v[0], inv)), i1 = _mm256_cvtps_epi32(_mm256_mul_ps(v[1], inv));
    __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(v[2], inv)), i3 = _mm256_cvtps_epi32(_mm256_mul_ps(v[3], inv));
    __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
    return _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

/* sum of a[i] * b[i] over n floats, 8 at a time (a scalar loop is one long chain of dependent FMAs) */
static inline float dot_floats(const float *a, const float *b, int64_t n) {
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    float r = hsum(acc);
    for (; i < n; i++) r += a[i] * b[i];
    return r;
}

/* One element of a field (OPT's 1-wide bias), dequantized. */
static float scalar_at(const bundle_layout *L, const uint8_t *row, int f, int64_t j) {
    const uint8_t *field = row + L->code_off[f];
    float s = 1.f, m = 0.f, q;
    if (L->fmt >= INT8) s = half_at(row + L->scale_off + 2 * (L->group_base[f] + j / L->group[f]));
    if (L->fmt == INT4) m = half_at(row + L->min_off + 2 * (L->group_base[f] + j / L->group[f]));
    switch (L->fmt) {
    case F32: memcpy(&q, field + 4 * j, 4); return q;
    case F16: return half_at(field + 2 * j);
    case BF16: { uint32_t u = (uint32_t)((const uint16_t *)field)[j] << 16; memcpy(&q, &u, 4); return q; }
    case INT8: return (float)((const int8_t *)field)[j] * s;
    default: return (float)((field[j / 2] >> (4 * (j & 1))) & 15) * s + m;
    }
}

/* res[t] = field_f . x_t for tb tokens, codes converted to float (every format) */
static inline __attribute__((always_inline)) void field_dot(const bundle_layout *L, int fmt, const uint8_t *row,
                                                            int f, const acts *A, int64_t t0, int tb, float *res) {
    const int64_t d = L->d, g = L->group[f], ngroups = d / g;
    const uint8_t *field = row + L->code_off[f];
    const float *x = A->x + t0 * d;
    __m256 tot[TB], acc[TB];
    float mins[TB];
    if (tb == 1 && fmt < INT8 && g % 32 == 0) {  /* one token: four independent chains (one FMA chain is
                                                    latency-bound: ~4 cycles per 8 weights) */
        __m256 c0 = _mm256_setzero_ps(), c1 = c0, c2 = c0, c3 = c0;
        for (int64_t j = 0; j < d; j += 32) {
            c0 = _mm256_fmadd_ps(load8(fmt, field, j), _mm256_loadu_ps(x + j), c0);
            c1 = _mm256_fmadd_ps(load8(fmt, field, j + 8), _mm256_loadu_ps(x + j + 8), c1);
            c2 = _mm256_fmadd_ps(load8(fmt, field, j + 16), _mm256_loadu_ps(x + j + 16), c2);
            c3 = _mm256_fmadd_ps(load8(fmt, field, j + 24), _mm256_loadu_ps(x + j + 24), c3);
        }
        res[0] = hsum(_mm256_add_ps(_mm256_add_ps(c0, c1), _mm256_add_ps(c2, c3)));
        return;
    }
    for (int t = 0; t < tb; t++) { tot[t] = _mm256_setzero_ps(); mins[t] = 0.f; }
    for (int64_t k = 0; k < ngroups; k++) {
        for (int t = 0; t < tb; t++) acc[t] = _mm256_setzero_ps();
        for (int64_t j = k * g; j < (k + 1) * g; j += 8) {
            __m256 w = load8(fmt, field, j);
            for (int t = 0; t < tb; t++) acc[t] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + t * d + j), acc[t]);
        }
        if (fmt >= INT8) {
            __m256 s = _mm256_set1_ps(half_at(row + L->scale_off + 2 * (L->group_base[f] + k)));
            for (int t = 0; t < tb; t++) tot[t] = _mm256_fmadd_ps(s, acc[t], tot[t]);
            if (fmt == INT4) {
                float m = half_at(row + L->min_off + 2 * (L->group_base[f] + k));
                for (int t = 0; t < tb; t++) mins[t] += m * A->xsum[(t0 + t) * ngroups + k];
            }
        } else {
            for (int t = 0; t < tb; t++) tot[t] = _mm256_add_ps(tot[t], acc[t]);
        }
    }
    for (int t = 0; t < tb; t++) res[t] = hsum(tot[t]) + mins[t];
}

/* The integer dot products: acc + the sums of 4 adjacent products of unsigned bytes u and signed bytes s per int32
   lane (DOT_U8S8), and of 2 adjacent int16 products (DOT_S16). With VNNI one instruction each (vpdpbusd, vpdpwssd);
   without it two or three (maddubs then madd by 1: equal results, since no pair of products here reaches int16's
   saturation: 2 * 127 * 127 < 32767, int4 codes <= 15). The library is built once per variant (setup.py) and
   native.py loads the one this CPU runs. */
#if INAFLASH_VNNI == 1  /* AVX-VNNI (VEX): Alder Lake and later Intel, Zen 5 */
#define DOT_U8S8(acc, u, s) _mm256_dpbusd_avx_epi32(acc, u, s)
#define DOT_S16(acc, a, b) _mm256_dpwssd_avx_epi32(acc, a, b)
#elif INAFLASH_VNNI == 2  /* AVX512-VNNI on 256-bit vectors (EVEX): Cascade Lake, Ice Lake, Zen 4 */
#define DOT_U8S8(acc, u, s) _mm256_dpbusd_epi32(acc, u, s)
#define DOT_S16(acc, a, b) _mm256_dpwssd_epi32(acc, a, b)
#else
#define DOT_U8S8(acc, u, s) _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)))
#define DOT_S16(acc, a, b) _mm256_add_epi32(acc, _mm256_madd_epi16(a, b))
#endif

/* 32 int8 codes against int8 activations, as 8 int32 partial sums: one unsigned x signed multiply-add, the codes
   entering as |w| with x's sign flipped where w < 0 (as llama.cpp does) */
static inline __attribute__((always_inline)) __m256i block_q8(const uint8_t *field, int64_t j, const int8_t *xq) {
    __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + j));
    __m256i w = _mm256_loadu_si256((const __m256i *)(field + j));
    return DOT_U8S8(_mm256_setzero_si256(), _mm256_abs_epi8(w), _mm256_sign_epi8(xv, w));
}

/* palette3's 3-bit indices (8 per 3 bytes, index k at bits 3k of the little-endian 24-bit word) as int4 lays codes
   out (two a byte, low nibble first): each 3 bytes into a 32-bit lane, then the 6-bit pairs of indices spread to one
   a byte (12 -> 16 bits of each lane apart, then 6 -> 8), and each pair's second index moved up a bit to the high
   nibble. Here the 32 indices at lo into the low 128 bits and the 32 at hi into the high 128, 12 bytes each (the 4
   after them are loaded, never used: a bundle's codes are always followed by its scales). */
static inline __m256i pal3_pair(const uint8_t *lo, const uint8_t *hi) {
    const __m256i spread = _mm256_setr_epi8(0, 1, 2, -1, 3, 4, 5, -1, 6, 7, 8, -1, 9, 10, 11, -1,
                                            0, 1, 2, -1, 3, 4, 5, -1, 6, 7, 8, -1, 9, 10, 11, -1);
    __m256i w = _mm256_shuffle_epi8(_mm256_loadu2_m128i((const __m128i *)hi, (const __m128i *)lo), spread);
    w = _mm256_or_si256(_mm256_and_si256(w, _mm256_set1_epi32(0x000FFF)),
                        _mm256_slli_epi32(_mm256_and_si256(w, _mm256_set1_epi32(0xFFF000)), 4));
    w = _mm256_or_si256(_mm256_and_si256(w, _mm256_set1_epi32(0x003F003F)),
                        _mm256_slli_epi32(_mm256_and_si256(w, _mm256_set1_epi32(0x0FC00FC0)), 2));
    return _mm256_or_si256(_mm256_and_si256(w, _mm256_set1_epi32(0x07070707)),
                           _mm256_slli_epi32(_mm256_and_si256(w, _mm256_set1_epi32(0x38383838)), 1));
}

/* the 64 codes of a field from code j (j % 64 == 0) as 32 nibble pairs */
static inline __attribute__((always_inline)) __m256i codes64(int fmt, const uint8_t *field, int64_t j) {
    if (fmt == PAL3) return pal3_pair(field + j / 8 * 3, field + j / 8 * 3 + 12);
    return _mm256_loadu_si256((const __m256i *)(field + j / 2));
}

/* a palette field's levels in both 128-bit lanes (for a byte shuffle: nibble -> level); int4: unused, zero */
static inline __attribute__((always_inline)) __m256i field_lut(const bundle_layout *L, int fmt, int f) {
    return PAL(fmt) ? _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)L->lut[f])) : _mm256_setzero_si256();
}

/* int4, 64 codes (two groups of 32, 32 bytes; lo/hi: their low and high nibbles) against int8 activations x0, x1
   stored per 64 as [evens of the first 32, evens of the second 32, odds of the first, odds of the second] (the order
   low and high nibbles come out in): 8 int32 partial sums, lanes 0-3 of the first group, 4-7 of the second */
static inline __attribute__((always_inline)) __m256i q4_dot64_split(int fmt, __m256i lo, __m256i hi, __m256i x0,
                                                                    __m256i x1) {
#if INAFLASH_VNNI
    (void)fmt;
    return DOT_U8S8(DOT_U8S8(_mm256_setzero_si256(), lo, x0), hi, x1);
#else
    /* int4: both halves' int16 pair sums add before widening (4 * 15 * 127 fits); palette levels (<= 127) do not */
    if (PAL(fmt))
        return _mm256_add_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(lo, x0), _mm256_set1_epi16(1)),
                                _mm256_madd_epi16(_mm256_maddubs_epi16(hi, x1), _mm256_set1_epi16(1)));
    return _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(lo, x0), _mm256_maddubs_epi16(hi, x1)),
                             _mm256_set1_epi16(1));
#endif
}

/* the 32 code bytes v split into low and high nibbles (palettes: looked up in lut, the field's levels) */
static inline __attribute__((always_inline)) void split_codes(int fmt, __m256i lut, __m256i v, __m256i *lo, __m256i *hi) {
    const __m256i low4 = _mm256_set1_epi8(15);
    *lo = _mm256_and_si256(v, low4);
    *hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
    if (PAL(fmt)) *lo = _mm256_shuffle_epi8(lut, *lo), *hi = _mm256_shuffle_epi8(lut, *hi);
}

/* q4_dot64_split of the 32 code bytes v */
static inline __attribute__((always_inline)) __m256i q4_dot64(int fmt, __m256i lut, __m256i v, __m256i x0, __m256i x1) {
    __m256i lo, hi;
    split_codes(fmt, lut, v, &lo, &hi);
    return q4_dot64_split(fmt, lo, hi, x0, x1);
}

/* q4_dot64 of the 64 codes of field from code j against the activations at xq + j */
static inline __attribute__((always_inline)) __m256i chunk64_q4(int fmt, __m256i lut, const uint8_t *field, int64_t j,
                                                               const int8_t *xq) {
    return q4_dot64(fmt, lut, codes64(fmt, field, j), _mm256_loadu_si256((const __m256i *)(xq + j)),
                    _mm256_loadu_si256((const __m256i *)(xq + j + 32)));
}

/* res[t] = field_f . x_t for int8/int4 codes against the activations quantized per weight group (one scale
   each: a group's integer sums add up before one conversion and one FMA). The group scales (and int4's
   minimums) are converted once per bundle, 8 at a time, and multiplied by the activations' scales as vectors, so
   the block loop has no scalar work. */
static inline __attribute__((always_inline)) void field_dot_q(const bundle_layout *L, int fmt, const uint8_t *row,
                                                              int f, const acts *A, int64_t t0, int tb, float *res) {
    const int64_t d = L->d, g = L->group[f], ngroups = d / g;
    const uint8_t *field = row + L->code_off[f];
    float sw[MAXG], mn[MAXG], db[MAXG];
    halfs_to_floats(row + L->scale_off + 2 * L->group_base[f], ngroups, sw);
    if (Q4(fmt)) halfs_to_floats(row + L->min_off + 2 * L->group_base[f], ngroups, mn);
    const __m256i lut = field_lut(L, fmt, f);
    for (int t = 0; t < tb; t++) {
        const int8_t *xq = A->q + (t0 + t) * d;
        const float *qs = A->qs + (t0 + t) * ngroups, *xs = A->xsum + (t0 + t) * ngroups;
        float mins = Q4(fmt) ? dot_floats(mn, xs, ngroups) : 0.f;
        int64_t k = 0;
        for (; k + 8 <= ngroups; k += 8)
            _mm256_storeu_ps(db + k, _mm256_mul_ps(_mm256_loadu_ps(sw + k), _mm256_loadu_ps(qs + k)));
        for (; k < ngroups; k++) db[k] = sw[k] * qs[k];
        __m256 c0 = _mm256_setzero_ps(), c1 = c0;  /* two chains */
        if (Q4(fmt) && g == 32) {  /* 64 codes a step (d % 64 == 0: checked at entry) */
            const __m256i lanes[4] = {_mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1), _mm256_setr_epi32(2, 2, 2, 2, 3, 3, 3, 3),
                                      _mm256_setr_epi32(4, 4, 4, 4, 5, 5, 5, 5), _mm256_setr_epi32(6, 6, 6, 6, 7, 7, 7, 7)};
            for (k = 0; k + 8 <= ngroups; k += 8) {
                __m256 dv = _mm256_loadu_ps(db + k);
                c0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(chunk64_q4(fmt, lut, field, k * 32, xq)), _mm256_permutevar8x32_ps(dv, lanes[0]), c0);
                c1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(chunk64_q4(fmt, lut, field, k * 32 + 64, xq)), _mm256_permutevar8x32_ps(dv, lanes[1]), c1);
                c0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(chunk64_q4(fmt, lut, field, k * 32 + 128, xq)), _mm256_permutevar8x32_ps(dv, lanes[2]), c0);
                c1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(chunk64_q4(fmt, lut, field, k * 32 + 192, xq)), _mm256_permutevar8x32_ps(dv, lanes[3]), c1);
            }
            for (; k < ngroups; k += 2)
                c0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(chunk64_q4(fmt, lut, field, k * 32, xq)),
                                     _mm256_set_m128(_mm_set1_ps(db[k + 1]), _mm_set1_ps(db[k])), c0);
            res[t] = hsum(_mm256_add_ps(c0, c1)) + mins;
            continue;
        }
        for (k = 0; k + 2 <= ngroups; k += 2) {
            __m256i s0 = block_q8(field, k * g, xq), s1 = block_q8(field, (k + 1) * g, xq);
            for (int64_t j = 32; j < g; j += 32) {
                s0 = _mm256_add_epi32(s0, block_q8(field, k * g + j, xq));
                s1 = _mm256_add_epi32(s1, block_q8(field, (k + 1) * g + j, xq));
            }
            c0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s0), _mm256_broadcast_ss(db + k), c0);
            c1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s1), _mm256_broadcast_ss(db + k + 1), c1);
        }
        if (k < ngroups) {
            __m256i s0 = block_q8(field, k * g, xq);
            for (int64_t j = 32; j < g; j += 32) s0 = _mm256_add_epi32(s0, block_q8(field, k * g + j, xq));
            c0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s0), _mm256_broadcast_ss(db + k), c0);
        }
        res[t] = hsum(_mm256_add_ps(c0, c1)) + mins;
    }
}

#define RA 8  /* rows per rows_axpy: 8 FMAs per load and store of an output vector (with 4: float16 bundles ~10% slower
                 at 8 and 128 tokens, int4 and int8 within 1-6%; /tmp A/B of the two builds in one process) */
/* out_t += sum over R rows of h[r][t] * field_OUT(r), for tb tokens: each output vector is loaded and stored once
   per R rows. int4's minimums add h * min over a whole group: collected in gm [tb tokens][groups], added at the end */
static inline __attribute__((always_inline)) void rows_axpy(const bundle_layout *L, int fmt, const uint8_t **rows,
                                                            float h[][TB], int R, int tb, float *out, float *gm) {
    const int64_t d = L->d, g = L->group[OUT], ngroups = d / g;
    float c[RA][TB], sc[RA][MAXG];
    if (fmt >= INT8)
        for (int r = 0; r < R; r++) {
            halfs_to_floats(rows[r] + L->scale_off + 2 * L->group_base[OUT], ngroups, sc[r]);
            if (fmt == INT4) {  /* the minimums' part, h * min over each whole group, in one vector pass */
                float mn[MAXG];
                halfs_to_floats(rows[r] + L->min_off + 2 * L->group_base[OUT], ngroups, mn);
                for (int t = 0; t < tb; t++) {
                    const float ht = h[r][t];
                    float *gt = gm + t * ngroups;
                    for (int64_t k = 0; k < ngroups; k++) gt[k] += ht * mn[k];
                }
            }
        }
    for (int64_t k = 0; k < ngroups; k++) {
        for (int r = 0; r < R; r++)
            for (int t = 0; t < tb; t++) c[r][t] = fmt >= INT8 ? h[r][t] * sc[r][k] : h[r][t];
        for (int64_t j = k * g; j < (k + 1) * g; j += 8) {
            __m256 w[RA];
            for (int r = 0; r < R; r++) w[r] = load8(fmt, rows[r] + L->code_off[OUT], j);
            for (int t = 0; t < tb; t++) {
                float *o = out + t * d + j;
                __m256 acc = _mm256_loadu_ps(o);
                for (int r = 0; r < R; r++) acc = _mm256_fmadd_ps(_mm256_set1_ps(c[r][t]), w[r], acc);
                _mm256_storeu_ps(o, acc);
            }
        }
    }
}

/* One token, int4 in groups of 32 with quantized activations: gate . x and up . x in one pass, sharing the
 * activation loads; the group scales (times the activations' scales) and the minimums' term are taken 8 groups at a
 * time inside the loop, from the float16 values as stored. ngroups is even (d % 64 == 0). */
static inline __attribute__((always_inline)) void gate_up_q4(const bundle_layout *L, int fmt, const uint8_t *row,
                                                            const uint8_t *fg, const uint8_t *fu, const acts *A,
                                                            int64_t t, float *ga, float *ub) {
    const int64_t ngroups = L->d / 32;
    const int8_t *xq = A->q + t * L->d;
    const float *qs = A->qs + t * ngroups, *xs = A->xsum + t * ngroups;
    const uint8_t *sg = row + L->scale_off + 2 * L->group_base[IN1], *su = row + L->scale_off + 2 * L->group_base[IN2];
    const uint8_t *mg = row + L->min_off + 2 * L->group_base[IN1], *mu = row + L->min_off + 2 * L->group_base[IN2];
    const __m256i lanes[4] = {_mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1), _mm256_setr_epi32(2, 2, 2, 2, 3, 3, 3, 3),
                              _mm256_setr_epi32(4, 4, 4, 4, 5, 5, 5, 5), _mm256_setr_epi32(6, 6, 6, 6, 7, 7, 7, 7)};
    __m256 cg = _mm256_setzero_ps(), cu = cg, ming = cg, minu = cg;
    int64_t k = 0;
    const __m256i lg = field_lut(L, fmt, IN1), lu = field_lut(L, fmt, IN2);
#define CHUNK(field, lut, j, x0, x1) _mm256_cvtepi32_ps(q4_dot64(fmt, lut, codes64(fmt, field, j), x0, x1))
    for (; k + 8 <= ngroups; k += 8) {
        const __m256 q8 = _mm256_loadu_ps(qs + k), x8 = _mm256_loadu_ps(xs + k);
        const __m256 dg = _mm256_mul_ps(half8(sg + 2 * k), q8), du = _mm256_mul_ps(half8(su + 2 * k), q8);
        ming = _mm256_fmadd_ps(half8(mg + 2 * k), x8, ming);
        minu = _mm256_fmadd_ps(half8(mu + 2 * k), x8, minu);
        for (int c = 0; c < 4; c++) {
            const int64_t j = k * 32 + 64 * c;
            const __m256i x0 = _mm256_loadu_si256((const __m256i *)(xq + j)), x1 = _mm256_loadu_si256((const __m256i *)(xq + j + 32));
            cg = _mm256_fmadd_ps(CHUNK(fg, lg, j, x0, x1), _mm256_permutevar8x32_ps(dg, lanes[c]), cg);
            cu = _mm256_fmadd_ps(CHUNK(fu, lu, j, x0, x1), _mm256_permutevar8x32_ps(du, lanes[c]), cu);
        }
    }
    float rg = hsum(ming), ru = hsum(minu);
    for (; k < ngroups; k += 2) {  /* the last groups, two at a time */
        const __m256i x0 = _mm256_loadu_si256((const __m256i *)(xq + k * 32)), x1 = _mm256_loadu_si256((const __m256i *)(xq + k * 32 + 32));
        const float s0 = qs[k], s1 = qs[k + 1];
        cg = _mm256_fmadd_ps(CHUNK(fg, lg, k * 32, x0, x1), _mm256_set_m128(_mm_set1_ps(half_at(sg + 2 * k + 2) * s1),
                                                                          _mm_set1_ps(half_at(sg + 2 * k) * s0)), cg);
        cu = _mm256_fmadd_ps(CHUNK(fu, lu, k * 32, x0, x1), _mm256_set_m128(_mm_set1_ps(half_at(su + 2 * k + 2) * s1),
                                                                          _mm_set1_ps(half_at(su + 2 * k) * s0)), cu);
        rg += half_at(mg + 2 * k) * xs[k] + half_at(mg + 2 * k + 2) * xs[k + 1];
        ru += half_at(mu + 2 * k) * xs[k] + half_at(mu + 2 * k + 2) * xs[k + 1];
    }
#undef CHUNK
    *ga = hsum(cg) + rg;
    *ub = hsum(cu) + ru;
}

/* Several tokens (a prompt), int4 in groups of 32 with quantized activations: gate . x_t and up . x_t for tb
 * tokens, each block of 8 groups (256 codes) unpacked once and multiplied against every token's activations; the
 * integer sums of a block's 8 groups are gathered into one vector (hadd) so that each token costs one conversion and
 * one FMA per block and field, not one per 2 groups as gate_up_q4 spends. Only for widths of whole blocks
 * (ngroups % 8 == 0: rows_pass checks; other widths take field_dot_q). */
static inline __attribute__((always_inline)) void gate_up_q4_tokens(const bundle_layout *L, int fmt, const uint8_t *row,
                                                                   const acts *A, int64_t t0, int tb, float *a,
                                                                   float *b) {
    const int64_t d = L->d, ngroups = d / 32;
    const uint8_t *fg = row + L->code_off[IN1], *fu = row + L->code_off[IN2];
    const uint8_t *sg = row + L->scale_off + 2 * L->group_base[IN1], *su = row + L->scale_off + 2 * L->group_base[IN2];
    const uint8_t *mg = row + L->min_off + 2 * L->group_base[IN1], *mu = row + L->min_off + 2 * L->group_base[IN2];
    const __m256i lg = field_lut(L, fmt, IN1), lu = field_lut(L, fmt, IN2);
    const __m256i order = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);  /* the groups as two hadds leave them */
    __m256 accg[TB], accu[TB], ming[TB], minu[TB];
    for (int t = 0; t < tb; t++) accg[t] = accu[t] = ming[t] = minu[t] = _mm256_setzero_ps();
    for (int64_t k = 0; k < ngroups; k += 8) {
        __m256i G[8], U[8];  /* low and high nibbles of 4 chunks of 64 codes */
        for (int c = 0; c < 4; c++) {
            split_codes(fmt, lg, codes64(fmt, fg, k * 32 + 64 * c), &G[2 * c], &G[2 * c + 1]);
            split_codes(fmt, lu, codes64(fmt, fu, k * 32 + 64 * c), &U[2 * c], &U[2 * c + 1]);
        }
        const __m256 wg = _mm256_permutevar8x32_ps(half8(sg + 2 * k), order);
        const __m256 wu = _mm256_permutevar8x32_ps(half8(su + 2 * k), order);
        const __m256 mg8 = half8(mg + 2 * k), mu8 = half8(mu + 2 * k);
        for (int t = 0; t < tb; t++) {
            const int8_t *xq = A->q + (t0 + t) * d + k * 32;
            __m256i pg[4], pu[4];
            for (int c = 0; c < 4; c++) {
                const __m256i x0 = _mm256_loadu_si256((const __m256i *)(xq + 64 * c));
                const __m256i x1 = _mm256_loadu_si256((const __m256i *)(xq + 64 * c + 32));
                pg[c] = q4_dot64_split(fmt, G[2 * c], G[2 * c + 1], x0, x1);
                pu[c] = q4_dot64_split(fmt, U[2 * c], U[2 * c + 1], x0, x1);
            }
            /* lanes 0-3 of pg[c] are group 2c's partial sums, 4-7 group 2c + 1's: two hadds sum each group's 4,
               leaving groups in the order 0, 2, 4, 6 | 1, 3, 5, 7 */
            const __m256i hg = _mm256_hadd_epi32(_mm256_hadd_epi32(pg[0], pg[1]), _mm256_hadd_epi32(pg[2], pg[3]));
            const __m256i hu = _mm256_hadd_epi32(_mm256_hadd_epi32(pu[0], pu[1]), _mm256_hadd_epi32(pu[2], pu[3]));
            const __m256 qs8 = _mm256_permutevar8x32_ps(_mm256_loadu_ps(A->qs + (t0 + t) * ngroups + k), order);
            const __m256 xs8 = _mm256_loadu_ps(A->xsum + (t0 + t) * ngroups + k);
            accg[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(hg), _mm256_mul_ps(wg, qs8), accg[t]);
            accu[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(hu), _mm256_mul_ps(wu, qs8), accu[t]);
            ming[t] = _mm256_fmadd_ps(mg8, xs8, ming[t]);
            minu[t] = _mm256_fmadd_ps(mu8, xs8, minu[t]);
        }
    }
    for (int t = 0; t < tb; t++) {
        a[t] = hsum(_mm256_add_ps(accg[t], ming[t]));
        b[t] = hsum(_mm256_add_ps(accu[t], minu[t]));
    }
}

/* The int16 coefficients of 32 rows for one output group (v: 4 vectors of 8 floats, rows in order) into q[0] (rows
 * 0-15) and q[1] (16-31): scaled so the largest is 32767, the scale returned (packs_epi32 interleaves 4-lane
 * halves: permuted back to order) */
static inline __attribute__((always_inline)) float quantize_coefficients(const __m256 v[4], __m256i q[2]) {
    __m256 m = _mm256_setzero_ps();
    for (int i = 0; i < 4; i++) m = _mm256_max_ps(m, _mm256_andnot_ps(_mm256_set1_ps(-0.f), v[i]));
    const float amax = hmax(m);
    const __m256 inv = _mm256_set1_ps(amax > 0.f ? 32767.f / amax : 0.f);
    for (int i = 0; i < 2; i++)
        q[i] = _mm256_permute4x64_epi64(_mm256_packs_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(v[2 * i], inv)),
                                                           _mm256_cvtps_epi32(_mm256_mul_ps(v[2 * i + 1], inv))), 0xD8);
    return amax / 32767.f;
}

/* The 32 down codes of output group k (from byte `off` of each bundle; palettes: their levels) of 4 rows as byte
 * pairs (row 0, row 1 | row 2, row 3) per output: P[0], P[1] the low nibbles' outputs j = 0, 2, .., 14 and 16, .., 30;
 * P[2], P[3] the high nibbles' 1, .., 15 and 17, .., 31 */
static inline __attribute__((always_inline)) void pair_codes(int fmt, __m256i lut, const uint8_t *const *rows,
                                                            int64_t off, int64_t k, __m256i P[4]) {
    const __m256i X = fmt == PAL3 ? pal3_pair(rows[0] + off + 12 * k, rows[2] + off + 12 * k) :
        _mm256_loadu2_m128i((const __m128i *)(rows[2] + off + 16 * k), (const __m128i *)(rows[0] + off + 16 * k));
    const __m256i Y = fmt == PAL3 ? pal3_pair(rows[1] + off + 12 * k, rows[3] + off + 12 * k) :
        _mm256_loadu2_m128i((const __m128i *)(rows[3] + off + 16 * k), (const __m128i *)(rows[1] + off + 16 * k));
    __m256i xl, xh, yl, yh;
    split_codes(fmt, lut, X, &xl, &xh);
    split_codes(fmt, lut, Y, &yl, &yh);
    P[0] = _mm256_unpacklo_epi8(xl, yl), P[1] = _mm256_unpackhi_epi8(xl, yl);
    P[2] = _mm256_unpacklo_epi8(xh, yh), P[3] = _mm256_unpackhi_epi8(xh, yh);
}

/* o[0..31] += scale * the int32 sums acc[8] of one output group: lanes summed (acc[0], acc[1] -> j = 0, 2, .., 14;
 * acc[2], acc[3] -> 16, .., 30; odds from acc[4..7]), evens and odds interleaved back into order */
static inline __attribute__((always_inline)) void add_group(const __m256i acc[8], float scale, float *o) {
    const __m256 s = _mm256_set1_ps(scale);
    __m256 v[4];
    for (int i = 0; i < 4; i++)
        v[i] = _mm256_mul_ps(s, _mm256_cvtepi32_ps(_mm256_add_epi32(
            _mm256_permute2x128_si256(acc[2 * i], acc[2 * i + 1], 0x20),
            _mm256_permute2x128_si256(acc[2 * i], acc[2 * i + 1], 0x31))));
    for (int i = 0; i < 2; i++) {  /* evens v[i] and odds v[i + 2] of outputs 16i .. 16i + 15 */
        __m256 lo = _mm256_unpacklo_ps(v[i], v[i + 2]), hi = _mm256_unpackhi_ps(v[i], v[i + 2]);
        _mm256_storeu_ps(o + 16 * i, _mm256_add_ps(_mm256_loadu_ps(o + 16 * i), _mm256_permute2f128_ps(lo, hi, 0x20)));
        _mm256_storeu_ps(o + 16 * i + 8, _mm256_add_ps(_mm256_loadu_ps(o + 16 * i + 8), _mm256_permute2f128_ps(lo, hi, 0x31)));
    }
}

/* One token, int4 down columns in groups of 32: out += sum over R rows of h[r] * field_OUT(r) in integers, as the
 * gate/up dot products are. The coefficients c[r][k] = h[r] * scale[r][k] are quantized to int16 per output group k
 * over the block of rows (one float scale per k and block: ~1e-5 relative error, where int8 coefficients cost 2%
 * on random weights); then for 4 rows at a time the codes of rows (0, 1) and (2, 3) are paired, widened to int16,
 * and one madd multiplies each pair by its two coefficients and adds them, summed in int32 over the block (|sum| <=
 * 16 * 2 * 15 * 32767 < 2^31), converted to float once per block and output group. On Qwen2.5-1.5B's shapes this
 * is ~2x fewer instructions than converting every code to float (rows_axpy). R <= DB; rows past R in the last
 * group of 4 point at a real row with coefficient 0. int4's minimums are summed in float per row into gm. */
#define DB 32
static inline __attribute__((always_inline)) void rows_down_q4(const bundle_layout *L, int fmt, const uint8_t **rows,
                                                              const float *h, int R, float *out, float *gm,
                                                              const uint8_t *const *next, int nnext) {
    const int64_t d = L->d, ngroups = d / 32;
    float c[MAXG][DB] __attribute__((aligned(32)));
    int16_t cq[MAXG][DB] __attribute__((aligned(32)));
    float sb[MAXG], sc[MAXG], mn[MAXG];
    const int Rp = (R + 3) & ~3;
    for (int r = 0; r < R; r++) {
        halfs_to_floats(rows[r] + L->scale_off + 2 * L->group_base[OUT], ngroups, sc);
        halfs_to_floats(rows[r] + L->min_off + 2 * L->group_base[OUT], ngroups, mn);
        const __m256 hv = _mm256_set1_ps(h[r]);
        int64_t k = 0;
        for (; k + 8 <= ngroups; k += 8)
            _mm256_storeu_ps(gm + k, _mm256_fmadd_ps(hv, _mm256_loadu_ps(mn + k), _mm256_loadu_ps(gm + k)));
        for (; k < ngroups; k++) gm[k] += h[r] * mn[k];
        for (k = 0; k < ngroups; k++) c[k][r] = h[r] * sc[k];
    }
    for (int64_t k = 0; k < ngroups; k++) {
        for (int r = R; r < DB; r++) c[k][r] = 0.f;
        const __m256 v[4] = {_mm256_load_ps(c[k]), _mm256_load_ps(c[k] + 8), _mm256_load_ps(c[k] + 16),
                             _mm256_load_ps(c[k] + 24)};
        __m256i q[2];
        sb[k] = quantize_coefficients(v, q) * L->level;
        _mm256_store_si256((__m256i *)cq[k], q[0]);
        _mm256_store_si256((__m256i *)(cq[k] + 16), q[1]);
    }
    const __m256i zero = _mm256_setzero_si256(), lut = field_lut(L, fmt, OUT);
    const int64_t off = L->code_off[OUT], lines = (L->row_bytes + 63) / 64;
    for (int64_t k = 0; k < ngroups; k++) {
        /* the bundles the gate/up pass takes next, a share per group: a block's down projection takes ~3 us of
           the core, long enough for the memory to go idle and the next bundles to arrive late */
        for (int64_t i = nnext * lines * k / ngroups; i < nnext * lines * (k + 1) / ngroups; i++)
            _mm_prefetch((const char *)next[i / lines] + 64 * (i % lines), _MM_HINT_T0);
        /* acc[i]: int32 sums for 4 outputs in each lane (lane 0 from rows 0-1 of each 4, lane 1 from rows 2-3) */
        __m256i acc[8];
        for (int i = 0; i < 8; i++) acc[i] = zero;
        for (int r = 0; r < Rp; r += 4) {
            int32_t w01, w23;
            memcpy(&w01, &cq[k][r], 4);
            memcpy(&w23, &cq[k][r + 2], 4);
            const __m256i w = _mm256_setr_m128i(_mm_set1_epi32(w01), _mm_set1_epi32(w23));
            __m256i P[4];
            pair_codes(fmt, lut, rows + r, off, k, P);  /* widened to int16 pairs below */
            for (int i = 0; i < 4; i++) {
                acc[2 * i] = DOT_S16(acc[2 * i], _mm256_unpacklo_epi8(P[i], zero), w);
                acc[2 * i + 1] = DOT_S16(acc[2 * i + 1], _mm256_unpackhi_epi8(P[i], zero), w);
            }
        }
        add_group(acc, sb[k], out + 32 * k);
    }
}

/* Several tokens, int4 down columns in groups of 32: rows_down_q4 for tb tokens over the same block of rows. Per
 * output group the block's codes are widened once into the int16 pairs rows_down_q4 multiplies (wide, in L1), then
 * each token's coefficients h[r][t] * scale[r][k], quantized to int16 over the block as rows_down_q4 quantizes
 * them, meet them: 8 multiply-adds per 4 rows and 32 outputs per token, where the float path (rows_axpy) converted
 * every code and spent an FMA per 8 outputs, row and token (Qwen2.5-1.5B, 128 tokens in dram: the FFN's down third
 * took most of a prefill). The integer sums are rows_down_q4's, term for term: a token computes the same here as
 * alone. */
static inline __attribute__((always_inline)) void rows_down_q4_tokens(const bundle_layout *L, int fmt,
                                                                     const uint8_t **rows,
                                                                     float h[][TB], int R, int tb, float *out,
                                                                     float *gm, const uint8_t *const *next,
                                                                     int nnext) {
    const int64_t d = L->d, ngroups = d / 32;
    float sc[ngroups][DB] __attribute__((aligned(32)));  /* the block's scales, output group major */
    float hc[TB][DB] __attribute__((aligned(32)));       /* the block's activations, token major */
    __m256i wide[DB / 4][8];
    __m256i cw[TB][DB / 4];  /* the int16 coefficients, per token and 4 rows */
    float sb[TB];
    const int Rp = (R + 3) & ~3;
    for (int r = 0; r < DB; r++) {
        float mn[MAXG], sr[MAXG];
        if (r >= R) {  /* rows past the block: coefficient 0 */
            for (int64_t k = 0; k < ngroups; k++) sc[k][r] = 0.f;
            for (int t = 0; t < TB; t++) hc[t][r] = 0.f;
            continue;
        }
        halfs_to_floats(rows[r] + L->scale_off + 2 * L->group_base[OUT], ngroups, sr);
        halfs_to_floats(rows[r] + L->min_off + 2 * L->group_base[OUT], ngroups, mn);
        for (int64_t k = 0; k < ngroups; k++) sc[k][r] = sr[k];
        for (int t = 0; t < tb; t++) {
            const __m256 hv = _mm256_set1_ps(hc[t][r] = h[r][t]);
            float *gt = gm + t * ngroups;
            int64_t k = 0;
            for (; k + 8 <= ngroups; k += 8)
                _mm256_storeu_ps(gt + k, _mm256_fmadd_ps(hv, _mm256_loadu_ps(mn + k), _mm256_loadu_ps(gt + k)));
            for (; k < ngroups; k++) gt[k] += h[r][t] * mn[k];
        }
    }
    const __m256i zero = _mm256_setzero_si256(), lut = field_lut(L, fmt, OUT);
    const int64_t off = L->code_off[OUT], lines = (L->row_bytes + 63) / 64;
    for (int64_t k = 0; k < ngroups; k++) {
        for (int64_t i = nnext * lines * k / ngroups; i < nnext * lines * (k + 1) / ngroups; i++)
            _mm_prefetch((const char *)next[i / lines] + 64 * (i % lines), _MM_HINT_T0);
        for (int t = 0; t < tb; t++) {  /* rows_down_q4's quantization of the coefficients, per token */
            __m256i q[2];
            const __m256 v[4] = {_mm256_mul_ps(_mm256_load_ps(hc[t]), _mm256_load_ps(sc[k])),
                                 _mm256_mul_ps(_mm256_load_ps(hc[t] + 8), _mm256_load_ps(sc[k] + 8)),
                                 _mm256_mul_ps(_mm256_load_ps(hc[t] + 16), _mm256_load_ps(sc[k] + 16)),
                                 _mm256_mul_ps(_mm256_load_ps(hc[t] + 24), _mm256_load_ps(sc[k] + 24))};
            sb[t] = quantize_coefficients(v, q) * L->level;
            for (int j = 0; j < DB / 4; j++)  /* rows 4j, 4j + 1 in the low lanes, 4j + 2, 4j + 3 in the high ones */
                cw[t][j] = _mm256_permutevar8x32_epi32(q[j / 4], _mm256_setr_epi32(
                    2 * (j % 4), 2 * (j % 4), 2 * (j % 4), 2 * (j % 4),
                    2 * (j % 4) + 1, 2 * (j % 4) + 1, 2 * (j % 4) + 1, 2 * (j % 4) + 1));
        }
        for (int r = 0; r < Rp; r += 4) {  /* rows_down_q4's pairs, widened once for every token */
            __m256i P[4];
            pair_codes(fmt, lut, rows + r, off, k, P);
            for (int i = 0; i < 4; i++) {
                wide[r / 4][2 * i] = _mm256_unpacklo_epi8(P[i], zero);
                wide[r / 4][2 * i + 1] = _mm256_unpackhi_epi8(P[i], zero);
            }
        }
        for (int t = 0; t < tb; t++) {
            __m256i acc[8];
            for (int i = 0; i < 8; i++) acc[i] = zero;
            for (int r = 0; r < Rp; r += 4)
                for (int i = 0; i < 8; i++) acc[i] = DOT_S16(acc[i], wide[r / 4][i], cw[t][r / 4]);
            add_group(acc, sb[t], out + t * d + 32 * k);
        }
    }
}

/* e^x for 8 floats (Cephes' expf: a degree-6 polynomial on x - n ln 2, within ~1 ulp of expf over the clamped range):
   SiLU of 8 tokens at once, where expf one value at a time took ~6% of a 128-token pass over Qwen2.5's FFN */
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

static inline float activate(int act, float v) { return act == SILU ? v / (1.f + expf(-v)) : (v > 0.f ? v : 0.f); }

/* rows lo..hi for tokens t0..t0+tb-1 into out (tb <= TB); rows whose h is 0 for every token (ReLU's zeros,
   masked neurons) are skipped, the others go to the down projection 4 at a time */
static inline __attribute__((always_inline)) void rows_pass(const bundle_layout *L, int fmt, int q, const uint8_t *base,
                                                            const int64_t *offsets, int64_t lo, int64_t hi,
                                                            const acts *A, int64_t t0, int tb, int few, const float *mask,
                                                            int64_t m, float *out, float *gm, float *hidden,
                                                            crc_job *crc) {
    const int64_t d = L->d;
    float a[TB] = {0}, b[TB] = {0}, h[RA][TB], hq[DB], hT[DB][TB], hv[TB];
    const uint8_t *rows[DB];
    int R = 0;
    /* int4 with quantized activations: the down projection in integers too, DB rows at a time (one token:
       rows_down_q4; several: rows_down_q4_tokens) */
    const int qdown = Q4(fmt) && q && L->group[OUT] == 32;
    /* several tokens of int4 with quantized activations, whole blocks of 8 groups: gate/up unpacked once per block
       (a prompt's chunk; a pass of a few tokens, speculation's verification, takes each token's gate/up as a
       one-token pass does, so that a token computes the same bits alone or verified beside others) */
    const int q4tokens = Q4(fmt) && q && tb > 1 && !few && L->gated && (L->d / 32) % 8 == 0;
    for (int64_t r = lo; r < hi; r++) {
        if (crc) crc_upto(crc, r * L->row_bytes, 0);  /* the pages under rows lo..r-1 */
        const uint8_t *row = base + (offsets ? offsets[r] : r * L->row_bytes);
        /* a bundle a few ahead, every cache line (its fields are read out of order), a third before each field's
           work: a whole bundle's lines at once fill the core's miss buffers and stall it */
        const char *ahead = r + PREFETCH < hi ?
            (const char *)base + (offsets ? offsets[r + PREFETCH] : (r + PREFETCH) * L->row_bytes) : NULL;
        const int64_t third = (L->row_bytes / 3 + 63) & ~(int64_t)63;
#define AHEAD(part) do { if (ahead) for (int64_t o = (part) * third; o < ((part) + 1) * third && o < L->row_bytes; o += 64) \
                             _mm_prefetch(ahead + o, _MM_HINT_T0); } while (0)
        if ((qdown && L->gated && (tb == 1 || few)) || q4tokens) {  /* int4 gate and up in one pass */
            AHEAD(0);
            AHEAD(1);
            const uint8_t *fg = row + L->code_off[IN1], *fu = row + L->code_off[IN2];
            if (q4tokens) gate_up_q4_tokens(L, fmt, row, A, t0, tb, a, b);
            else if (fmt == PAL3 && tb > 1) {  /* a few tokens: the indices widened to nibbles once, not per token
                                                  (the same integers: each token's bits are a one-token pass's) */
                uint8_t ng[MAXG * 16] __attribute__((aligned(32))), nu[MAXG * 16] __attribute__((aligned(32)));
                for (int64_t j = 0; j < d; j += 64) {
                    _mm256_store_si256((__m256i *)(ng + j / 2), codes64(PAL3, fg, j));
                    _mm256_store_si256((__m256i *)(nu + j / 2), codes64(PAL3, fu, j));
                }
                for (int t = 0; t < tb; t++) gate_up_q4(L, PAL4, row, ng, nu, A, t0 + t, a + t, b + t);
            } else for (int t = 0; t < tb; t++) gate_up_q4(L, fmt, row, fg, fu, A, t0 + t, a + t, b + t);
            AHEAD(2);
        } else {
            AHEAD(0);
            if (q) field_dot_q(L, fmt, row, IN1, A, t0, tb, a); else field_dot(L, fmt, row, IN1, A, t0, tb, a);
            AHEAD(1);
            if (L->gated) { if (q) field_dot_q(L, fmt, row, IN2, A, t0, tb, b); else field_dot(L, fmt, row, IN2, A, t0, tb, b); }
            AHEAD(2);
        }
#undef AHEAD
        float bias = L->gated ? 0.f : scalar_at(L, row, BIAS, 0);
        int any = 0;
        if (L->act == SILU && tb == 1) {  /* one token as a lane of several (broadcast: a[0] was just stored, and a
                                             vector load of it waits for the store; ~10% of a 1-token FFN) */
            const __m256 v = _mm256_set1_ps(a[0] + bias);
            __m256 s = _mm256_div_ps(v, _mm256_add_ps(_mm256_set1_ps(1.f), exp8(_mm256_sub_ps(_mm256_setzero_ps(), v))));
            hv[0] = _mm256_cvtss_f32(L->gated ? _mm256_mul_ps(s, _mm256_set1_ps(b[0])) : s);
        } else if (L->act == SILU) {  /* all the block's tokens at once (lanes past tb: unused) */
            const __m256 v = _mm256_add_ps(_mm256_loadu_ps(a), _mm256_set1_ps(bias));
            __m256 s = _mm256_div_ps(v, _mm256_add_ps(_mm256_set1_ps(1.f), exp8(_mm256_sub_ps(_mm256_setzero_ps(), v))));
            _mm256_storeu_ps(hv, L->gated ? _mm256_mul_ps(s, _mm256_loadu_ps(b)) : s);
        }
        for (int t = 0; t < tb; t++) {
            float ht;
            if (L->act == SILU) ht = hv[t];
            else {
                float v = activate(L->act, a[t] + bias);
                ht = L->gated ? v * b[t] : v;
            }
            if (mask) ht *= mask[(t0 + t) * m + r];
            if (hidden) hidden[(t0 + t) * m + r] = ht;
            h[R % RA][t] = ht;
            any |= ht != 0.f;
        }
        /* SiLU's rare exact zeros (an underflow) stay: skipping a row changes which rows share a block of the down
           projection's int16 coefficients, so a token that skips it alone and one beside others that do not would
           round differently; ReLU's zeros and masked neurons are many, and worth skipping */
        if (!any && (L->act != SILU || mask)) continue;
        if (qdown) {
            if (tb == 1) hq[R] = h[R % RA][0];
            else for (int t = 0; t < tb; t++) hT[R][t] = h[R % RA][t];
            rows[R] = row;
            for (int pad = ++R; pad < ((R + 3) & ~3); pad++) rows[pad] = row;  /* padding reads a real row */
            if (R == DB) {
                const uint8_t *next[PREFETCH];
                int nnext = 0;
                for (int64_t i = r + 1; i < hi && nnext < PREFETCH; i++)
                    next[nnext++] = base + (offsets ? offsets[i] : i * L->row_bytes);
                if (tb == 1) rows_down_q4(L, fmt, rows, hq, R, out + t0 * d, gm, next, nnext);
                else rows_down_q4_tokens(L, fmt, rows, hT, R, tb, out + t0 * d, gm, next, nnext);
                R = 0;
            }
            continue;
        }
        rows[R++] = row;
        if (R == RA) { rows_axpy(L, fmt, rows, h, RA, tb, out + t0 * d, gm); R = 0; }
    }
    if (R && qdown && tb == 1) rows_down_q4(L, fmt, rows, hq, R, out + t0 * d, gm, NULL, 0);
    else if (R && qdown) rows_down_q4_tokens(L, fmt, rows, hT, R, tb, out + t0 * d, gm, NULL, 0);
    else if (R) rows_axpy(L, fmt, rows, h, R, tb, out + t0 * d, gm);
}

static void rows_all_tokens(const bundle_layout *L, int q, const uint8_t *base, const int64_t *offsets, int64_t lo,
                            int64_t hi, const acts *A, int64_t T, const float *mask, int64_t m, float *out, float *gm,
                            float *hidden, crc_job *crc) {
    const int few = T <= FEW_TOKENS;  /* a pass of a few tokens computes each token as a one-token pass does */
    for (int64_t t0 = 0; t0 < T; t0 += TB) {
        int tb = T - t0 < TB ? (int)(T - t0) : TB;
        float *g = gm + t0 * (L->d / L->group[OUT]);
        crc_job *c = t0 == 0 ? crc : NULL;  /* pages hashed in the first pass over the rows */
        /* one instance per format, with and without quantized activations, and the 1-token case, so the compiler
           specializes each inner loop */
#define PASS(FMT, Q) do { if (tb == 1) rows_pass(L, FMT, Q, base, offsets, lo, hi, A, t0, 1, 1, mask, m, out, g, hidden, c); \
                          else rows_pass(L, FMT, Q, base, offsets, lo, hi, A, t0, tb, few, mask, m, out, g, hidden, c); } while (0)
        switch (L->fmt) {
        case F32: PASS(F32, 0); break;
        case F16: PASS(F16, 0); break;
        case BF16: PASS(BF16, 0); break;
        case INT8: if (q) PASS(INT8, 1); else PASS(INT8, 0); break;
        case PAL4: PASS(PAL4, 1); break;  /* palettes: quantized activations only (checked at entry) */
        case PAL3: PASS(PAL3, 1); break;
        default: if (q) PASS(INT4, 1); else PASS(INT4, 0); break;
        }
#undef PASS
    }
}

/* per token, per group of gq (a multiple of 32): int8 codes of x, their scale, and the sum of the quantized values
   (int4's minimums multiply it); qs is the scale times `level` (a palette level's worth). int4 (perm): stored per 64 as chunk64_q4 reads them, [evens of the first 32, evens
   of the second 32, odds of the first, odds of the second]. Vectors throughout: called once per matrix and token, it
   was ~15 us per call in scalar code with Qwen2.5's 1536 (lrintf a library call), ~0.5 ms per token over 28 FFNs */
static void quantize_acts(const float *x, int64_t T, int64_t d, int64_t gq, int perm, float level, int8_t *q,
                          float *qs, float *xsum) {
    const int64_t ng = d / gq;
    const __m256i ones8 = _mm256_set1_epi8(1);
    const __m256i split = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                           0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
    for (int64_t t = 0; t < T; t++)
        for (int64_t j0 = 0; j0 < d; j0 += gq) {
            const float *v = x + t * d + j0;
            __m256 m = _mm256_setzero_ps();
            for (int64_t i = 0; i < gq; i += 8) m = _mm256_max_ps(m, _mm256_andnot_ps(_mm256_set1_ps(-0.f), _mm256_loadu_ps(v + i)));
            const float amax = hmax(m), s = amax / 127.f;
            const __m256 inv = _mm256_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
            __m256i total = _mm256_setzero_si256();
            __m256i b[2];
            for (int64_t i = 0; i < gq; i += 32) {
                const __m256 vs[4] = {_mm256_loadu_ps(v + i), _mm256_loadu_ps(v + i + 8), _mm256_loadu_ps(v + i + 16),
                                      _mm256_loadu_ps(v + i + 24)};
                __m256i c = pack_int8(vs, inv);
                total = DOT_U8S8(total, ones8, c);
                if (!perm) { _mm256_storeu_si256((__m256i *)(q + t * d + j0 + i), c); continue; }
                b[((j0 + i) / 32) & 1] = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(c, split), 0xD8);
                if (((j0 + i) / 32) & 1) {  /* a whole 64: [evens, odds] of each half, reassembled */
                    __m256i *to = (__m256i *)(q + t * d + j0 + i - 32);
                    _mm256_storeu_si256(to, _mm256_permute2x128_si256(b[0], b[1], 0x20));
                    _mm256_storeu_si256(to + 1, _mm256_permute2x128_si256(b[0], b[1], 0x31));
                }
            }
            __m128i t4 = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
            t4 = _mm_add_epi32(t4, _mm_shuffle_epi32(t4, 0x4E));
            t4 = _mm_add_epi32(t4, _mm_shuffle_epi32(t4, 0xB1));
            qs[t * ng + j0 / gq] = s * level;  /* palettes: a level's worth folded into the dot products' scale */
            xsum[t * ng + j0 / gq] = s * (float)_mm_cvtsi128_si32(t4);
        }
}

/* out [T, d] += the FFN over the m bundles (see the top of this file). x [T, d] float32; mask [T, m] or NULL;
 * hidden [T, m] (the activations h, for checks) or NULL. crcs [npages] or NULL: CRC-32C of each 4096-byte page of
 * base[0, npages * 4096) (rows evenly spaced from base only; the pages past the last row's go to the last part).
 * Returns 0, -1 if the layout is not one it computes, -2 out of memory, -3 no CRC instruction here. */
int inaflash_bundle_ffn(const bundle_layout *L, const uint8_t *base, const int64_t *offsets, int64_t m,
                        const float *x, int64_t T, const float *mask, float *out, float *hidden, int nthreads,
                        uint32_t *crcs, int64_t npages) {
    const int64_t d = L->d;
    for (int f = 0; f < 3; f++)
        if ((f == IN2 && !L->gated) ? 0 : (L->group[f] % 8 || d % L->group[f])) return -1;
    if (d / 32 > MAXG || d / L->group[OUT] > MAXG) return -1;
    if (crcs && offsets) return -1;
    /* activations quantized per weight group: gate and up must share the grouping, of whole 32s, at most 256 */
    const int64_t gq = L->group[IN1];
    const int q = L->qx && L->fmt >= INT8 && gq % 32 == 0 && gq <= 256 && (!L->gated || L->group[IN2] == gq) &&
                  (!Q4(L->fmt) || (gq == 32 && d % 64 == 0));
    /* palettes: SwiGLU bundles in groups of 32 with quantized activations (the integer paths) only */
    if (PAL(L->fmt) && (!q || !L->gated || L->group[OUT] != 32 || L->group[IN2] != 32)) return -1;
    if (m <= 0 || T <= 0) return crcs && npages > 0 && inaflash_crc32c_pages(base, npages, CRC_PAGE, crcs) ? -3 : 0;
    const int64_t ngroups = d / L->group[IN1], gout = d / L->group[OUT];
    float *xsum = calloc((size_t)(2 * T * ngroups + 1), sizeof(float));
    int8_t *xq = q ? malloc((size_t)(T * d)) : NULL;
    if (!xsum || (q && !xq)) { free(xsum); free(xq); return -2; }
    acts A = {x, xq, xsum + T * ngroups, xsum, ngroups};
    /* int4's minimums multiply the sum of the activations the codes meet: the quantized ones where q (else the
       two terms, which nearly cancel, would see different x: 2-3% error instead of int8's 0.7%) */
    if (q)
        quantize_acts(x, T, d, gq, Q4(L->fmt), Q4(L->fmt) ? L->level : 1.f, xq, xsum + T * ngroups, xsum);
    else if (L->fmt == INT4)
        for (int64_t t = 0; t < T; t++)
            for (int64_t j = 0; j < d; j++) xsum[t * ngroups + j / gq] += x[t * d + j];
    int nt = nthreads < 1 ? 1 : nthreads;
    if (m < 64 * nt) nt = 1;  /* a few rows: the hand-off costs more than it saves */
    /* The rows in parts, 4 per thread where there are many, taken by whichever thread is free: a core that the
       reader's threads (or anything else) take for a while no longer holds up the other's half. Each part has its own
       output rows [T, d] and int4's per-group minimum terms [T, gout], summed in part order (the result does not
       depend on which thread ran what). */
    const int np = nt == 1 ? 1 : (m >= 512 * nt ? 4 * nt : nt);
    const int64_t part_size = T * d + T * gout;
    float *local = calloc((size_t)(np * part_size), sizeof(float));
    if (!local) { free(xsum); free(xq); return -2; }
    int next_part = 0, no_crc = 0;
#pragma omp parallel num_threads(nt) if (nt > 1)
    for (;;) {
        int part;
#pragma omp atomic capture
        part = next_part++;
        if (part >= np) break;
        int64_t lo = m * part / np, hi = m * (part + 1) / np;
        float *mine = local + part * part_size;
        /* the pages that start under this part's rows (whole pages: the last may reach into the next part's) */
        crc_job job = {base, crcs, (lo * L->row_bytes + CRC_PAGE - 1) / CRC_PAGE,
                       part == np - 1 ? npages : (hi * L->row_bytes + CRC_PAGE - 1) / CRC_PAGE, 0};
        if (job.stop > npages) job.stop = npages;
        rows_all_tokens(L, q, base, offsets, lo, hi, &A, T, mask, m, mine, mine + T * d, hidden, crcs ? &job : NULL);
        if (crcs) crc_upto(&job, 0, 1);
        if (job.failed) {
#pragma omp atomic write
            no_crc = 1;
        }
    }
    const int64_t go = L->group[OUT];
    for (int p = 0; p < np; p++) {
        const float *mine = local + p * part_size, *gm = mine + T * d;
        for (int64_t t = 0; t < T; t++)
            for (int64_t k = 0; k < gout; k++) {
                const __m256 mk = _mm256_set1_ps(gm[t * gout + k]);
                for (int64_t j = t * d + k * go; j < t * d + (k + 1) * go; j += 8)  /* go % 8 == 0: checked */
                    _mm256_storeu_ps(out + j, _mm256_add_ps(_mm256_loadu_ps(out + j),
                                                            _mm256_add_ps(_mm256_loadu_ps(mine + j), mk)));
            }
    }
    free(local);
    free(xsum);
    free(xq);
    return no_crc ? -3 : 0;
}

/* out [m, width] float32 = the bundles decoded (for many tokens: one decode, then a GEMM). Fields in bundle
   order as kernel_layout gives them; OPT's bias (group 1) element by element. Returns -1 for layouts it lacks. */
int inaflash_decode_rows(const bundle_layout *L, const uint8_t *base, const int64_t *offsets, int64_t m,
                         float *out, int64_t width, int nthreads) {
    const int64_t d = L->d;
    const int nf = L->gated ? 3 : 2, slots[3] = {IN1, L->gated ? IN2 : OUT, OUT};
    if (PAL(L->fmt)) return -1;  /* palettes decode through torch (quant.decode) */
    for (int i = 0; i < nf; i++) if (L->group[slots[i]] % 8 || d % L->group[slots[i]]) return -1;
#pragma omp parallel for num_threads(nthreads < 1 ? 1 : nthreads) schedule(static) if (m >= 256)
    for (int64_t r = 0; r < m; r++) {
        const uint8_t *row = base + (offsets ? offsets[r] : r * L->row_bytes);
        float *o = out + r * width;
        for (int i = 0; i < nf; i++) {
            const int f = slots[i];
            const int64_t g = L->group[f], col = L->gated ? i * d : (f == IN1 ? 0 : d + 1);
            const uint8_t *field = row + L->code_off[f];
            for (int64_t k = 0; k < d / g; k++) {
                __m256 sv = _mm256_set1_ps(L->fmt >= INT8 ? half_at(row + L->scale_off + 2 * (L->group_base[f] + k)) : 1.f);
                __m256 mv = _mm256_set1_ps(L->fmt == INT4 ? half_at(row + L->min_off + 2 * (L->group_base[f] + k)) : 0.f);
                for (int64_t j = k * g; j < (k + 1) * g; j += 8)
                    _mm256_storeu_ps(o + col + j, _mm256_fmadd_ps(load8(L->fmt, field, j), sv, mv));
            }
        }
        if (!L->gated) o[d] = scalar_at(L, row, BIAS, 0);
    }
    return 0;
}

/* out [T, rows] = x [T, cols] . W^T for a resident int8 matrix W = codes [rows, cols] * scale[r] (bfloat16 per row):
 * the head and the attention projections. x is quantized to int8 per 32 (as for int8 bundles), so each row is 32
 * integer multiply-adds per instruction and one FMA per 32 codes. Rows split between threads. cols % 32 == 0. */
int inaflash_int8_matvec(const int8_t *codes, const uint16_t *scales, int64_t rows, int64_t cols, const float *x,
                         int64_t T, float *out, int nthreads) {
    if (cols % 32 || T <= 0 || rows <= 0) return cols % 32 ? -1 : 0;
    const int64_t nb = cols / 32;
    int8_t *xq = malloc((size_t)(T * cols));
    float *qs = malloc((size_t)(2 * T * nb) * sizeof(float));
    if (!xq || !qs) { free(xq); free(qs); return -2; }
    quantize_acts(x, T, cols, 32, 0, 1.f, xq, qs, qs + T * nb);
    int nt = nthreads < 1 ? 1 : nthreads;
    if (rows < 64 * nt) nt = 1;  /* a few rows: the hand-off costs more than it saves */
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
    for (int64_t r = 0; r < rows; r++) {
        const uint8_t *w = (const uint8_t *)(codes + r * cols);
        uint32_t bits = (uint32_t)scales[r] << 16;
        float s;
        memcpy(&s, &bits, 4);
        for (int64_t t = 0; t < T; t++) {
            const int8_t *q = xq + t * cols;
            const float *qst = qs + t * nb;
            __m256 c0 = _mm256_setzero_ps(), c1 = c0;  /* two chains */
            int64_t k = 0;
            for (; k + 2 <= nb; k += 2) {
                c0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(block_q8(w, k * 32, q)), _mm256_broadcast_ss(qst + k), c0);
                c1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(block_q8(w, k * 32 + 32, q)), _mm256_broadcast_ss(qst + k + 1),
                                     c1);
            }
            if (k < nb) c0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(block_q8(w, k * 32, q)), _mm256_broadcast_ss(qst + k), c0);
            out[t * rows + r] = hsum(_mm256_add_ps(c0, c1)) * s;
        }
    }
    free(xq);
    free(qs);
    return 0;
}

/* out [T, rows] = x [T, cols] . W^T for a resident int4 matrix stored as rows of one int4 field each (quant.py's
 * FFN int4 layout with a single field: cols / 2 code bytes, then a float16 scale per 32, then a float16 minimum per
 * 32): the head and attention of `--resident-format int4`. x quantized to int8 per 32 in int4's nibble order, 64
 * codes per q4_dot64, the group scales and minimums taken 8 groups at a time. Rows split between threads; all tokens
 * of a row while its codes are in L1. cols % 64 == 0. */
int inaflash_int4_matvec(const uint8_t *w, int64_t rows, int64_t cols, int64_t row_bytes, const float *x, int64_t T,
                         float *out, int nthreads) {
    if (cols % 64 || T <= 0 || rows <= 0) return cols % 64 ? -1 : 0;
    const int64_t ng = cols / 32, scale_off = cols / 2, min_off = cols / 2 + 2 * ng;
    if (row_bytes < min_off + 2 * ng) return -1;
    int8_t *xq = malloc((size_t)(T * cols));
    float *qs = malloc((size_t)(2 * T * ng) * sizeof(float));
    if (!xq || !qs) { free(xq); free(qs); return -2; }
    quantize_acts(x, T, cols, 32, 1, 1.f, xq, qs, qs + T * ng);
    const float *xsum = qs + T * ng;
    int nt = nthreads < 1 ? 1 : nthreads;
    if (rows * T < 64 * nt) nt = 1;  /* a few rows: the hand-off costs more than it saves */
    const __m256i lanes[4] = {_mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1), _mm256_setr_epi32(2, 2, 2, 2, 3, 3, 3, 3),
                              _mm256_setr_epi32(4, 4, 4, 4, 5, 5, 5, 5), _mm256_setr_epi32(6, 6, 6, 6, 7, 7, 7, 7)};
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
    for (int64_t r = 0; r < rows; r++) {
        const uint8_t *codes = w + r * row_bytes, *sc = codes + scale_off, *mn = codes + min_off;
        for (int64_t t = 0; t < T; t++) {
            const int8_t *q = xq + t * cols;
            const float *qst = qs + t * ng, *xs = xsum + t * ng;
            __m256 c0 = _mm256_setzero_ps(), c1 = c0, mins = c0;
            int64_t k = 0;
            for (; k + 8 <= ng; k += 8) {
                const __m256 d8 = _mm256_mul_ps(half8(sc + 2 * k), _mm256_loadu_ps(qst + k));
                mins = _mm256_fmadd_ps(half8(mn + 2 * k), _mm256_loadu_ps(xs + k), mins);
                c0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(chunk64_q4(INT4, _mm256_setzero_si256(), codes, k * 32, q)), _mm256_permutevar8x32_ps(d8, lanes[0]), c0);
                c1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(chunk64_q4(INT4, _mm256_setzero_si256(), codes, k * 32 + 64, q)), _mm256_permutevar8x32_ps(d8, lanes[1]), c1);
                c0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(chunk64_q4(INT4, _mm256_setzero_si256(), codes, k * 32 + 128, q)), _mm256_permutevar8x32_ps(d8, lanes[2]), c0);
                c1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(chunk64_q4(INT4, _mm256_setzero_si256(), codes, k * 32 + 192, q)), _mm256_permutevar8x32_ps(d8, lanes[3]), c1);
            }
            float rest = hsum(mins);
            for (; k < ng; k += 2) {  /* the last groups, two at a time (ng is even) */
                c0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(chunk64_q4(INT4, _mm256_setzero_si256(), codes, k * 32, q)),
                                     _mm256_set_m128(_mm_set1_ps(half_at(sc + 2 * k + 2) * qst[k + 1]),
                                                     _mm_set1_ps(half_at(sc + 2 * k) * qst[k])), c0);
                rest += half_at(mn + 2 * k) * xs[k] + half_at(mn + 2 * k + 2) * xs[k + 1];
            }
            out[t * rows + r] = hsum(_mm256_add_ps(c0, c1)) + rest;
        }
    }
    free(xq);
    free(qs);
    return 0;
}

#else  /* no AVX2/FMA/F16C here: Python uses the torch path */
int inaflash_kernel_version(void) { return 0; }
int inaflash_bundle_ffn(const bundle_layout *L, const uint8_t *base, const int64_t *offsets, int64_t m,
                        const float *x, int64_t T, const float *mask, float *out, float *hidden, int nthreads,
                        uint32_t *crcs, int64_t npages) {
    (void)L; (void)base; (void)offsets; (void)m; (void)x; (void)T; (void)mask; (void)out; (void)hidden;
    (void)nthreads; (void)crcs; (void)npages;
    return -1;
}
int inaflash_decode_rows(const bundle_layout *L, const uint8_t *base, const int64_t *offsets, int64_t m,
                         float *out, int64_t width, int nthreads) {
    (void)L; (void)base; (void)offsets; (void)m; (void)out; (void)width; (void)nthreads;
    return -1;
}
int inaflash_int8_matvec(const int8_t *codes, const uint16_t *scales, int64_t rows, int64_t cols, const float *x,
                         int64_t T, float *out, int nthreads) {
    (void)codes; (void)scales; (void)rows; (void)cols; (void)x; (void)T; (void)out; (void)nthreads;
    return -1;
}
int inaflash_int4_matvec(const uint8_t *w, int64_t rows, int64_t cols, int64_t row_bytes, const float *x, int64_t T,
                         float *out, int nthreads) {
    (void)w; (void)rows; (void)cols; (void)row_bytes; (void)x; (void)T; (void)out; (void)nthreads;
    return -1;
}
#endif

/* dst row i (dst_stride apart) = the row_bytes at src + offsets[i]: bundles from a staging buffer into the cache */
void inaflash_gather_rows(uint8_t *dst, int64_t dst_stride, const uint8_t *src, const int64_t *offsets, int64_t m,
                          int64_t row_bytes) {
    for (int64_t i = 0; i < m; i++) memcpy(dst + i * dst_stride, src + offsets[i], (size_t)row_bytes);
}

/* rows[to[i]] = rows[from[i]]: the cache's swap-delete (slots never overlap: movers lie beyond the holes) */
void inaflash_move_rows(uint8_t *rows, int64_t stride, const int64_t *from, const int64_t *to, int64_t count) {
    for (int64_t i = 0; i < count; i++) memcpy(rows + to[i] * stride, rows + from[i] * stride, (size_t)stride);
}
