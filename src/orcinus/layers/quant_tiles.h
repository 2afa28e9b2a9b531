/* The quantized matmul for batches of rows: register tiles on AVX-512 (included by quant_kernels.c,
 * whose `unpack_row`, `fmt` and `prefetch_ahead` it uses).
 *
 * Why: the row-at-a-time kernel loads a weight block once for 4 activation rows and reduces every
 * block's products horizontally; from ~8 rows on, a batch is better served as a GEMM. Dequantising
 * the weight to float32 for torch's GEMM costs a pass over every weight per step and multiplies at
 * float32 rate; this keeps the integer arithmetic of the row kernel (same 16-bit activations, same
 * per-group scales, same result up to float summation order) at twice float32's multiply rate.
 *
 * How: 16 output features (a strip, one per 32-bit lane) at a time. A strip's weight rows are
 * unpacked once to bytes, widened to 16 bits and transposed so that one vector holds, for each of
 * the 16 features, the pair of weights (k, k+1): `vpdpwssd` (AVX-512 VNNI; `madd` + add without it)
 * multiplies it with an activation pair broadcast to all lanes and adds into 32-bit lanes, so a row
 * of activations meets 16 features with no horizontal sums. Per group (32 elements; 16 for Q6_K)
 * the integer sums are scaled into float accumulators: ws * da (weight and activation scales) and
 * the offset term (wm - zoff ws) * da * isum, exactly the row kernel's formula. TILE_ROWS rows at a
 * time keep 2 * TILE_ROWS accumulators in registers and reuse each loaded weight vector that often.
 * Strips are split over OpenMP threads. Features past the last whole strip take the row kernel.
 */
#if defined(__AVX512BW__)
#define HAVE_TILES 1
#define TILE_COLS 16
#define TILE_ROWS 12
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
    uint8_t *q;          /* [16][K] */
    float *ws1, *wm1;    /* [ng] of one row */
    int32_t *pairs;      /* [K / 32][16 pairs][16 lanes] */
    float *wsv, *wmv;    /* [ng][16 lanes] */
} strip_scratch;

static int strip_alloc(strip_scratch *s, int64_t K, int64_t ng) {
    s->q = (uint8_t *)aligned_alloc(64, (size_t)(16 * K));
    s->pairs = (int32_t *)aligned_alloc(64, (size_t)(K / 32 * 1024));
    s->ws1 = (float *)malloc(sizeof(float) * (size_t)ng);
    s->wm1 = (float *)malloc(sizeof(float) * (size_t)ng);
    s->wsv = (float *)aligned_alloc(64, sizeof(float) * (size_t)(16 * ng));
    s->wmv = (float *)aligned_alloc(64, sizeof(float) * (size_t)(16 * ng));
    return s->q && s->pairs && s->ws1 && s->wm1 && s->wsv && s->wmv ? 0 : -1;
}

static void strip_free(strip_scratch *s) {
    free(s->q); free(s->pairs); free(s->ws1); free(s->wm1); free(s->wsv); free(s->wmv);
}

/* Weight rows [0, 16) of `w` (a strip) -> pair vectors and lane-wise scales. */
static void pack_strip(int type, const uint8_t *w, int64_t row_bytes, int64_t K, int64_t ng, int zoff,
                       strip_scratch *s) {
    for (int l = 0; l < 16; l++) {
        prefetch_ahead(w + l * row_bytes, row_bytes);
        unpack_row(type, w + l * row_bytes, K, s->q + l * K, s->ws1, s->wm1);
        for (int64_t g = 0; g < ng; g++) {
            s->wsv[g * 16 + l] = s->ws1[g];
            s->wmv[g * 16 + l] = s->wm1[g] - (float)zoff * s->ws1[g];
        }
    }
    for (int64_t c = 0; c < K / 32; c++) {
        __m512i r[16];
        for (int l = 0; l < 16; l++)
            r[l] = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(s->q + l * K + 32 * c)));
        transpose16(r);
        for (int p = 0; p < 16; p++) _mm512_store_si512((void *)(s->pairs + (c * 16 + p) * 16), r[p]);
    }
}

