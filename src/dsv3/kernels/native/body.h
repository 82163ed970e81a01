/* One ISA's row kernels. Included by dsv3_kernels.c once per ISA after `#pragma GCC target(...)` with
 * SFX (the name suffix), VLEN (fp32 lanes) and the vector helpers below defined for that ISA:
 *   vf, VZERO(), VLOADX(p), VFMA(a, b, c), VMUL(a, b), VSET1(f), VSUM(v),
 *   DEC_I8(p), DEC_U4(p, shift), DEC_BF16(p), DEC_FP8(p)   (VLEN weights -> vf)
 *   W8A8_CHUNK bytes per integer step and W8A8_DOT(acc, xq_ptr, w_ptr) (int32 lanes, signed x signed).
 *
 * Every format shares one tile: R weight rows (4, or 1 for the last rows) x M activation rows (1..4),
 * decoded once per VLEN weights and reused for the M rows; accumulators stay in registers because
 * M and R are compile-time constants at every call site (always_inline). */

#define CAT_(a, b) a##_##b
#define CAT(a, b) CAT_(a, b)
#define FN(name) CAT(name, SFX)

/* TILE(DEC, SCALAR): acc[m][r] += x[m][k] * DEC(r, k) over full VLEN chunks, then a scalar tail. */
#define TILE_BODY(DEC, SCALAR)                                                                    \
    vf acc[4][4];                                                                                 \
    for (int m = 0; m < M; m++)                                                                   \
        for (int r = 0; r < R; r++) acc[m][r] = VZERO();                                          \
    int k = 0;                                                                                    \
    for (; k + VLEN <= K; k += VLEN) {                                                            \
        vf wv[4];                                                                                 \
        for (int r = 0; r < R; r++) wv[r] = DEC(r, k);                                            \
        for (int m = 0; m < M; m++) {                                                             \
            vf xv = VLOADX(x + (size_t)m * ldx + k);                                              \
            for (int r = 0; r < R; r++) acc[m][r] = VFMA(xv, wv[r], acc[m][r]);                   \
        }                                                                                         \
    }                                                                                             \
    for (int m = 0; m < M; m++)                                                                   \
        for (int r = 0; r < R; r++) {                                                             \
            float t = VSUM(acc[m][r]);                                                            \
            for (int kk = k; kk < K; kk++) t += x[(size_t)m * ldx + kk] * (SCALAR(r, kk));        \
            out[m * 4 + r] = t;                                                                   \
        }

/* ---- int8 weight-only: w [N, K] int8, s [N] fp32 (applied by the caller's epilogue) */
#define I8_DEC(r, k) DEC_I8(w + (size_t)(r) * K + (k))
#define I8_SCALAR(r, kk) ((float)w[(size_t)(r) * K + (kk)])
static inline __attribute__((always_inline)) void FN(tile_i8)(const float *x, size_t ldx, const int8_t *w, int K,
                                                             float *out, const int M, const int R) {
    TILE_BODY(I8_DEC, I8_SCALAR)
}

/* ---- bf16: w [N, K] bf16 bits, widened to fp32 in registers */
#define BF_DEC(r, k) DEC_BF16(w + (size_t)(r) * K + (k))
#define BF_SCALAR(r, kk) bf16_to_f32(w[(size_t)(r) * K + (kk)])
static inline __attribute__((always_inline)) void FN(tile_bf16)(const float *x, size_t ldx, const uint16_t *w, int K,
                                                               float *out, const int M, const int R) {
    TILE_BODY(BF_DEC, BF_SCALAR)
}

/* ---- fp32: w [N, K] fp32 (a dense model's decode GEMVs and experts) */
#define F32_DEC(r, k) VLOADX(w + (size_t)(r) * K + (k))
#define F32_SCALAR(r, kk) w[(size_t)(r) * K + (kk)]
static inline __attribute__((always_inline)) void FN(tile_f32)(const float *x, size_t ldx, const float *w, int K,
                                                              float *out, const int M, const int R) {
    TILE_BODY(F32_DEC, F32_SCALAR)
}

/* ---- FP8 e4m3 with 128x128 block scales: sc points at this row block's scales (ceil(K/128) fp32),
 * pre-multiplied by 2^8 (the fp16 route's exponent offset); rows of one tile share a 128-row block */
