/* Linear layers over weights kept in their GGUF blocks (Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K), for CPUs.
 *
 * Why: a decode step reads every weight once per token; the default model's weights are 98 MB as
 * 4-bit blocks and 540 MB dequantised to float32, so reading the blocks is ~5x less memory traffic.
 *
 * How (written from the block layouts of the GGUF spec / gguf-py's reference dequantisation):
 *  - Every format is viewed the same way: per group of G elements (G = 32; 16 for Q6_K) a weight is
 *    w = ws[g] * (q - zoff) + wm[g], with q an unsigned small integer (4, 5, 6 or 8 bits; Q8_0's
 *    signed bytes are shifted by 128) and zoff a per-format constant.
 *  - Activations are rounded per block of 32 to int16 with one float scale (da, see ACT_MAX), as
 *    integer dot products need; their per-group integer sums (isum) carry the offset terms:
 *        sum_k w_k x_k ~= sum_g ws[g] da[g] (sum_k q_k a_k) + (wm[g] - zoff ws[g]) da[g] isum[g]
 *  - Few rows: one weight row is unpacked to bytes once per call and then dotted with every
 *    activation row of the batch (bytes widened to 16 bits, AVX-512BW or AVX2 `madd`, or scalar C).
 *  - More rows, with AVX-512: register tiles of 32 features by up to 12 rows (quant_tiles.h).
 *  - Output rows are split over OpenMP threads (torch's pool; see attention/native.py).
 * `orcinus_quant_dequantize` writes rows as float32 or bfloat16 with the reference's exact formula,
 * for embeddings and for the batches whose GEMM runs in torch (bfloat16 ones, or no AVX-512).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

#include "float_formats.h"  /* f16_to_f32, f32_to_bf16 */

enum { T_Q4_0 = 2, T_Q4_1 = 3, T_Q8_0 = 8, T_Q4_K = 12, T_Q5_K = 13, T_Q6_K = 14 };  /* ggml type ids */
/* Builds with the AVX-512 register tiles (quant_tiles.h) also read the layouts that quant_packed.h
 * packs Q4_0, Q4_1 and Q8_0 into at load; their ids are the source's + PACKED_OFFSET. */
#if defined(__AVX512BW__)
#define HAVE_PACKED 1
#endif
#define PACKED_OFFSET 100
enum { T_P4_0 = T_Q4_0 + PACKED_OFFSET, T_P4_1 = T_Q4_1 + PACKED_OFFSET, T_P8_0 = T_Q8_0 + PACKED_OFFSET };
enum { OUT_F32 = 0, OUT_BF16 = 1 };
/* Activations are rounded to 16-bit integers per block of 32 (scale amax / 32767). 8 bits, as
 * llama.cpp does, flipped the default model's first answer token on a near-tie and sent it off
 * course ("What is the capital of France?"); 16 bits agree with float32 to ~1e-5, and the blocks
 * still feed integer multiply-adds (`madd`: 16-bit pairs summed into 32-bit lanes). */
#define ACT_MAX 32767
/* How far ahead of the row being read its stream is prefetched. Each thread walks its output rows in
 * order, so the weight is one sequential stream per thread; without software prefetch the kernel ran
 * at ~5 GB/s over the default model's 66 MB of layer weights (its rows come from memory, not cache:
 * 12.3 ms for a token's 120 layer matmuls on 2 threads, 5.7 ms with it; 512 bytes: 6.7 ms, 4 KiB: 5.9). */
#define PREFETCH_AHEAD 2048

static inline void prefetch_ahead(const uint8_t *row, int64_t row_bytes) {
#if defined(__AVX2__) || defined(__AVX512F__)
    for (int64_t off = 0; off < row_bytes; off += 64) _mm_prefetch((const char *)(row + PREFETCH_AHEAD + off), _MM_HINT_T0);
#else
    (void)row; (void)row_bytes;
#endif
}

/* A little-endian half at p (GGUF block scales). */
static inline float half_to_float(const uint8_t *p) { return f16_to_f32((uint16_t)(p[0] | (p[1] << 8))); }

