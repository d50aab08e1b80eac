/* inaflash's native kernel: the FFN computed straight from neuron bundles as they lie on flash.
 *
 * A bundle is one neuron's weights, contiguous: [in1 | in2 | out] (SwiGLU: gate row, up row, down column;
 * OPT: fc1 row, its bias, fc2 column), in float32/float16/bfloat16, or compressed (int8 with a float16 scale per
 * group; int4 with a float16 scale and minimum per group, two codes a byte, low nibble first). The byte layout is
 * quant.py's; Python hands it over as a bundle_layout.
 *
 * For each bundle r (rows at base + offsets[r], or base + r * row_bytes) and token t:
 *     h[t, r] = act(in1_r . x_t (+ bias_r)) (* in2_r . x_t)  (* mask[t, r])
 *     out[t, :] += h[t, r] * out_r
 * One pass over each bundle's bytes; codes are converted to float in registers (never to memory), group scales
 * multiply the group's partial sums, an int4 minimum contributes min * sum(x over the group). So a neuron costs the
 * bytes it has on flash, in DRAM and in the multiply alike: the cache holds bundles as read, no transcoding.
 * Rows are split between threads (OpenMP: torch's own runtime, the same libgomp), each with its own output rows,
 * summed at the end.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

enum { F32 = 0, F16 = 1, BF16 = 2, INT8 = 3, INT4 = 4 };
enum { IN1 = 0, IN2 = 1, OUT = 2, BIAS = 3 };
enum { SILU = 0, RELU = 1 };
#define TB 8 /* tokens per pass over a bundle: each weight is loaded once per 8 tokens */

typedef struct {
    int32_t fmt, d, gated, act;
    int64_t row_bytes;
    int64_t code_off[4];  /* bytes from the bundle's start to each field's first code / element */
    int32_t group_base[4];  /* index of each field's first group in the scales (and minimums) arrays */
    int32_t group[4];  /* group size per field (floats: the field's width) */
    int64_t scale_off, min_off;  /* bytes from the bundle's start to the float16 scales / minimums */
} bundle_layout;

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#ifdef _OPENMP
#include <omp.h>
#endif

int inaflash_kernel_version(void) { return 1; }

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

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
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

/* res[t] = field_f . x_t for tb tokens (x rows d floats apart; xsum: per token the sums of x over each group) */
static inline __attribute__((always_inline)) void field_dot(const bundle_layout *L, int fmt, const uint8_t *row,
                                                            int f, const float *x, int tb, const float *xsum,
                                                            float *res) {
    const int64_t d = L->d, g = L->group[f], ngroups = d / g;
    const uint8_t *field = row + L->code_off[f];
    __m256 tot[TB], acc[TB];
    float mins[TB];
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
                for (int t = 0; t < tb; t++) mins[t] += m * xsum[t * ngroups + k];
            }
        } else {
            for (int t = 0; t < tb; t++) tot[t] = _mm256_add_ps(tot[t], acc[t]);
        }
    }
    for (int t = 0; t < tb; t++) res[t] = hsum(tot[t]) + mins[t];
}

/* out_t += h[t] * field_OUT for tb tokens (skipped where every h is 0: ReLU's zeros, masked neurons) */
static inline __attribute__((always_inline)) void field_axpy(const bundle_layout *L, int fmt, const uint8_t *row,
                                                             const float *h, int tb, float *out) {
    const int64_t d = L->d, g = L->group[OUT], ngroups = d / g;
    const uint8_t *field = row + L->code_off[OUT];
    int any = 0;
    for (int t = 0; t < tb; t++) any |= h[t] != 0.f;
    if (!any) return;
    __m256 hv[TB];
    for (int t = 0; t < tb; t++) hv[t] = _mm256_set1_ps(h[t]);
    for (int64_t k = 0; k < ngroups; k++) {
        __m256 s = _mm256_set1_ps(1.f), m = _mm256_setzero_ps();
        if (fmt >= INT8) s = _mm256_set1_ps(half_at(row + L->scale_off + 2 * (L->group_base[OUT] + k)));
        if (fmt == INT4) m = _mm256_set1_ps(half_at(row + L->min_off + 2 * (L->group_base[OUT] + k)));
        for (int64_t j = k * g; j < (k + 1) * g; j += 8) {
            __m256 w = load8(fmt, field, j);
            w = fmt == INT4 ? _mm256_fmadd_ps(w, s, m) : fmt == INT8 ? _mm256_mul_ps(w, s) : w;
            for (int t = 0; t < tb; t++) {
                float *o = out + t * d + j;
                _mm256_storeu_ps(o, _mm256_fmadd_ps(hv[t], w, _mm256_loadu_ps(o)));
            }
        }
    }
}

static inline float activate(int act, float v) { return act == SILU ? v / (1.f + expf(-v)) : (v > 0.f ? v : 0.f); }

