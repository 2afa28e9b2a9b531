/* An iteration through a pipeline stage's decoder layers in one call, for CPUs: Llama-family
 * layers (pre-norm RMSNorm, rotary self-attention over the paged KV pool, gated SiLU MLP) whose
 * linear weights are kept in their GGUF blocks, for any batch of decodes and prompt chunks.
 *
 * Why: with the weights read from their 4-bit blocks a token's matmuls take ~6 ms on two cores of
 * an Intel Xeon, while the ~25 small PyTorch ops around them per layer (norms, rotary, the KV write,
 * residual adds, views, the activation quantisation's temporaries) took another ~9 ms: a single
 * user's decode was mostly dispatch. Prompt-sized batches paid the same ops on [2048, 3072]
 * temporaries, each allocated (and its pages zeroed by the kernel) per op. Here each layer's
 * element-wise work is a few loops over [rows, hidden] floats in one scratch buffer the caller keeps,
 * and the heavy parts call the kernels the module path calls (through function pointers, so this
 * file links to neither and every result is computed by the same code):
 *   quant_activations / quant_matmul   layers/quant_kernels.c        (the linears, OpenMP over rows)
 *   paged_decode / paged_prefill       attention/paged_attention.c   (attention, OpenMP over requests)
 * The element-wise steps follow the PyTorch modules' formulas (layers/norms.py, rotary.py,
 * activations.py); layers/fused_decode.py decides when a batch may take this path and packs the
 * structs below (their layout is mirrored there with ctypes).
 *
 * Layouts: x [rows, hidden] float32, the residual stream, updated in place; caches
 * [blocks, block_size, kv_heads, head_dim] float32 or float16 (kv_cache_dtype=float16: the new keys
 * and values are rounded to nearest even, as torch's conversion does); cos/sin [max_positions, head_dim / 2].
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "float_formats.h"  /* f32_to_f16 */

#define MAX_SEGMENTS 4
enum { KV_F32 = 0, KV_F16 = 2 };

typedef void (*quant_activations_fn)(const float *x, int64_t rows, int64_t K, int16_t *a, float *da, float *isum16);
typedef int (*quant_matmul_fn)(int type, const uint8_t *w, int64_t N, int64_t K, int64_t row_bytes,
                               const int16_t *a, const float *da, const float *isum16, int64_t rows,
                               float *y, int64_t ldy, int num_threads);
typedef int (*paged_decode_fn)(const void *q, int64_t q_row_stride, const void *k, const void *v, void *out,
                               const int64_t *table, int64_t table_stride, const int64_t *rows,
                               const int64_t *seq_lens, int num_requests, int num_heads, int num_kv_heads,
                               int head_dim, int block_size, int window, float scale, int dtype, int kv_dtype,
                               int num_threads);
typedef int (*paged_prefill_fn)(const void *q, int64_t q_row_stride, const void *k, const void *v, void *out,
                                const int64_t *table, int64_t table_stride, const int64_t *query_starts,
                                const int64_t *query_lens, const int64_t *seq_lens, int num_requests, int num_heads,
                                int num_kv_heads, int head_dim, int block_size, int window, float scale, int dtype,
                                int kv_dtype, int num_threads);

/* A linear layer as quantized_linear.QuantState holds it: runs of output rows, each of one type. */
typedef struct {
    int64_t num_segments, in_features, out_features;
    int64_t type[MAX_SEGMENTS], out_start[MAX_SEGMENTS], out_rows[MAX_SEGMENTS], row_bytes[MAX_SEGMENTS];
    const uint8_t *raw[MAX_SEGMENTS];
    const float *bias; /* NULL: none */
} DecodeLinear;

typedef struct {
    const float *input_norm, *post_norm;
    const float *q_norm, *k_norm; /* per-head RMSNorm weights (Qwen3), else NULL */
    void *k_cache, *v_cache; /* the layer's pool: float32 or float16 (the model's kv_dtype) */
    int64_t window; /* sliding window, 0 for none */
    double norm_eps, qk_norm_eps;
    DecodeLinear qkv, o, gate_up, down;
} DecodeLayer;

typedef struct {
    int64_t hidden, num_heads, num_kv_heads, head_dim, intermediate, block_size;
    int64_t kv_dtype; /* the pool's: KV_F32 or KV_F16 (attention/paged_attention.c's codes) */
    double scale;
    const float *cos, *sin;
    void *quant_activations, *quant_matmul, *paged_decode, *paged_prefill;
} DecodeModel;

/* The batch's requests as the attention kernels take them: decodes (one row each) and prompt chunks. */
typedef struct {
    int64_t num_decodes;
    const int64_t *decode_rows, *decode_seq_lens, *decode_table;
    int64_t decode_table_stride;
    int64_t num_chunks;
    const int64_t *chunk_starts, *chunk_lens, *chunk_seq_lens, *chunk_table;
    int64_t chunk_table_stride;
} BatchRequests;