#define F8_DEC(r, k) VMUL(DEC_FP8(w + (size_t)(r) * K + (k)), VSET1(sc[(k) >> 7]))
#define F8_SCALAR(r, kk) (fp8_lut[w[(size_t)(r) * K + (kk)]] * sc[(kk) >> 7])
static inline __attribute__((always_inline)) void FN(tile_fp8)(const float *x, size_t ldx, const uint8_t *w,
                                                              const float *sc, int K, float *out, const int M,
                                                              const int R) {
    TILE_BODY(F8_DEC, F8_SCALAR)
}

/* ---- int4 group-wise: w [N, K/2], per 32 values 16 bytes (low nibbles: values 0..15, high: 16..31);
 * sz [N, K/group, 2] bf16 (scale, zero): w = (q - 8) * scale + zero = q * scale + (zero - 8 * scale) */
static inline __attribute__((always_inline)) void FN(tile_i4)(const float *x, size_t ldx, const uint8_t *w,
                                                             const uint16_t *sz, int K, int group, float *out,
                                                             const int M, const int R) {
    const int ng = K / group;
    vf acc[4][4];
    for (int m = 0; m < M; m++)
        for (int r = 0; r < R; r++) acc[m][r] = VZERO();
    for (int g = 0; g < ng; g++) {
        vf sc[4], zr[4]; /* the group's scale and zero - 8 * scale per row, broadcast once per group */
        for (int r = 0; r < R; r++) {
            const float scale = bf16_to_f32(sz[((size_t)r * ng + g) * 2]);
            sc[r] = VSET1(scale);
            zr[r] = VSET1(bf16_to_f32(sz[((size_t)r * ng + g) * 2 + 1]) - 8.0f * scale);
        }
        for (int k = g * group; k < (g + 1) * group; k += 32)
            for (int h = 0; h < 32; h += VLEN) { /* values h..h+VLEN of this 32-block: low or high nibbles */
                vf wv[4];
                for (int r = 0; r < R; r++)
                    wv[r] = VFMA(DEC_U4(w + (size_t)r * (K / 2) + k / 2 + (h & 15), (h & 16) ? 4 : 0), sc[r], zr[r]);
                for (int m = 0; m < M; m++) {
                    vf xv = VLOADX(x + (size_t)m * ldx + k + h);
                    for (int r = 0; r < R; r++) acc[m][r] = VFMA(xv, wv[r], acc[m][r]);
                }
            }
    }
    for (int m = 0; m < M; m++)
        for (int r = 0; r < R; r++) out[m * 4 + r] = VSUM(acc[m][r]);
}

/* ---- W8A8: int8 activations (quantised per row by the caller) x int8 weights -> int32.
 * W8A8_OFFSET (VNNI): the caller stores activations as u = q + 128 (u8), so one vpdpbusd per 64 products
 * and activation row; sum(u * w) - 128 * sum(w), with the row sums taken once per call (not per row of x). */
static inline __attribute__((always_inline)) void FN(tile_w8a8)(const int8_t *xq, size_t ldx, const int8_t *w, int K,
                                                               float *out, const int M, const int R) {
    vi acc[4][4];
    for (int m = 0; m < M; m++)
        for (int r = 0; r < R; r++) acc[m][r] = VIZERO();
    int k = 0;
#ifdef W8A8_OFFSET
    vi wsum[4];
    for (int r = 0; r < R; r++) wsum[r] = VIZERO();
    for (; k + W8A8_CHUNK <= K; k += W8A8_CHUNK) {
        vi wv[4];
        for (int r = 0; r < R; r++) {
            wv[r] = _mm512_loadu_si512(w + (size_t)r * K + k);
            wsum[r] = _mm512_dpbusd_epi32(wsum[r], _mm512_set1_epi8(1), wv[r]);
        }
        for (int m = 0; m < M; m++) {
            vi xv = _mm512_loadu_si512(xq + (size_t)m * ldx + k);
            for (int r = 0; r < R; r++) acc[m][r] = _mm512_dpbusd_epi32(acc[m][r], xv, wv[r]);
        }
    }
    for (int m = 0; m < M; m++)
        for (int r = 0; r < R; r++) {
            int32_t t = VISUM(acc[m][r]) - 128 * VISUM(wsum[r]);
            for (int kk = k; kk < K; kk++) t += ((int32_t)(uint8_t)xq[(size_t)m * ldx + kk] - 128) * w[(size_t)r * K + kk];
            out[m * 4 + r] = (float)t;
        }
#else
    for (; k + W8A8_CHUNK <= K; k += W8A8_CHUNK)
        for (int m = 0; m < M; m++)
            for (int r = 0; r < R; r++) acc[m][r] = W8A8_DOT(acc[m][r], xq + (size_t)m * ldx + k, w + (size_t)r * K + k);
    for (int m = 0; m < M; m++)
        for (int r = 0; r < R; r++) {
            int32_t t = VISUM(acc[m][r]);
            for (int kk = k; kk < K; kk++) t += (int32_t)xq[(size_t)m * ldx + kk] * w[(size_t)r * K + kk];
            out[m * 4 + r] = (float)t;
        }
#endif
}

