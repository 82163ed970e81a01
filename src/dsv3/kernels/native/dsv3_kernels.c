/* dsv3 native CPU kernels: decode-sized GEMV (1..64 activation rows) over quantised weights, and a
 * fused routed-expert MoE, with runtime ISA dispatch. Plain C (no torch headers): the Python loader
 * (`dsv3.kernels.native`) calls it through ctypes with tensor data pointers.
 *
 * ISAs (dsv3_set_isa caps them, DSV3_ISA in Python): 1 AVX2+FMA+F16C, 2 AVX-512 F/BW/VL,
 * 3 AVX-512 + VNNI (vpdpbusd for W8A8). Slot 4 is kept for AMX tiles. Each ISA's kernels are the same
 * source (body.h) compiled under that ISA's target pragma, so no translation unit needs -m flags and
 * the .so runs on any x86-64 (the dispatcher never calls an ISA the CPU lacks).
 *
 * Threads: the caller passes torch.get_num_threads(); the parallel regions run on the OpenMP runtime
 * torch already loaded (GOMP_parallel found by the loader), so dsv3 and torch share one thread pool
 * instead of two spinning pools on the same cores. Without it, kernels run on the calling thread. */

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* I8Q / I4Q: int8 / int4 weights with Q8 activations (int8 per QB-value block, quantised per call) */
enum { FMT_I8, FMT_W8A8, FMT_FP8, FMT_I4, FMT_BF16, FMT_I8Q, FMT_I4Q, FMT_F32, N_FMT };
#define QB 32 /* activation values per Q8 block */
enum { ISA_NONE, ISA_AVX2, ISA_AVX512, ISA_AVX512_VNNI, ISA_AMX, N_ISA };

typedef struct {
    const float *x;    /* activations [M, K] fp32 (row stride ldx) */
    const int8_t *xq;  /* W8A8: the activations quantised per row, and their scales [M]; I8Q / I4Q: per */
    const float *xs;   /* QB-block, scales [M, K / QB] (xq's row stride: ldx) */
    const float *xg;   /* I4Q: per weight group, the sum of the dequantised activations [M, K / group] */
    size_t ldx;
    int M, K, group;
    const void *w;     /* weights [N, K] in the format's layout */
    const void *s;     /* per-row scales (int8, w8a8: fp32 [N]) or int4's bf16 (scale, zero) pairs */
    const float *aux;  /* FP8: block scales x 256 */
    float *y;          /* output [M, N] fp32 (row stride ldy) */
    size_t ldy;
} gemv_args;

typedef void (*rows_fn)(const gemv_args *, int n0, int n1);

static float fp8_lut[256]; /* e4m3fn value / 256 (the fp16 route's scale), for the scalar tails */

static inline float bf16_to_f32(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* ================================================================================ AVX2 + FMA + F16C */
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif
typedef __m256 vf2;
typedef __m256i vi2;
static inline float hsum_avx2(__m256 v) {
    __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    a = _mm_add_ps(a, _mm_movehl_ps(a, a));
    a = _mm_add_ss(a, _mm_movehdup_ps(a));
    return _mm_cvtss_f32(a);
}
static inline int32_t hsumi_avx2(__m256i v) {
    __m128i a = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    a = _mm_add_epi32(a, _mm_shuffle_epi32(a, 0x4e));
    a = _mm_add_epi32(a, _mm_shuffle_epi32(a, 0xb1));
    return _mm_cvtsi128_si32(a);
}
static inline __m256 fp8_avx2(const uint8_t *p) {
    /* e4m3 -> fp16 bits: sign-extended byte << 7 puts sign at 15, exponent and mantissa at 13..7, and a
     * copy of the sign at 14 (cleared); the fp16 value is the e4m3 value / 256 (bias 15 vs 7) */
    __m128i v = _mm_slli_epi16(_mm_cvtepi8_epi16(_mm_loadl_epi64((const __m128i *)p)), 7);
    return _mm256_cvtph_ps(_mm_and_si128(v, _mm_set1_epi16((short)0xBFFF)));
}
static inline __m256i w8a8_dot_avx2(__m256i acc, const int8_t *xq, const int8_t *w) {
    __m256i x = _mm256_loadu_si256((const __m256i *)xq), wv = _mm256_loadu_si256((const __m256i *)w);
    __m256i p = _mm256_maddubs_epi16(_mm256_abs_epi8(x), _mm256_sign_epi8(wv, x)); /* |x| * (w * sign x) */
    return _mm256_add_epi32(acc, _mm256_madd_epi16(p, _mm256_set1_epi16(1)));
}
#define SFX avx2
#define VLEN 8
#define vf vf2
#define vi vi2
#define VZERO() _mm256_setzero_ps()
#define VIZERO() _mm256_setzero_si256()
#define VLOADX(p) _mm256_loadu_ps(p)
#define VFMA(a, b, c) _mm256_fmadd_ps(a, b, c)
#define VMUL(a, b) _mm256_mul_ps(a, b)
#define VSET1(f) _mm256_set1_ps(f)
#define VSUM(v) hsum_avx2(v)
#define VISUM(v) hsumi_avx2(v)
#define DEC_I8(p) _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p))))
#define DEC_U4(p, sh)                                                                             \
    _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p))), \
                                        _mm256_set1_epi32(sh)), _mm256_set1_epi32(15)))