/* Elements per block, bytes per block, group size, zero offset. */
static int fmt(int type, int *block, int *bytes, int *group, int *zoff) {
    switch (type) {
    case T_Q4_0: *block = 32; *bytes = 18; *group = 32; *zoff = 8; return 0;
    case T_Q4_1: *block = 32; *bytes = 20; *group = 32; *zoff = 0; return 0;
    case T_Q8_0: *block = 32; *bytes = 34; *group = 32; *zoff = 128; return 0;
    case T_Q4_K: *block = 256; *bytes = 144; *group = 32; *zoff = 0; return 0;
    case T_Q5_K: *block = 256; *bytes = 176; *group = 32; *zoff = 0; return 0;
    case T_Q6_K: *block = 256; *bytes = 210; *group = 16; *zoff = 32; return 0;
#ifdef HAVE_PACKED  /* the packed layouts (quant_packed.h), bytes per 32 weights */
    case T_P4_0: *block = 32; *bytes = 20; *group = 32; *zoff = 8; return 0;
    case T_P4_1: *block = 32; *bytes = 20; *group = 32; *zoff = 0; return 0;
    case T_P8_0: *block = 32; *bytes = 36; *group = 32; *zoff = 128; return 0;
#endif
    default: return -1;
    }
}

/* The 6-bit scale and min of sub-block j (0..7) of a Q4_K/Q5_K block's 12 packed bytes. */
static inline void kscale(const uint8_t *s, int j, int *sc, int *mn) {
    if (j < 4) { *sc = s[j] & 63; *mn = s[j + 4] & 63; }
    else {
        *sc = (s[j + 4] & 15) | ((s[j - 4] >> 6) << 4);
        *mn = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}

/* One row of K elements (K / block blocks) -> q[K], ws[K / G], wm[K / G] (w = ws * (q - zoff) + wm). */
static void unpack_row(int type, const uint8_t *restrict row, int64_t K, uint8_t *restrict q,
                       float *restrict ws, float *restrict wm) {
    int64_t g = 0;
    switch (type) {
    case T_Q4_0: case T_Q4_1: case T_Q8_0: {
        const int bytes = type == T_Q4_0 ? 18 : type == T_Q4_1 ? 20 : 34;
        for (int64_t b = 0; b < K / 32; b++, row += bytes, q += 32, g++) {
            ws[g] = half_to_float(row);
            if (type == T_Q8_0) {
                wm[g] = 0.0f;
#ifdef __AVX2__
                /* int8 + 128, 32 at once: the scalar loop made Q8_0 (the default model's LM head)
                 * dequantise at ~1 ns per element against ~0.17 for Q4_1 */
                _mm256_storeu_si256((__m256i *)q, _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(row + 2)),
                                                                   _mm256_set1_epi8((char)0x80)));
#else
                for (int i = 0; i < 32; i++) q[i] = (uint8_t)(row[2 + i] ^ 0x80u);  /* int8 + 128 */
#endif
                continue;
            }
            const uint8_t *qs = row + (type == T_Q4_1 ? 4 : 2);
            wm[g] = type == T_Q4_1 ? half_to_float(row + 2) : 0.0f;
#ifdef __AVX2__
            const __m128i v = _mm_loadu_si128((const __m128i *)qs), m4 = _mm_set1_epi8(15);
            _mm_storeu_si128((__m128i *)q, _mm_and_si128(v, m4));
            _mm_storeu_si128((__m128i *)(q + 16), _mm_and_si128(_mm_srli_epi16(v, 4), m4));
#else
            for (int i = 0; i < 16; i++) { q[i] = qs[i] & 15; q[i + 16] = qs[i] >> 4; }
#endif
        }
        return;
    }
    case T_Q4_K: case T_Q5_K: {
        const int bytes = type == T_Q4_K ? 144 : 176;
        for (int64_t b = 0; b < K / 256; b++, row += bytes) {
            const float d = half_to_float(row), dmin = half_to_float(row + 2);
            const uint8_t *sc = row + 4, *qh = row + 16, *qs = row + (type == T_Q4_K ? 16 : 48);
            for (int j = 0; j < 8; j++, q += 32, g++) {
                int s, m;
                kscale(sc, j, &s, &m);
                ws[g] = d * (float)s;
                wm[g] = -(dmin * (float)m);
                const uint8_t *src = qs + (j / 2) * 32;
                const int shift = (j & 1) * 4;
                for (int i = 0; i < 32; i++) q[i] = (src[i] >> shift) & 15;
                if (type == T_Q5_K)
                    for (int i = 0; i < 32; i++) q[i] |= ((qh[i] >> j) & 1) << 4;
            }
        }
        return;
    }
    case T_Q6_K:
        for (int64_t b = 0; b < K / 256; b++, row += 210) {
            const uint8_t *ql = row, *qh = row + 128;
            const int8_t *sc = (const int8_t *)(row + 192);
            const float d = half_to_float(row + 208);
            for (int e = 0; e < 256; e++) {
                const int h = e / 128, r = e % 128;
                const int lo = (ql[h * 64 + r % 64] >> (4 * (r / 64))) & 15;
                const int hi = (qh[h * 32 + r % 32] >> (2 * (r / 32))) & 3;
                q[e] = (uint8_t)(lo | (hi << 4));
            }
            for (int j = 0; j < 16; j++, g++) { ws[g] = d * (float)sc[j]; wm[g] = 0.0f; }
            q += 256;
        }
        return;
    }
}

