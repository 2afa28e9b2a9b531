/* The prompt-chunk kernel of paged_attention.c (`orcinus_paged_prefill`), included by it after its
 * shared helpers (dtype codes, load_f32, f32_to_bf16, kv_load16): one translation unit,
 * one shared object, built and loaded by attention/native.py. */
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
        for (int d = 0; d < D; d++) qj[d] = load_f32(P->q, P->dtype, at + d) * P->scale;
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
                kt[(int64_t)d * ldk + t] = load_f32(P->k, P->kv_dtype, voff[t] + d);
                vv[t * D + d] = load_f32(P->v, P->kv_dtype, voff[t] + d);
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