/* ---- activation-quantised int8 / int4 (Q8 activations, as llama.cpp's Q8_0 x Q8_0 dot): the caller
 * quantises x per QB-value block to int8 with one fp32 scale per block (`quant_blocks`: xq [M, K] with row
 * stride ldx, xs [M, K / QB]); each block is one integer dot (DOT_US: u8 x s8 -> 8 int32, vpdpbusd on
 * VNNI, maddubs + madd otherwise) and one float FMA with its scale. 256-bit integer vectors on every ISA
 * (512-bit ones are split in two on AMD's Zen 4 anyway). */
static inline __attribute__((always_inline)) void FN(tile_i8q)(const float *x, const int8_t *xq, size_t ldx,
                                                              const float *xs, const int8_t *w, int K, float *out,
                                                              const int M, const int R) {
    const int nb = K / QB;
    __m256 acc[4][4];
    for (int m = 0; m < M; m++)
        for (int r = 0; r < R; r++) acc[m][r] = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++) {
        __m256i wv[4];
        for (int r = 0; r < R; r++) wv[r] = _mm256_loadu_si256((const __m256i *)(w + (size_t)r * K + b * QB));
#ifdef W8A8_OFFSET /* activations stored as u = q + 128 (u8): dot(u, w) - 128 sum(w), the second term per row */
        __m256i wneg[4];
        for (int r = 0; r < R; r++)
            wneg[r] = _mm256_sub_epi32(_mm256_setzero_si256(), DOT_US(_mm256_set1_epi8((char)0x80), wv[r]));
        for (int m = 0; m < M; m++) {
            const __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + (size_t)m * ldx + b * QB));
            const __m256 sv = _mm256_set1_ps(xs[(size_t)m * nb + b]);
            for (int r = 0; r < R; r++)
                acc[m][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_dpbusd_epi32(wneg[r], xv, wv[r])), sv, acc[m][r]);
        }
#else
        for (int m = 0; m < M; m++) {
            const __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + (size_t)m * ldx + b * QB));
            const __m256i ax = _mm256_abs_epi8(xv); /* |x| (u8) x (w with x's sign): the u8 x s8 product */
            const __m256 sv = _mm256_set1_ps(xs[(size_t)m * nb + b]);
            for (int r = 0; r < R; r++)
                acc[m][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(DOT_US(ax, _mm256_sign_epi8(wv[r], xv))), sv, acc[m][r]);
        }
#endif
    }
    for (int m = 0; m < M; m++)
        for (int r = 0; r < R; r++) { /* the values past the last whole block: exact fp32 activations */
            float t = hsum_avx2(acc[m][r]);
            for (int kk = nb * QB; kk < K; kk++) t += x[(size_t)m * ldx + kk] * (float)w[(size_t)r * K + kk];
            out[m * 4 + r] = t;
        }
}

/* int4 (layout of tile_i4) x Q8 activations: w = q * scale + (zero - 8 * scale) per group, so a group's
 * sum is scale * sum_b xs_b * dot(q, xq_b) + (zero - 8 * scale) * xg, with xg [M, K / group] the group's
 * sum of the dequantised activations (quant_blocks). q (0..15) is the u8 operand, xq the s8 one. */