/* Element-wise loops run on the OpenMP team (torch's, where this file is built with OpenMP) once a
 * loop has 65,536 elements: prompt chunks bring thousands of rows (16,384, which also splits decode
 * batches of a few dozen rows, measured no different on 48 decodes: 674-733 tok/s either way). */
#define PARALLEL_ELEMS 65536

/* out = w * (x / sqrt(mean(x^2) + eps)), per row of n. */
static void rms_norm(const float *x, const float *w, float *out, int64_t rows, int64_t n, int64_t ld_in,
                     int64_t ld_out, double eps, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (rows * n >= PARALLEL_ELEMS)
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * ld_in;
        float *o = out + r * ld_out;
        double ss = 0.0;
        for (int64_t i = 0; i < n; i++) ss += (double)xr[i] * (double)xr[i];
        const float inv = (float)(1.0 / sqrt(ss / (double)n + eps));
        for (int64_t i = 0; i < n; i++) o[i] = w[i] * (xr[i] * inv);
    }
}

typedef struct {
    int16_t *a;
    float *da, *isum;
} Activations;

/* y [rows, out_features] = x [rows, in_features] W^T (+ bias): x rounded once, then one kernel call
 * per segment, as quantized_linear.linear does for float32 batches. */
static int linear(const DecodeModel *m, const DecodeLinear *l, const float *x, int64_t rows, float *y,
                  Activations *act, int threads) {
    ((quant_activations_fn)m->quant_activations)(x, rows, l->in_features, act->a, act->da, act->isum);
    for (int64_t s = 0; s < l->num_segments; s++) {
        const int status = ((quant_matmul_fn)m->quant_matmul)(
            (int)l->type[s], l->raw[s], l->out_rows[s], l->in_features, l->row_bytes[s], act->a, act->da,
            act->isum, rows, y + l->out_start[s], l->out_features, threads);
        if (status != 0) return status;
    }
    if (l->bias) {
#pragma omp parallel for num_threads(threads) schedule(static) if (rows * l->out_features >= PARALLEL_ELEMS)
        for (int64_t r = 0; r < rows; r++)
            for (int64_t o = 0; o < l->out_features; o++) y[r * l->out_features + o] += l->bias[o];
    }
    return 0;
}

/* Rotate-half rotary position embedding of `heads` heads of one row, in place. */
static void rotate(float *h, int64_t heads, int64_t D, const float *cos, const float *sin) {
    const int64_t half = D / 2;
    for (int64_t k = 0; k < heads; k++, h += D)
        for (int64_t i = 0; i < half; i++) {
            const float x1 = h[i], x2 = h[i + half];
            h[i] = x1 * cos[i] - x2 * sin[i];
            h[i + half] = x2 * cos[i] + x1 * sin[i];
        }
}

/* For tests: the conversion the step writes float16 pools with. */
void orcinus_f32_to_f16(const float *x, uint16_t *out, int64_t n) {
    for (int64_t i = 0; i < n; i++) out[i] = f32_to_f16(x[i]);
}

/* n floats into a pool slot of the model's KV dtype. */
static inline void store_kv(void *cache, int64_t kv_dtype, int64_t at, const float *x, int64_t n) {
    if (kv_dtype == KV_F32) {
        memcpy((float *)cache + at, x, sizeof(float) * (size_t)n);
        return;
    }
    uint16_t *h = (uint16_t *)cache + at;
    for (int64_t i = 0; i < n; i++) h[i] = f32_to_f16(x[i]);
}

/* x += y over n floats. */
static void add_into(float *x, const float *y, int64_t n, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (n >= PARALLEL_ELEMS)
    for (int64_t i = 0; i < n; i++) x[i] += y[i];
}

/* The scratch one call needs for `rows` rows, in bytes (the caller keeps it between calls: a
 * prompt-sized batch needs tens of megabytes, which malloc would map and the kernel zero every call). */
static int64_t widest_of(const DecodeModel *m) {
    const int64_t H = m->hidden, I = m->intermediate, nq = m->num_heads * m->head_dim;
    const int64_t a = nq > H ? nq : H;
    return a > I ? a : I;
}

int64_t orcinus_decode_layers_scratch_bytes(const DecodeModel *m, int64_t rows) {
    const int64_t D = m->head_dim, nq = m->num_heads * D, nqkv = nq + 2 * m->num_kv_heads * D;
    const int64_t floats = rows * (widest_of(m) + nqkv + nq + m->hidden + 2 * m->intermediate)
                           + rows * widest_of(m) / 32 + 1 + rows * widest_of(m) / 16 + 1;
    return (int64_t)sizeof(float) * floats + (int64_t)sizeof(int16_t) * rows * widest_of(m) + 64 * 8;
}

static void *carve(char **at, int64_t bytes) {
    void *p = *at;
    *at += (bytes + 63) / 64 * 64;
    return p;
}

