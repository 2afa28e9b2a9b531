/* Paged attention for CPUs, one call per layer: every decoding request of the iteration
 * (`orcinus_paged_decode`, here), and every prompt chunk (`orcinus_paged_prefill`, paged_prefill.h).
 *
 * Decodes. Why a C kernel: per-request SDPA calls from Python cost ~15 small tensor ops each
 * (views, transposes, the call itself) for ~25 us of real work; with 64 requests x 30 layers that
 * overhead was most of attention's time. This loop reads each request's keys and values once, in
 * place in the pool (no gather, no copy), token by token so that all KV heads of a slot are one
 * contiguous read, and keeps GQA's query heads of one KV head together so no key is read twice.
 * Scores are kept per head ([H][t]) so that the softmax runs over contiguous memory (vectorised exp).
 *
 * Compiled at first use by orcinus/attention/native.py (gcc/cc, -O3 -march=native) and called
 * through ctypes; no Python or torch headers, so it builds in about a second. Layouts:
 *   q    [tokens, H, D]          row stride q_row_stride elements, heads contiguous
 *   k, v [blocks, BS, Hkv, D]    the layer's pool, contiguous
 *   out  [tokens, H, D]          contiguous
 * q and out are float32 or bfloat16 (`dtype`); the pool float32, bfloat16 or float16 (`kv_dtype`,
 * converted as it is loaded: a float16 pool halves the bytes a decode reads).
 *   table[requests, table_stride] int64 block ids; rows[r] the request's query row in q/out;
 *   seq_lens[r] its context length including this token.
 * Requests are split over `num_threads` threads by context length: OpenMP's (torch's pool) where
 * the build has it, pthreads otherwise (see native.py).
 */
#include <math.h>
#include <pthread.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "float_formats.h"  /* bf16_to_f32, f32_to_bf16, f16_to_f32 */

enum { DTYPE_F32 = 0, DTYPE_BF16 = 1, DTYPE_F16 = 2 };

typedef struct {
    const void *q, *k, *v;
    void *out;
    const int64_t *table, *rows, *seq_lens;
    int64_t table_stride, q_row_stride;
    int num_heads, num_kv_heads, head_dim, block_size, window, dtype, kv_dtype;
    float scale;
    int begin, end;  /* this job's requests */
    int status;      /* 0 ok, -1 out of memory */
} Job;

/* Element i of an array of `dtype` (queries or the pool), as float32. */
static inline float load_f32(const void *base, int dtype, int64_t i) {
    if (dtype == DTYPE_F32) return ((const float *)base)[i];
    const uint16_t x = ((const uint16_t *)base)[i];
    return dtype == DTYPE_F16 ? f16_to_f32(x) : bf16_to_f32(x);
}

static inline int64_t elem_bytes(int dtype) { return dtype == DTYPE_F32 ? 4 : 2; }

#ifdef __AVX512F__
/* 16 elements of a float32 or float16 pool from element `at`, as float32. */
static inline __m512 kv_load16(const void *pool, int dtype, int64_t at) {
    if (dtype == DTYPE_F16) return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)pool + at)));
    return _mm512_loadu_ps((const float *)pool + at);
}
#endif

/* slots[t - first] = the pool slot of a request's token t, for t in [first, len): walked block by
 * block, so that the loops below index an array instead of dividing by the block size for every
 * token they touch (two 64-bit divisions per token and KV head in the value loop alone). */
static void slots_of(const Job *j, const int64_t *blocks, int64_t first, int64_t len, int64_t *slots) {
    const int64_t bs = j->block_size;
    int64_t b = first / bs, o = first % bs;
    for (int64_t t = first; t < len; t++) {
        slots[t - first] = blocks[b] * bs + o;
        if (++o == bs) { o = 0; b++; }
    }
}

/* One slot's Hkv x D keys or values, as float32. */
static inline const float *slot_f32(const Job *j, const void *pool, int64_t slot, float *tmp) {
    const int64_t n = (int64_t)j->num_kv_heads * j->head_dim;
    if (j->kv_dtype == DTYPE_F32) return (const float *)pool + slot * n;
    for (int64_t i = 0; i < n; i++) tmp[i] = load_f32(pool, j->kv_dtype, slot * n + i);
    return tmp;
}

#ifdef __AVX512F__
/* Lane i of the result = the sum of v[i]'s 16 lanes: a tree of unpacks and 128-bit shuffles
 * (45 operations for 16 sums, against ~8 for each one alone). */