static inline __attribute__((always_inline)) void FN(tile_i4q)(const int8_t *xq, size_t ldx, const float *xs,
                                                              const float *xg, const uint8_t *w, const uint16_t *sz,
                                                              int K, int group, float *out, const int M, const int R) {
    const int ng = K / group, nb = K / QB, bpg = group / QB;
    const __m128i lo4 = _mm_set1_epi8(15);
    __m256 acc[4][4];
    float zacc[4][4];
    for (int m = 0; m < M; m++)
        for (int r = 0; r < R; r++) acc[m][r] = _mm256_setzero_ps(), zacc[m][r] = 0.0f;
    for (int g = 0; g < ng; g++) {
        float sc[4];
        for (int r = 0; r < R; r++) {
            sc[r] = bf16_to_f32(sz[((size_t)r * ng + g) * 2]);
            const float zr = bf16_to_f32(sz[((size_t)r * ng + g) * 2 + 1]) - 8.0f * sc[r];
            for (int m = 0; m < M; m++) zacc[m][r] += zr * xg[(size_t)m * ng + g];
        }
        for (int b = g * bpg; b < (g + 1) * bpg; b++) {
            __m256i wv[4];
            for (int r = 0; r < R; r++) {
                const __m128i v = _mm_loadu_si128((const __m128i *)(w + (size_t)r * (K / 2) + b * (QB / 2)));
                wv[r] = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), lo4), _mm_and_si128(v, lo4));
            }
            for (int m = 0; m < M; m++) {
                const __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + (size_t)m * ldx + b * QB));
                const float s = xs[(size_t)m * nb + b];
                for (int r = 0; r < R; r++)
                    acc[m][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(DOT_US(wv[r], xv)), _mm256_set1_ps(s * sc[r]), acc[m][r]);
            }
        }
    }
    for (int m = 0; m < M; m++)
        for (int r = 0; r < R; r++) out[m * 4 + r] = hsum_avx2(acc[m][r]) + zacc[m][r];
}

/* The M rows of the tile in blocks of up to 4, R = 4 rows at a time then single rows. CALL(MB, RB) runs
 * one tile; EPI(m, n, v) stores output (m, n) from the tile's value v. */
#define ROWS_LOOP(CALL, EPI)                                                                      \
    float out[16];                                                                                \
    for (int n = n0; n < n1;) {                                                                   \
        const int rb = (n + 4 <= n1 && ROWS_OK(n)) ? 4 : 1;                                       \
        for (int m0 = 0; m0 < a->M; m0 += 4) {                                                    \
            const int mb = a->M - m0 < 4 ? a->M - m0 : 4;                                         \
            if (rb == 4) {                                                                        \
                switch (mb) { case 1: CALL(1, 4); break; case 2: CALL(2, 4); break;               \
                              case 3: CALL(3, 4); break; default: CALL(4, 4); }                   \
            } else {                                                                              \
                switch (mb) { case 1: CALL(1, 1); break; case 2: CALL(2, 1); break;               \
                              case 3: CALL(3, 1); break; default: CALL(4, 1); }                   \
            }                                                                                     \
            for (int m = 0; m < mb; m++)                                                          \
                for (int r = 0; r < rb; r++) EPI(m0 + m, n + r, out[m * 4 + r]);                  \
        }                                                                                         \
        n += rb;                                                                                  \
    }

#define XROW(m0) (a->x + (size_t)(m0) * a->ldx)
#define YSTORE(m, n, v) a->y[(size_t)(m) * a->ldy + (n)] = (v)

static void FN(rows_i8)(const gemv_args *a, int n0, int n1) {
    const int8_t *w = (const int8_t *)a->w;
    const float *s = (const float *)a->s;
    const int K = a->K;
#define ROWS_OK(n) 1
#define CALL(MB, RB) FN(tile_i8)(XROW(m0), a->ldx, w + (size_t)n * K, K, out, MB, RB)
#define EPI(m, nn, v) YSTORE(m, nn, (v) * s[nn])
    ROWS_LOOP(CALL, EPI)
#undef CALL
#undef EPI
}

static void FN(rows_bf16)(const gemv_args *a, int n0, int n1) {
    const uint16_t *w = (const uint16_t *)a->w;
    const int K = a->K;
#define CALL(MB, RB) FN(tile_bf16)(XROW(m0), a->ldx, w + (size_t)n * K, K, out, MB, RB)
#define EPI(m, nn, v) YSTORE(m, nn, v)
    ROWS_LOOP(CALL, EPI)
#undef CALL
#undef EPI
#undef ROWS_OK
}

