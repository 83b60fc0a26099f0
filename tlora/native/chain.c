/* Fused CPU kernels for the factored TRM chain (tlora.functional.trm._Chain, D >= 3 cores).

   The Python engine runs one BLAS call per stage over blocks of ~200 tokens: each stage's
   R^2-expanded intermediate (R^2 I floats per token) then lives in L3 or memory, and small-K
   GEMMs on such data run at a third of the machine's peak. Here every stage runs on a tile
   of a few tokens at a time, so the whole chain (forward, or backward with its recomputed
   intermediates and core-gradient reductions) stays in L1/L2.

   Layout: the same as _Chain's (stage matrices `ops` built by _Chain.operands_detached,
   their transposes `ops_t`, gradients accumulated in `ops` layout). A tile holds its tokens
   in the fastest axis (Lt tokens, Lt a multiple of 8), as in _Chain's token-inner blocks.
   Inputs and outputs are addressed as x[t * ts + i * cs] (rows: ts = I, cs = 1; a conv's
   channel-major input: ts = 1, cs = L). Tokens are split over threads in runs of whole
   tiles (OpenMP when built with it, else pthreads); each thread keeps its own work space.
   Plain C with GCC vector extensions (8 floats), compiled at first use by tlora.native. */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

typedef float v8 __attribute__((vector_size(32)));
#define MAX_CORES 16
#define MAX_THREADS 64

/* Per-thread work space, kept between calls: fresh MB-sized buffers are new pages from the
   OS on every call (faults and zeroing), which cost more than a small layer's arithmetic.
   Grown on demand, never shrunk; a pool thread keeps at most a few MB. */
static _Thread_local float *arena = NULL;
static _Thread_local size_t arena_floats = 0;

static size_t padded(size_t floats) { return (floats + 15) / 16 * 16; } /* 64-byte multiples */

static float *arena_get(size_t floats) {
    if (floats > arena_floats) {
        free(arena);
        arena = (float *)aligned_alloc(64, padded(floats) * sizeof(float));
        arena_floats = arena ? floats : 0;
    }
    return arena;
}

/* Free the calling thread's work space. */
void tlora_release(void) {
    free(arena);
    arena = NULL;
    arena_floats = 0;
}

/* Y (mt x 8nv, row stride C) (+)= W (mt x K) @ X (K x 8nv, row stride C); W rows of length K. */
static inline __attribute__((always_inline)) void mm_tile(const float *W, int K, const float *X,
                                                          float *Y, long C, const int mt, const int nv,
                                                          int accumulate) {
    v8 acc[6][2];
    for (int i = 0; i < mt; i++)
        for (int v = 0; v < nv; v++)
            acc[i][v] = accumulate ? *(const v8 *)(Y + i * C + 8 * v) : (v8){0};
    for (int k = 0; k < K; k++) {
        v8 x0 = *(const v8 *)(X + k * C);
        v8 x1 = nv > 1 ? *(const v8 *)(X + k * C + 8) : x0;
        for (int i = 0; i < mt; i++) {
            float w = W[i * K + k];
            acc[i][0] += w * x0;
            if (nv > 1) acc[i][1] += w * x1;
        }
    }
    for (int i = 0; i < mt; i++)
        for (int v = 0; v < nv; v++) *(v8 *)(Y + i * C + 8 * v) = acc[i][v];
}

/* Balanced tiling: n rows in ceil(n / most) tiles whose sizes differ by at most one, so no
   tile is left with one or two rows (a lone accumulator chain waits on FMA latency). */
static inline int tile_count(int n, int most) { return (n + most - 1) / most; }
static inline int tile_start(int n, int tiles, int t) { return (int)(((long)n * t) / tiles); }

#define MM_CASE(MT, NV) case MT: mm_tile(W + m * K, K, xb + l, yb + m * C + l, C, MT, NV, accumulate); break
#define MM_ROWS(NV)                                                                     \
    for (int t = 0; t < tiles; t++) {                                                   \
        int m = 6 * t, mt = M - m < 6 ? M - m : 6;                                      \
        switch (mt) { MM_CASE(6, NV); MM_CASE(5, NV); MM_CASE(4, NV); MM_CASE(3, NV);   \
                      MM_CASE(2, NV); MM_CASE(1, NV); default: break; }                 \
    }

