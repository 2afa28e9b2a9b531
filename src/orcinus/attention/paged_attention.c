/* Paged attention for CPUs, one call per layer: every decoding request of the iteration
 * (`orcinus_paged_decode`), and every prompt chunk (`orcinus_paged_prefill`, further below).
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
 * converted as it is loaded: a float16 pool halves the bytes a decode reads, which bound it).
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

static inline float bf16_to_f32(uint16_t x) {
    uint32_t bits = (uint32_t)x << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40u); /* NaN stays NaN */
    bits += 0x7fffu + ((bits >> 16) & 1u); /* round to nearest even, as torch does */
    return (uint16_t)(bits >> 16);
}

/* IEEE half to float, exactly (normal, subnormal, zero, infinity, NaN). */
static inline float f16_to_f32(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
    uint32_t bits;
    if (exp == 0x1f) bits = sign | 0x7f800000u | (man << 13);
    else if (exp != 0) bits = sign | ((exp + 112u) << 23) | (man << 13);
    else if (man == 0) bits = sign;
    else {  /* subnormal: normalise */
        int e = -1;
        uint32_t m = man;
        do { e++; m <<= 1; } while (!(m & 0x400u));
        bits = sign | ((uint32_t)(112 - e) << 23) | ((m & 0x3ffu) << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* Element i of a pool of `dtype`, as float32. */
static inline float kv_at(const void *pool, int dtype, int64_t i) {
    if (dtype == DTYPE_F32) return ((const float *)pool)[i];
    const uint16_t x = ((const uint16_t *)pool)[i];
    return dtype == DTYPE_F16 ? f16_to_f32(x) : bf16_to_f32(x);
}

#ifdef __AVX512F__
/* 16 elements of a float32 or float16 pool from element `at`, as float32. */
static inline __m512 kv_load16(const void *pool, int dtype, int64_t at) {
    if (dtype == DTYPE_F16) return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)pool + at)));
    return _mm512_loadu_ps((const float *)pool + at);
}
#endif

/* The pool slot of a request's token t. */
static inline int64_t slot_of(const Job *j, const int64_t *blocks, int64_t t) {
    return blocks[t / j->block_size] * j->block_size + t % j->block_size;
}