/* Integer dot of n unsigned weight bytes with n 16-bit activations (the scalar path). */
static inline int32_t idot(const uint8_t *q, const int16_t *a, int n) {
    int32_t s = 0;
    for (int i = 0; i < n; i++) s += (int32_t)q[i] * (int32_t)a[i];
    return s;
}

/* One block of 32: acc += scale * (q . a), q as 32 bytes in a register, a 32 int16 in memory. The
 * products are widened to 16 bits and summed in pairs (`madd`): exact in int32 for every format. */
#if defined(__AVX512BW__)
#define HAVE_VEC 1
typedef __m512 facc_t;
static inline facc_t facc_zero(void) { return _mm512_setzero_ps(); }
static inline facc_t block32(__m256i qv, const int16_t *a, float scale, facc_t acc) {
    const __m512i s = _mm512_madd_epi16(_mm512_cvtepu8_epi16(qv), _mm512_loadu_si512((const void *)a));
    return _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_set1_ps(scale), acc);
}
static inline float facc_sum(facc_t v) { return _mm512_reduce_add_ps(v); }
#elif defined(__AVX2__)
#define HAVE_VEC 1
typedef __m256 facc_t;
static inline facc_t facc_zero(void) { return _mm256_setzero_ps(); }
static inline facc_t block32(__m256i qv, const int16_t *a, float scale, facc_t acc) {
    const __m256i lo = _mm256_madd_epi16(_mm256_cvtepu8_epi16(_mm256_castsi256_si128(qv)),
                                         _mm256_loadu_si256((const __m256i *)a));
    const __m256i hi = _mm256_madd_epi16(_mm256_cvtepu8_epi16(_mm256_extracti128_si256(qv, 1)),
                                         _mm256_loadu_si256((const __m256i *)(a + 16)));
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(lo, hi)), _mm256_set1_ps(scale), acc);
}
#endif
#ifdef __AVX2__
static inline float hsum8(__m256 v) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    return _mm_cvtss_f32(h);
}
#if !defined(__AVX512BW__)
static inline float facc_sum(facc_t v) { return hsum8(v); }
#endif
#endif

/* out[j] = sum_g ws[g] * da_j[g] * (q_g . a_j,g) for NR activation rows j at once (G = 32, weights
 * unpacked to bytes): each weight block is loaded once for all NR rows. */
