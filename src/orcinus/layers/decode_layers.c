/* A decode step through a pipeline stage's decoder layers in one call, for CPUs: Llama-family
 * layers (pre-norm RMSNorm, rotary self-attention over the paged KV pool, gated SiLU MLP) whose
 * linear weights are kept in their GGUF blocks, for a batch in which every request brings one token.
 *
 * Why: with the weights read from their 4-bit blocks a token's matmuls take ~6 ms on two cores of
 * an Intel Xeon, while the ~25 small PyTorch ops around them per layer (norms, rotary, the KV write,
 * residual adds, views, the activation quantisation's temporaries) took another ~9 ms: a single
 * user's decode was mostly dispatch. Here each layer's element-wise work is a few loops over
 * [rows, hidden] floats and the heavy parts call the kernels the module path calls (through
 * function pointers, so this file links to neither and every result is computed by the same code):
 *   quant_activations / quant_matmul   layers/quant_kernels.c   (the linears, OpenMP over rows)
 *   paged_decode                       attention/paged_attention.c (attention, OpenMP over requests)
 * The element-wise steps follow the PyTorch modules' formulas (layers/norms.py, rotary.py,
 * activations.py); layers/fused_decode.py decides when a batch may take this path and packs the
 * structs below (their layout is mirrored there with ctypes).
 *
 * Layouts: x [rows, hidden] float32, the residual stream, updated in place; caches
 * [blocks, block_size, kv_heads, head_dim] float32; cos/sin [max_positions, head_dim / 2].
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_SEGMENTS 4

typedef void (*quant_activations_fn)(const float *x, int64_t rows, int64_t K, int16_t *a, float *da, float *isum16);
typedef int (*quant_matmul_fn)(int type, const uint8_t *w, int64_t N, int64_t K, int64_t row_bytes,
                               const int16_t *a, const float *da, const float *isum16, int64_t rows,
                               float *y, int64_t ldy, int num_threads);
typedef int (*paged_decode_fn)(const void *q, int64_t q_row_stride, const void *k, const void *v, void *out,
                               const int64_t *table, int64_t table_stride, const int64_t *rows,
                               const int64_t *seq_lens, int num_requests, int num_heads, int num_kv_heads,
                               int head_dim, int block_size, int window, float scale, int dtype, int num_threads);

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
    float *k_cache, *v_cache;
    int64_t window; /* sliding window, 0 for none */
    double norm_eps, qk_norm_eps;
    DecodeLinear qkv, o, gate_up, down;
} DecodeLayer;

typedef struct {
    int64_t hidden, num_heads, num_kv_heads, head_dim, intermediate, block_size;
    double scale;
    const float *cos, *sin;
    void *quant_activations, *quant_matmul, *paged_decode;
} DecodeModel;

