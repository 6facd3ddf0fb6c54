/* One decode token through a run of Llama-style decoder layers in one call (included by kernels.c).
 *
 * Why: at batch 1 the fast path's torch ops cost more than their arithmetic. Measured on the 2-core
 * AVX2 host (SmolLM2-135M, l = 15, 1 thread, torch profiler): SDPA alone took ~110-125 us per layer
 * for one query, and the ~30 other small ops of a layer (norms, rotary, cache writes, casts, views)
 * several hundred us more. Here a layer's non-product work is ~60 us (0.9 ms for 15 layers at
 * position 230, most of it reading the KV prefix), and the products run on this file's float GEMV
 * over the batch-1 layout the fast path already gives float weights (W^T [K, N] contiguous; it
 * streamed 212 MB of fp32 weights in ~17 ms where MKL's batch-1 product took ~21) and on
 * kernels.c's 4- and 8-bit kernels. bench decode, same host: the fp32 split step 39 ms against 55
 * on the torch path, the int4 edge's 5.2-6.2 ms against 14-15.
 *
 * The arithmetic is the fast path's (model/fast.py), in the same order where that is cheap:
 * RMSNorm as (x * (1 / sqrt(mean(x^2) + eps))) * w, rotary as x * cos + roll(x, D/2) * sin_signed
 * (separate multiply and add: kernels.py builds with -ffp-contract=off), attention as
 * softmax(q.k * scaling) v over positions [0, pos] of a float cache or an 8-bit one (new rows
 * quantized as rtn.quantize_kv does, bit for bit, tested; the prefix read through kv8_dequant, as
 * the torch path reads it), SiLU(gate) * up, residual adds; e^x for the softmax and SiLU by exp8,
 * 8 at a time (within 1 ulp of expf; the two took 27.7 -> 17.3 us of a layer at position 230 and
 * 108 -> 79 us at 1000, SmolLM2-135M shapes, C harness, this host). Sums run in
 * another order than torch's (the norm's mean, the dot products, the float GEMV's k order), so
 * the outputs differ from the torch path in the last bits; tests/test_decode_step.py bounds it.
 * Results do not depend on anything but the inputs (no threads, no blocking that varies), so a
 * split and an unsplit model running the same layers here agree bit for bit.
 *
 * A token whose input a 4- or 8-bit product would leave to float (quantize_input: NaN, inf, extreme
 * magnitudes), or whose k / v row the 8-bit cache cannot store (non-finite values, scale or zero),
 * stops the call with 1, and the caller runs the whole token on the torch path again from a copy
 * of its input: that rewrites every cache position this call wrote. */

typedef struct {
    int64_t kind;  /* SL_FLOAT: a = W^T [K, N] float32 contiguous; SL_INT4: a = P, b = SZ, G (kernels.c's
                      layout), SL_INT4_A8 the same on int8 inputs; SL_INT8: a = codes [N, K] int8,
                      b = scales [N] bf16 */
    int64_t K, N, G;
    const void *a, *b;
} sl_prod;

typedef struct {
    sl_prod qkv, o, gate_up, down;  /* qkv: [q | k | v] rows; gate_up: [gate | up] rows */
    const float *w_in, *w_post;     /* the two RMSNorm weights [H] */
    double eps_in, eps_post, scaling;
    int64_t n_heads, n_kv, head_dim, inter;
} sl_layer;

enum { SL_FLOAT = 0, SL_INT4 = 1, SL_INT8 = 2, SL_INT4_A8 = 3 };

/* The KV cache of the layers' run (batch 1). kind SL_KV_FLOAT: k / v are layer 0's [n_kv, cap, D]
 * float32. SL_KV8: codes is layer 0's [2 (K, V), n_kv, cap, D] uint8, scales / zeros its
 * [2, n_kv, cap, D / G] fp16 (QuantStaticKV at 8 bits, fp16 scales). Layer i's are
 * i * (layer_stride or sz_layer_stride) elements on. */
typedef struct {
    int64_t kind;
    float *k, *v;
    uint8_t *codes;
    uint16_t *scales, *zeros;
    int64_t layer_stride, sz_layer_stride, cap, G;
} sl_cache;

enum { SL_KV_FLOAT = 0, SL_KV8 = 1 };

/* rows ahead the float GEMV prefetches (its blocks of rows stream one contiguous region) */
#define SL_FLOAT_PREFETCH 8