static inline __m512 reduce16(const __m512 v[16]) {
    __m512 p[8], q[4], u[2];
    for (int i = 0; i < 8; i++)  /* per 128-bit lane: v[2i] in elements 0, 2; v[2i + 1] in 1, 3 */
        p[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++) {  /* per 128-bit lane L: the lane-L sums of v[4i .. 4i + 3] */
        const __m512d a = _mm512_castps_pd(p[2 * i]), b = _mm512_castps_pd(p[2 * i + 1]);
        q[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
    }
    for (int i = 0; i < 2; i++)  /* lanes: q[2i] over lanes 0+1, 2+3; q[2i + 1] over 0+1, 2+3 */
        u[i] = _mm512_add_ps(_mm512_shuffle_f32x4(q[2 * i], q[2 * i + 1], 0x88),
                             _mm512_shuffle_f32x4(q[2 * i], q[2 * i + 1], 0xdd));
    return _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], 0x88), _mm512_shuffle_f32x4(u[0], u[1], 0xdd));
}
#endif

static inline __attribute__((always_inline)) void attend_request_impl(const Job *j, int r, float *scores, float *qf, float *acc, float *tmp,
                                                                        int64_t *slots, const int D) {
    const int H = j->num_heads, Hkv = j->num_kv_heads, G = H / Hkv;
    const int64_t len = j->seq_lens[r];
    const int64_t first = (j->window > 0 && len > j->window) ? len - j->window : 0;
    const int64_t n = len - first;
    const int64_t *blocks = j->table + (int64_t)r * j->table_stride;
    const int64_t row = j->rows[r];
    slots_of(j, blocks, first, len, slots);
    for (int i = 0; i < H * D; i++) qf[i] = load_f32(j->q, j->dtype, row * j->q_row_stride + i) * j->scale;
    /* scores[h][t] */
    int64_t t_done = first;
#ifdef __AVX512F__
    if ((j->kv_dtype == DTYPE_F32 || j->kv_dtype == DTYPE_F16) && D % 16 == 0 && D <= 128) {
        /* 16 keys at a time: each dot's 16-lane partial sums stay in a register and one
         * reduction tree (reduce16) turns the 16 of them into 16 scores, instead of one
         * horizontal sum per dot */
        const int64_t slot_bytes = (int64_t)Hkv * D * elem_bytes(j->kv_dtype);
        for (; t_done + 16 <= len; t_done += 16) {
            int64_t keys[16];  /* element offsets of the 16 slots */
            for (int i = 0; i < 16; i++) keys[i] = slots[t_done + i - first] * (int64_t)Hkv * D;
            /* The next 16 keys (and, first, the values) lie in other blocks of the pool, anywhere:
             * no hardware prefetcher guesses the jump, so ask for them while these are multiplied
             * (a float16 pool over 30 layers 1.19-1.28 -> 0.93 ms a layer on one EPYC core; float32
             * unchanged within noise). */
            for (int64_t t = t_done + 16; t < t_done + 32 && t < len; t++) {
                const char *at = (const char *)j->k + slots[t - first] * slot_bytes;
                for (int64_t b = 0; b < slot_bytes; b += 64) __builtin_prefetch(at + b);
            }
            if (t_done == first) for (int64_t t = first; t < first + 16 && t < len; t++) {
                const char *at = (const char *)j->v + slots[t - first] * slot_bytes;
                for (int64_t b = 0; b < slot_bytes; b += 64) __builtin_prefetch(at + b);
            }
            for (int kh = 0; kh < Hkv; kh++)
                for (int g = 0; g < G; g++) {
                    const int h = kh * G + g;
                    __m512 qv[8], acc[16];
                    for (int c = 0; c < D / 16; c++) qv[c] = _mm512_loadu_ps(qf + h * D + 16 * c);
                    for (int i = 0; i < 16; i++) {
                        const int64_t kv = keys[i] + kh * D;
                        __m512 a = _mm512_mul_ps(qv[0], kv_load16(j->k, j->kv_dtype, kv));
                        for (int c = 1; c < D / 16; c++)
                            a = _mm512_fmadd_ps(qv[c], kv_load16(j->k, j->kv_dtype, kv + 16 * c), a);
                        acc[i] = a;
                    }
                    _mm512_storeu_ps(scores + h * n + (t_done - first), reduce16(acc));
                }
        }
    }
#endif
    for (int64_t t = t_done; t < len; t++) {
        const float *key = slot_f32(j, j->k, slots[t - first], tmp);
        for (int kh = 0; kh < Hkv; kh++) {
            const float *kv = key + kh * D;
            for (int g = 0; g < G; g++) {
                const int h = kh * G + g;
                const float *qh = qf + h * D;
                float dot = 0.f;
#pragma omp simd reduction(+ : dot)
                for (int d = 0; d < D; d++) dot += qh[d] * kv[d];
                scores[h * n + (t - first)] = dot;
            }
        }
    }
    float sums[H];
    for (int h = 0; h < H; h++) {
        float *s = scores + h * n, m = -INFINITY, sum = 0.f;
#pragma omp simd reduction(max : m)
        for (int64_t t = 0; t < n; t++) m = s[t] > m ? s[t] : m;
#pragma omp simd reduction(+ : sum)
        for (int64_t t = 0; t < n; t++) { s[t] = expf(s[t] - m); sum += s[t]; }
        sums[h] = sum;
    }
    memset(acc, 0, sizeof(float) * (size_t)H * D);
#ifdef __AVX512F__
    if ((j->kv_dtype == DTYPE_F32 || j->kv_dtype == DTYPE_F16) && D == 64) {
        /* Per KV head, up to 3 of its query heads at a time with their 3 x 64 sums in 12 registers
         * (the loop below keeps them in memory: a load and a store per multiply-add). */
        for (int kh = 0; kh < Hkv; kh++)
            for (int g0 = 0; g0 < G; g0 += 3) {
                const int gn = G - g0 < 3 ? G - g0 : 3;
                const float *w0 = scores + (kh * G + g0) * n;
                const float *w1 = gn > 1 ? w0 + n : w0, *w2 = gn > 2 ? w0 + 2 * n : w0;
                __m512 a[3][4];
                for (int g = 0; g < 3; g++)
                    for (int c = 0; c < 4; c++) a[g][c] = _mm512_setzero_ps();
                for (int64_t t = first; t < len; t++) {
                    const int64_t vh = slots[t - first] * (int64_t)Hkv * D + kh * D;
                    if (t + 8 < len) {
                        const int64_t esize = elem_bytes(j->kv_dtype);
                        const char *ahead = (const char *)j->v + (slots[t + 8 - first] * (int64_t)Hkv * D + kh * D) * esize;
                        for (int64_t b = 0; b < D * esize; b += 64) __builtin_prefetch(ahead + b);
                    }
                    const __m512 v0 = kv_load16(j->v, j->kv_dtype, vh), v1 = kv_load16(j->v, j->kv_dtype, vh + 16);
                    const __m512 v2 = kv_load16(j->v, j->kv_dtype, vh + 32), v3 = kv_load16(j->v, j->kv_dtype, vh + 48);
                    const __m512 x[3] = {_mm512_set1_ps(w0[t - first]), _mm512_set1_ps(w1[t - first]),
                                         _mm512_set1_ps(w2[t - first])};
                    for (int g = 0; g < 3; g++) {
                        a[g][0] = _mm512_fmadd_ps(x[g], v0, a[g][0]); a[g][1] = _mm512_fmadd_ps(x[g], v1, a[g][1]);
                        a[g][2] = _mm512_fmadd_ps(x[g], v2, a[g][2]); a[g][3] = _mm512_fmadd_ps(x[g], v3, a[g][3]);
                    }
                }
                for (int g = 0; g < gn; g++)
                    for (int c = 0; c < 4; c++) _mm512_storeu_ps(acc + (kh * G + g0 + g) * D + 16 * c, a[g][c]);
            }
        goto normalise;
    }
#endif
    for (int64_t t = first; t < len; t++) {
        const float *val = slot_f32(j, j->v, slots[t - first], tmp);
        for (int kh = 0; kh < Hkv; kh++) {
            const float *vh = val + kh * D;
            for (int g = 0; g < G; g++) {
                const int h = kh * G + g;
                const float w = scores[h * n + (t - first)];
                float *a = acc + h * D;
#pragma omp simd
                for (int d = 0; d < D; d++) a[d] += w * vh[d];
            }
        }
    }
#ifdef __AVX512F__
normalise:
#endif
    for (int h = 0; h < H; h++) {
        const float inv = 1.f / sums[h];
        for (int d = 0; d < D; d++) {
            const float o = acc[h * D + d] * inv;
            const int64_t at = row * (int64_t)H * D + h * D + d;
            if (j->dtype == DTYPE_F32) ((float *)j->out)[at] = o;
            else ((uint16_t *)j->out)[at] = f32_to_bf16(o);
        }
    }
}


