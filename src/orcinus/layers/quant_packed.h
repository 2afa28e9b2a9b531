/* Q4_0, Q4_1 and Q8_0 weights packed once, at load, in the order the register tiles read them
 * (included by quant_kernels.c after quant_tiles.h, whose STRIP, DPWSSD and tile scheme it follows).
 *
 * Why: the tiles of quant_tiles.h repack every strip of 32 output features from its GGUF blocks on
 * every call (unpack to bytes, widen, transpose): 9.4 % of a one-thread run of the 64-request trace
 * (pack_strip + unpack_row, perf), paid again at every layer of every step. Packing at load removes
 * that pass; to keep the model at its file size, the packed weights stay 4-bit (8-bit for Q8_0) and
 * the tile widens them in registers, which the VNNI port mostly hides (a 12-row tile in L1 ran at
 * 126-131 GMAC/s from 16-bit pairs, 122-133 from 8-bit ones, 113-122 from nibbles: docs/benchmarks.md,
 * "Issue 21, sixth round").
 *
 * Layout of a packed weight [N features, K inputs], N a multiple of STRIP: strip after strip (features
 * 32s .. 32s + 31); within a strip, chunk after chunk of 32 inputs, each
 *   quants: 16 pair rows p (inputs 2p, 2p + 1) x 2 halves v (features 16v .. 16v + 15):
 *           P8: 32 bytes, byte e = weight (feature 16v + e / 2, input 2p + e % 2), as int8 + 128;
 *           P4: pair rows p and p + 8 (p < 8) share 32 bytes per half: byte e holds weight (feature
 *               16v + e / 2, input 2p + e % 2) in its low nibble and the same of pair row p + 8 in its
 *               high one, so one load and widen, then a mask and a shift, give both pair vectors;
 *   scales: 32 halves ws (one per feature), then 32 halves wm - zoff * ws (exact: ws is a half and
 *           zoff a power of two; the packer refuses a weight where it would not be).
 * A chunk is 640 bytes (P4: 20 per 32 weights, Q4_1's size) or 1,152 (P8: 36, Q8_0's 34 + 2).
 * The results equal the per-call tiles' bit for bit: same integers, same float operations in the
 * same order. Batches of every size take the tiles (one row too: no row kernel reads this layout).
 */
#ifdef HAVE_PACKED /* quant_kernels.c: with the tiles; type ids T_P4_0, T_P4_1, T_P8_0 */

static inline int is_packed(int type) { return type == T_P4_0 || type == T_P4_1 || type == T_P8_0; }
static inline int64_t packed_quant_bytes(int type) { return type == T_P8_0 ? 1024 : 512; }
static inline int64_t packed_chunk_bytes(int type) { return packed_quant_bytes(type) + 128; }

/* 32 bytes at src widened to 16-bit lanes: a P8 pair vector, or two P4 ones (low and high nibbles). */
static inline __m512i load_wide(const uint8_t *src) {
    return _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)src));
}

/* y[j, 0:32] = activation rows j < R against one packed strip: quant_tiles.h's DEFINE_TILE (G = 32)
 * with the pair vectors and scales read from the strip instead of a per-call scratch (its multiply,
 * scale and store steps are quant_tiles.h's TILE_*_ROWS). VBYTES: bytes
 * of the strip per pair vector (16 for P4, two nibbles to a byte; 32 for P8). */
#define DEFINE_PACKED_TILE(R, KIND, VBYTES)                                                             \
static inline void ptile_##R##_##KIND(const uint8_t *strip, int64_t K, const int16_t *a, const float *da,\
                                      const float *asum, float *y, int64_t ldy) {                       \
    const int64_t nb = K / 32, chunk = 16 * 2 * VBYTES + 128;                                           \
    const __m512i m15 = _mm512_set1_epi16(15);                                                          \
    __m512i x0 = _mm512_setzero_si512(), x1 = x0;                                                       \
    (void)m15; (void)x0; (void)x1;                                                                      \
    float fa[R * STRIP] __attribute__((aligned(64)));                                                   \
    memset(fa, 0, sizeof fa);                                                                           \
    for (int64_t c = 0; c < nb; c++) {                                                                  \
        const uint8_t *pc = strip + c * chunk;                                                          \
        __m512i lo[R], hi[R];                                                                           \
        _Pragma("GCC unroll 16") for (int j = 0; j < R; j++) {                                          \
            lo[j] = _mm512_setzero_si512();                                                             \
            hi[j] = _mm512_setzero_si512();                                                             \
        }                                                                                               \
        _Pragma("GCC unroll 16") for (int i = 0; i < 16; i++) {                                         \
            /* P8: pair row p = i; P4: pair row i / 2 + 8 (i % 2) (its low, then its high nibbles) */   \
            const int p = VBYTES == 32 ? i : i / 2 + 8 * (i % 2);                                       \
            __m512i b0, b1;                                                                             \
            PAIRS_##KIND(pc, i, b0, b1);                                                                \
            TILE_MULTIPLY_ROWS(R, b0, b1, c, p);                                                        \
        }                                                                                               \
        const uint16_t *sc = (const uint16_t *)(pc + 16 * 2 * VBYTES);                                  \
        const __m512 s0 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)sc));                     \
        const __m512 s1 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(sc + 16)));              \
        const __m512 m0 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(sc + 32)));              \
        const __m512 m1 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(sc + 48)));              \
        TILE_SCALE_ROWS(R, s0, s1, m0, m1, c, nb, c); /* G = 32: one group per chunk */                 \
    }                                                                                                   \
    TILE_STORE_ROWS(R);                                                                                 \
}
/* The two pair vectors (halves v = 0, 1) of step i of a chunk at pc. P4: an even step loads and
 * widens the 32-byte halves of pair rows (i / 2, i / 2 + 8) and keeps them (x0, x1) for the odd one. */