/* For b < B: Y[b] (M x C) (+)= W (M x K) @ X[b] (K x C); panels contiguous, C % 8 == 0. */
static void panel_mm(const float *W, int M, int K, const float *X, float *Y, long B, long C, int accumulate) {
    /* Full 6-row tiles and one remainder tile: measured faster here than balancing (the X
       rows are reloaded per tile). */
    int tiles = tile_count(M, 6);
    for (long b = 0; b < B; b++) {
        const float *xb = X + b * K * C;
        float *yb = Y + b * M * C;
        long l = 0;
        for (; l + 16 <= C; l += 16) MM_ROWS(2)
        for (; l < C; l += 8) MM_ROWS(1)
    }
}

/* s (mt x kt sums, 8 lanes each) += sum over b in [b0, b1) of A[b] rows m.. @ X[b] rows k..^T. */
static inline __attribute__((always_inline)) void red_tile(const float *A, int M, const float *X, int K, long b0,
                                                           long b1, long C, v8 *acc, int m, int k,
                                                           const int mt, const int kt) {
    v8 s[3][4];
    for (int i = 0; i < mt; i++)
        for (int j = 0; j < kt; j++) s[i][j] = acc[(m + i) * K + k + j];
    for (long b = b0; b < b1; b++) {
        const float *ab = A + b * M * C + m * C, *xb = X + b * K * C + k * C;
        for (long l = 0; l < C; l += 8) {
            v8 a[3];
            for (int i = 0; i < mt; i++) a[i] = *(const v8 *)(ab + i * C + l);
            for (int j = 0; j < kt; j++) {
                v8 x = *(const v8 *)(xb + j * C + l);
                for (int i = 0; i < mt; i++) s[i][j] += a[i] * x;
            }
        }
    }
    for (int i = 0; i < mt; i++)
        for (int j = 0; j < kt; j++) acc[(m + i) * K + k + j] = s[i][j];
}

#ifndef RED_CHUNK
#define RED_CHUNK 8192
#endif
#define RED_CASE(MT, KT) case MT * 8 + KT: red_tile(A, M, X, K, b0, b1, C, acc, m, k, MT, KT); break

/* acc (M x K of 8-lane partial sums) += sum_b A[b] (M x C) @ X[b]^T (K x C); C % 8 == 0.
   The partial sums stay 8 wide until `flush` adds them into the gradient. */
static void panel_reduce(const float *A, int M, const float *X, int K, long B, long C, v8 *acc) {
    /* Batches in chunks that fit L1 together, so each register tile of sums is loaded and
       stored once per chunk, not once per batch (C can be as small as one tile's tokens). */
    long chunk = RED_CHUNK / ((M + K) * C);
    if (chunk < 1) chunk = 1;
    int row_tiles = tile_count(M, 3), col_tiles = tile_count(K, 4);
    for (long b0 = 0; b0 < B; b0 += chunk) {
        long b1 = b0 + chunk < B ? b0 + chunk : B;
        for (int rt = 0; rt < row_tiles; rt++) {
            int m = tile_start(M, row_tiles, rt), mt = tile_start(M, row_tiles, rt + 1) - m;
            for (int ct = 0; ct < col_tiles; ct++) {
                int k = tile_start(K, col_tiles, ct), kt = tile_start(K, col_tiles, ct + 1) - k;
                switch (mt * 8 + kt) {
                    RED_CASE(3, 4); RED_CASE(3, 3); RED_CASE(3, 2); RED_CASE(3, 1);
                    RED_CASE(2, 4); RED_CASE(2, 3); RED_CASE(2, 2); RED_CASE(2, 1);
                    RED_CASE(1, 4); RED_CASE(1, 3); RED_CASE(1, 2); RED_CASE(1, 1);
                    default: break;
                }
            }
        }
    }
}

