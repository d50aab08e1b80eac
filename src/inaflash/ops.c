/* Small per-token operations of the attention block, natively: each is a handful of torch ops on a vector of a few
 * thousand floats, where torch's per-op overhead (~7 us each on the reference machine) is the whole cost:
 * F.rms_norm ~40 us a call, the rotary embedding ~80 us, ~2 and ~4 ms per token on Qwen2.5-1.5B (57 and 56 calls).
 * Plain loops: the compiler vectorizes them (-O3 -march=native). */
#include <math.h>
#include <stdint.h>

/* out[t] = x[t] / sqrt(mean(x[t]^2) + eps) * w, rows of d floats */
void inaflash_rms_norm(const float *x, const float *w, int64_t T, int64_t d, float eps, float *out) {
    for (int64_t t = 0; t < T; t++) {
        const float *v = x + t * d;
        float ss = 0.f;
        for (int64_t i = 0; i < d; i++) ss += v[i] * v[i];
        const float r = 1.f / sqrtf(ss / (float)d + eps);
        for (int64_t i = 0; i < d; i++) out[t * d + i] = v[i] * r * w[i];
    }
}

/* Rotary embedding in place, the half-split form (Llama, Qwen2: x[i] pairs with x[i + hd/2]), for x [T, heads, hd]
 * at consecutive positions whose tables start at cos, sin ([T, hd] rows; the two halves of a row are equal). */
void inaflash_rope(float *x, int64_t T, int64_t heads, int64_t hd, const float *cos, const float *sin) {
    const int64_t half = hd / 2;
    for (int64_t t = 0; t < T; t++)
        for (int64_t h = 0; h < heads; h++) {
            float *v = x + (t * heads + h) * hd;
            const float *c = cos + t * hd, *s = sin + t * hd;
            for (int64_t i = 0; i < half; i++) {
                const float a = v[i], b = v[i + half];
                v[i] = a * c[i] - b * s[i];
                v[i + half] = b * c[i + half] + a * s[i + half];
            }
        }
}