#define DEFINE_DOT_G32(NR)                                                                              \
static inline void dot_g32_##NR(const uint8_t *q, const float *ws, const int16_t *a, const float *da,    \
                                int64_t K, int64_t ng, float *out) {                                    \
    DOT_G32_BODY(NR)                                                                                    \
}
#ifdef HAVE_VEC
#define DOT_G32_BODY(NR)                                                                                \
    facc_t acc[NR];                                                                                     \
    for (int j = 0; j < NR; j++) acc[j] = facc_zero();                                                  \
    for (int64_t g = 0; g < ng; g++) {                                                                  \
        const __m256i qv = _mm256_loadu_si256((const __m256i *)(q + 32 * g));                           \
        for (int j = 0; j < NR; j++) acc[j] = block32(qv, a + j * K + 32 * g, ws[g] * da[j * ng + g], acc[j]); \
    }                                                                                                   \
    for (int j = 0; j < NR; j++) out[j] = facc_sum(acc[j]);
#else
#define DOT_G32_BODY(NR)                                                                                \
    for (int j = 0; j < NR; j++) {                                                                      \
        float acc = 0.0f;                                                                               \
        for (int64_t g = 0; g < ng; g++)                                                                \
            acc += ws[g] * da[j * ng + g] * (float)idot(q + 32 * g, a + j * K + 32 * g, 32);            \
        out[j] = acc;                                                                                   \
    }
#endif
DEFINE_DOT_G32(4)
DEFINE_DOT_G32(1)

/* Q4_0, Q4_1 and Q8_0 read straight from their blocks (no unpacked copy of the row): the bytes are
 * spread into registers, each block's scale and offset applied as it goes. NR activation rows. */
#ifdef HAVE_VEC
#define DEFINE_FUSED32(NR)                                                                              \
static inline __attribute__((always_inline)) void fused32_##NR(                                         \
        int type, const uint8_t *row, int64_t nb, const int16_t *a, int64_t K, const float *da,         \
        const float *asum, float *out) {                                                                \
    const int bytes = type == T_Q4_0 ? 18 : type == T_Q4_1 ? 20 : 34;                                   \
    facc_t acc[NR];                                                                                     \
    float off[NR];                                                                                      \
    for (int j = 0; j < NR; j++) { acc[j] = facc_zero(); off[j] = 0.0f; }                               \
    const __m128i m4 = _mm_set1_epi8(15);                                                               \
    for (int64_t g = 0; g < nb; g++) {                                                                  \
        const uint8_t *blk = row + g * bytes;                                                           \
        const float d = half_to_float(blk);                                                             \
        float wm;                                                                                       \
        __m256i qv;                                                                                     \
        if (type == T_Q8_0) {                                                                           \
            qv = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(blk + 2)), _mm256_set1_epi8((char)0x80)); \
            wm = -128.0f * d;                                                                           \
        } else {                                                                                        \
            const __m128i v = _mm_loadu_si128((const __m128i *)(blk + (type == T_Q4_1 ? 4 : 2)));       \
            qv = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), m4), _mm_and_si128(v, m4));       \
            wm = type == T_Q4_1 ? half_to_float(blk + 2) : -8.0f * d;                                   \
        }                                                                                               \
        for (int j = 0; j < NR; j++) {                                                                  \
            acc[j] = block32(qv, a + j * K + 32 * g, d * da[j * nb + g], acc[j]);                       \
            off[j] += wm * asum[j * nb + g];                                                            \
        }                                                                                               \
    }                                                                                                   \
    for (int j = 0; j < NR; j++) out[j] = facc_sum(acc[j]) + off[j];                                    \
}
DEFINE_FUSED32(4)
DEFINE_FUSED32(1)

static void fused32_row(int type, const uint8_t *row, int64_t nb, const int16_t *a, int64_t K, const float *da,
                        const float *asum, int64_t rows, float *y, int64_t ldy) {
    int64_t r = 0;
    float dots[4];
#define FUSED_CASE(T)                                                                                   \
    for (; r + 4 <= rows; r += 4) {                                                                     \
        fused32_4(T, row, nb, a + r * K, K, da + r * nb, asum + r * nb, dots);                          \
        for (int j = 0; j < 4; j++) y[(r + j) * ldy] = dots[j];                                         \
    }                                                                                                   \
    for (; r < rows; r++) { fused32_1(T, row, nb, a + r * K, K, da + r * nb, asum + r * nb, dots); y[r * ldy] = dots[0]; }
    switch (type) {
    case T_Q4_0: FUSED_CASE(T_Q4_0) break;
    case T_Q4_1: FUSED_CASE(T_Q4_1) break;
    default: FUSED_CASE(T_Q8_0) break;
    }
#undef FUSED_CASE
}
#endif

