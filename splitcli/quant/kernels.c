/* splitllm's 4- and 8-bit weight kernels for x86-64 with AVX2 + FMA (built and loaded by kernels.py).
 *
 * Weight layout (the same bytes on every CPU, unlike torch's int4 pack): W [N, K] as codes
 * q in 0..15 with one bf16 (scale, zero) pair per group of G codes along K:
 *     W[n, k] = q[n, k] * s[n, g] + (z[n, g] - 8 s[n, g]),   g = k / G     (rtn.dequantize_groupwise)
 * P  [N, K/2] uint8: each run of 64 codes q[0..64) is 16 little-endian 16-bit words; word w holds
 *    q[w], q[16 + w], q[32 + w], q[48 + w] in its nibbles 0..3 (a shift and a mask per nibble give
 *    16 codes in order as int16, with no byte shuffles: the shuffle ports were the bottleneck)
 * SZ [N/4, K/G, 4, 2] bf16 bit patterns: (scale, zero) of rows 4b..4b+3 for each group, so one
 *    16-byte load gives a block of four rows its pairs (N % 4 == 0). Against unpacking bytes and
 *    gathering each row's pair from [N, K/G, 2], measured 1.20-1.35x at 1536 x 576 and 576 x 1536
 *    (1 thread, this 2-core Zen 3, medians of 31 interleaved rounds, weights in cache)
 *
 * Why the activations go to int16: torch's kernel is compute-bound on AVX2 (it reads 2.7 GB/s of
 * packed weights here, where the machine streams 10+). Widening the codes to int16 and using
 * vpmaddwd takes two instructions per 16 codes instead of four per 8; x is rounded to int16 with
 * one scale per weight group (error <= 2^-16 of the group's largest |x|; torch's kernel rounds
 * each element to bf16, 2^-9 of itself: smaller only for elements below 1/128 of their group's
 * largest, and on this project's models' activations int16 is 10-30x closer overall). The integer
 * sums are exact, so a row's output does not depend on how many tokens share the call (tokens
 * left to the float path are computed one at a time in kernels.py for the same reason). A weight
 * group whose scale is inf gives +-inf or NaN here (the float product of the dequantized weight
 * gives NaN: q inf + (z - 8 inf)); only corrupt weights have one.
 *
 * Opt-in (Int4Linear.act_bits = 8, a plan's edge_act_bits): the 4-bit product on x rounded to int8
 * per weight group (quantize_input), vpmaddubsw on the nibbles (DOT64A8): 1.30-1.35x the int16
 * product with weights in cache, 1.12-1.17x streaming them from memory (this Zen 3, 1 thread).
 *
 * 8-bit weights keep Int8Linear's operands (codes [N, K] int8, one bf16 scale per row) and the same
 * int16 input; torch's int8 kernel reads ~7-10 GB/s here, this one ~20-25 from cache.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define SPLITLLM_ABI 11
/* Rows ahead whose bytes are prefetched: the hardware prefetcher alone left one Zen 3 core reading
 * int8 weights from memory at 7.7 GB/s; asking for the next block's rows gave 14.5 GB/s (1.9x)
 * and the 4-bit kernel 1.14x (49152 x 576, 1 thread, median of 15; 4, 8, 16 and 32 rows ahead
 * measured, 4 best, 32 worst by 4-7%). */
#define PREFETCH_ROWS 4
/* the 4-bit kernel prefetches whole blocks of four rows' (scale, zero) pairs */
_Static_assert(PREFETCH_ROWS % 4 == 0, "PREFETCH_ROWS must be a multiple of 4");

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

/* A group's largest |x| and its sum (in double: at most 4096 floats cannot overflow, so the sum is
 * non-finite iff a NaN / inf). Returns 1 when the group is outside what an integer input with a
 * float scale carries faithfully: a NaN or inf (the float product's sign and NaN-ness depend on
 * every term), a largest |x| past 1e30 (scaled sums could overflow where the float product does
 * not) or below 1e-30 but not 0 (the scale would lose precision). G % 8 == 0. */