/* y[0..N) += sum over the R rows k..k+R-1 of x[k] * W^T[k], each y[n] in ascending k (one FMA
 * chain per y vector: the same operations whatever R is) */
static inline __attribute__((always_inline)) void gemv_f32_rows(const float *x, int64_t k, int64_t K, const float *W,
                                                                int64_t N, float *y, const int R) {
    __m256 xs[8];
    const float *w[8];
    for (int r = 0; r < R; r++) {
        xs[r] = _mm256_set1_ps(x[k + r]);
        w[r] = W + (k + r) * N;
    }
    const float *pf = k + SL_FLOAT_PREFETCH + R <= K ? W + (k + SL_FLOAT_PREFETCH) * N : NULL;
    for (int64_t n = 0; n < N; n += 16) {
        if (pf)  /* the same 64 bytes of the R rows SL_FLOAT_PREFETCH ahead */
            for (int r = 0; r < R; r++) _mm_prefetch((const char *)(pf + r * N + n), _MM_HINT_T0);
        __m256 a = _mm256_loadu_ps(y + n), b = _mm256_loadu_ps(y + n + 8);
        for (int r = 0; r < R; r++) {
            a = _mm256_fmadd_ps(xs[r], _mm256_loadu_ps(w[r] + n), a);
            b = _mm256_fmadd_ps(xs[r], _mm256_loadu_ps(w[r] + n + 8), b);
        }
        _mm256_storeu_ps(y + n, a);
        _mm256_storeu_ps(y + n + 8, b);
    }
}

/* y [N] = x [K] @ W^T [K, N]; each y[n] sums k in ascending order, fused, 8 rows per pass over y
 * (then 4, then 1: the same sums bit for bit, tested in a harness over K = 1..1537). N % 16 == 0.
 * 8 rows per pass halve y's loads and stores per weight byte: the 15 layers' 212 MB of an fp32
 * half in 12.0-12.3 ms against 13.0-13.2 at 4 rows (C harness, 2-core Zen 4 with AVX-512, 1
 * thread, medians of 11 alternating rounds, two runs; 16 rows no better than 4). A single read
 * stream reaches 23-29 GB/s on this core, the GEMV now ~17.5. */
static void gemv_f32(const float *x, int64_t K, const float *W, int64_t N, float *y) {
    memset(y, 0, (size_t)N * sizeof(float));
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) gemv_f32_rows(x, k, K, W, N, y, 8);
    for (; k + 4 <= K; k += 4) gemv_f32_rows(x, k, K, W, N, y, 4);
    for (; k < K; k++) gemv_f32_rows(x, k, K, W, N, y, 1);
}

/* y [N] = the product of x [K] with p's weight. scratch: K int16 + 2 (K / 64) floats at least.
 * Returns 1 (y untouched) where a quantized product leaves x to float. */
static int sl_product(const sl_prod *p, const float *x, void *scratch, float *y) {
    if (p->kind == SL_FLOAT) {
        gemv_f32(x, p->K, (const float *)p->a, p->N, y);
        return 0;
    }
    const int four = p->kind == SL_INT4 || p->kind == SL_INT4_A8, a8 = p->kind == SL_INT4_A8;
    const int64_t G = four ? p->G : 64, ng = p->K / G;
    int16_t *x16 = (int16_t *)scratch;
    float *sx = (float *)(x16 + p->K), *xs = sx + ng;
    if (quantize_input(x, p->K, G, a8, x16, sx, xs)) return 1;
    if (four)
        one_token(x16, a8, sx, xs, p->K, (const uint8_t *)p->a, (const uint16_t *)p->b, p->N, G, y);
    else
        q8_one_token(x16, sx, p->K, (const int8_t *)p->a, (const uint16_t *)p->b, p->N, y);
    return 0;
}

/* out [H] = (x * (1 / sqrt(mean(x^2) + eps))) * w */
static void rms_norm(const float *x, const float *w, int64_t H, double eps, float *out) {
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= H; i += 8) {
        const __m256 v = _mm256_loadu_ps(x + i);
        acc = _mm256_add_ps(acc, _mm256_mul_ps(v, v));
    }
    float ss = hsum8(acc);
    for (; i < H; i++) ss += x[i] * x[i];
    const float r = 1.0f / sqrtf(ss / (float)H + (float)eps);
    for (i = 0; i < H; i++) out[i] = (x[i] * r) * w[i];
}