/* One slot's Hkv x D keys or values, as float32. */
static inline const float *slot_f32(const Job *j, const void *pool, int64_t slot, float *tmp) {
    const int64_t n = (int64_t)j->num_kv_heads * j->head_dim;
    if (j->kv_dtype == DTYPE_F32) return (const float *)pool + slot * n;
    for (int64_t i = 0; i < n; i++) tmp[i] = kv_at(pool, j->kv_dtype, slot * n + i);
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

static inline __attribute__((always_inline)) void attend_request_impl(const Job *j, int r, float *scores, float *qf, float *acc, float *tmp, const int D) {
    const int H = j->num_heads, Hkv = j->num_kv_heads, G = H / Hkv;
    const int64_t len = j->seq_lens[r];
    const int64_t first = (j->window > 0 && len > j->window) ? len - j->window : 0;
    const int64_t n = len - first;
    const int64_t *blocks = j->table + (int64_t)r * j->table_stride;
    const int64_t row = j->rows[r];
    for (int i = 0; i < H * D; i++) {
        float x = j->dtype == DTYPE_F32 ? ((const float *)j->q)[row * j->q_row_stride + i]
                                        : bf16_to_f32(((const uint16_t *)j->q)[row * j->q_row_stride + i]);
        qf[i] = x * j->scale;
    }
    /* scores[h][t] */
    int64_t t_done = first;
#ifdef __AVX512F__
    if ((j->kv_dtype == DTYPE_F32 || j->kv_dtype == DTYPE_F16) && D % 16 == 0 && D <= 128) {
        /* 16 keys at a time: each dot's 16-lane partial sums stay in a register and one
         * reduction tree (reduce16) turns the 16 of them into 16 scores, instead of one
         * horizontal sum per dot */
        const int64_t esize = j->kv_dtype == DTYPE_F16 ? 2 : 4, slot_bytes = (int64_t)Hkv * D * esize;
        for (; t_done + 16 <= len; t_done += 16) {
            int64_t keys[16];  /* element offsets of the 16 slots */
            for (int i = 0; i < 16; i++) keys[i] = slot_of(j, blocks, t_done + i) * (int64_t)Hkv * D;
            /* The next 16 keys (and, first, the values) lie in other blocks of the pool, anywhere:
             * no hardware prefetcher guesses the jump, so ask for them while these are multiplied
             * (a float16 pool over 30 layers 1.19-1.28 -> 0.93 ms a layer on one EPYC core; float32
             * unchanged within noise). */
            for (int64_t t = t_done + 16; t < t_done + 32 && t < len; t++) {
                const char *at = (const char *)j->k + slot_of(j, blocks, t) * slot_bytes;
                for (int64_t b = 0; b < slot_bytes; b += 64) __builtin_prefetch(at + b);
            }
            if (t_done == first) for (int64_t t = first; t < first + 16 && t < len; t++) {
                const char *at = (const char *)j->v + slot_of(j, blocks, t) * slot_bytes;
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
        const float *key = slot_f32(j, j->k, slot_of(j, blocks, t), tmp);
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
                    const int64_t vh = slot_of(j, blocks, t) * (int64_t)Hkv * D + kh * D;
                    if (t + 8 < len) {
                        const char *ahead = (const char *)j->v + (slot_of(j, blocks, t + 8) * (int64_t)Hkv * D + kh * D)
                                            * (j->kv_dtype == DTYPE_F16 ? 2 : 4);
                        for (int b = 0; b < D * (j->kv_dtype == DTYPE_F16 ? 2 : 4); b += 64) __builtin_prefetch(ahead + b);
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
        const float *val = slot_f32(j, j->v, slot_of(j, blocks, t), tmp);
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
static void attend_request_d64(const Job *j, int r, float *s, float *q, float *a, float *t) { attend_request_impl(j, r, s, q, a, t, 64); }
static void attend_request_d128(const Job *j, int r, float *s, float *q, float *a, float *t) { attend_request_impl(j, r, s, q, a, t, 128); }
static void attend_request_any(const Job *j, int r, float *s, float *q, float *a, float *t) { attend_request_impl(j, r, s, q, a, t, j->head_dim); }

static void *run_job(void *arg) {
    Job *j = (Job *)arg;
    int64_t longest = 1;
    for (int r = j->begin; r < j->end; r++) if (j->seq_lens[r] > longest) longest = j->seq_lens[r];
    const int64_t hd = (int64_t)j->num_heads * j->head_dim;
    float *buf = malloc(sizeof(float) * (size_t)(longest * j->num_heads + 2 * hd + (int64_t)j->num_kv_heads * j->head_dim));
    if (!buf) { j->status = -1; return NULL; }
    float *scores = buf, *qf = buf + longest * j->num_heads, *acc = qf + hd, *tmp = acc + hd;
    void (*attend)(const Job *, int, float *, float *, float *, float *) =
        j->head_dim == 64 ? attend_request_d64 : j->head_dim == 128 ? attend_request_d128 : attend_request_any;
    for (int r = j->begin; r < j->end; r++) attend(j, r, scores, qf, acc, tmp);
    free(buf);
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

/* ------------------------------------------------------------------------------------------------
 * Prompt chunks: `orcinus_paged_prefill`.
 *
 * Why: SDPA per request (PyTorch's flash kernel, blocks of 32-64 queries x 512 keys) spent most of
 * its time on overhead for the short prompts of a serving batch: ~15 % of a prompt-heavy iteration on
 * two EPYC cores, ~30 GFLOP/s. Here one call covers every chunk of the layer. The work is split into
 * items of (request, KV head, up to QB query rows), handed out dynamically (causal items differ in
 * cost, and a thread that the OS takes away mid-call leaves its share to the others). An item
 * copies its keys once, transposed ([D][n], float32), and its values ([n][D]); then, SB rows at a
 * time, treats their SB x G query vectors (GQA's heads of that KV head) as a small matrix product:
 * 4 vectors x 32 keys of scores per inner step, 4 vectors x 64 dimensions of output, so that the
 * compiler keeps the sums in vector registers. Causality and sliding windows are per query row:
 * steps wholly outside a row's keys are skipped, the rest weighted zero.
 *   query_starts[r], query_lens[r]: the chunk's rows in q/out; seq_lens[r]: context length after
 *   the chunk (the chunk's own keys are already in the pool); row i sees keys up to seq - qlen + i.
 */
enum { QB = 128, SB = 16, QV = 4, KT = 32, DT = 64 };

typedef struct {
    const void *q, *k, *v;
    void *out;
    const int64_t *table, *query_starts, *query_lens, *seq_lens;
    int64_t table_stride, q_row_stride;
    int num_heads, num_kv_heads, head_dim, block_size, window, dtype, kv_dtype;
    float scale;
    int64_t longest;  /* the most keys one item reads */
} Prefill;

/* One item's state: its keys [lo, lo + n) copied to kt [D][ldk] and vv [n][D]. */
typedef struct {
    const Prefill *P;
    int kh;
    int64_t row0, base, lo, ldk;  /* row0: the request's first row in q/out; base: keys before the chunk */
    float *kt, *qs, *s;           /* qs [SB * G rounded up to QV][D], s [same][ldk] */
    const float *vbase;           /* value t at vbase + voff[t]: in the pool (float32) or a copy */
    const int64_t *voff;
} Item;

static inline float load_f(const void *base, int dtype, int64_t i) {
    return dtype == DTYPE_F32 ? ((const float *)base)[i] : bf16_to_f32(((const uint16_t *)base)[i]);
}

/* The first key that query position p sees. */
static inline int64_t first_key(const Prefill *P, int64_t p) {
    return (P->window > 0 && p + 1 > P->window) ? p + 1 - P->window : 0;
}

static inline int padded_vectors(int n) { return (n + QV - 1) / QV * QV; }

/* Rows [i0, i1) of the chunk (at most SB): query vectors j = (i - i0) * G + g. */
static void prefill_rows(const Item *it, int64_t i0, int64_t i1) {
    const Prefill *P = it->P;
    const int G = P->num_heads / P->num_kv_heads, D = P->head_dim;
    const int64_t ldk = it->ldk, base = it->base, lo = it->lo;
    const int nv = (int)(i1 - i0) * G, nvp = padded_vectors(nv);
    float *qs = it->qs, *s = it->s;
    for (int j = 0; j < nvp; j++) {
        float *qj = qs + (int64_t)j * D;
        if (j >= nv) { memset(qj, 0, sizeof(float) * (size_t)D); continue; }
        const int64_t at = (it->row0 + i0 + j / G) * P->q_row_stride + (int64_t)(it->kh * G + j % G) * D;
        for (int d = 0; d < D; d++) qj[d] = load_f(P->q, P->dtype, at + d) * P->scale;
    }
    /* scores s[j][t] = q_j . k_t, QV vectors x KT keys per step; steps after the last key that
     * their vectors see are skipped */
    for (int j = 0; j < nvp; j += QV) {
        const int jl = j + QV - 1 < nv ? j + QV - 1 : nv - 1;
        const int64_t last = base + i0 + jl / G - lo;
        const float *q0 = qs + (int64_t)j * D, *q1 = q0 + D, *q2 = q1 + D, *q3 = q2 + D;
        float *s0 = s + (int64_t)j * ldk, *s1 = s0 + ldk, *s2 = s1 + ldk, *s3 = s2 + ldk;
        for (int64_t t0 = 0; t0 <= last; t0 += KT) {
#ifdef __AVX512F__
            /* the same sums as below, held in 8 registers (gcc spilled the arrays to the stack) */
            __m512 a0l = _mm512_setzero_ps(), a0h = a0l, a1l = a0l, a1h = a0l, a2l = a0l, a2h = a0l, a3l = a0l, a3h = a0l;
            for (int d = 0; d < D; d++) {
                const float *kd = it->kt + (int64_t)d * ldk + t0;
                const __m512 kl = _mm512_loadu_ps(kd), kh = _mm512_loadu_ps(kd + 16);
                __m512 x = _mm512_set1_ps(q0[d]);
                a0l = _mm512_fmadd_ps(x, kl, a0l); a0h = _mm512_fmadd_ps(x, kh, a0h);
                x = _mm512_set1_ps(q1[d]);
                a1l = _mm512_fmadd_ps(x, kl, a1l); a1h = _mm512_fmadd_ps(x, kh, a1h);
                x = _mm512_set1_ps(q2[d]);
                a2l = _mm512_fmadd_ps(x, kl, a2l); a2h = _mm512_fmadd_ps(x, kh, a2h);
                x = _mm512_set1_ps(q3[d]);
                a3l = _mm512_fmadd_ps(x, kl, a3l); a3h = _mm512_fmadd_ps(x, kh, a3h);
            }
            _mm512_storeu_ps(s0 + t0, a0l); _mm512_storeu_ps(s0 + t0 + 16, a0h);
            _mm512_storeu_ps(s1 + t0, a1l); _mm512_storeu_ps(s1 + t0 + 16, a1h);
            _mm512_storeu_ps(s2 + t0, a2l); _mm512_storeu_ps(s2 + t0 + 16, a2h);
            _mm512_storeu_ps(s3 + t0, a3l); _mm512_storeu_ps(s3 + t0 + 16, a3h);
#else
            float a0[KT] = {0}, a1[KT] = {0}, a2[KT] = {0}, a3[KT] = {0};
            for (int d = 0; d < D; d++) {
                const float *kd = it->kt + (int64_t)d * ldk + t0;
                const float x0 = q0[d], x1 = q1[d], x2 = q2[d], x3 = q3[d];
#pragma omp simd
                for (int tt = 0; tt < KT; tt++) {
                    a0[tt] += x0 * kd[tt]; a1[tt] += x1 * kd[tt]; a2[tt] += x2 * kd[tt]; a3[tt] += x3 * kd[tt];
                }
            }
            memcpy(s0 + t0, a0, sizeof a0); memcpy(s1 + t0, a1, sizeof a1);
            memcpy(s2 + t0, a2, sizeof a2); memcpy(s3 + t0, a3, sizeof a3);
#endif
        }
    }
    /* softmax of each vector over its keys [a, b); zero from b on (the output step reads up to its
     * group's last key) */
    for (int j = 0; j < nv; j++) {
        const int64_t p = base + i0 + j / G;
        const int64_t a = first_key(P, p) - lo, b = p - lo + 1;
        float *sj = s + (int64_t)j * ldk, m = -INFINITY, sum = 0.f;
#pragma omp simd reduction(max : m)
        for (int64_t t = a; t < b; t++) m = sj[t] > m ? sj[t] : m;
#pragma omp simd reduction(+ : sum)
        for (int64_t t = a; t < b; t++) { sj[t] = expf(sj[t] - m); sum += sj[t]; }
        const float inv = 1.f / sum;
#pragma omp simd
        for (int64_t t = a; t < b; t++) sj[t] *= inv;
        for (int64_t t = 0; t < a; t++) sj[t] = 0.f;
        const int64_t end = (b + QV + KT < ldk) ? b + QV + KT : ldk;
        for (int64_t t = b; t < end; t++) sj[t] = 0.f;
    }
    /* out_j = sum_t s[j][t] v_t, QV vectors x DT dimensions per step; a step's missing vectors
     * repeat its first one (computed, not stored) */
    for (int j = 0; j < nv; j += QV) {
        const int jn = nv - j < QV ? nv - j : QV;
        const int64_t b = base + i0 + (j + jn - 1) / G - lo + 1;
        const float *w0 = s + (int64_t)j * ldk;
        const float *w1 = jn > 1 ? w0 + ldk : w0, *w2 = jn > 2 ? w0 + 2 * ldk : w0, *w3 = jn > 3 ? w0 + 3 * ldk : w0;
        for (int d0 = 0; d0 < D; d0 += DT) {
            float a0[DT] = {0}, a1[DT] = {0}, a2[DT] = {0}, a3[DT] = {0};
            const int dn = D - d0 < DT ? D - d0 : DT;
            if (dn == DT) {
#ifdef __AVX512F__
                /* 16 sums in registers: 4 vectors x 64 dimensions */
                __m512 acc[QV][4];
                for (int jj = 0; jj < QV; jj++)
                    for (int c = 0; c < 4; c++) acc[jj][c] = _mm512_setzero_ps();
                for (int64_t t = 0; t < b; t++) {
                    const float *vt = it->vbase + it->voff[t] + d0;
                    const __m512 v0 = _mm512_loadu_ps(vt), v1 = _mm512_loadu_ps(vt + 16);
                    const __m512 v2 = _mm512_loadu_ps(vt + 32), v3 = _mm512_loadu_ps(vt + 48);
                    const float *w[QV] = {w0, w1, w2, w3};
                    for (int jj = 0; jj < QV; jj++) {
                        const __m512 x = _mm512_set1_ps(w[jj][t]);
                        acc[jj][0] = _mm512_fmadd_ps(x, v0, acc[jj][0]); acc[jj][1] = _mm512_fmadd_ps(x, v1, acc[jj][1]);
                        acc[jj][2] = _mm512_fmadd_ps(x, v2, acc[jj][2]); acc[jj][3] = _mm512_fmadd_ps(x, v3, acc[jj][3]);
                    }
                }
                for (int jj = 0; jj < QV; jj++) {
                    float *a = jj == 0 ? a0 : jj == 1 ? a1 : jj == 2 ? a2 : a3;
                    for (int c = 0; c < 4; c++) _mm512_storeu_ps(a + 16 * c, acc[jj][c]);
                }
#else
                for (int64_t t = 0; t < b; t++) {
                    const float *vt = it->vbase + it->voff[t] + d0;
                    const float x0 = w0[t], x1 = w1[t], x2 = w2[t], x3 = w3[t];
#pragma omp simd
                    for (int dd = 0; dd < DT; dd++) {
                        a0[dd] += x0 * vt[dd]; a1[dd] += x1 * vt[dd]; a2[dd] += x2 * vt[dd]; a3[dd] += x3 * vt[dd];
                    }
                }
#endif
            } else {
                for (int64_t t = 0; t < b; t++) {
                    const float *vt = it->vbase + it->voff[t] + d0;
                    for (int dd = 0; dd < dn; dd++) {
                        a0[dd] += w0[t] * vt[dd]; a1[dd] += w1[t] * vt[dd];
                        a2[dd] += w2[t] * vt[dd]; a3[dd] += w3[t] * vt[dd];
                    }
                }
            }
            const float *acc[QV] = {a0, a1, a2, a3};
            for (int jj = 0; jj < jn; jj++) {
                const int jv = j + jj;
                const int64_t at = (it->row0 + i0 + jv / G) * (int64_t)P->num_heads * D
                                   + (int64_t)(it->kh * G + jv % G) * D + d0;
                for (int dd = 0; dd < dn; dd++) {
                    if (P->dtype == DTYPE_F32) ((float *)P->out)[at + dd] = acc[jj][dd];
                    else ((uint16_t *)P->out)[at + dd] = f32_to_bf16(acc[jj][dd]);
                }
            }
        }
    }
}

static int64_t item_ldk(const Prefill *P) { return (P->longest + KT - 1) / KT * KT; }

static size_t prefill_scratch_floats(const Prefill *P) {
    const int64_t ldk = item_ldk(P), nvp = padded_vectors(SB * (P->num_heads / P->num_kv_heads));
    /* kt, a bfloat16 pool's values as float32, qs, s, then voff (int64: two floats each) */
    return (size_t)(2 * ldk * P->head_dim + nvp * P->head_dim + nvp * ldk + 2 * ldk);
}

/* Item `spec` = {request * Hkv + KV head, first row, end row}: its keys transposed into kt, its
 * values located (read in place from a float32 pool, converted from bfloat16 or float16), then its rows SB
 * at a time. */
static void run_prefill_item(const Prefill *P, const int64_t *spec, float *buf) {
    const int r = (int)(spec[0] / P->num_kv_heads), kh = (int)(spec[0] % P->num_kv_heads), D = P->head_dim;
    const int64_t i0 = spec[1], i1 = spec[2], base = P->seq_lens[r] - P->query_lens[r];
    const int64_t lo = first_key(P, base + i0), n = base + i1 - lo, ldk = item_ldk(P);
    const int64_t nvp = padded_vectors(SB * (P->num_heads / P->num_kv_heads));
    float *kt = buf, *vv = buf + ldk * D, *qs = vv + ldk * D, *s = qs + nvp * D;
    int64_t *voff = (int64_t *)(s + nvp * ldk);
    const int64_t *blocks = P->table + (int64_t)r * P->table_stride;
    const int64_t slot_elems = (int64_t)P->num_kv_heads * D;
    for (int64_t t = 0; t < n; t++) {
        const int64_t pos = lo + t;
        voff[t] = (blocks[pos / P->block_size] * P->block_size + pos % P->block_size) * slot_elems + (int64_t)kh * D;
    }
    Item it = {P, kh, P->query_starts[r], base, lo, ldk, kt, qs, s, NULL, voff};
    if (P->kv_dtype == DTYPE_F32) {
        const float *k = (const float *)P->k;
        for (int d = 0; d < D; d++) {
            float *row = kt + (int64_t)d * ldk;
            for (int64_t t = 0; t < n; t++) row[t] = k[voff[t] + d];
        }
        it.vbase = (const float *)P->v;
    } else {
        for (int64_t t = 0; t < n; t++) {
            for (int d = 0; d < D; d++) {
                kt[(int64_t)d * ldk + t] = kv_at(P->k, P->kv_dtype, voff[t] + d);
                vv[t * D + d] = kv_at(P->v, P->kv_dtype, voff[t] + d);
            }
            voff[t] = t * D;
        }
        it.vbase = vv;
    }
    const int64_t tail = (n + KT - 1) / KT * KT;  /* the last score step reads up to here */
    for (int d = 0; d < D; d++)
        for (int64_t t = n; t < tail; t++) kt[(int64_t)d * ldk + t] = 0.f;
    for (int64_t a = i0; a < i1; a += SB) prefill_rows(&it, a, a + SB < i1 ? a + SB : i1);
}

typedef struct {
    const Prefill *P;
    const int64_t *items;
    int64_t begin, end, stride;  /* this thread's items: begin, begin + stride, ... (pthreads build) */
    int status;
} PrefillJob;

static void *run_prefill_job(void *arg) {
    PrefillJob *j = (PrefillJob *)arg;
    float *buf = malloc(sizeof(float) * prefill_scratch_floats(j->P));
    if (!buf) { j->status = -1; return NULL; }
    for (int64_t i = j->begin; i < j->end; i += j->stride) run_prefill_item(j->P, j->items + 3 * i, buf);
    free(buf);
    j->status = 0;
    return NULL;
}

/* Returns 0 on success, -1 when scratch memory could not be had. */
int orcinus_paged_prefill(const void *q, int64_t q_row_stride, const void *k, const void *v, void *out,
                          const int64_t *table, int64_t table_stride, const int64_t *query_starts,
                          const int64_t *query_lens, const int64_t *seq_lens, int num_requests, int num_heads,
                          int num_kv_heads, int head_dim, int block_size, int window, float scale, int dtype,
                          int kv_dtype, int num_threads) {
    if (num_requests <= 0) return 0;
    Prefill P = {q, k, v, out, table, query_starts, query_lens, seq_lens, table_stride, q_row_stride, num_heads,
                 num_kv_heads, head_dim, block_size, window, dtype, kv_dtype, scale, 1};
    int64_t count = 0;
    for (int r = 0; r < num_requests; r++) {
        const int64_t base = seq_lens[r] - query_lens[r];
        for (int64_t i0 = 0; i0 < query_lens[r]; i0 += QB, count++) {
            const int64_t i1 = i0 + QB < query_lens[r] ? i0 + QB : query_lens[r];
            const int64_t n = base + i1 - first_key(&P, base + i0);
            if (n > P.longest) P.longest = n;
        }
    }
    count *= num_kv_heads;
    int64_t *items = malloc(sizeof(int64_t) * 3 * (size_t)count);
    if (!items) return -1;
    int64_t n = 0;
    for (int r = 0; r < num_requests; r++)
        for (int64_t i0 = 0; i0 < query_lens[r]; i0 += QB)
            for (int kh = 0; kh < num_kv_heads; kh++, n++) {
                items[3 * n] = (int64_t)r * num_kv_heads + kh;
                items[3 * n + 1] = i0;
                items[3 * n + 2] = i0 + QB < query_lens[r] ? i0 + QB : query_lens[r];
            }
    if (num_threads < 1) num_threads = 1;
    if (num_threads > count) num_threads = (int)count;
    if (num_threads > 64) num_threads = 64;
    int status = 0;
#ifdef _OPENMP
#pragma omp parallel num_threads(num_threads)
    {
        float *buf = malloc(sizeof(float) * prefill_scratch_floats(&P));
        if (!buf) {
#pragma omp atomic write
            status = -1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t i = 0; i < count; i++)
            if (buf) run_prefill_item(&P, items + 3 * i, buf);
        free(buf);
    }
#else
    PrefillJob jobs[64];
    pthread_t threads[64];
    int started[64] = {0};
    for (int i = 0; i < num_threads; i++) jobs[i] = (PrefillJob){&P, items, i, count, num_threads, 0};
    for (int i = 1; i < num_threads; i++) started[i] = pthread_create(&threads[i], NULL, run_prefill_job, &jobs[i]) == 0;
    run_prefill_job(&jobs[0]);
    status = jobs[0].status;
    for (int i = 1; i < num_threads; i++) {
        if (started[i]) pthread_join(threads[i], NULL);
        else run_prefill_job(&jobs[i]);
        if (jobs[i].status) status = jobs[i].status;
    }
#endif
    free(items);
    return status;
}

/* 1 when this build runs its threads on OpenMP, 0 when on pthreads of its own. */
int orcinus_native_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}