static inline int group_stats(const float *xg, int64_t G, float *amax_out, double *sum_out) {
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    __m256 vmax = _mm256_setzero_ps();
    __m256d s0 = _mm256_setzero_pd(), s1 = s0;
    for (int64_t k = 0; k < G; k += 8) {
        const __m256 v = _mm256_loadu_ps(xg + k);
        vmax = _mm256_max_ps(vmax, _mm256_and_ps(v, abs_mask));  /* a NaN lane is caught by the sum */
        s0 = _mm256_add_pd(s0, _mm256_cvtps_pd(_mm256_castps256_ps128(v)));
        s1 = _mm256_add_pd(s1, _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
    }
    float lanes[8];
    double parts[4];
    _mm256_storeu_ps(lanes, vmax);
    _mm256_storeu_pd(parts, _mm256_add_pd(s0, s1));
    float amax = 0.f;
    for (int i = 0; i < 8; i++) amax = lanes[i] > amax ? lanes[i] : amax;
    const double sum = (parts[0] + parts[1]) + (parts[2] + parts[3]);
    *amax_out = amax;
    *sum_out = sum;
    return !isfinite(sum) || amax > 1e30f || (amax > 0.f && amax < 1e-30f);
}

/* 16 inputs x[0..16) * inv rounded to int8 (nearest even; |x * inv| <= 127 by the choice of inv) */
static inline __m128i round16_i8(const float *x, __m256 inv) {
    const __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x), inv));
    const __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + 8), inv));
    return _mm_packs_epi16(_mm_packs_epi32(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1)),
                           _mm_packs_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1)));
}

/* x [K] -> xq [K] with x ~= xq * sx[g] per group of G inputs; xs[g] = the group's sum (for the
 * zero term). xq is int16 (32767 levels a side: 2^-16 of the group's largest |x|) or, with a8,
 * the 4-bit product's opt-in int8 (Int4Linear.act_bits = 8; 127 levels, 2^-8), laid out for
 * vpmaddubsw against the packed codes' nibble pairs: each run of 64 inputs is 32 bytes
 * (x[w], x[32 + w]) for w = 0..15, then 32 bytes (x[16 + w], x[48 + w]). G % 64 == 0, or G == 64
 * (the 8-bit kernel): whole vectors. Returns 1 when a group is refused (group_stats): the caller
 * computes the token in float. */
static int quantize_input(const float *x, int64_t K, int64_t G, int a8, void *xq, float *sx, float *xs) {
    const float levels = a8 ? 127.f : 32767.f;
    for (int64_t g = 0; g < K / G; g++) {
        const float *xg = x + g * G;
        float amax;
        double sum;
        if (group_stats(xg, G, &amax, &sum)) return 1;
        const __m256 inv = _mm256_set1_ps(amax > 0.f ? levels / amax : 0.f);
        if (a8) {
            for (int64_t k = 0; k < G; k += 64) {
                const __m128i q0 = round16_i8(xg + k, inv), q1 = round16_i8(xg + k + 16, inv),
                              q2 = round16_i8(xg + k + 32, inv), q3 = round16_i8(xg + k + 48, inv);
                int8_t *o = (int8_t *)xq + g * G + k;
                _mm_storeu_si128((__m128i *)o, _mm_unpacklo_epi8(q0, q2));
                _mm_storeu_si128((__m128i *)(o + 16), _mm_unpackhi_epi8(q0, q2));
                _mm_storeu_si128((__m128i *)(o + 32), _mm_unpacklo_epi8(q1, q3));
                _mm_storeu_si128((__m128i *)(o + 48), _mm_unpackhi_epi8(q1, q3));
            }
        } else {
            for (int64_t k = 0; k < G; k += 8) {  /* round to nearest even, as lrintf */
                const __m256i r = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xg + k), inv));
                _mm_storeu_si128((__m128i *)((int16_t *)xq + g * G + k),
                                 _mm_packs_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)));
            }
        }
        sx[g] = amax / levels;
        xs[g] = (float)sum;
    }
    return 0;
}