/* x [D] rotated in place: x * cos + roll(x, D/2) * sin_signed (one head); tmp [D] */
static void rope(float *x, const float *cos, const float *sin, int64_t D, float *tmp) {
    const int64_t half = D / 2;  /* roll(x, D/2)[j] = x[j + D/2] below D/2, x[j - D/2] above */
    for (int64_t j = 0; j < half; j++) tmp[j] = x[j] * cos[j] + x[j + half] * sin[j];
    for (int64_t j = half; j < D; j++) tmp[j] = x[j] * cos[j] + x[j - half] * sin[j];
    memcpy(x, tmp, (size_t)D * sizeof(float));
}

static inline float dot(const float *a, const float *b, int64_t D) {
    __m256 acc = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= D; j += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + j), _mm256_loadu_ps(b + j), acc);
    float s = hsum8(acc);
    for (; j < D; j++) s += a[j] * b[j];
    return s;
}

/* p[0..4) = hsum8 of a0..a3, each in hsum8's order (lo + hi, then (l0 + l1) + (l2 + l3)), four at
 * once after a transpose */
static inline void hsum8x4(__m256 a0, __m256 a1, __m256 a2, __m256 a3, float *p) {
    __m128 r0 = _mm_add_ps(_mm256_castps256_ps128(a0), _mm256_extractf128_ps(a0, 1));
    __m128 r1 = _mm_add_ps(_mm256_castps256_ps128(a1), _mm256_extractf128_ps(a1, 1));
    __m128 r2 = _mm_add_ps(_mm256_castps256_ps128(a2), _mm256_extractf128_ps(a2, 1));
    __m128 r3 = _mm_add_ps(_mm256_castps256_ps128(a3), _mm256_extractf128_ps(a3, 1));
    _MM_TRANSPOSE4_PS(r0, r1, r2, r3);  /* r_i = lane i of the four */
    _mm_storeu_ps(p, _mm_add_ps(_mm_add_ps(r0, r1), _mm_add_ps(r2, r3)));
}

/* e^x of 8 floats: x = n ln2 + r with |r| <= ln2 / 2, e^r by Cephes expf's degree-7 polynomial
 * (within 1 ulp of exp rounded once, tested), times 2^n applied as two powers of two so
 * that results in the subnormal range and overflow to inf come out as expf's. NaN stays NaN,
 * -inf and x < -103.98 give 0, +inf gives inf. Why not expf: the step calls it ~3,600 times per
 * layer (softmax weights and SiLU at position ~230); one call at a time cost ~13 us of each
 * layer's ~30 us outside the products (this 2-core Zen 3, SmolLM2-135M shapes). */
static inline __m256 exp8(__m256 x) {
    const __m256 xc = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(89.0f)), _mm256_set1_ps(-104.0f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), xc);  /* ln2 in two parts: n * hi exact */
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 e = _mm256_set1_ps(1.9875691500e-4f);
    e = _mm256_fmadd_ps(e, r, _mm256_set1_ps(1.3981999507e-3f));
    e = _mm256_fmadd_ps(e, r, _mm256_set1_ps(8.3334519073e-3f));
    e = _mm256_fmadd_ps(e, r, _mm256_set1_ps(4.1665795894e-2f));
    e = _mm256_fmadd_ps(e, r, _mm256_set1_ps(1.6666665459e-1f));
    e = _mm256_fmadd_ps(e, r, _mm256_set1_ps(5.0000001201e-1f));
    e = _mm256_add_ps(_mm256_fmadd_ps(e, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0f));  /* e^r */
    const __m256i ni = _mm256_cvtps_epi32(n), n1 = _mm256_srai_epi32(ni, 1), n2 = _mm256_sub_epi32(ni, n1);
    const __m256i bias = _mm256_set1_epi32(127);
    e = _mm256_mul_ps(e, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, bias), 23)));
    e = _mm256_mul_ps(e, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n2, bias), 23)));
    e = _mm256_andnot_ps(_mm256_cmp_ps(x, _mm256_set1_ps(-103.972084f), _CMP_LT_OQ), e);  /* expf's 0 */
    return _mm256_blendv_ps(e, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));                      /* NaN */
}

