/* The quantized matmul for batches of rows: register tiles on AVX-512 (included by quant_kernels.c,
 * whose `unpack_row`, `fmt` and `prefetch_ahead` it uses).
 *
 * Why: the row-at-a-time kernel loads a weight block once for 4 activation rows and reduces every
 * block's products horizontally; from a few rows on (TILE_MIN_ROWS), a batch is better served as a GEMM. Dequantising
 * the weight to float32 for torch's GEMM costs a pass over every weight per step and multiplies at
 * float32 rate; this keeps the integer arithmetic of the row kernel (same 16-bit activations, same
 * per-group scales, same result up to float summation order) at twice float32's multiply rate.
 *
 * How: 32 output features (a strip, two vectors of 16 32-bit lanes) at a time. A strip's weight
 * rows are unpacked once to bytes, widened to 16 bits and transposed so that one vector holds, for
 * each of 16 features, the pair of weights (k, k+1): `vpdpwssd` (AVX-512 VNNI; `madd` + add without
 * it) multiplies it with an activation pair broadcast to all lanes and adds into 32-bit lanes, so a
 * row of activations meets 32 features with no horizontal sums. Per group (32 elements; 16 for Q6_K)
 * the integer sums are scaled into float sums: ws * da (weight and activation scales) plus the offset
 * term (wm - zoff ws) * da * isum, exactly the row kernel's formula. TILE_ROWS rows at a time keep
 * 2 * TILE_ROWS integer accumulators in registers; each loaded weight vector serves them all, each
 * broadcast pair two weight vectors (about two instructions per multiply: the front end, not the
 * multipliers, bounds it). Strips are split over OpenMP threads; features past the last whole strip
 * take the row kernel.
 *
 * Measured (2-core AMD EPYC, `python -m orcinus.bench.quant_matmul`, docs/benchmarks.md "Quantized
 * matmul tiles"): the default model's 210 layer matmuls at 35 rows 41.6 -> 14.6 ms, at 256 rows
 * 680 GFLOP/s, faster than float32 weights in torch's GEMM at every batch size.
 */
#if defined(__AVX512BW__)
#define HAVE_TILES 1
#define STRIP 32     /* features per strip: two vectors of 16 lanes */
#define TILE_ROWS 12 /* activation rows per tile: 2 x 12 integer accumulators in registers (8: ~3 % slower) */
/* From this many activation rows up orcinus_quant_matmul takes the tiles (packing a strip costs
 * about as much as a few rows' products; measured: docs/benchmarks.md, "Quantized matmul tiles"). */
#define TILE_MIN_ROWS 6

#ifdef __AVX512VNNI__
#define DPWSSD(acc, b, a) _mm512_dpwssd_epi32((acc), (b), (a))
#else
#define DPWSSD(acc, b, a) _mm512_add_epi32((acc), _mm512_madd_epi16((b), (a)))
#endif