/* the int32 dot products of one 64-code run (32 bytes at p) with x16 X0..X3, added to d */
#define DOT64(p, d)                                                                                   \
    {                                                                                                 \
        const __m256i b = _mm256_loadu_si256((const __m256i *)(p));                                   \
        d = _mm256_add_epi32(d, _mm256_madd_epi16(_mm256_and_si256(b, m4), X0));                      \
        d = _mm256_add_epi32(d, _mm256_madd_epi16(_mm256_and_si256(_mm256_srli_epi16(b, 4), m4), X1)); \
        d = _mm256_add_epi32(d, _mm256_madd_epi16(_mm256_and_si256(_mm256_srli_epi16(b, 8), m4), X2)); \
        d = _mm256_add_epi32(d, _mm256_madd_epi16(_mm256_srli_epi16(b, 12), X3));                     \
    }

/* The same with x8 (quantize_input's int8 layout): nibbles 0 and 2 of each word are the low and high
 * bytes' low nibbles, 1 and 3 their high ones, so one mask gives the byte pairs (q[w], q[32 + w])
 * and a shift and the mask (q[16 + w], q[48 + w]); vpmaddubsw (codes unsigned, x8 signed) sums each
 * pair into int16 (<= 2 * 15 * 127: no saturation), the two are added (<= 7620) and vpmaddwd by
 * ones widens to int32. 9 instructions per 64 codes and row where DOT64 takes 15. */
#define DOT64A8(p, d)                                                                                     \
    {                                                                                                   \
        const __m256i b = _mm256_loadu_si256((const __m256i *)(p));                                     \
        const __m256i lo = _mm256_and_si256(b, m8), hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), m8); \
        d = _mm256_add_epi32(d, _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(lo, XA),         \
                                                                   _mm256_maddubs_epi16(hi, XB)), ones)); \
    }

/* y for one token, a block of four rows at a time: the x loads are shared, and each group's four
 * int32 dot vectors are summed into one [row 0..3 | row 0..3] vector (integer adds: exact) that
 * one FMA scales by [s sx] into a single float accumulator. xq is x16 (int16) or, with a8, x8
 * (quantize_input). |d| <= G * 15 * 32767 < 2^31 for G <= 4096 (kernels.py allows up to 4096).
 * Inlined with a8 and runs = G / 64 constant where G is 64. */
