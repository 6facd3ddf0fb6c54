/* splitllm's 4- and 8-bit weight kernels for x86-64 with AVX2 + FMA (built and loaded by kernels.py).
 *
 * Weight layout (the same bytes on every CPU, unlike torch's int4 pack): W [N, K] as codes
 * q in 0..15 with one bf16 (scale, zero) pair per group of G codes along K:
 *     W[n, k] = q[n, k] * s[n, g] + (z[n, g] - 8 s[n, g]),   g = k / G     (rtn.dequantize_groupwise)
 * P  [N, K/2] uint8: each run of 64 codes q[0..64) is 32 bytes; byte j holds q[c(j)] in its low
 *    and q[32 + c(j)] in its high nibble, c(j) = j for j in 0..8 and 24..32, j + 8 for 8..16,
 *    j - 8 for 16..24 (so that in-lane unpacking of a 256-bit load yields the codes in order)
 * SZ [N, K/G, 2] bf16 bit patterns: (scale, zero)
 *
 * Why the activations go to int16: torch's kernel is compute-bound on AVX2 (it reads 2.7 GB/s of
 * packed weights here, where the machine streams 10+). Widening the codes to int16 and using
 * vpmaddwd takes two instructions per 16 codes instead of four per 8; x is rounded to int16 with
 * one scale per weight group (error <= 2^-16 of the group's largest |x|, below bf16's 2^-9 of
 * every element, which torch's kernel rounds x to). The integer sums are exact, so a row's output
 * does not depend on how many tokens share the call.
 *
 * 8-bit weights keep Int8Linear's operands (codes [N, K] int8, one bf16 scale per row) and the same
 * int16 input; torch's int8 kernel reads ~7-10 GB/s here, this one ~20-25 from cache.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define SPLITLLM_ABI 3

int splitllm_abi(void) { return SPLITLLM_ABI; }

static inline float bf16_to_f32(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline float hsum8(__m256 v) {
    __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    lo = _mm_hadd_ps(lo, lo);
    lo = _mm_hadd_ps(lo, lo);
    return _mm_cvtss_f32(lo);
}

/* x [K] -> x16 [K] with x ~= x16 * sx[g]; xs[g] = the group's float sum (for the zero term) */
static void quantize_x(const float *x, int64_t K, int64_t G, int16_t *x16, float *sx, float *xs) {
    for (int64_t g = 0; g < K / G; g++) {
        const float *xg = x + g * G;
        float amax = 0.f, sum = 0.f;
        for (int64_t k = 0; k < G; k++) {
            float a = fabsf(xg[k]);
            amax = a > amax ? a : amax;
            sum += xg[k];
        }
        /* a group holding NaN or inf: its int16 codes mean nothing (zeroed), and its sum, NaN or
         * inf, makes the output non-finite through the zero term, as a float product would */
        int finite = isfinite(sum);
        float inv = (finite && amax > 0.f) ? 32767.f / amax : 0.f;
        for (int64_t k = 0; k < G; k++) x16[g * G + k] = finite ? (int16_t)lrintf(xg[k] * inv) : 0;
        sx[g] = inv > 0.f ? amax / 32767.f : 0.f;
        xs[g] = sum;
    }
}

/* the int32 dot products of one 64-code run (32 bytes at p) with x16 X0..X3, added to d.
 * In-lane unpacking (no lane-crossing widening) is why the layout interleaves bytes as it does */
#define DOT64(p, d)                                                                          \
    {                                                                                        \
        __m256i b = _mm256_loadu_si256((const __m256i *)(p));                                \
        __m256i lo = _mm256_and_si256(b, m4), hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), m4); \
        d = _mm256_add_epi32(d, _mm256_madd_epi16(_mm256_unpacklo_epi8(lo, zero), X0));     \
        d = _mm256_add_epi32(d, _mm256_madd_epi16(_mm256_unpackhi_epi8(lo, zero), X1));     \
        d = _mm256_add_epi32(d, _mm256_madd_epi16(_mm256_unpacklo_epi8(hi, zero), X2));     \
        d = _mm256_add_epi32(d, _mm256_madd_epi16(_mm256_unpackhi_epi8(hi, zero), X3));     \
    }