/* y [n] = exp8 of x [n] (the tail through a padded copy): what the step's softmax and SiLU use */
void splitllm_exp(const float *x, int64_t n, float *y) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, exp8(_mm256_loadu_ps(x + i)));
    if (i < n) {
        float t[8] = {0};
        memcpy(t, x + i, (size_t)(n - i) * sizeof(float));
        _mm256_storeu_ps(t, exp8(_mm256_loadu_ps(t)));
        memcpy(y + i, t, (size_t)(n - i) * sizeof(float));
    }
}

/* The `nq` (<= 3) heads' q . K[t] for rows t = 0..3 of K (rows D apart) into ps[h * stride + t]:
 * `dot`'s sums, each in the same order (8 lanes, then hsum8's tree), with 4 nq independent FMA
 * chains instead of one and each K load shared by the heads. D % 8 == 0. */
static inline __attribute__((always_inline)) void scores4(const float *q, int nq, const float *K, int64_t D,
                                                          float *ps, int64_t stride) {
    __m256 a[3][4];
    for (int h = 0; h < nq; h++)
        for (int r = 0; r < 4; r++) a[h][r] = _mm256_setzero_ps();
    for (int64_t j = 0; j < D; j += 8)
        for (int r = 0; r < 4; r++) {
            const __m256 k = _mm256_loadu_ps(K + r * D + j);
            for (int h = 0; h < nq; h++) a[h][r] = _mm256_fmadd_ps(_mm256_loadu_ps(q + h * D + j), k, a[h][r]);
        }
    for (int h = 0; h < nq; h++) hsum8x4(a[h][0], a[h][1], a[h][2], a[h][3], ps + h * stride);
}

/* out_h [j, j + 8 w) = the `nq` (<= 3) heads' weighted sums of V[t][j, j + 8 w) over t in [0, T),
 * each output a t-ascending FMA chain from 0 (as one head at a time would compute it), each V load
 * shared by the heads; nq * w <= 12 accumulators (w = 8 for a head alone: eight FMA chains hide the
 * FMA's latency, w = 4 for two or three heads) */
static inline __attribute__((always_inline)) void weigh(const float *p, int nq, int64_t stride, const float *V,
                                                        int64_t T, int64_t D, int64_t j, int w, float *out) {
    __m256 o[3][8];
    for (int h = 0; h < nq; h++)
        for (int c = 0; c < w; c++) o[h][c] = _mm256_setzero_ps();
    for (int64_t t = 0; t < T; t++) {
        const float *v = V + t * D + j;
        for (int h = 0; h < nq; h++) {
            const __m256 wt = _mm256_set1_ps(p[h * stride + t]);
            for (int c = 0; c < w; c++) o[h][c] = _mm256_fmadd_ps(wt, _mm256_loadu_ps(v + 8 * c), o[h][c]);
        }
    }
    for (int h = 0; h < nq; h++)
        for (int c = 0; c < w; c++) _mm256_storeu_ps(out + h * D + j + 8 * c, o[h][c]);
}

/* One head's p [T] (scores * scaling, m their max as `m = p > m ? p : m` finds it from -inf) into
 * softmax weights: e^(p - m) 8 at a time over T rounded up to 8 (p has room:
 * splitllm_decode_scratch; the padding -inf weighs 0), summed in 8 lanes then hsum8's tree, times
 * 1 / sum */
static void softmax_(float *p, int64_t T, float m) {
    const int64_t T8 = (T + 7) & ~(int64_t)7;
    for (int64_t t = T; t < T8; t++) p[t] = -INFINITY;
    const __m256 mv = _mm256_set1_ps(m);
    __m256 acc = _mm256_setzero_ps();
    for (int64_t t = 0; t < T8; t += 8) {
        const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p + t), mv));
        _mm256_storeu_ps(p + t, e);
        acc = _mm256_add_ps(acc, e);
    }
    const float inv = 1.0f / hsum8(acc);
    for (int64_t t = 0; t < T; t++) p[t] *= inv;
}

/* out [j0, D) = one head's weighted sum of V's columns [j0, D) (8 at a time, then one by one) */
static void weigh_tail(const float *p, const float *V, int64_t T, int64_t D, int64_t j0, float *out) {
    int64_t j = j0;
    for (; j + 8 <= D; j += 8) {
        __m256 acc = _mm256_setzero_ps();
        for (int64_t t = 0; t < T; t++) acc = _mm256_fmadd_ps(_mm256_set1_ps(p[t]), _mm256_loadu_ps(V + t * D + j), acc);
        _mm256_storeu_ps(out + j, acc);
    }
    for (; j < D; j++) {
        float acc = 0.f;
        for (int64_t t = 0; t < T; t++) acc += p[t] * V[t * D + j];
        out[j] = acc;
    }
}