/* The common head sizes as compile-time constants: the compiler then unrolls the dot products and
 * keeps whole rows in registers (23 % faster at D = 64 than with D known only at run time). */
static void attend_request_d64(const Job *j, int r, float *s, float *q, float *a, float *t, int64_t *sl) { attend_request_impl(j, r, s, q, a, t, sl, 64); }
static void attend_request_d128(const Job *j, int r, float *s, float *q, float *a, float *t, int64_t *sl) { attend_request_impl(j, r, s, q, a, t, sl, 128); }
static void attend_request_any(const Job *j, int r, float *s, float *q, float *a, float *t, int64_t *sl) { attend_request_impl(j, r, s, q, a, t, sl, j->head_dim); }

static void *run_job(void *arg) {
    Job *j = (Job *)arg;
    int64_t longest = 1;
    for (int r = j->begin; r < j->end; r++) if (j->seq_lens[r] > longest) longest = j->seq_lens[r];
    const int64_t hd = (int64_t)j->num_heads * j->head_dim;
    float *buf = malloc(sizeof(float) * (size_t)(longest * j->num_heads + 2 * hd + (int64_t)j->num_kv_heads * j->head_dim));
    int64_t *slots = malloc(sizeof(int64_t) * (size_t)longest);
    if (!buf || !slots) { free(buf); free(slots); j->status = -1; return NULL; }
    float *scores = buf, *qf = buf + longest * j->num_heads, *acc = qf + hd, *tmp = acc + hd;
    void (*attend)(const Job *, int, float *, float *, float *, float *, int64_t *) =
        j->head_dim == 64 ? attend_request_d64 : j->head_dim == 128 ? attend_request_d128 : attend_request_any;
    for (int r = j->begin; r < j->end; r++) attend(j, r, scores, qf, acc, tmp, slots);
    free(buf);
    free(slots);
    j->status = 0;
    return NULL;
}