/* The same for G = 16 (Q6_K), one activation row; da is per 32 elements. */
static float dot_g16(const uint8_t *q, const float *ws, const int16_t *a, const float *da, int64_t ng) {
#ifdef __AVX2__
    __m256 acc = _mm256_setzero_ps();
    for (int64_t g = 0; g < ng; g++) {
        const __m256i s = _mm256_madd_epi16(_mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(q + 16 * g))),
                                            _mm256_loadu_si256((const __m256i *)(a + 16 * g)));
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(ws[g] * da[g / 2]), acc);
    }
    return hsum8(acc);
#else
    float acc = 0.0f;
    for (int64_t g = 0; g < ng; g++) acc += ws[g] * da[g / 2] * (float)idot(q + 16 * g, a + 16 * g, 16);
    return acc;
#endif
}

static inline float fdot(const float *x, const float *y, int64_t n) {
    float s = 0.0f;
    for (int64_t i = 0; i < n; i++) s += x[i] * y[i];
    return s;
}

/* x [rows, K] float32 -> a [rows, K] int16, da [rows, K/32], isum16 [rows, K/16] (integer sums as float). */
void orcinus_quant_activations(const float *x, int64_t rows, int64_t K, int16_t *a, float *da, float *isum16) {
    const int64_t nb = K / 32;
#pragma omp parallel for schedule(static) if (rows * K > 65536)
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t b = 0; b < nb; b++) {
            const float *xb = x + r * K + 32 * b;
            int16_t *ab = a + r * K + 32 * b;
#ifdef __AVX512F__
            /* the scalar loop (#else), 16 lanes at a time (same rounding: the product, then nearest-even) */
            const __m512 x0 = _mm512_loadu_ps(xb), x1 = _mm512_loadu_ps(xb + 16);
            const float vmax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(x0), _mm512_abs_ps(x1)));
            const float vd = vmax / (float)ACT_MAX, vid = vd > 0.0f ? 1.0f / vd : 0.0f;
            const __m512i v0 = _mm512_cvtps_epi32(_mm512_mul_ps(x0, _mm512_set1_ps(vid)));
            const __m512i v1 = _mm512_cvtps_epi32(_mm512_mul_ps(x1, _mm512_set1_ps(vid)));
            _mm256_storeu_si256((__m256i *)ab, _mm512_cvtepi32_epi16(v0));
            _mm256_storeu_si256((__m256i *)(ab + 16), _mm512_cvtepi32_epi16(v1));
            da[r * nb + b] = vd;
            isum16[r * 2 * nb + 2 * b] = (float)_mm512_reduce_add_epi32(v0);
            isum16[r * 2 * nb + 2 * b + 1] = (float)_mm512_reduce_add_epi32(v1);
#else
            float amax = 0.0f;
            for (int i = 0; i < 32; i++) amax = fmaxf(amax, fabsf(xb[i]));
            const float d = amax / (float)ACT_MAX, id = d > 0.0f ? 1.0f / d : 0.0f;
            da[r * nb + b] = d;
            int s0 = 0, s1 = 0;
            for (int i = 0; i < 32; i++) {
                const int v = (int)lrintf(xb[i] * id);
                ab[i] = (int16_t)v;
                if (i < 16) s0 += v; else s1 += v;
            }
            isum16[r * 2 * nb + 2 * b] = (float)s0;
            isum16[r * 2 * nb + 2 * b + 1] = (float)s1;
#endif
        }
    }
}

/* x [rows, K] float32 -> out [rows, K] float32: each value as orcinus_quant_activations rounds it
 * (a * da, a its 16-bit integer, da its block's scale), in one pass. The dequantise-then-GEMM path
 * multiplies these, so that a row's result does not depend on whether its batch took the kernel. */