/* rows [n0, n1) of y for one token; two rows at a time share the loads of x.
 * |d| <= G * 15 * 32767 < 2^31 for G <= 4096 (kernels.py allows up to 256) */
static void one_token(const int16_t *x16, const float *sx, const float *xs, int64_t K, const uint8_t *P,
                      const uint16_t *SZ, int64_t N, int64_t G, float *y) {
    const __m256i m4 = _mm256_set1_epi8(0x0F), zero = _mm256_setzero_si256();
    const int64_t ng = K / G, runs = G / 64, stride = K / 2;
    for (int64_t n = 0; n < N; n += 2) {
        const int two = n + 1 < N;
        const uint8_t *pa = P + n * stride, *pb = two ? pa + stride : pa;
        const uint16_t *sa = SZ + n * ng * 2, *sb = two ? sa + ng * 2 : sa;
        const int16_t *xk = x16;
        __m256 acca = _mm256_setzero_ps(), accb = acca;
        float offa = 0.f, offb = 0.f;
        for (int64_t g = 0; g < ng; g++) {
            __m256i da = _mm256_setzero_si256(), db = da;
            for (int64_t r = 0; r < runs; r++, pa += 32, pb += 32, xk += 64) {
                const __m256i X0 = _mm256_loadu_si256((const __m256i *)xk);
                const __m256i X1 = _mm256_loadu_si256((const __m256i *)(xk + 16));
                const __m256i X2 = _mm256_loadu_si256((const __m256i *)(xk + 32));
                const __m256i X3 = _mm256_loadu_si256((const __m256i *)(xk + 48));
                DOT64(pa, da)
                DOT64(pb, db)
            }
            const float s = bf16_to_f32(sa[2 * g]), t = bf16_to_f32(sb[2 * g]);
            acca = _mm256_fmadd_ps(_mm256_set1_ps(s * sx[g]), _mm256_cvtepi32_ps(da), acca);
            accb = _mm256_fmadd_ps(_mm256_set1_ps(t * sx[g]), _mm256_cvtepi32_ps(db), accb);
            offa += (bf16_to_f32(sa[2 * g + 1]) - 8.0f * s) * xs[g];
            offb += (bf16_to_f32(sb[2 * g + 1]) - 8.0f * t) * xs[g];
        }
        y[n] = hsum8(acca) + offa;
        if (two) y[n + 1] = hsum8(accb) + offb;
    }
}

/* y [M, N] = x [M, K] @ W.T, one token at a time (decode: M is 1).
 * scratch: at least M*K int16 followed by 2*M*(K/G) floats (kernels.py sizes it). */
void splitllm_q4_gemv(const float *x, int64_t M, int64_t K, const uint8_t *P, const uint16_t *SZ, int64_t N,
                      int64_t G, void *scratch, float *y) {
    const int64_t ng = K / G;
    int16_t *x16 = (int16_t *)scratch;
    float *sx = (float *)(x16 + M * K), *xs = sx + M * ng;
    for (int64_t m = 0; m < M; m++) {
        quantize_x(x + m * K, K, G, x16 + m * K, sx + m * ng, xs + m * ng);
        one_token(x16 + m * K, sx + m * ng, xs + m * ng, K, P, SZ, N, G, y + m * N);
    }
}