/* Returns 0 on success, -1 when a scratch buffer could not be allocated. */
int orcinus_paged_decode(const void *q, int64_t q_row_stride, const void *k, const void *v, void *out,
                         const int64_t *table, int64_t table_stride, const int64_t *rows,
                         const int64_t *seq_lens, int num_requests, int num_heads, int num_kv_heads,
                         int head_dim, int block_size, int window, float scale, int dtype, int kv_dtype,
                         int num_threads) {
    if (num_requests <= 0) return 0;
    if (num_threads < 1) num_threads = 1;
    if (num_threads > num_requests) num_threads = num_requests;
    if (num_threads > 64) num_threads = 64;
    Job jobs[64];
    int64_t total = 0;
    for (int r = 0; r < num_requests; r++) total += seq_lens[r];
    /* contiguous ranges of requests with about equal context each */
    int begin = 0;
    int64_t seen = 0;
    for (int i = 0; i < num_threads; i++) {
        int end = begin;
        const int64_t target = total * (i + 1) / num_threads;
        while (end < num_requests && (seen < target || end == begin)) seen += seq_lens[end++];
        if (i == num_threads - 1) end = num_requests;
        jobs[i] = (Job){q, k, v, out, table, rows, seq_lens, table_stride, q_row_stride, num_heads,
                        num_kv_heads, head_dim, block_size, window, dtype, kv_dtype, scale, begin, end, 0};
        begin = end;
    }
#ifdef _OPENMP
    /* On the OpenMP pool that torch's own kernels use (the process has one libgomp: ours resolves
     * to the copy torch loaded), so its threads are awake and no second set of threads competes
     * with them for the cores. */
#pragma omp parallel for num_threads(num_threads) schedule(static, 1)
    for (int i = 0; i < num_threads; i++) run_job(&jobs[i]);
    int status = 0;
    for (int i = 0; i < num_threads; i++) if (jobs[i].status) status = jobs[i].status;
#else
    pthread_t threads[64];
    int started[64] = {0};
    for (int i = 1; i < num_threads; i++)
        started[i] = jobs[i].begin < jobs[i].end && pthread_create(&threads[i], NULL, run_job, &jobs[i]) == 0;
    run_job(&jobs[0]);
    int status = jobs[0].status;
    for (int i = 1; i < num_threads; i++) {
        if (started[i]) pthread_join(threads[i], NULL);
        else if (jobs[i].begin < jobs[i].end) run_job(&jobs[i]); /* could not start a thread: do it here */
        if (jobs[i].status) status = jobs[i].status;
    }
#endif
    return status;
}

#include "paged_prefill.h"  /* prompt chunks: orcinus_paged_prefill */

/* 1 when this build runs its threads on OpenMP, 0 when on pthreads of its own. */
int orcinus_native_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}