/* rows lo..hi for tokens t0..t0+tb-1 into out (tb <= TB) */
static inline __attribute__((always_inline)) void rows_pass(const bundle_layout *L, int fmt, const uint8_t *base,
                                                            const int64_t *offsets, int64_t lo, int64_t hi,
                                                            const float *x, int64_t T, int64_t t0, int tb,
                                                            const float *mask, int64_t m, const float *xsum,
                                                            float *out, float *hidden) {
    const int64_t d = L->d;
    float a[TB], b[TB], h[TB];
    for (int64_t r = lo; r < hi; r++) {
        const uint8_t *row = base + (offsets ? offsets[r] : r * L->row_bytes);
        field_dot(L, fmt, row, IN1, x + t0 * d, tb, xsum, a);
        if (L->gated) field_dot(L, fmt, row, IN2, x + t0 * d, tb, xsum, b);
        float bias = L->gated ? 0.f : scalar_at(L, row, BIAS, 0);
        for (int t = 0; t < tb; t++) {
            float v = activate(L->act, a[t] + bias);
            h[t] = L->gated ? v * b[t] : v;
            if (mask) h[t] *= mask[(t0 + t) * m + r];
            if (hidden) hidden[(t0 + t) * m + r] = h[t];
        }
        field_axpy(L, fmt, row, h, tb, out + t0 * d);
    }
    (void)T;
}

static void rows_all_tokens(const bundle_layout *L, const uint8_t *base, const int64_t *offsets, int64_t lo,
                            int64_t hi, const float *x, int64_t T, const float *mask, int64_t m, const float *xsum,
                            float *out, float *hidden) {
    const int64_t ngroups = L->d / L->group[IN1];
    for (int64_t t0 = 0; t0 < T; t0 += TB) {
        int tb = T - t0 < TB ? (int)(T - t0) : TB;
        const float *xs = xsum + t0 * ngroups;
        /* one instance per format and the 1-token case, so the compiler specializes each inner loop */
#define PASS(FMT) do { if (tb == 1) rows_pass(L, FMT, base, offsets, lo, hi, x, T, t0, 1, mask, m, xs, out, hidden); \
                       else rows_pass(L, FMT, base, offsets, lo, hi, x, T, t0, tb, mask, m, xs, out, hidden); } while (0)
        switch (L->fmt) {
        case F32: PASS(F32); break;
        case F16: PASS(F16); break;
        case BF16: PASS(BF16); break;
        case INT8: PASS(INT8); break;
        default: PASS(INT4); break;
        }
#undef PASS
    }
}

/* out [T, d] += the FFN over the m bundles (see the top of this file). x [T, d] float32; mask [T, m] or NULL;
 * hidden [T, m] (the activations h, for checks) or NULL. Returns 0, or -1 if the layout is not one it computes. */
int inaflash_bundle_ffn(const bundle_layout *L, const uint8_t *base, const int64_t *offsets, int64_t m,
                        const float *x, int64_t T, const float *mask, float *out, float *hidden, int nthreads) {
    const int64_t d = L->d;
    for (int f = 0; f < 3; f++)
        if ((f == IN2 && !L->gated) ? 0 : (L->group[f] % 8 || d % L->group[f])) return -1;
    if (m <= 0 || T <= 0) return 0;
    const int64_t ngroups = d / L->group[IN1];
    float *xsum = calloc((size_t)(T * ngroups), sizeof(float));
    if (!xsum) return -2;
    if (L->fmt == INT4)
        for (int64_t t = 0; t < T; t++)
            for (int64_t j = 0; j < d; j++) xsum[t * ngroups + j / L->group[IN1]] += x[t * d + j];
    int nt = nthreads < 1 ? 1 : nthreads;
    if (m < 64 * nt) nt = 1;  /* a few rows: the hand-off costs more than it saves */
    if (nt == 1) {
        rows_all_tokens(L, base, offsets, 0, m, x, T, mask, m, xsum, out, hidden);
        free(xsum);
        return 0;
    }
    float *local = calloc((size_t)(nt * T * d), sizeof(float));
    if (!local) { free(xsum); return -2; }
#pragma omp parallel num_threads(nt)
    {
#ifdef _OPENMP
        int id = omp_get_thread_num(), got = omp_get_num_threads();
#else
        int id = 0, got = 1;
#endif
        for (int part = id; part < nt; part += got) {  /* whatever threads the runtime gives, every part runs */
            int64_t lo = m * part / nt, hi = m * (part + 1) / nt;
            rows_all_tokens(L, base, offsets, lo, hi, x, T, mask, m, xsum, local + part * T * d, hidden);
        }
    }
    for (int p = 0; p < nt; p++)
        for (int64_t i = 0; i < T * d; i++) out[i] += local[p * T * d + i];
    free(local);
    free(xsum);
    return 0;
}

#else  /* no AVX2/FMA/F16C here: Python uses the torch path */
int inaflash_kernel_version(void) { return 0; }
int inaflash_bundle_ffn(const bundle_layout *L, const uint8_t *base, const int64_t *offsets, int64_t m,
                        const float *x, int64_t T, const float *mask, float *out, float *hidden, int nthreads) {
    (void)L; (void)base; (void)offsets; (void)m; (void)x; (void)T; (void)mask; (void)out; (void)hidden;
    (void)nthreads;
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