#define DEC_BF16(p) \
    _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(p))), 16))
#define DEC_FP8(p) fp8_avx2(p)
#define W8A8_CHUNK 32
#define W8A8_DOT(acc, xp, wp) w8a8_dot_avx2(acc, xp, wp)
#define DOT_US(u, s) _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1))
#include "body.h"
#undef SFX
#undef VLEN
#undef vf
#undef vi
#undef VZERO
#undef VIZERO
#undef VLOADX
#undef VFMA
#undef VMUL
#undef VSET1
#undef VSUM
#undef VISUM
#undef DEC_I8
#undef DEC_U4
#undef DEC_BF16
#undef DEC_FP8
#undef W8A8_CHUNK
#undef W8A8_DOT
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

/* ================================================================= AVX-512 F/BW/VL, with and without VNNI */
#define AVX512_HELPERS(NAME, DOT_BODY)                                                            \
    static inline __m512 fp8_##NAME(const uint8_t *p) {                                           \
        __m256i v = _mm256_slli_epi16(_mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)p)), 7); \
        return _mm512_cvtph_ps(_mm256_and_si256(v, _mm256_set1_epi16((short)0xBFFF)));          \
    }                                                                                             \
    static inline __m512i w8a8_dot_##NAME(__m512i acc, const int8_t *xq, const int8_t *w) {       \
        __m512i x = _mm512_loadu_si512(xq), wv = _mm512_loadu_si512(w);                           \
        __m512i sw = _mm512_mask_sub_epi8(wv, _mm512_movepi8_mask(x), _mm512_setzero_si512(), wv); \
        __m512i ax = _mm512_abs_epi8(x);                                                          \
        DOT_BODY                                                                                  \
    }
#define VLEN 16
#define vf __m512
#define vi __m512i
#define VZERO() _mm512_setzero_ps()
#define VIZERO() _mm512_setzero_si512()
#define VLOADX(p) _mm512_loadu_ps(p)
#define VFMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define VMUL(a, b) _mm512_mul_ps(a, b)
#define VSET1(f) _mm512_set1_ps(f)
#define VSUM(v) _mm512_reduce_add_ps(v)
#define VISUM(v) _mm512_reduce_add_epi32(v)
#define DEC_I8(p) _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p))))
#define DEC_U4(p, sh)                                                                             \
    _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srlv_epi32(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(p))), \
                                        _mm512_set1_epi32(sh)), _mm512_set1_epi32(15)))
#define DEC_BF16(p) \
    _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(p))), 16))
#define W8A8_CHUNK 64

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")
#endif
AVX512_HELPERS(avx512, return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(ax, sw), _mm512_set1_epi16(1)));)
#define SFX avx512
#define DEC_FP8(p) fp8_avx512(p)
#define W8A8_DOT(acc, xp, wp) w8a8_dot_avx512(acc, xp, wp)
#include "body.h"
#undef SFX
#undef DEC_FP8
#undef W8A8_DOT
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")
#endif
AVX512_HELPERS(vnni, return _mm512_dpbusd_epi32(acc, ax, sw);)
#define W8A8_OFFSET 1
#define SFX avx512_vnni
#define DEC_FP8(p) fp8_vnni(p)
#define W8A8_DOT(acc, xp, wp) w8a8_dot_vnni(acc, xp, wp)
#undef DOT_US
#define DOT_US(u, s) _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s)
#include "body.h"
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

/* ========================================================================================= dispatch */
static const rows_fn *const TABLES[N_ISA] = {NULL, table_avx2, table_avx512, table_avx512_vnni, NULL /* AMX */};
static int isa_cap = N_ISA;

int dsv3_isa_detected(void) {
    __builtin_cpu_init();
    int isa = ISA_NONE;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) isa = ISA_AVX2;
    if (isa && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl")) {
        isa = ISA_AVX512;
        if (__builtin_cpu_supports("avx512vnni")) isa = ISA_AVX512_VNNI;
    }
    return isa;
}