static void flush(const v8 *acc, long n, float *grad) {
    for (long e = 0; e < n; e++) {
        v8 v = acc[e];
        grad[e] += ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
    }
}

#if defined(__AVX__)
#include <immintrin.h>
/* r[0..7] <- the transpose of the 8 x 8 block r[0..7]. */
static inline void transpose8(__m256 *r) {
    __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
    __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
    __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
    __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
    __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
    __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
    __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
    __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
    r[0] = _mm256_permute2f128_ps(u0, u4, 0x20);
    r[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
    r[2] = _mm256_permute2f128_ps(u2, u6, 0x20);
    r[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
    r[4] = _mm256_permute2f128_ps(u0, u4, 0x31);
    r[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
    r[6] = _mm256_permute2f128_ps(u2, u6, 0x31);
    r[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}
#define HAVE_TRANSPOSE8 1
#else
#define HAVE_TRANSPOSE8 0
#endif

/* Tile (I x Lt) <- tokens [t0, t0 + lt) of x; columns lt..Lt-1 zero. */
static void load_tile(const float *x, long ts, long cs, long t0, long lt, long I, long Lt, float *tile) {
    long i0 = 0;
#if HAVE_TRANSPOSE8
    if (cs == 1 && lt == Lt) { /* token rows: 8 x 8 block transposes */
        for (; i0 + 8 <= I; i0 += 8)
            for (long l = 0; l < Lt; l += 8) {
                __m256 r[8];
                for (int q = 0; q < 8; q++) r[q] = _mm256_loadu_ps(x + (t0 + l + q) * ts + i0);
                transpose8(r);
                for (int q = 0; q < 8; q++) _mm256_store_ps(tile + (i0 + q) * Lt + l, r[q]);
            }
    }
#endif
    for (long i = i0; i < I; i++) {
        float *row = tile + i * Lt;
        const float *src = x + t0 * ts + i * cs;
        long l = 0;
        if (ts == 1) {
            memcpy(row, src, lt * sizeof(float));
            l = lt;
        }
        for (; l < lt; l++) row[l] = src[l * ts];
        for (; l < Lt; l++) row[l] = 0.f;
    }
}

/* out tokens [t0, t0 + lt) <- tile (I x Lt) + keep * extra (same addressing as out; may be NULL). */
static void store_tile(const float *tile, long t0, long lt, long I, long Lt, float *out, long ts, long cs,
                       float keep, const float *extra) {
    int add = extra && keep != 0.f;
    long i0 = 0;
#if HAVE_TRANSPOSE8
    if (cs == 1 && lt == Lt) {
        __m256 k = _mm256_set1_ps(keep);
        for (; i0 + 8 <= I; i0 += 8)
            for (long l = 0; l < Lt; l += 8) {
                __m256 r[8];
                for (int q = 0; q < 8; q++) r[q] = _mm256_load_ps(tile + (i0 + q) * Lt + l);
                transpose8(r);
                for (int q = 0; q < 8; q++) {
                    long at = (t0 + l + q) * ts + i0;
                    __m256 v = add ? _mm256_add_ps(r[q], _mm256_mul_ps(k, _mm256_loadu_ps(extra + at))) : r[q];
                    _mm256_storeu_ps(out + at, v);
                }
            }
    }
#endif
    for (long i = i0; i < I; i++) {
        const float *row = tile + i * Lt;
        float *dst = out + t0 * ts + i * cs;
        if (add) {
            const float *e = extra + t0 * ts + i * cs;
            for (long l = 0; l < lt; l++) dst[l * ts] = row[l] + keep * e[l * ts];
        } else {
            for (long l = 0; l < lt; l++) dst[l * ts] = row[l];
        }
    }
}

typedef struct {
    int D, R;
    long n[MAX_CORES];
    long width, Lt, big; /* big = R^2 * width * Lt: an intermediate's floats */
} plan_t;

static int make_plan(plan_t *p, int D, int R, const int *sizes, int Lt, long N) {
    if (D < 3 || D > MAX_CORES || R < 1 || Lt < 8 || Lt % 8) return 1;
    if (N < Lt) Lt = N < 8 ? 8 : (int)((N + 7) / 8 * 8); /* a few tokens: no wasted columns */
    p->D = D;
    p->R = R;
    p->width = 1;
    for (int d = 0; d < D; d++) {
        if (sizes[d] < 1) return 1;
        p->n[d] = sizes[d];
        p->width *= sizes[d];
    }
    p->Lt = Lt;
    p->big = (long)R * R * p->width * Lt;
    return 0;
}

/* z[0..D-2] for the tile xt, as _Chain._intermediates. */
static void intermediates(const plan_t *p, const float *const *ops, const float *xt, float **z) {
    long R = p->R, n0 = p->n[0];
    long rest = p->width / n0 * p->Lt;
    panel_mm(ops[0], (int)(R * n0 * R), (int)n0, xt, z[0], 1, rest, 0);
    long lead = R * n0;
    for (int d = 1; d < p->D - 1; d++) {
        long n = p->n[d];
        long cols = p->big / (lead * R * n);
        panel_mm(ops[d], (int)(n * R), (int)(R * n), z[d - 1], z[d], lead, cols, 0);
        lead *= n;
    }
}

/* Tokens [t_begin, t_end) of the forward (one thread's share). */
static int forward_range(const plan_t *pp, const float *const *ops, const float *x, long t_begin, long t_end,
                         long ts, long cs, float *out, long ots, long ocs, float keep) {
    plan_t p = *pp;
    int D = p.D, R = p.R;
    long Lt = p.Lt;
    size_t tile_floats = padded(p.width * Lt), big = padded(p.big);
    float *space = arena_get(2 * tile_floats + (D - 1) * big);
    int failed = !space;
    float *xt = space, *ut = space + tile_floats;
    float *z[MAX_CORES] = {0};
    for (int d = 0; d < D - 1 && !failed; d++) z[d] = space + 2 * tile_floats + d * big;
    if (!failed) {
        long nl = p.n[D - 1], batch = p.width / nl, rn = (long)R * nl;
        for (long t0 = t_begin; t0 < t_end; t0 += Lt) {
            long lt = t_end - t0 < Lt ? t_end - t0 : Lt;
            load_tile(x, ts, cs, t0, lt, p.width, Lt, xt);
            intermediates(&p, ops, xt, z);
            const float *zl = z[D - 2];
            for (int k = 0; k < R; k++)
                panel_mm(ops[D - 1] + k * nl * rn, (int)nl, (int)rn, zl + k * batch * rn * Lt, ut, batch, Lt, k > 0);
            store_tile(ut, t0, lt, p.width, Lt, out, ots, ocs, keep, x);
        }
    }
    return failed ? 2 : 0;
}

/* Tokens [t_begin, t_end) of the backward; gradients added into grads (if not NULL). */
static int backward_range(const plan_t *pp, const float *const *ops, const float *const *ops_t, const float *x,
                          const float *h, long t_begin, long t_end, long ts, long cs, float *gx, float keep,
                          float *const *grads) {
    plan_t p = *pp;
    int D = p.D, R = p.R;
    long Lt = p.Lt, width = p.width, n0 = p.n[0], nl = p.n[D - 1], batch = width / nl, rn = (long)R * nl;
    v8 *acc[MAX_CORES + 1] = {0};
    long acc_n[MAX_CORES + 1] = {0};
    size_t acc_floats = 0;
    if (grads) {
        acc_n[0] = (long)R * n0 * R * n0;
        for (int d = 1; d < D - 1; d++) acc_n[d] = p.n[d] * R * R * p.n[d];
        acc_n[D - 1] = (long)R * nl * rn;
        for (int d = 0; d < D; d++) acc_floats += padded(acc_n[d] * 8);
    }
    size_t tile_floats = padded(width * Lt), big = padded(p.big);
    float *space = arena_get(3 * tile_floats + (D + 1) * big + acc_floats);
    int failed = !space;
    float *xt = NULL, *ht = NULL, *ot = NULL, *ga = NULL, *gb = NULL;
    float *z[MAX_CORES] = {0};
    if (!failed) {
        float *next = space;
        xt = next, next += tile_floats;
        ht = next, next += tile_floats;
        ot = next, next += tile_floats;
        ga = next, next += big;
        gb = next, next += big;
        for (int d = 0; d < D - 1; d++) z[d] = next, next += big;
        for (int d = 0; d < D && grads; d++) {
            acc[d] = (v8 *)next;
            memset(next, 0, acc_n[d] * sizeof(v8));
            next += padded(acc_n[d] * 8);
        }
    }
    if (!failed) {
        for (long t0 = t_begin; t0 < t_end; t0 += Lt) {
            long lt = t_end - t0 < Lt ? t_end - t0 : Lt;
            load_tile(x, ts, cs, t0, lt, width, Lt, xt);
            load_tile(h, ts, cs, t0, lt, width, Lt, ht);
            intermediates(&p, ops, xt, z);
            /* last stage: gz[k] = last[k]^T h; grad last[k] += h zv[k]^T */
            const float *zl = z[D - 2];
            for (int k = 0; k < R; k++) {
                panel_mm(ops_t[D - 1] + k * rn * nl, (int)rn, (int)nl, ht, ga + k * batch * rn * Lt, batch, Lt, 0);
                if (grads) panel_reduce(ht, (int)nl, zl + k * batch * rn * Lt, (int)rn, batch, Lt, acc[D - 1] + k * nl * rn);
            }
            float *g = ga, *g_next = gb;
            long lead = (long)R * (width / nl);
            for (int d = D - 2; d >= 1; d--) {
                long m = p.n[d];
                lead /= m;
                long cols = p.big / (lead * R * m);
                if (grads) panel_reduce(g, (int)(m * R), z[d - 1], (int)(R * m), lead, cols, acc[d]);
                panel_mm(ops_t[d], (int)(R * m), (int)(m * R), g, g_next, lead, cols, 0);
                float *swap = g;
                g = g_next;
                g_next = swap;
            }
            long rest = width / n0 * Lt;
            if (grads) panel_reduce(g, (int)(R * n0 * R), xt, (int)n0, 1, rest, acc[0]);
            if (gx) {
                panel_mm(ops_t[0], (int)n0, (int)(R * n0 * R), g, ot, 1, rest, 0);
                store_tile(ot, t0, lt, width, Lt, gx, ts, cs, keep, h);
            }
        }
        if (grads)
            for (int d = 0; d < D; d++) flush(acc[d], acc_n[d], grads[d]);
    }
    return failed ? 2 : 0;
}

/* ----- threads: each takes a contiguous run of tiles; gradients are summed after the join. */
typedef struct {
    const plan_t *p;
    const float *const *ops, *const *ops_t;
    const float *x, *h;
    long t_begin, t_end, ts, cs, ots, ocs;
    float *out, *gx, keep;
    float *grads[MAX_CORES];
    int with_grads, rc;
} job_t;

static void *forward_job(void *arg) {
    job_t *j = (job_t *)arg;
    j->rc = forward_range(j->p, j->ops, j->x, j->t_begin, j->t_end, j->ts, j->cs, j->out, j->ots, j->ocs, j->keep);
    return NULL;
}

static void *backward_job(void *arg) {
    job_t *j = (job_t *)arg;
    j->rc = backward_range(j->p, j->ops, j->ops_t, j->x, j->h, j->t_begin, j->t_end, j->ts, j->cs, j->gx, j->keep,
                           j->with_grads ? j->grads : NULL);
    return NULL;
}

/* Split [0, N) into `threads` runs of whole tiles (jobs[0..threads) already filled in) and
   run `work` on each. With OpenMP the runs go to the OpenMP runtime torch already loaded
   (same libgomp soname, so the same thread pool: no second set of threads fighting torch's
   spinning workers for the cores); without it, to fresh pthreads. */
static void run_jobs(job_t *jobs, int threads, long N, long Lt, void *(*work)(void *)) {
    long tiles = (N + Lt - 1) / Lt;
    for (int t = 0; t < threads; t++) {
        long end = tiles * (t + 1) / threads * Lt;
        jobs[t].t_begin = tiles * t / threads * Lt;
        jobs[t].t_end = end < N ? end : N;
        jobs[t].rc = 0;
    }
    if (threads == 1) {
        work(&jobs[0]);
        return;
    }
#ifdef _OPENMP
#pragma omp parallel for num_threads(threads) schedule(static, 1)
    for (int t = 0; t < threads; t++) work(&jobs[t]);
#else
    pthread_t ids[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    for (int t = 1; t < threads; t++) started[t] = pthread_create(&ids[t], NULL, work, &jobs[t]) == 0;
    work(&jobs[0]);
    for (int t = 1; t < threads; t++) {
        if (started[t]) pthread_join(ids[t], NULL);
        else work(&jobs[t]); /* no thread to be had: do it here */
    }
#endif
}

/* Threads worth using: at most `threads`, MAX_THREADS and one per tile. */
static int thread_count(int threads, long N, long Lt) {
    long tiles = (N + Lt - 1) / Lt;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > tiles) threads = (int)tiles;
    return threads < 1 ? 1 : threads;
}

int tlora_chain_forward(int D, int R, const int *sizes, const float *const *ops, const float *x, long N,
                        long ts, long cs, float *out, long ots, long ocs, float keep, int Lt, int threads) {
    plan_t p;
    if (make_plan(&p, D, R, sizes, Lt, N)) return 1;
    Lt = (int)p.Lt;
    job_t jobs[MAX_THREADS];
    int used = thread_count(threads, N, Lt);
    for (int t = 0; t < used; t++)
        jobs[t] = (job_t){.p = &p, .ops = ops, .x = x, .ts = ts, .cs = cs, .out = out, .ots = ots, .ocs = ocs,
                          .keep = keep};
    run_jobs(jobs, used, N, Lt, forward_job);
    for (int t = 0; t < used; t++)
        if (jobs[t].rc) return jobs[t].rc;
    return 0;
}

/* gx = T^T h (+ keep h) when gx is not NULL; the stage matrices' gradients (ops layout) are
   accumulated into grads when grads is not NULL. h and gx are addressed like x. */
int tlora_chain_backward(int D, int R, const int *sizes, const float *const *ops, const float *const *ops_t,
                         const float *x, const float *h, long N, long ts, long cs, float *gx, float keep,
                         float *const *grads, int Lt, int threads) {
    plan_t p;
    if (make_plan(&p, D, R, sizes, Lt, N)) return 1;
    Lt = (int)p.Lt;
    long numel[MAX_CORES];
    for (int d = 0; d < D; d++) numel[d] = p.n[d] * p.n[d] * R * R; /* every stage matrix: n_d^2 R^2 */
    job_t jobs[MAX_THREADS];
    int used = thread_count(threads, N, Lt), failed = 0;
    for (int t = 0; t < used; t++) {
        jobs[t] = (job_t){.p = &p, .ops = ops, .ops_t = ops_t, .x = x, .h = h, .ts = ts, .cs = cs, .gx = gx,
                          .keep = keep, .with_grads = grads != NULL};
        /* thread 0 adds into grads; the others into private zeroed copies, summed after */
        for (int d = 0; d < D && grads && !failed; d++) {
            jobs[t].grads[d] = t ? (float *)calloc(numel[d], sizeof(float)) : grads[d];
            failed = !jobs[t].grads[d];
        }
    }
    if (!failed) {
        run_jobs(jobs, used, N, Lt, backward_job);
        for (int t = 0; t < used; t++)
            if (jobs[t].rc) failed = jobs[t].rc;
        if (grads && !failed)
            for (int t = 1; t < used; t++)
                for (int d = 0; d < D; d++)
                    for (long e = 0; e < numel[d]; e++) grads[d][e] += jobs[t].grads[d][e];
    }
    for (int t = 1; t < used && grads; t++)
        for (int d = 0; d < D; d++) free(jobs[t].grads[d]);
    return failed ? (failed == 1 ? 1 : 2) : 0;
}