/* W [n1 - n0, K] float32: rows n0..n1 of the weight, for a prefill's float product */
void splitllm_q4_dequant(const uint8_t *P, const uint16_t *SZ, int64_t K, int64_t G, int64_t n0, int64_t n1,
                         float *W) {
    const __m256i m4 = _mm256_set1_epi8(0x0F), zero = _mm256_setzero_si256();
    const int64_t ng = K / G, runs = G / 64;
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *p = P + n * (K / 2);
        const uint16_t *sz = SZ + n * ng * 2;
        float *w = W + (n - n0) * K;
        for (int64_t g = 0; g < ng; g++) {
            const float s = bf16_to_f32(sz[2 * g]);
            const __m256 sv = _mm256_set1_ps(s), ov = _mm256_set1_ps(bf16_to_f32(sz[2 * g + 1]) - 8.0f * s);
            for (int64_t r = 0; r < runs; r++, p += 32, w += 64) {
                __m256i b = _mm256_loadu_si256((const __m256i *)p);
                __m256i lo = _mm256_and_si256(b, m4), hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), m4);
                __m256i q16[4] = {_mm256_unpacklo_epi8(lo, zero), _mm256_unpackhi_epi8(lo, zero),
                                  _mm256_unpacklo_epi8(hi, zero), _mm256_unpackhi_epi8(hi, zero)};
                for (int i = 0; i < 4; i++) {  /* 16 codes, in order: k = 16 i .. 16 i + 15 */
                    __m256 a = _mm256_cvtepi32_ps(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(q16[i])));
                    __m256 c = _mm256_cvtepi32_ps(_mm256_cvtepu16_epi32(_mm256_extracti128_si256(q16[i], 1)));
                    _mm256_storeu_ps(w + 16 * i, _mm256_fmadd_ps(a, sv, ov));
                    _mm256_storeu_ps(w + 16 * i + 8, _mm256_fmadd_ps(c, sv, ov));
                }
            }
        }
    }
}

/* 8-bit: y [M, N] = x [M, K] @ W.T with W[n, k] = c[n, k] * s[n] (Int8Linear's operands as they
 * are: codes C [N, K] int8, scales S [N] bf16). x is rounded to int16 per 64 inputs (K % 64 == 0);
 * |sum| <= 64 * 128 * 32767 per group fits int32 with room to spare. One token at a time. */
void splitllm_q8_gemv(const float *x, int64_t M, int64_t K, const int8_t *C, const uint16_t *S, int64_t N,
                      void *scratch, float *y) {
    const int64_t G = 64, ng = K / G;
    int16_t *x16 = (int16_t *)scratch;
    float *sx = (float *)(x16 + K), *xs = sx + ng;
    for (int64_t m = 0; m < M; m++, x += K, y += N) {
        quantize_x(x, K, G, x16, sx, xs);
        float poison = 0.f;  /* NaN / inf in x: the float product would be non-finite */
        for (int64_t g = 0; g < ng; g++)
            if (!isfinite(xs[g])) poison = xs[g] * 0.f;
        for (int64_t n = 0; n < N; n += 2) {
            const int two = n + 1 < N;
            const int8_t *ca = C + n * K, *cb = two ? ca + K : ca;
            __m256 acca = _mm256_setzero_ps(), accb = acca;
            for (int64_t g = 0; g < ng; g++) {
                __m256i da = _mm256_setzero_si256(), db = da;
                for (int64_t r = g * G; r < (g + 1) * G; r += 16) {
                    const __m256i X = _mm256_loadu_si256((const __m256i *)(x16 + r));
                    da = _mm256_add_epi32(da, _mm256_madd_epi16(_mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(ca + r))), X));
                    db = _mm256_add_epi32(db, _mm256_madd_epi16(_mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(cb + r))), X));
                }
                const __m256 s = _mm256_set1_ps(sx[g]);
                acca = _mm256_fmadd_ps(s, _mm256_cvtepi32_ps(da), acca);
                accb = _mm256_fmadd_ps(s, _mm256_cvtepi32_ps(db), accb);
            }
            y[n] = bf16_to_f32(S[n]) * hsum8(acca) + poison;
            if (two) y[n + 1] = bf16_to_f32(S[n + 1]) * hsum8(accb) + poison;
        }
    }
}