#define PAIRS_p8(pc, i, b0, b1)                                                                         \
    do { b0 = load_wide((pc) + (2 * (i)) * 32); b1 = load_wide((pc) + (2 * (i) + 1) * 32); } while (0)
#define PAIRS_p4(pc, i, b0, b1)                                                                         \
    do {                                                                                                \
        if ((i) % 2 == 0) {                                                                             \
            x0 = load_wide((pc) + ((i) / 2 * 2) * 32);                                                  \
            x1 = load_wide((pc) + ((i) / 2 * 2 + 1) * 32);                                              \
            b0 = _mm512_and_si512(x0, m15); b1 = _mm512_and_si512(x1, m15);                             \
        } else {                                                                                        \
            b0 = _mm512_srli_epi16(x0, 4); b1 = _mm512_srli_epi16(x1, 4);                               \
        }                                                                                               \
    } while (0)
/* 2 x 11 accumulators, the two widened loads kept for the high nibbles, two pair vectors, the
 * broadcast and the mask: 28 of the 32 vector registers (12 rows would leave no room for spills) */
#define PACKED_TILE_ROWS 11
DEFINE_PACKED_TILE(11, p4, 16)
DEFINE_PACKED_TILE(8, p4, 16)
DEFINE_PACKED_TILE(4, p4, 16)
DEFINE_PACKED_TILE(2, p4, 16)
DEFINE_PACKED_TILE(1, p4, 16)
DEFINE_PACKED_TILE(11, p8, 32)
DEFINE_PACKED_TILE(8, p8, 32)
DEFINE_PACKED_TILE(4, p8, 32)
DEFINE_PACKED_TILE(2, p8, 32)
DEFINE_PACKED_TILE(1, p8, 32)