static inline __attribute__((always_inline)) void one_token_runs(const void *xq, int a8, const float *sx,
                                                                 const float *xs, int64_t K, const uint8_t *P,
                                                                 const uint16_t *SZ, int64_t N, int64_t G,
                                                                 int64_t runs, float *y) {
    const __m256i m4 = _mm256_set1_epi16(0x0F), m8 = _mm256_set1_epi16(0x0F0F), ones = _mm256_set1_epi16(1);
    const __m128i hi16 = _mm_set1_epi32((int)0xFFFF0000);
    const int64_t ng = K / G, stride = K / 2, run_bytes = a8 ? 64 : 128;
    for (int64_t n = 0; n < N; n += 4) {
        if (n + PREFETCH_ROWS + 4 <= N) {  /* the next block's packed rows and (scale, zero) pairs */
            for (int64_t o = 0; o < 4 * stride; o += 64)
                _mm_prefetch((const char *)(P + (n + PREFETCH_ROWS) * stride + o), _MM_HINT_T0);
            for (int64_t o = 0; o < 16 * ng; o += 64)
                _mm_prefetch((const char *)(SZ + (n + PREFETCH_ROWS) * ng * 2) + o, _MM_HINT_T0);
        }
        const uint8_t *p0 = P + n * stride, *p1 = p0 + stride, *p2 = p1 + stride, *p3 = p2 + stride;
        const uint16_t *sz = SZ + n * ng * 2;  /* this block's [K/G, 4, 2] */
        const uint8_t *xk = (const uint8_t *)xq;
        __m256 acc = _mm256_setzero_ps();
        __m128 off = _mm_setzero_ps();
        for (int64_t g = 0; g < ng; g++) {
            __m256i d0 = _mm256_setzero_si256(), d1 = d0, d2 = d0, d3 = d0;
            for (int64_t r = 0; r < runs; r++, xk += run_bytes) {
                if (a8) {
                    const __m256i XA = _mm256_loadu_si256((const __m256i *)xk);
                    const __m256i XB = _mm256_loadu_si256((const __m256i *)(xk + 32));
                    DOT64A8(p0, d0) DOT64A8(p1, d1) DOT64A8(p2, d2) DOT64A8(p3, d3)
                } else {
                    const __m256i X0 = _mm256_loadu_si256((const __m256i *)xk);
                    const __m256i X1 = _mm256_loadu_si256((const __m256i *)(xk + 32));
                    const __m256i X2 = _mm256_loadu_si256((const __m256i *)(xk + 64));
                    const __m256i X3 = _mm256_loadu_si256((const __m256i *)(xk + 96));
                    DOT64(p0, d0) DOT64(p1, d1) DOT64(p2, d2) DOT64(p3, d3)
                }
                p0 += 32; p1 += 32; p2 += 32; p3 += 32;
            }
            /* (scale, zero) of the four rows as one word each, scale in the low half */
            const __m128i pairs = _mm_loadu_si128((const __m128i *)(sz + 8 * g));
            const __m128 s = _mm_castsi128_ps(_mm_slli_epi32(pairs, 16)), z = _mm_castsi128_ps(_mm_and_si128(pairs, hi16));
            const __m128 ssx = _mm_mul_ps(s, _mm_set1_ps(sx[g]));
            const __m256 b = _mm256_insertf128_ps(_mm256_castps128_ps256(ssx), ssx, 1);  /* [s sx] twice */
            /* [row 0..3 | row 0..3] sums of d0..d3 by unpacks and adds (fewer uops than vphaddd on Zen 3) */
            const __m256i t0 = _mm256_add_epi32(_mm256_unpacklo_epi32(d0, d1), _mm256_unpackhi_epi32(d0, d1));
            const __m256i t1 = _mm256_add_epi32(_mm256_unpacklo_epi32(d2, d3), _mm256_unpackhi_epi32(d2, d3));
            const __m256i h = _mm256_add_epi32(_mm256_unpacklo_epi64(t0, t1), _mm256_unpackhi_epi64(t0, t1));
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(h), b, acc);
            off = _mm_fmadd_ps(_mm_sub_ps(z, _mm_mul_ps(_mm_set1_ps(8.0f), s)), _mm_set1_ps(xs[g]), off);
        }
        const __m128 dots = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
        _mm_storeu_ps(y + n, _mm_add_ps(dots, off));
    }
}

/* y [N] for one token whose input quantize_input rounded to int16 or, with a8, int8 */
static void one_token(const void *xq, int a8, const float *sx, const float *xs, int64_t K, const uint8_t *P,
                      const uint16_t *SZ, int64_t N, int64_t G, float *y) {
    if (a8 && G == 64)
        one_token_runs(xq, 1, sx, xs, K, P, SZ, N, 64, 1, y);
    else if (a8)
        one_token_runs(xq, 1, sx, xs, K, P, SZ, N, G, G / 64, y);
    else if (G == 64)
        one_token_runs(xq, 0, sx, xs, K, P, SZ, N, 64, 1, y);
    else
        one_token_runs(xq, 0, sx, xs, K, P, SZ, N, G, G / 64, y);
}

/* y [M, N] = x [M, K] @ W.T, one token at a time (decode: M is 1), M <= 62, N % 4 == 0; a8: the
 * input rounded to int8 (quantize_input), else int16. scratch: at least M*K int16 followed by
 * 2*M*(K/G) floats (kernels.py sizes it). Returns a mask: bit m set = token m was left for the
 * caller to compute in float (group_stats). */