/* r[i] lane j <- r[j] lane i (16 x 16 32-bit elements). */
static inline void transpose16(__m512i r[16]) {
    __m512i t[16], u[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    /* within each 128-bit lane L of u[4q + e]: element 4L + e of rows 4q .. 4q + 3 */
    for (int q = 0; q < 16; q += 4) {
        u[q] = _mm512_unpacklo_epi64(t[q], t[q + 2]);
        u[q + 1] = _mm512_unpackhi_epi64(t[q], t[q + 2]);
        u[q + 2] = _mm512_unpacklo_epi64(t[q + 1], t[q + 3]);
        u[q + 3] = _mm512_unpackhi_epi64(t[q + 1], t[q + 3]);
    }
    for (int e = 0; e < 4; e++) {
        const __m512i v = _mm512_shuffle_i32x4(u[e], u[4 + e], 0x88), w = _mm512_shuffle_i32x4(u[e], u[4 + e], 0xdd);
        const __m512i x = _mm512_shuffle_i32x4(u[8 + e], u[12 + e], 0x88), z = _mm512_shuffle_i32x4(u[8 + e], u[12 + e], 0xdd);
        r[e] = _mm512_shuffle_i32x4(v, x, 0x88);       /* elements 0..3 of lane 0 */
        r[4 + e] = _mm512_shuffle_i32x4(w, z, 0x88);   /* lane 1 */
        r[8 + e] = _mm512_shuffle_i32x4(v, x, 0xdd);   /* lane 2 */
        r[12 + e] = _mm512_shuffle_i32x4(w, z, 0xdd);  /* lane 3 */
    }
}

/* Scratch of one thread: a strip's unpacked bytes, its pair vectors and per-group scales. */
typedef struct {
    uint8_t *q;          /* [STRIP][K] */
    float *ws1, *wm1;    /* [ng] of one row */
    int32_t *pairs;      /* [K / 32][16 pairs][STRIP lanes] */
    float *wsv, *wmv;    /* [ng][STRIP lanes] */
} strip_scratch;

static int strip_alloc(strip_scratch *s, int64_t K, int64_t ng) {
    s->q = (uint8_t *)aligned_alloc(64, (size_t)(STRIP * K));
    s->pairs = (int32_t *)aligned_alloc(64, (size_t)(K / 32 * 16 * STRIP * 4));
    s->ws1 = (float *)malloc(sizeof(float) * (size_t)ng);
    s->wm1 = (float *)malloc(sizeof(float) * (size_t)ng);
    s->wsv = (float *)aligned_alloc(64, sizeof(float) * (size_t)(STRIP * ng));
    s->wmv = (float *)aligned_alloc(64, sizeof(float) * (size_t)(STRIP * ng));
    return s->q && s->pairs && s->ws1 && s->wm1 && s->wsv && s->wmv ? 0 : -1;
}

static void strip_free(strip_scratch *s) {
    free(s->q); free(s->pairs); free(s->ws1); free(s->wm1); free(s->wsv); free(s->wmv);
}

/* Weight rows [0, STRIP) of `w` (a strip) -> pair vectors and lane-wise scales. */
static void pack_strip(int type, const uint8_t *w, int64_t row_bytes, int64_t K, int64_t ng, int zoff,
                       strip_scratch *s) {
    for (int l = 0; l < STRIP; l++) {
        prefetch_ahead(w + l * row_bytes, row_bytes);
        unpack_row(type, w + l * row_bytes, K, s->q + l * K, s->ws1, s->wm1);
        for (int64_t g = 0; g < ng; g++) {
            s->wsv[g * STRIP + l] = s->ws1[g];
            s->wmv[g * STRIP + l] = s->wm1[g] - (float)zoff * s->ws1[g];
        }
    }
    for (int64_t c = 0; c < K / 32; c++)
        for (int v = 0; v < STRIP / 16; v++) {  /* lanes 16v .. 16v + 15 */
            __m512i r[16];
            for (int l = 0; l < 16; l++)
                r[l] = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(s->q + (16 * v + l) * K + 32 * c)));
            transpose16(r);
            for (int p = 0; p < 16; p++) _mm512_store_si512((void *)(s->pairs + (c * 16 + p) * STRIP + 16 * v), r[p]);
        }
}

/* The three steps every register tile shares (this one and the packed one of quant_packed.h). They
 * work on the tile's locals: activations `a` (rows of K), scales `da` (per 32, row stride nb) and
 * `asum`, integer sums lo[R] / hi[R], float sums fa[R * STRIP], output y (row stride ldy).
 * Multiply: activation pair (32c + 2p, +1) of each row, broadcast, times the pair vectors b0, b1. */
#define TILE_MULTIPLY_ROWS(R, b0, b1, c, p)                                                             \
    _Pragma("GCC unroll 16") for (int j = 0; j < R; j++) {                                              \
        int32_t pair;                                                                                   \
        memcpy(&pair, a + j * K + 32 * (c) + 2 * (p), sizeof pair);                                     \
        const __m512i t = _mm512_set1_epi32(pair);                                                      \
        lo[j] = DPWSSD(lo[j], b0, t);                                                                   \
        hi[j] = DPWSSD(hi[j], b1, t);                                                                   \
    }
/* Scale: a group's integer sums into the float sums, ws * da (s0, s1) plus the offset term
 * (wm - zoff ws: m0, m1) * asum; da of 32-block c, asum of group g (row stride ng). */
#define TILE_SCALE_ROWS(R, s0, s1, m0, m1, c, ng, g)                                                    \
    _Pragma("GCC unroll 16") for (int j = 0; j < R; j++) {                                              \
        const __m512 d = _mm512_set1_ps(da[j * nb + (c)]), o = _mm512_set1_ps(asum[j * (ng) + (g)]);    \
        float *f = fa + j * STRIP;                                                                      \
        __m512 f0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(lo[j]), _mm512_mul_ps(s0, d), _mm512_load_ps(f)); \
        __m512 f1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(hi[j]), _mm512_mul_ps(s1, d), _mm512_load_ps(f + 16)); \
        _mm512_store_ps(f, _mm512_fmadd_ps(m0, o, f0));                                                 \
        _mm512_store_ps(f + 16, _mm512_fmadd_ps(m1, o, f1));                                            \
    }
/* Store: the float sums to y. */
#define TILE_STORE_ROWS(R)                                                                              \
    for (int j = 0; j < R; j++) {                                                                       \
        _mm512_storeu_ps(y + j * ldy, _mm512_load_ps(fa + j * STRIP));                                  \
        _mm512_storeu_ps(y + j * ldy + 16, _mm512_load_ps(fa + j * STRIP + 16));                        \
    }

/* y[j, 0:32] = activation rows j < R against a packed strip, G elements per scale group. The
 * integer sums of a group live in 2R registers; the float sums in `fa` (L1), updated once per group. */