static void FN(rows_f32)(const gemv_args *a, int n0, int n1) {
    const float *w = (const float *)a->w;
    const int K = a->K;
#define ROWS_OK(n) 1
#define CALL(MB, RB) FN(tile_f32)(XROW(m0), a->ldx, w + (size_t)n * K, K, out, MB, RB)
#define EPI(m, nn, v) YSTORE(m, nn, v)
    ROWS_LOOP(CALL, EPI)
#undef CALL
#undef EPI
#undef ROWS_OK
}

static void FN(rows_fp8)(const gemv_args *a, int n0, int n1) {
    const uint8_t *w = (const uint8_t *)a->w;
    const int K = a->K, kb = (K + 127) / 128;
    const float *sc256 = a->aux; /* the block scales x 256, [ceil(N/128), kb] */
#define ROWS_OK(n) (((n) >> 7) == (((n) + 3) >> 7))
#define CALL(MB, RB) FN(tile_fp8)(XROW(m0), a->ldx, w + (size_t)n * K, sc256 + (size_t)(n >> 7) * kb, K, out, MB, RB)
#define EPI(m, nn, v) YSTORE(m, nn, v)
    ROWS_LOOP(CALL, EPI)
#undef CALL
#undef EPI
#undef ROWS_OK
}

static void FN(rows_i4)(const gemv_args *a, int n0, int n1) {
    const uint8_t *w = (const uint8_t *)a->w;
    const uint16_t *sz = (const uint16_t *)a->s;
    const int K = a->K, g = a->group;
#define ROWS_OK(n) 1
#define CALL(MB, RB) FN(tile_i4)(XROW(m0), a->ldx, w + (size_t)n * (K / 2), sz + (size_t)n * (K / g) * 2, K, g, out, MB, RB)
#define EPI(m, nn, v) YSTORE(m, nn, v)
    ROWS_LOOP(CALL, EPI)
#undef CALL
#undef EPI
}

static void FN(rows_w8a8)(const gemv_args *a, int n0, int n1) {
    const int8_t *w = (const int8_t *)a->w;
    const float *s = (const float *)a->s;
    const int K = a->K;
#define CALL(MB, RB) FN(tile_w8a8)(a->xq + (size_t)m0 * a->ldx, a->ldx, w + (size_t)n * K, K, out, MB, RB)
#define EPI(m, nn, v) YSTORE(m, nn, (v) * a->xs[m] * s[nn])
    ROWS_LOOP(CALL, EPI)
#undef CALL
#undef EPI
#undef ROWS_OK
}

static void FN(rows_i8q)(const gemv_args *a, int n0, int n1) {
    const int8_t *w = (const int8_t *)a->w;
    const float *s = (const float *)a->s;
    const int K = a->K;
#define ROWS_OK(n) 1
#define CALL(MB, RB) FN(tile_i8q)(XROW(m0), a->xq + (size_t)m0 * a->ldx, a->ldx, a->xs + (size_t)m0 * (K / QB), \
                                  w + (size_t)n * K, K, out, MB, RB)
#define EPI(m, nn, v) YSTORE(m, nn, (v) * s[nn])
    ROWS_LOOP(CALL, EPI)
#undef CALL
#undef EPI
}

static void FN(rows_i4q)(const gemv_args *a, int n0, int n1) {
    const uint8_t *w = (const uint8_t *)a->w;
    const uint16_t *sz = (const uint16_t *)a->s;
    const int K = a->K, g = a->group;
#define CALL(MB, RB) FN(tile_i4q)(a->xq + (size_t)m0 * a->ldx, a->ldx, a->xs + (size_t)m0 * (K / QB), \
                                  a->xg + (size_t)m0 * (K / g), w + (size_t)n * (K / 2), sz + (size_t)n * (K / g) * 2, \
                                  K, g, out, MB, RB)
#define EPI(m, nn, v) YSTORE(m, nn, v)
    ROWS_LOOP(CALL, EPI)
#undef CALL
#undef EPI
#undef ROWS_OK
}

static const rows_fn FN(table)[N_FMT] = {FN(rows_i8), FN(rows_w8a8), FN(rows_fp8), FN(rows_i4), FN(rows_bf16),
                                         FN(rows_i8q), FN(rows_i4q), FN(rows_f32)};

#undef XROW
#undef YSTORE