int64_t splitllm_q4_gemv(const float *x, int64_t M, int64_t K, const uint8_t *P, const uint16_t *SZ, int64_t N,
                         int64_t G, int64_t a8, void *scratch, float *y) {
    const int64_t ng = K / G;
    int16_t *x16 = (int16_t *)scratch;
    float *sx = (float *)(x16 + M * K), *xs = sx + M * ng;
    int64_t left = 0;
    for (int64_t m = 0; m < M; m++) {
        if (quantize_input(x + m * K, K, G, a8 != 0, x16 + m * K, sx + m * ng, xs + m * ng))
            left |= (int64_t)1 << m;
        else
            one_token(x16 + m * K, a8 != 0, sx + m * ng, xs + m * ng, K, P, SZ, N, G, y + m * N);
    }
    return left;
}

/* W [n1 - n0, K] float32: rows n0..n1 of the weight, for a prefill's float product */
void splitllm_q4_dequant(const uint8_t *P, const uint16_t *SZ, int64_t K, int64_t G, int64_t n0, int64_t n1,
                         float *W) {
    const __m256i m4 = _mm256_set1_epi16(0x0F);
    const int64_t ng = K / G, runs = G / 64;
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *p = P + n * (K / 2);
        const uint16_t *sz = SZ + ((n / 4) * ng * 4 + n % 4) * 2;  /* row n's pair of group 0; groups 8 apart */
        float *w = W + (n - n0) * K;
        for (int64_t g = 0; g < ng; g++) {
            const float s = bf16_to_f32(sz[8 * g]);
            const __m256 sv = _mm256_set1_ps(s), ov = _mm256_set1_ps(bf16_to_f32(sz[8 * g + 1]) - 8.0f * s);
            for (int64_t r = 0; r < runs; r++, p += 32, w += 64) {
                const __m256i b = _mm256_loadu_si256((const __m256i *)p);
                for (int i = 0; i < 4; i++) {  /* nibble i of the 16 words: codes k = 16 i .. 16 i + 15 */
                    const __m256i q = _mm256_and_si256(_mm256_srli_epi16(b, 4 * i), m4);
                    __m256 a = _mm256_cvtepi32_ps(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(q)));
                    __m256 c = _mm256_cvtepi32_ps(_mm256_cvtepu16_epi32(_mm256_extracti128_si256(q, 1)));
                    _mm256_storeu_ps(w + 16 * i, _mm256_fmadd_ps(a, sv, ov));
                    _mm256_storeu_ps(w + 16 * i + 8, _mm256_fmadd_ps(c, sv, ov));
                }
            }
        }
    }
}

/* 8-bit, one token: y [N] = x16 [K] (groups of 64 scaled by sx) @ (C [N, K] int8 * S [N] bf16).T.
 * |sum| <= 64 * 128 * 32767 per group fits int32 with room to spare. */
static void q8_one_token(const int16_t *x16, const float *sx, int64_t K, const int8_t *C, const uint16_t *S, int64_t N,
                         float *y) {
    const int64_t G = 64, ng = K / G;
    for (int64_t n = 0; n < N; n += 2) {
        const int two = n + 1 < N;
        if (n + PREFETCH_ROWS + 2 <= N)  /* the next block's two rows (see PREFETCH_ROWS) */
            for (int64_t o = 0; o < 2 * K; o += 64)
                _mm_prefetch((const char *)(C + (n + PREFETCH_ROWS) * K + o), _MM_HINT_T0);
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
        y[n] = bf16_to_f32(S[n]) * hsum8(acca);
        if (two) y[n + 1] = bf16_to_f32(S[n + 1]) * hsum8(accb);
    }
}

/* 8-bit: y [M, N] = x [M, K] @ W.T with W[n, k] = c[n, k] * s[n] (Int8Linear's operands as they
 * are: codes C [N, K] int8, scales S [N] bf16). x is rounded to int16 per 64 inputs (K % 64 == 0).
 * One token at a time. */