/* out [D] = softmax_t(q . K[t] * scaling) V[t] over t in [0, T) for one head: the scores four rows
 * at a time (scores4) with the max on the way, then 64 outputs a pass (weigh) */
static void attend_one(const float *q, const float *K, const float *V, int64_t T, int64_t D, float scaling, float *p,
                       float *out) {
    float m = -INFINITY;
    int64_t t = 0;
    if (D % 8 == 0)
        for (; t + 4 <= T; t += 4) {
            scores4(q, 1, K + t * D, D, p + t, 0);
            for (int i = 0; i < 4; i++) {
                p[t + i] *= scaling;
                m = p[t + i] > m ? p[t + i] : m;
            }
        }
    for (; t < T; t++) {
        p[t] = dot(q, K + t * D, D) * scaling;
        m = p[t] > m ? p[t] : m;
    }
    softmax_(p, T, m);
    int64_t j = 0;
    for (; j + 64 <= D; j += 64) weigh(p, 1, 0, V, T, D, j, 8, out);
    weigh_tail(p, V, T, D, j, out);
}

/* out_h [D] = softmax_t(q_h . K[t] * scaling) V[t] over t in [0, T) for the n query heads q [n, D]
 * that share one kv head's K, V [T, D] (rows D apart); out [n, D]; p: n rows of `stride` >= T + 8
 * floats of scratch. Each head's numbers are what one head at a time computes (`dot`'s sums, then
 * a t-ascending FMA per output), in blocks of up to three heads that share every K and V load: on
 * SmolLM2-135M (9 heads on 3 kv heads) one layer's attention went from 15.0 to 10.1 us at
 * position 230 and from 74 to 47 us at 1000 (this host, C harness, the same output bits), where
 * each head re-reading K and V from L2 was the cost. A head alone (multi-head attention) takes
 * attend_one, as fast as before. */
static void attend(const float *q, int64_t n, const float *K, const float *V, int64_t T, int64_t D, float scaling,
                   float *p, int64_t stride, float *out) {
    for (int64_t h0 = 0; h0 < n; h0 += 3) {
        const int nq = n - h0 < 3 ? (int)(n - h0) : 3;
        const float *qh = q + h0 * D;
        float *ph = p + h0 * stride, *oh = out + h0 * D;
        if (nq == 1) {  /* a head alone (multi-head attention, or the last of a group) */
            attend_one(qh, K, V, T, D, scaling, ph, oh);
            continue;
        }
        int64_t t = 0;
        if (D % 8 == 0)
            for (; t + 4 <= T; t += 4) {
                if (nq == 3) scores4(qh, 3, K + t * D, D, ph + t, stride);
                else scores4(qh, 2, K + t * D, D, ph + t, stride);
            }
        for (int h = 0; h < nq; h++) {
            float *ps = ph + h * stride;
            for (int64_t u = t; u < T; u++) ps[u] = dot(qh + h * D, K + u * D, D);
            float m = -INFINITY;
            for (int64_t u = 0; u < T; u++) {
                ps[u] *= scaling;
                m = ps[u] > m ? ps[u] : m;
            }
            softmax_(ps, T, m);
        }
        int64_t j = 0;
        for (; j + 32 <= D; j += 32) {
            if (nq == 3) weigh(ph, 3, stride, V, T, D, j, 4, oh);
            else weigh(ph, 2, stride, V, T, D, j, 4, oh);
        }
        for (int h = 0; h < nq; h++) weigh_tail(ph + h * stride, V, T, D, j, oh + h * D);
    }
}

/* act [n] = SiLU(gate) * up = (gate / (1 + e^-gate)) * up, 8 at a time (exp8) */
static void silu_mul(const float *gate, const float *up, int64_t n, float *act) {
    const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
        const __m256 g = _mm256_loadu_ps(gate + j);
        const __m256 s = _mm256_div_ps(g, _mm256_add_ps(one, exp8(_mm256_sub_ps(zero, g))));
        _mm256_storeu_ps(act + j, _mm256_mul_ps(s, _mm256_loadu_ps(up + j)));
    }
    if (j < n) {  /* the tail through the same function, from a padded copy */
        float g[8] = {0}, e[8];
        memcpy(g, gate + j, (size_t)(n - j) * sizeof(float));
        _mm256_storeu_ps(e, exp8(_mm256_sub_ps(zero, _mm256_loadu_ps(g))));
        for (int64_t i = 0; j + i < n; i++) act[j + i] = (g[i] / (1.0f + e[i])) * up[j + i];
    }
}