void orcinus_quant_round_activations(const float *x, int64_t rows, int64_t K, float *out) {
    const int64_t nb = K / 32;
#pragma omp parallel for schedule(static) if (rows * K > 65536)
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t b = 0; b < nb; b++) {
            const float *xb = x + r * K + 32 * b;
            float *ob = out + r * K + 32 * b;
            float amax = 0.0f;
            for (int i = 0; i < 32; i++) amax = fmaxf(amax, fabsf(xb[i]));
            const float d = amax / (float)ACT_MAX, id = d > 0.0f ? 1.0f / d : 0.0f;
            for (int i = 0; i < 32; i++) ob[i] = (float)(int16_t)lrintf(xb[i] * id) * d;
        }
    }
}

#include "quant_tiles.h"
#include "quant_packed.h"

#ifndef HAVE_PACKED
/* No register tiles in this build: nothing reads a packed layout, so nothing is packed. */
int orcinus_quant_pack(int type, const uint8_t *w, int64_t N, int64_t K, int64_t row_bytes, uint8_t *out,
                       int num_threads) {
    (void)type; (void)w; (void)N; (void)K; (void)row_bytes; (void)out; (void)num_threads;
    return -1;
}
#endif

/* The id of the layout orcinus_quant_pack makes of `type` (0: none in this build, or not that type). */
int orcinus_quant_packed_type(int type) {
#ifdef HAVE_PACKED
    return type == T_Q4_0 || type == T_Q4_1 || type == T_Q8_0 ? type + PACKED_OFFSET : 0;
#else
    (void)type;
    return 0;
#endif
}

/* y[r, o] (row stride ldy) = x[r] . W[o] for the weight's rows [0, N); W is `type` blocks, `row_bytes` a row.
 * Activations come quantized (orcinus_quant_activations). Batches of TILE_MIN_ROWS rows or more take
 * the register tiles (quant_tiles.h) for whole strips of STRIP features; the rest one feature at a time.
 * Returns 0, or -1 for an unknown type / no memory. */
int orcinus_quant_matmul(int type, const uint8_t *w, int64_t N, int64_t K, int64_t row_bytes,
                         const int16_t *a, const float *da, const float *isum16, int64_t rows,
                         float *y, int64_t ldy, int num_threads) {
    int block, bytes, G, zoff;
    if (fmt(type, &block, &bytes, &G, &zoff) != 0 || K % block) return -1;
    const int64_t ng = K / G, nb = K / 32;
    /* The offset terms' activation side, per group: da * (integer sum of the group). */
    float *asum = (float *)malloc(sizeof(float) * (size_t)(rows * ng));
    if (!asum) return -1;
    for (int64_t r = 0; r < rows; r++)
        for (int64_t g = 0; g < ng; g++)
            asum[r * ng + g] = G == 32 ? da[r * nb + g] * (isum16[r * 2 * nb + 2 * g] + isum16[r * 2 * nb + 2 * g + 1])
                                       : da[r * nb + g / 2] * isum16[r * 2 * nb + g];
    int status = 0;
#ifdef HAVE_PACKED
    if (is_packed(type)) {
        if (N % STRIP) status = -1;
        else packed_matmul(type, w, N, K, a, da, asum, rows, y, ldy, num_threads);
        free(asum);
        return status;
    }
#endif
    int64_t first = 0;  /* the first feature the row kernel computes */
#ifdef HAVE_TILES
    if (rows >= TILE_MIN_ROWS && N >= STRIP) {
        first = N / STRIP * STRIP;
        status = tiled_matmul(type, w, first, K, row_bytes, G, zoff, a, da, asum, rows, y, ldy, num_threads);
    }
#endif
#pragma omp parallel num_threads(num_threads) if ((N - first) * rows * K > 32768)
    {
        uint8_t *q = (uint8_t *)aligned_alloc(64, (size_t)((K + 63) / 64 * 64));
        float *ws = (float *)malloc(sizeof(float) * (size_t)ng), *wm = (float *)malloc(sizeof(float) * (size_t)ng);
        if (!q || !ws || !wm) {
#pragma omp atomic write
            status = -1;
        } else {
#ifdef HAVE_VEC
            if (block == 32) {
#pragma omp for schedule(static)
                for (int64_t o = first; o < N; o++) {
                    prefetch_ahead(w + o * row_bytes, row_bytes);
                    fused32_row(type, w + o * row_bytes, nb, a, K, da, asum, rows, y + o, ldy);
                }
            } else
#endif
#pragma omp for schedule(static)
            for (int64_t o = first; o < N; o++) {
                prefetch_ahead(w + o * row_bytes, row_bytes);
                unpack_row(type, w + o * row_bytes, K, q, ws, wm);
                for (int64_t g = 0; g < ng; g++) wm[g] -= (float)zoff * ws[g];  /* offset term per group */
                int64_t r = 0;
                float dots[4];
                if (G == 32)
                    for (; r + 4 <= rows; r += 4) {
                        dot_g32_4(q, ws, a + r * K, da + r * nb, K, nb, dots);
                        for (int j = 0; j < 4; j++) y[(r + j) * ldy + o] = dots[j] + fdot(wm, asum + (r + j) * ng, ng);
                    }
                for (; r < rows; r++) {
                    if (G == 32) dot_g32_1(q, ws, a + r * K, da + r * nb, K, nb, dots);
                    else dots[0] = dot_g16(q, ws, a + r * K, da + r * nb, ng);
                    y[r * ldy + o] = dots[0] + fdot(wm, asum + r * ng, ng);
                }
            }
        }
        free(q); free(ws); free(wm);
    }
    free(asum);
    return status;
}