int64_t splitllm_q8_gemv(const float *x, int64_t M, int64_t K, const int8_t *C, const uint16_t *S, int64_t N,
                         void *scratch, float *y) {
    const int64_t ng = K / 64;
    int16_t *x16 = (int16_t *)scratch;
    float *sx = (float *)(x16 + K), *xs = sx + ng;
    int64_t left = 0;  /* as splitllm_q4_gemv */
    for (int64_t m = 0; m < M; m++, x += K, y += N) {
        if (quantize_input(x, K, 64, 0, x16, sx, xs))
            left |= (int64_t)1 << m;
        else
            q8_one_token(x16, sx, K, C, S, N, y);
    }
    return left;
}

/* The 8-bit KV cache's prefix, dequantized into attention's float scratch with the roundings of
 * rtn.dequantize_groupwise's out= path (the codes converted exactly, times the scale rounded, plus
 * (zero - 128 scale) rounded: separate mul and add, never fused), so the values are bit for bit
 * the same. Codes [planes, T, D] uint8, scales / zeros [planes, T, D/G] fp16, out [planes, T, D]
 * float32, each plane at its own stride (the cache's capacity); G % 8 == 0. */
void splitllm_kv8_dequant(const uint8_t *q, int64_t q_plane, const uint16_t *s, const uint16_t *z, int64_t sz_plane,
                          int64_t planes, int64_t T, int64_t D, int64_t G, float *out, int64_t out_plane) {
    const int64_t ng = D / G;
    for (int64_t p = 0; p < planes; p++) {
        for (int64_t t = 0; t < T; t++) {
            const uint8_t *qr = q + p * q_plane + t * D;
            const uint16_t *sr = s + p * sz_plane + t * ng, *zr = z + p * sz_plane + t * ng;
            float *o = out + p * out_plane + t * D;
            for (int64_t g = 0; g < ng; g++) {
                const float sc = _cvtsh_ss(sr[g]);
                const __m256 sv = _mm256_set1_ps(sc), ov = _mm256_set1_ps(_cvtsh_ss(zr[g]) - 128.0f * sc);
                for (int64_t k = g * G; k < (g + 1) * G; k += 8) {
                    __m256 c = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(qr + k))));
                    _mm256_storeu_ps(o + k, _mm256_add_ps(_mm256_mul_ps(c, sv), ov));
                }
            }
        }
    }
}

/* The LM-head screen's per-step work past its product (quant/screen.py, Int8Screen.top), one pass
 * each instead of ~15 torch ops over V floats (~0.5 ms a step on SmolLM2's 49152 rows). */

/* out[0] = ||x||_1 (summed in double, rounded once), out[1] = max |x| */
void splitllm_abs_stats(const float *x, int64_t K, float *out) {
    double l1 = 0;
    float amax = 0.f;
    for (int64_t i = 0; i < K; i++) {
        const float a = fabsf(x[i]);
        l1 += a;
        amax = a > amax ? a : amax;
    }
    out[0] = (float)l1;
    out[1] = amax;
}

/* The first index of S's largest value (S [V] finite, V >= 1), as torch.argmax */
int64_t splitllm_argmax(const float *S, int64_t V) {
    __m256 vmax = _mm256_set1_ps(-INFINITY);
    int64_t j = 0;
    for (; j + 8 <= V; j += 8) vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(S + j));
    float lanes[8], best = -INFINITY;
    _mm256_storeu_ps(lanes, vmax);
    for (int i = 0; i < 8; i++) best = lanes[i] > best ? lanes[i] : best;
    for (; j < V; j++) best = S[j] > best ? S[j] : best;
    for (j = 0; j < V; j++)
        if (S[j] == best) return j;
    return 0;
}