/* Rows [0, rows) against one packed strip: TILE_ROWS at a time, the rest in at most four tiles. */
#define PACKED_STRIP_ROWS(KIND)                                                                         \
    do {                                                                                                \
        int64_t r = 0;                                                                                  \
        for (; r + PACKED_TILE_ROWS <= rows; r += PACKED_TILE_ROWS)                                     \
            ptile_11_##KIND(s, K, a + r * K, da + r * nb, asum + r * nb, ys + r * ldy, ldy);            \
        if (r + 8 <= rows) { ptile_8_##KIND(s, K, a + r * K, da + r * nb, asum + r * nb, ys + r * ldy, ldy); r += 8; } \
        if (r + 4 <= rows) { ptile_4_##KIND(s, K, a + r * K, da + r * nb, asum + r * nb, ys + r * ldy, ldy); r += 4; } \
        if (r + 2 <= rows) { ptile_2_##KIND(s, K, a + r * K, da + r * nb, asum + r * nb, ys + r * ldy, ldy); r += 2; } \
        if (r < rows) ptile_1_##KIND(s, K, a + r * K, da + r * nb, asum + r * nb, ys + r * ldy, ldy);    \
    } while (0)

/* y[r, o] for a packed weight of N features (whole strips), every batch size; asum per group of 32. */
static void packed_matmul(int type, const uint8_t *w, int64_t N, int64_t K, const int16_t *a, const float *da,
                          const float *asum, int64_t rows, float *y, int64_t ldy, int num_threads) {
    const int64_t nb = K / 32, strip_bytes = nb * packed_chunk_bytes(type);
#pragma omp parallel for num_threads(num_threads) schedule(static) if (N * rows * K > 32768)
    for (int64_t st = 0; st < N / STRIP; st++) {
        const uint8_t *s = w + st * strip_bytes;
        float *ys = y + st * STRIP;
        if (type == T_P8_0) PACKED_STRIP_ROWS(p8);
        else PACKED_STRIP_ROWS(p4);
    }
}

/* Feature o of a packed weight as float32 (the reference formula ws * (q - zoff) + wm, as
 * orcinus_quant_dequantize computes it from the blocks): embedding lookups of a packed LM head. */
static void packed_row(int type, const uint8_t *w, int64_t K, int64_t o, int zoff, float *f) {
    const int64_t nb = K / 32, chunk = packed_chunk_bytes(type), qb = packed_quant_bytes(type);
    const uint8_t *strip = w + (o / STRIP) * nb * chunk;
    const int l = (int)(o % STRIP), v = l / 16, li = l % 16;
    for (int64_t c = 0; c < nb; c++) {
        const uint8_t *pc = strip + c * chunk;
        const uint16_t *sc = (const uint16_t *)(pc + qb);
        const float s = f16_to_f32(sc[l]), m = f16_to_f32(sc[32 + l]) + (float)zoff * s;  /* exact */
        for (int p = 0; p < 16; p++)
            for (int h = 0; h < 2; h++) {
                const int e = 2 * li + h;
                int q;
                if (type == T_P8_0) q = pc[(2 * p + v) * 32 + e];
                else q = p < 8 ? pc[(2 * p + v) * 32 + e] & 15 : pc[(2 * (p - 8) + v) * 32 + e] >> 4;
                f[32 * c + 2 * p + h] = s * (float)(q - zoff) + m;
            }
    }
}

/* Packs a Q4_0, Q4_1 or Q8_0 weight (N rows of row_bytes, N a multiple of STRIP) into `out`
 * (N / STRIP * K / 32 * packed_chunk_bytes bytes). Returns 0; -1 for another type or shape or no
 * memory; -2 when a scale term is not exact as a half (then the caller keeps the blocks). */
int orcinus_quant_pack(int type, const uint8_t *w, int64_t N, int64_t K, int64_t row_bytes, uint8_t *out,
                       int num_threads) {
    if ((type != T_Q4_0 && type != T_Q4_1 && type != T_Q8_0) || N % STRIP || K % 32 || N <= 0) return -1;
    const int ptype = type + PACKED_OFFSET, zoff = type == T_Q4_0 ? 8 : type == T_Q8_0 ? 128 : 0;
    const int64_t nb = K / 32, chunk = packed_chunk_bytes(ptype), qb = packed_quant_bytes(ptype);
    int status = 0;
#pragma omp parallel num_threads(num_threads)
    {
        uint8_t *q = (uint8_t *)malloc((size_t)(STRIP * K));
        float *ws = (float *)malloc(sizeof(float) * (size_t)(STRIP * nb)), *wm = (float *)malloc(sizeof(float) * (size_t)(STRIP * nb));
        if (!q || !ws || !wm) {
#pragma omp atomic write
            status = -1;
        } else {
#pragma omp for schedule(static)
            for (int64_t st = 0; st < N / STRIP; st++) {
                for (int l = 0; l < STRIP; l++)
                    unpack_row(type, w + (st * STRIP + l) * row_bytes, K, q + l * K, ws + l * nb, wm + l * nb);
                for (int64_t c = 0; c < nb; c++) {
                    uint8_t *pc = out + (st * nb + c) * chunk;
                    for (int p = 0; p < 16; p++)
                        for (int v = 0; v < 2; v++) {
                            const int64_t k0 = 32 * c + 2 * p;
                            if (ptype == T_P8_0) {
                                uint8_t *dst = pc + (2 * p + v) * 32;
                                for (int e = 0; e < 32; e++) dst[e] = q[(16 * v + e / 2) * K + k0 + e % 2];
                            } else if (p < 8) {  /* pair row p low, p + 8 high */
                                uint8_t *dst = pc + (2 * p + v) * 32;
                                for (int e = 0; e < 32; e++)
                                    dst[e] = (uint8_t)(q[(16 * v + e / 2) * K + k0 + e % 2] |
                                                       (q[(16 * v + e / 2) * K + k0 + 16 + e % 2] << 4));
                            }
                        }
                    uint16_t *sc = (uint16_t *)(pc + qb);
                    for (int l = 0; l < STRIP; l++) {
                        const float s = ws[l * nb + c], m = wm[l * nb + c] - (float)zoff * s;
                        sc[l] = f32_to_f16(s);
                        sc[32 + l] = f32_to_f16(m);
                        if (f16_to_f32(sc[l]) != s || f16_to_f32(sc[32 + l]) != m) {
#pragma omp atomic write
                            status = -2;
                        }
                    }
                }
            }
        }
        free(q); free(ws); free(wm);
    }
    return status;
}
#endif