/* One token's k or v row x [D] into 8-bit codes q [D] and fp16 scale / zero per group of G, in
 * rtn.quantize_kv's number format and arithmetic (float32, fp16 rounded to nearest, the same
 * margins: see its docstring for the guarantees, which hold for any float32 evaluation order of
 * its <= 4 roundings). Returns 1 for a non-finite value, scale or zero (earlier groups of the row
 * may be written): the torch rerun then stores the row as quantize_kv does. */
static int kv8_quantize(const float *x, int64_t D, int64_t G, uint8_t *q, uint16_t *scales, uint16_t *zeros) {
    const float k_lo = (float)((1.0 + 0x1p-10) / 128.0), k_hi = (float)((1.0 + 0x1p-10) / 127.0), d = 0x1p-24f;
    const float w = (float)(128.0 / 255.0);
    for (int64_t g = 0; g < D / G; g++) {
        const float *xg = x + g * G;
        float lo = xg[0], hi = xg[0];
        for (int64_t j = 0; j < G; j++) {
            if (!isfinite(xg[j])) return 1;
            lo = xg[j] < lo ? xg[j] : lo;
            hi = xg[j] > hi ? xg[j] : hi;
        }
        /* torch.lerp(lo, hi, w) for w >= 1/2 as its vectorized kernel computes it, fused (and as its
         * scalar form hi - (hi - lo) (1 - w) where contracted: 1 - w is exact) */
        const float zf = fmaf(w - 1.0f, hi - lo, hi);
        const uint16_t zh = _cvtss_sh(zf, _MM_FROUND_TO_NEAREST_INT);
        const float z = _cvtsh_ss(zh);
        const float a = d + (z - lo) * k_lo, b = d + (hi - z) * k_hi;
        const uint16_t sh = _cvtss_sh(a > b ? a : b, _MM_FROUND_TO_NEAREST_INT);
        const float sc = _cvtsh_ss(sh);
        if (!isfinite(z) || !isfinite(sc)) return 1;
        scales[g] = sh;
        zeros[g] = zh;
        for (int64_t j = 0; j < G; j++) {
            float t = nearbyintf(128.0f + (xg[j] - z) / sc);
            q[g * G + j] = (uint8_t)(t < 0.f ? 0.f : t > 255.f ? 255.f : t);
        }
    }
    return 0;
}

/* the widest vector a step holds: H and every layer's product widths */
static int64_t widest(const sl_layer *L, int64_t n_layers, int64_t H) {
    int64_t most = H;
    for (int64_t i = 0; i < n_layers; i++) {
        const sl_layer *l = L + i;
        const int64_t widths[] = {l->qkv.N, l->gate_up.N, l->n_heads * l->head_dim, l->inter, l->head_dim};
        for (int j = 0; j < 5; j++) most = widths[j] > most ? widths[j] : most;
    }
    return most;
}

/* the most query heads any layer puts on one kv head (attend's rows of weights) */
static int64_t most_per_kv(const sl_layer *L, int64_t n_layers) {
    int64_t most = 1;
    for (int64_t i = 0; i < n_layers; i++) most = L[i].n_heads / L[i].n_kv > most ? L[i].n_heads / L[i].n_kv : most;
    return most;
}

/* Floats of scratch splitllm_decode_step needs for a token at position pos (kernels.py sizes the
 * buffer with this): h, y, a, act, tmp of the widest width, the attention weights [pos + 1 + 16]
 * of each query head on one kv head and the quantized input (K int16 and 2 floats per 64 inputs:
 * within the widest width again). */
int64_t splitllm_decode_scratch(const sl_layer *L, int64_t n_layers, int64_t H, int64_t pos, int64_t cache_kind) {
    /* + for an 8-bit cache, one kv head's K and V prefix dequantized: 2 (pos + 1) D */
    return 6 * widest(L, n_layers, H) + most_per_kv(L, n_layers) * (pos + 1 + 16) +
           (cache_kind == SL_KV8 ? 2 * (pos + 1) * L[0].head_dim : 0);
}