/* y[j, 0:16] = activation rows j < R against a packed strip (G: elements per scale group). */
#define DEFINE_TILE(R)                                                                                  \
static inline void tile_##R(const strip_scratch *s, int64_t K, int G, const int16_t *a, const float *da,\
                            const float *asum, int64_t ng, float *y, int64_t ldy) {                     \
    const int64_t nb = K / 32;                                                                          \
    const int per = 32 / G, half = G / 2;                                                               \
    __m512 f[R];                                                                                        \
    __m512i acc[R];                                                                                     \
    _Pragma("GCC unroll 16") for (int j = 0; j < R; j++) f[j] = _mm512_setzero_ps();                    \
    for (int64_t c = 0; c < nb; c++) {                                                                  \
        const int32_t *pc = s->pairs + c * 256;                                                         \
        for (int h = 0; h < per; h++) {                                                                 \
            const int64_t g = c * per + h;                                                              \
            _Pragma("GCC unroll 16") for (int j = 0; j < R; j++) acc[j] = _mm512_setzero_si512();       \
            for (int p = h * half; p < (h + 1) * half; p++) {                                           \
                const __m512i b = _mm512_load_si512((const void *)(pc + p * 16));                       \
                _Pragma("GCC unroll 16") for (int j = 0; j < R; j++) {                                  \
                    int32_t pair;                                                                       \
                    memcpy(&pair, a + j * K + 32 * c + 2 * p, sizeof pair);                             \
                    acc[j] = DPWSSD(acc[j], b, _mm512_set1_epi32(pair));                                \
                }                                                                                       \
            }                                                                                           \
            const __m512 sv = _mm512_load_ps(s->wsv + g * 16), mv = _mm512_load_ps(s->wmv + g * 16);    \
            _Pragma("GCC unroll 16") for (int j = 0; j < R; j++) {                                      \
                f[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[j]),                                      \
                                       _mm512_mul_ps(sv, _mm512_set1_ps(da[j * nb + c])), f[j]);        \
                f[j] = _mm512_fmadd_ps(mv, _mm512_set1_ps(asum[j * ng + g]), f[j]);                     \
            }                                                                                           \
        }                                                                                               \
    }                                                                                                   \
    _Pragma("GCC unroll 16") for (int j = 0; j < R; j++) _mm512_storeu_ps(y + j * ldy, f[j]);           \
}
DEFINE_TILE(12)
DEFINE_TILE(8)
DEFINE_TILE(4)
DEFINE_TILE(2)
DEFINE_TILE(1)

/* Features [0, N16) (whole strips) of orcinus_quant_matmul: y[r, o] for every activation row. */
static int tiled_matmul(int type, const uint8_t *w, int64_t N16, int64_t K, int64_t row_bytes, int G, int zoff,
                        const int16_t *a, const float *da, const float *asum, int64_t rows, float *y,
                        int64_t ldy, int num_threads) {
    const int64_t ng = K / G, nb = K / 32;
    int status = 0;
#pragma omp parallel num_threads(num_threads) if (N16 * rows * K > 32768)
    {
        strip_scratch s;
        if (strip_alloc(&s, K, ng) != 0) {
#pragma omp atomic write
            status = -1;
        } else {
#pragma omp for schedule(static)
            for (int64_t st = 0; st < N16 / 16; st++) {
                pack_strip(type, w + st * 16 * row_bytes, row_bytes, K, ng, zoff, &s);
                float *ys = y + st * 16;
                int64_t r = 0;
                for (; r + TILE_ROWS <= rows; r += TILE_ROWS)
                    tile_12(&s, K, G, a + r * K, da + r * nb, asum + r * ng, ng, ys + r * ldy, ldy);
                /* the last 0-11 rows in at most four tiles */
                if (r + 8 <= rows) {
                    tile_8(&s, K, G, a + r * K, da + r * nb, asum + r * ng, ng, ys + r * ldy, ldy);
                    r += 8;
                }
                if (r + 4 <= rows) {
                    tile_4(&s, K, G, a + r * K, da + r * nb, asum + r * ng, ng, ys + r * ldy, ldy);
                    r += 4;
                }
                if (r + 2 <= rows) {
                    tile_2(&s, K, G, a + r * K, da + r * nb, asum + r * ng, ng, ys + r * ldy, ldy);
                    r += 2;
                }
                if (r < rows)
                    tile_1(&s, K, G, a + r * K, da + r * nb, asum + r * ng, ng, ys + r * ldy, ldy);
            }
        }
        strip_free(&s);
    }
    return status;
}
#endif