#define DEFINE_TILE(R, G)                                                                               \
static inline void tile_##R##_g##G(const strip_scratch *s, int64_t K, const int16_t *a, const float *da,\
                                   const float *asum, int64_t ng, float *y, int64_t ldy) {              \
    const int64_t nb = K / 32;                                                                          \
    float fa[R * STRIP] __attribute__((aligned(64)));                                                   \
    memset(fa, 0, sizeof fa);                                                                           \
    for (int64_t c = 0; c < nb; c++) {                                                                  \
        const int32_t *pc = s->pairs + c * 16 * STRIP;                                                  \
        _Pragma("GCC unroll 2") for (int h = 0; h < 32 / G; h++) {                                      \
            const int64_t g = c * (32 / G) + h;                                                         \
            __m512i lo[R], hi[R];                                                                       \
            _Pragma("GCC unroll 16") for (int j = 0; j < R; j++) {                                      \
                lo[j] = _mm512_setzero_si512();                                                         \
                hi[j] = _mm512_setzero_si512();                                                         \
            }                                                                                           \
            _Pragma("GCC unroll 16") for (int p = h * (G / 2); p < (h + 1) * (G / 2); p++) {            \
                const __m512i b0 = _mm512_load_si512((const void *)(pc + p * STRIP));                   \
                const __m512i b1 = _mm512_load_si512((const void *)(pc + p * STRIP + 16));              \
                TILE_MULTIPLY_ROWS(R, b0, b1, c, p);                                                    \
            }                                                                                           \
            const __m512 s0 = _mm512_load_ps(s->wsv + g * STRIP), s1 = _mm512_load_ps(s->wsv + g * STRIP + 16); \
            const __m512 m0 = _mm512_load_ps(s->wmv + g * STRIP), m1 = _mm512_load_ps(s->wmv + g * STRIP + 16); \
            TILE_SCALE_ROWS(R, s0, s1, m0, m1, c, ng, g);                                              \
        }                                                                                               \
    }                                                                                                   \
    TILE_STORE_ROWS(R);                                                                                 \
}
DEFINE_TILE(12, 32)
DEFINE_TILE(8, 32)
DEFINE_TILE(4, 32)
DEFINE_TILE(2, 32)
DEFINE_TILE(1, 32)
DEFINE_TILE(12, 16)
DEFINE_TILE(8, 16)
DEFINE_TILE(4, 16)
DEFINE_TILE(2, 16)
DEFINE_TILE(1, 16)

/* Rows [0, rows) against one packed strip, TILE_ROWS at a time, the rest in at most four tiles (8, 4, 2, 1). */
#define STRIP_ROWS(G)                                                                                   \
    do {                                                                                                \
        int64_t r = 0;                                                                                  \
        for (; r + TILE_ROWS <= rows; r += TILE_ROWS)                                                   \
            tile_12_g##G(&s, K, a + r * K, da + r * nb, asum + r * ng, ng, ys + r * ldy, ldy);          \
        if (r + 8 <= rows) {                                                                            \
            tile_8_g##G(&s, K, a + r * K, da + r * nb, asum + r * ng, ng, ys + r * ldy, ldy);           \
            r += 8;                                                                                     \
        }                                                                                               \
        if (r + 4 <= rows) {                                                                            \
            tile_4_g##G(&s, K, a + r * K, da + r * nb, asum + r * ng, ng, ys + r * ldy, ldy);           \
            r += 4;                                                                                     \
        }                                                                                               \
        if (r + 2 <= rows) {                                                                            \
            tile_2_g##G(&s, K, a + r * K, da + r * nb, asum + r * ng, ng, ys + r * ldy, ldy);           \
            r += 2;                                                                                     \
        }                                                                                               \
        if (r < rows) tile_1_g##G(&s, K, a + r * K, da + r * nb, asum + r * ng, ng, ys + r * ldy, ldy); \
    } while (0)

/* Features [0, NS) (whole strips) of orcinus_quant_matmul: y[r, o] for every activation row. */
static int tiled_matmul(int type, const uint8_t *w, int64_t NS, int64_t K, int64_t row_bytes, int G, int zoff,
                        const int16_t *a, const float *da, const float *asum, int64_t rows, float *y,
                        int64_t ldy, int num_threads) {
    const int64_t ng = K / G, nb = K / 32;
    int status = 0;
#pragma omp parallel num_threads(num_threads) if (NS * rows * K > 32768)
    {
        strip_scratch s;
        if (strip_alloc(&s, K, ng) != 0) {
#pragma omp atomic write
            status = -1;
        } else {
#pragma omp for schedule(static)
            for (int64_t st = 0; st < NS / STRIP; st++) {
                pack_strip(type, w + st * STRIP * row_bytes, row_bytes, K, ng, zoff, &s);
                float *ys = y + st * STRIP;
                if (G == 32) STRIP_ROWS(32);
                else STRIP_ROWS(16);
            }
        }
        strip_free(&s);
    }
    return status;
}
#endif