/* out = w * (x / sqrt(mean(x^2) + eps)), per row of n. */
static void rms_norm(const float *x, const float *w, float *out, int64_t rows, int64_t n, int64_t ld_in,
                     int64_t ld_out, double eps) {
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
 * per segment, as quantized_linear.linear does for batches under DEQUANT_MIN_ROWS. */
static int linear(const DecodeModel *m, const DecodeLinear *l, const float *x, int64_t rows, float *y,
                  Activations *act, int threads) {
    ((quant_activations_fn)m->quant_activations)(x, rows, l->in_features, act->a, act->da, act->isum);
    for (int64_t s = 0; s < l->num_segments; s++) {
        const int status = ((quant_matmul_fn)m->quant_matmul)(
            (int)l->type[s], l->raw[s], l->out_rows[s], l->in_features, l->row_bytes[s], act->a, act->da,
            act->isum, rows, y + l->out_start[s], l->out_features, threads);
        if (status != 0) return status;
    }
    if (l->bias)
        for (int64_t r = 0; r < rows; r++)
            for (int64_t o = 0; o < l->out_features; o++) y[r * l->out_features + o] += l->bias[o];
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

/* Returns 0, -1 when scratch memory could not be had, or a kernel's non-zero status. */
int orcinus_decode_layers(const DecodeModel *m, const DecodeLayer *layers, int64_t num_layers, float *x,
                          int64_t rows, const int64_t *positions, const int64_t *slots, const int64_t *table,
                          int64_t table_stride, const int64_t *seq_lens, const int64_t *query_rows,
                          int num_threads) {
    const int64_t H = m->hidden, D = m->head_dim, I = m->intermediate;
    const int64_t nq = m->num_heads * D, nkv = m->num_kv_heads * D, nqkv = nq + 2 * nkv;
    const int64_t widest = nq > I ? (nq > H ? nq : H) : (I > H ? I : H);
    float *xn = malloc(sizeof(float) * (size_t)(rows * widest));
    float *qkv = malloc(sizeof(float) * (size_t)(rows * nqkv));
    float *att = malloc(sizeof(float) * (size_t)(rows * nq));
    float *y = malloc(sizeof(float) * (size_t)(rows * H));
    float *gu = malloc(sizeof(float) * (size_t)(rows * 2 * I));
    Activations act = {malloc(sizeof(int16_t) * (size_t)(rows * widest)), malloc(sizeof(float) * (size_t)(rows * widest / 32 + 1)),
                       malloc(sizeof(float) * (size_t)(rows * widest / 16 + 1))};
    int status = (xn && qkv && att && y && gu && act.a && act.da && act.isum) ? 0 : -1;
    for (int64_t li = 0; li < num_layers && status == 0; li++) {
        const DecodeLayer *L = &layers[li];
        /* attention */
        rms_norm(x, L->input_norm, xn, rows, H, H, H, L->norm_eps);
        if ((status = linear(m, &L->qkv, xn, rows, qkv, &act, num_threads)) != 0) break;
        for (int64_t r = 0; r < rows; r++) {
            float *q = qkv + r * nqkv, *k = q + nq, *v = k + nkv;
            if (L->q_norm) {
                rms_norm(q, L->q_norm, q, m->num_heads, D, D, D, L->qk_norm_eps);
                rms_norm(k, L->k_norm, k, m->num_kv_heads, D, D, D, L->qk_norm_eps);
            }
            const float *c = m->cos + positions[r] * (D / 2), *s = m->sin + positions[r] * (D / 2);
            rotate(q, m->num_heads, D, c, s);
            rotate(k, m->num_kv_heads, D, c, s);
            memcpy(L->k_cache + slots[r] * nkv, k, sizeof(float) * (size_t)nkv);
            memcpy(L->v_cache + slots[r] * nkv, v, sizeof(float) * (size_t)nkv);
        }
        if ((status = ((paged_decode_fn)m->paged_decode)(
                 qkv, nqkv, L->k_cache, L->v_cache, att, table, table_stride, query_rows, seq_lens, (int)rows,
                 (int)m->num_heads, (int)m->num_kv_heads, (int)D, (int)m->block_size, (int)L->window,
                 (float)m->scale, 0, num_threads)) != 0)
            break;
        if ((status = linear(m, &L->o, att, rows, y, &act, num_threads)) != 0) break;
        for (int64_t i = 0; i < rows * H; i++) x[i] += y[i];
        /* MLP: down(silu(gate) * up) */
        rms_norm(x, L->post_norm, xn, rows, H, H, H, L->norm_eps);
        if ((status = linear(m, &L->gate_up, xn, rows, gu, &act, num_threads)) != 0) break;
        for (int64_t r = 0; r < rows; r++) {
            const float *g = gu + r * 2 * I, *u = g + I;
            float *a = xn + r * I;
            for (int64_t i = 0; i < I; i++) a[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
        }
        if ((status = linear(m, &L->down, xn, rows, y, &act, num_threads)) != 0) break;
        for (int64_t i = 0; i < rows * H; i++) x[i] += y[i];
    }
    free(xn); free(qkv); free(att); free(y); free(gu); free(act.a); free(act.da); free(act.isum);
    return status;
}