/* Returns 0, -1 when the scratch given is too small, or a kernel's non-zero status. */
int orcinus_decode_layers(const DecodeModel *m, const DecodeLayer *layers, int64_t num_layers, float *x,
                          int64_t rows, const int64_t *positions, const int64_t *slots, const BatchRequests *batch,
                          void *scratch, int64_t scratch_bytes, int num_threads) {
    const int64_t H = m->hidden, D = m->head_dim, I = m->intermediate;
    const int64_t nq = m->num_heads * D, nkv = m->num_kv_heads * D, nqkv = nq + 2 * nkv;
    const int64_t widest = widest_of(m);
    if (scratch_bytes < orcinus_decode_layers_scratch_bytes(m, rows)) return -1;
    char *at = (char *)scratch;
    float *xn = carve(&at, (int64_t)sizeof(float) * rows * widest);
    float *qkv = carve(&at, (int64_t)sizeof(float) * rows * nqkv);
    float *att = carve(&at, (int64_t)sizeof(float) * rows * nq);
    float *y = carve(&at, (int64_t)sizeof(float) * rows * H);
    float *gu = carve(&at, (int64_t)sizeof(float) * rows * 2 * I);
    Activations act;
    act.a = carve(&at, (int64_t)sizeof(int16_t) * rows * widest);
    act.da = carve(&at, (int64_t)sizeof(float) * (rows * widest / 32 + 1));
    act.isum = carve(&at, (int64_t)sizeof(float) * (rows * widest / 16 + 1));
    int status = 0;
    for (int64_t li = 0; li < num_layers && status == 0; li++) {
        const DecodeLayer *L = &layers[li];
        /* attention */
        rms_norm(x, L->input_norm, xn, rows, H, H, H, L->norm_eps, num_threads);
        if ((status = linear(m, &L->qkv, xn, rows, qkv, &act, num_threads)) != 0) break;
#pragma omp parallel for num_threads(num_threads) schedule(static) if (rows * nqkv >= PARALLEL_ELEMS)
        for (int64_t r = 0; r < rows; r++) {
            float *q = qkv + r * nqkv, *k = q + nq, *v = k + nkv;
            if (L->q_norm) {
                rms_norm(q, L->q_norm, q, m->num_heads, D, D, D, L->qk_norm_eps, 1);
                rms_norm(k, L->k_norm, k, m->num_kv_heads, D, D, D, L->qk_norm_eps, 1);
            }
            const float *c = m->cos + positions[r] * (D / 2), *s = m->sin + positions[r] * (D / 2);
            rotate(q, m->num_heads, D, c, s);
            rotate(k, m->num_kv_heads, D, c, s);
            store_kv(L->k_cache, m->kv_dtype, slots[r] * nkv, k, nkv);
            store_kv(L->v_cache, m->kv_dtype, slots[r] * nkv, v, nkv);
        }
        if (batch->num_decodes > 0 &&
            (status = ((paged_decode_fn)m->paged_decode)(
                 qkv, nqkv, L->k_cache, L->v_cache, att, batch->decode_table, batch->decode_table_stride,
                 batch->decode_rows, batch->decode_seq_lens, (int)batch->num_decodes, (int)m->num_heads,
                 (int)m->num_kv_heads, (int)D, (int)m->block_size, (int)L->window, (float)m->scale, 0,
                 (int)m->kv_dtype, num_threads)) != 0)
            break;
        if (batch->num_chunks > 0 &&
            (status = ((paged_prefill_fn)m->paged_prefill)(
                 qkv, nqkv, L->k_cache, L->v_cache, att, batch->chunk_table, batch->chunk_table_stride,
                 batch->chunk_starts, batch->chunk_lens, batch->chunk_seq_lens, (int)batch->num_chunks,
                 (int)m->num_heads, (int)m->num_kv_heads, (int)D, (int)m->block_size, (int)L->window,
                 (float)m->scale, 0, (int)m->kv_dtype, num_threads)) != 0)
            break;
        if ((status = linear(m, &L->o, att, rows, y, &act, num_threads)) != 0) break;
        add_into(x, y, rows * H, num_threads);
        /* MLP: down(silu(gate) * up) */
        rms_norm(x, L->post_norm, xn, rows, H, H, H, L->norm_eps, num_threads);
        if ((status = linear(m, &L->gate_up, xn, rows, gu, &act, num_threads)) != 0) break;
#pragma omp parallel for num_threads(num_threads) schedule(static) if (rows * I >= PARALLEL_ELEMS)
        for (int64_t r = 0; r < rows; r++) {
            const float *g = gu + r * 2 * I, *u = g + I;
            float *a = xn + r * I;
            for (int64_t i = 0; i < I; i++) a[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
        }
        if ((status = linear(m, &L->down, xn, rows, y, &act, num_threads)) != 0) break;
        add_into(x, y, rows * H, num_threads);
    }
    return status;
}