/* The ISA the kernels run: the best the CPU has with a kernel table, at most `cap`. */
int dsv3_set_isa(int cap) {
    int isa = dsv3_isa_detected();
    if (cap < isa) isa = cap;
    while (isa > ISA_NONE && TABLES[isa] == NULL) isa--;
    isa_cap = isa;
    for (int b = 0; b < 256; b++) {
        int e = (b >> 3) & 15, m = b & 7;
        float v = e ? ldexpf(1.0f + m / 8.0f, e - 7) : ldexpf(m / 8.0f, -6);
        fp8_lut[b] = ((b & 0x80) ? -v : v) / 256.0f;
    }
    return isa;
}

/* ---- threads: torch's OpenMP runtime (GOMP ABI), handed over by the loader */
typedef void (*gomp_parallel_t)(void (*)(void *), void *, unsigned, unsigned);
typedef int (*omp_int_t)(void);
static gomp_parallel_t gomp_parallel;
static omp_int_t omp_thread_num, omp_num_threads;

void dsv3_set_omp(void *parallel, void *thread_num, void *num_threads) {
    gomp_parallel = (gomp_parallel_t)parallel;
    omp_thread_num = (omp_int_t)thread_num;
    omp_num_threads = (omp_int_t)num_threads;
}

typedef void (*par_body)(void *ctx, int tid, int nth);
typedef struct { par_body body; void *ctx; } par_ctx;
static volatile int last_team; /* threads of the latest parallel region (dsv3_last_team: tests) */
static void par_trampoline(void *p) {
    par_ctx *c = (par_ctx *)p;
    int tid = omp_thread_num(), nth = omp_num_threads();
    if (tid == 0) last_team = nth;
    c->body(c->ctx, tid, nth);
}
static void run_parallel(par_body body, void *ctx, int nt) {
    if (nt > 1 && gomp_parallel && omp_thread_num && omp_num_threads) {
        par_ctx c = {body, ctx};
        gomp_parallel(par_trampoline, &c, (unsigned)nt, 0);
    } else {
        last_team = 1;
        body(ctx, 0, 1);
    }
}
int dsv3_last_team(void) { return last_team; }

/* Symmetric int8 per row, as dsv3.quant.schemes.quantize_rows_int8: s = max(amax, 1e-12) / 127,
 * q = round-half-even(x / s) clamped to +-127; stored as q + 128 (u8) for the VNNI kernel (W8A8_OFFSET). */
static void quant_rows(const float *x, size_t ldx, int M, int K, int8_t *q, float *qs) {
    const int offset = isa_cap == ISA_AVX512_VNNI ? 128 : 0;
    for (int m = 0; m < M; m++) {
        const float *xr = x + (size_t)m * ldx;
        float amax = 0.0f;
        for (int k = 0; k < K; k++) amax = fmaxf(amax, fabsf(xr[k]));
        float s = fmaxf(amax, 1e-12f) / 127.0f;
        for (int k = 0; k < K; k++) {
            float v = nearbyintf(xr[k] / s);
            q[(size_t)m * K + k] = (int8_t)(uint8_t)((int)(v > 127.0f ? 127.0f : (v < -127.0f ? -127.0f : v)) + offset);
        }
        qs[m] = s;
    }
}

/* Q8 activations (I8Q / I4Q), as dsv3.quant.schemes.quantize_blocks_int8: per QB-value block of a row,
 * s = max(amax, 1e-12) / 127 and q = round-half-even(x / s) clamped to +-127 (values past the last whole
 * block are left to the kernels' exact fp32 tail); with `group`, xg [M, K / group] the group's sum of s * q.
 * I8Q (group 0) on VNNI stores q + 128 (u8, tile_i8q's W8A8_OFFSET form). */
static void quant_blocks(const float *x, size_t ldx, int M, int K, int group, int8_t *q, float *qs, float *xg) {
    const int offset = !group && isa_cap == ISA_AVX512_VNNI ? 128 : 0;
    const int nb = K / QB, ng = group ? K / group : 0;
    for (int m = 0; m < M; m++) {
        const float *xr = x + (size_t)m * ldx;
        for (int g = 0; g < ng; g++) xg[(size_t)m * ng + g] = 0.0f;
        for (int b = 0; b < nb; b++) {
            float amax = 0.0f;
            for (int k = b * QB; k < (b + 1) * QB; k++) amax = fmaxf(amax, fabsf(xr[k]));
            const float s = fmaxf(amax, 1e-12f) / 127.0f;
            int sum = 0;
            for (int k = b * QB; k < (b + 1) * QB; k++) {
                float v = nearbyintf(xr[k] / s);
                int qi = (int)(v > 127.0f ? 127.0f : (v < -127.0f ? -127.0f : v));
                q[(size_t)m * K + k] = (int8_t)(uint8_t)(qi + offset);
                sum += qi;
            }
            qs[(size_t)m * nb + b] = s;
            if (ng) xg[(size_t)m * ng + b * QB / group] += s * (float)sum;
        }
    }
}

#include "dispatch.h"