/* x [H]: one token's hidden state, updated in place through layers L[0 .. n_layers). cos / sin:
 * the rotary tables' row for this position [D]. C: the cache (all layers share n_kv and D).
 * pos: the token's position (the cache holds [0, pos)). scratch: splitllm_decode_scratch(...)
 * floats. Returns 0, or 1 where a quantized product or the 8-bit cache left the token to float
 * (the caller reruns it; see the top of this file). */
int64_t splitllm_decode_step(const sl_layer *L, int64_t n_layers, float *x, int64_t H, const float *cos,
                             const float *sin, const sl_cache *C, int64_t pos, float *scratch) {
    const int64_t most = widest(L, n_layers, H), cap = C->cap, T = pos + 1;
    float *h = scratch, *y = h + most, *a = y + most, *act = a + most, *tmp = act + most, *q16 = tmp + most;
    float *p = q16 + most, *Kd = p + most_per_kv(L, n_layers) * (T + 16), *Vd = Kd + T * L[0].head_dim;
    for (int64_t i = 0; i < n_layers; i++) {
        const sl_layer *l = L + i;
        const int64_t nh = l->n_heads, nkv = l->n_kv, D = l->head_dim, group = nh / nkv;
        rms_norm(x, l->w_in, H, l->eps_in, h);
        if (sl_product(&l->qkv, h, q16, y)) return 1;  /* y = [q (nh D) | k (nkv D) | v (nkv D)] */
        for (int64_t hd = 0; hd < nh + nkv; hd++) rope(y + hd * D, cos, sin, D, tmp);
        for (int64_t g = 0; g < nkv; g++) {
            const float *kn = y + (nh + g) * D, *vn = y + (nh + nkv + g) * D;
            const float *Kg, *Vg;  /* this kv head's K, V over [0, T) */
            if (C->kind == SL_KV_FLOAT) {
                float *Kl = C->k + i * C->layer_stride + g * cap * D, *Vl = C->v + i * C->layer_stride + g * cap * D;
                memcpy(Kl + pos * D, kn, (size_t)D * sizeof(float));
                memcpy(Vl + pos * D, vn, (size_t)D * sizeof(float));
                Kg = Kl, Vg = Vl;
            } else {
                const int64_t G = C->G, plane = nkv * cap * D, sz_plane = nkv * cap * (D / G);
                uint8_t *ck = C->codes + i * C->layer_stride + g * cap * D;
                uint16_t *sk = C->scales + i * C->sz_layer_stride + g * cap * (D / G);
                uint16_t *zk = C->zeros + i * C->sz_layer_stride + g * cap * (D / G);
                if (kv8_quantize(kn, D, G, ck + pos * D, sk + pos * (D / G), zk + pos * (D / G)) ||
                    kv8_quantize(vn, D, G, ck + plane + pos * D, sk + sz_plane + pos * (D / G),
                                 zk + sz_plane + pos * (D / G)))
                    return 1;
                /* K and V planes of [0, T) at once: kv8_dequant's values, bit for bit the torch path's */
                splitllm_kv8_dequant(ck, plane, sk, zk, sz_plane, 2, T, D, G, Kd, T * D);
                Kg = Kd, Vg = Vd;
            }
            attend(y + g * group * D, group, Kg, Vg, T, D, (float)l->scaling, p, T + 16, a + g * group * D);
        }
        if (sl_product(&l->o, a, q16, y)) return 1;
        for (int64_t j = 0; j < H; j++) x[j] += y[j];
        rms_norm(x, l->w_post, H, l->eps_post, h);
        if (sl_product(&l->gate_up, h, q16, y)) return 1;  /* y = [gate | up] */
        silu_mul(y, y + l->inter, l->inter, act);
        if (sl_product(&l->down, act, q16, y)) return 1;
        for (int64_t j = 0; j < H; j++) x[j] += y[j];
    }
    return 0;
}

/* rows x [R, D] -> codes [R, D], scales / zeros [R, D / G] fp16 with the step's quantizer (tests
 * hold it to rtn.quantize_kv). Returns the number of rows it refused (see kv8_quantize). */
int64_t splitllm_kv8_quantize_rows(const float *x, int64_t R, int64_t D, int64_t G, uint8_t *q, uint16_t *s,
                                   uint16_t *z) {
    int64_t left = 0;
    for (int64_t r = 0; r < R; r++)
        left += kv8_quantize(x + r * D, D, G, q + r * D, s + r * (D / G), z + r * (D / G));
    return left;
}