/* Which rows can be among the top: T = min over the k computed rows of (R_i - m_i l1 slack) - tiny,
 * then row j is kept when S[j] + e[j] >= T with e[j] = ((a[j] l1) + (b[j] c)) slack + tiny; the
 * float32 operations Int8Screen.top's bound is stated for, each rounded on its own (the build's
 * -ffp-contract=off). The kept rows' indices go to idx (room for V) in ascending order and every
 * S[j] becomes -inf (the caller writes the kept rows' float products over them). Returns how
 * many were kept, or -1 (nothing written) when T is not finite. */
int64_t splitllm_screen_keep(float *S, const float *a, const float *b, int64_t V, float l1, float c, float slack,
                             float tiny, const float *R, const float *m, int64_t k, int64_t *idx) {
    float T = INFINITY;
    for (int64_t i = 0; i < k; i++) {
        const float t = (R[i] - (m[i] * l1) * slack) - tiny;
        if (isnan(t)) return -1;  /* as torch's min: a NaN anywhere makes T NaN */
        T = t < T ? t : T;
    }
    if (!isfinite(T)) return -1;
    const __m256 vl1 = _mm256_set1_ps(l1), vc = _mm256_set1_ps(c), vslack = _mm256_set1_ps(slack),
                 vtiny = _mm256_set1_ps(tiny), vT = _mm256_set1_ps(T), ninf = _mm256_set1_ps(-INFINITY);
    int64_t n = 0, j = 0;
    for (; j + 8 <= V; j += 8) {
        const __m256 e = _mm256_add_ps(_mm256_mul_ps(_mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(a + j), vl1),
                                                                   _mm256_mul_ps(_mm256_loadu_ps(b + j), vc)),
                                                     vslack), vtiny);
        unsigned mask = (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(_mm256_add_ps(_mm256_loadu_ps(S + j), e), vT,
                                                                   _CMP_GE_OQ));
        _mm256_storeu_ps(S + j, ninf);
        while (mask) {
            idx[n++] = j + __builtin_ctz(mask);
            mask &= mask - 1;
        }
    }
    for (; j < V; j++) {
        const float e = ((a[j] * l1) + (b[j] * c)) * slack + tiny;
        if (S[j] + e >= T) idx[n++] = j;
        S[j] = -INFINITY;
    }
    return n;
}

/* fp16 weights: y [M, N] = x [M, K] @ W.T (+ b [N]) with W [N, K] IEEE half (the predictive codec's
 * predictor and KLT, which one decode step streams whole: in fp16 an end's 2 MB of them fit this
 * machine's 2 MB L2 where the float32 4 MB did not). Products and sums in float32; blocks of four
 * rows of W, each reused from L1 by every row of x. K % 8 == 0; b may be NULL. */
void splitllm_f16_gemv(const float *x, int64_t M, int64_t K, const uint16_t *W, const float *b, int64_t N,
                       float *y) {
    for (int64_t n = 0; n < N; n += 4) {
        const int64_t r = N - n < 4 ? N - n : 4;
        const uint16_t *w[4];
        for (int64_t i = 0; i < 4; i++) w[i] = W + (n + (i < r ? i : 0)) * K;  /* a short block repeats row 0 */
        if (n + PREFETCH_ROWS + 4 <= N)  /* the next block's rows */
            for (int64_t o = 0; o < 4 * K; o += 32)
                _mm_prefetch((const char *)(W + (n + PREFETCH_ROWS) * K + o), _MM_HINT_T0);
        for (int64_t m = 0; m < M; m++) {
            const float *xm = x + m * K;
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            for (int64_t k = 0; k < K; k += 8) {
                const __m256 X = _mm256_loadu_ps(xm + k);
                a0 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w[0] + k))), X, a0);
                a1 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w[1] + k))), X, a1);
                a2 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w[2] + k))), X, a2);
                a3 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w[3] + k))), X, a3);
            }
            const float s[4] = {hsum8(a0), hsum8(a1), hsum8(a2), hsum8(a3)};
            for (int64_t i = 0; i < r; i++) y[m * N + n + i] = b ? s[i] + b[n + i] : s[i];
        }
    }
}

#include "decode_step.c"