/* Rows `ids[i]` (or rows [0, n) when ids is NULL) of W dequantised into out [n, K] float32 or bfloat16,
 * with the reference's formula for each format. */
int orcinus_quant_dequantize(int type, const uint8_t *w, int64_t K, int64_t row_bytes, const int64_t *ids,
                             int64_t n, void *out, int out_dtype, int num_threads) {
    int block, bytes, G, zoff;
    if (fmt(type, &block, &bytes, &G, &zoff) != 0 || K % block) return -1;
    const int64_t ng = K / G;
    int status = 0;
#pragma omp parallel num_threads(num_threads) if (n * K > 65536)
    {
        uint8_t *q = (uint8_t *)malloc((size_t)K);
        float *ws = (float *)malloc(sizeof(float) * (size_t)ng), *wm = (float *)malloc(sizeof(float) * (size_t)ng);
        float *f = (float *)malloc(sizeof(float) * (size_t)K);
        if (!q || !ws || !wm || !f) {
#pragma omp atomic write
            status = -1;
        } else {
#pragma omp for schedule(static)
            for (int64_t i = 0; i < n; i++) {
                const int64_t row = ids ? ids[i] : i;
#ifdef HAVE_PACKED
                if (is_packed(type)) {
                    packed_row(type, w, K, row, zoff, f);
                    goto write;
                }
#endif
                if (!ids) prefetch_ahead(w + row * row_bytes, row_bytes);
                unpack_row(type, w + row * row_bytes, K, q, ws, wm);
                for (int64_t g = 0; g < ng; g++) {  /* the reference's formula, e.g. d * (q - 8) for Q4_0 */
                    const float s = ws[g], m = wm[g];
                    const uint8_t *qg = q + g * G;
                    float *fg = f + g * G;
                    for (int i = 0; i < G; i++) fg[i] = s * (float)((int)qg[i] - zoff) + m;
                }
#ifdef HAVE_PACKED
            write:
#endif
                if (out_dtype == OUT_BF16) {
                    uint16_t *o = (uint16_t *)out + i * K;
                    for (int64_t k = 0; k < K; k++) o[k] = f32_to_bf16(f[k]);
                } else memcpy((float *)out + i * K, f, sizeof(float) * (size_t)K);
            }
        }
        free(q); free(ws); free(wm); free(f);
    }
    return status;
}

/* The fewest activation rows orcinus_quant_matmul runs as register tiles, or 0 where this build
 * has none (no AVX-512): the Python side then dequantises for larger batches instead. */
int orcinus_quant_tile_rows(void) {
#ifdef HAVE_TILES
    return TILE_MIN_ROWS;
#else
    return 0;
#endif
}

int orcinus_quant_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}
