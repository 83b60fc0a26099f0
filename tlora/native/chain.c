/* Fused CPU kernels for the factored TRM chain (tlora.functional.trm._Chain, D >= 3 cores).

   The Python engine runs one BLAS call per stage over blocks of ~200 tokens: each stage's
   R^2-expanded intermediate (R^2 I floats per token) then lives in L3 or memory, and small-K
   GEMMs on such data run at a third of the machine's peak. Here every stage runs on a tile
   of a few tokens at a time, so the whole chain (forward, or backward with its recomputed
   intermediates and core-gradient reductions) stays in L1/L2.

   Layout: the same as _Chain's (stage matrices `ops` built by _Chain.operands_detached,
   their transposes `ops_t`, gradients accumulated in `ops` layout). A tile holds its tokens
   in the fastest axis (Lt tokens, Lt a multiple of VW), as in _Chain's token-inner blocks.
   Inputs and outputs are addressed as x[t * ts + i * cs] (rows: ts = I, cs = 1; a conv's
   channel-major input: ts = 1, cs = L). Tokens are split over threads in runs of whole
   tiles (OpenMP when built with it, else pthreads); each thread keeps its own work space.
   Plain C with GCC vector extensions (VW floats: 16 where the compiler targets AVX-512, whose
   FMAs are twice as wide as AVX2's and which MKL's frozen GEMM uses; else 8), compiled at first
   use by tlora.native. */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"

#define MAX_CORES 16
#define MAX_THREADS 64

/* Per-thread work space, kept between calls: fresh MB-sized buffers are new pages from the
   OS on every call (faults and zeroing), which cost more than a small layer's arithmetic.
   Grown on demand, never shrunk; a pool thread keeps at most a few MB. */
static _Thread_local float *arena = NULL;
static _Thread_local size_t arena_floats = 0;

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

/* The kernel's vector width (tokens per vector): tiles are multiples of it. */
int tlora_vector_width(void) { return VW; }


typedef struct {
    int D, R;
    long n[MAX_CORES];
    long width, Lt, big; /* big = R^2 * width * Lt: an intermediate's floats */
} plan_t;

static int make_plan(plan_t *p, int D, int R, const int *sizes, int Lt, long N) {
    if (D < 3 || D > MAX_CORES || R < 1 || Lt < 8 || Lt % 8) return 1; /* the callers' unit: 8 tokens */
    Lt = (Lt + VW - 1) / VW * VW;
    if (N < Lt) Lt = N < VW ? VW : (int)((N + VW - 1) / VW * VW); /* a few tokens: no wasted columns */
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
    /* One tile buffer: the output tile overwrites the input tile, which is dead once the
       intermediates are made (store_tile adds keep * x from x itself). Less work space is
       less of it pushed out of L2 on wide layers. */
    float *space = arena_get(tile_floats + (D - 1) * big);
    int failed = !space;
    float *xt = space, *ut = space;
    float *z[MAX_CORES] = {0};
    for (int d = 0; d < D - 1 && !failed; d++) z[d] = space + tile_floats + d * big;
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
    vec *acc[MAX_CORES + 1] = {0};
    long acc_n[MAX_CORES + 1] = {0};
    size_t acc_floats = 0;
    if (grads) {
        acc_n[0] = (long)R * n0 * R * n0;
        for (int d = 1; d < D - 1; d++) acc_n[d] = p.n[d] * R * R * p.n[d];
        acc_n[D - 1] = (long)R * nl * rn;
        for (int d = 0; d < D; d++) acc_floats += padded(acc_n[d] * VW);
    }
    size_t tile_floats = padded(width * Lt), big = padded(p.big);
    /* Each gradient overwrites the intermediate its stage has just finished with: the last
       stage's reductions read z[D-2] slice by slice before its input gradient is written there,
       and stage d's input gradient goes where z[d-1] was once its reductions are done. The
       input gradient's tile overwrites h's. Half the work space of one buffer each, which on
       wide layers kept the backward's tiles in L2. */
    float *space = arena_get(2 * tile_floats + (D - 1) * big + acc_floats);
    int failed = !space;
    float *xt = NULL, *ht = NULL, *ot = NULL;
    float *z[MAX_CORES] = {0};
    if (!failed) {
        float *next = space;
        xt = next, next += tile_floats;
        ht = next, next += tile_floats;
        ot = ht;
        for (int d = 0; d < D - 1; d++) z[d] = next, next += big;
        for (int d = 0; d < D && grads; d++) {
            acc[d] = (vec *)next;
            memset(next, 0, acc_n[d] * sizeof(vec));
            next += padded(acc_n[d] * VW);
        }
    }
    if (!failed) {
        for (long t0 = t_begin; t0 < t_end; t0 += Lt) {
            long lt = t_end - t0 < Lt ? t_end - t0 : Lt;
            load_tile(x, ts, cs, t0, lt, width, Lt, xt);
            load_tile(h, ts, cs, t0, lt, width, Lt, ht);
            intermediates(&p, ops, xt, z);
            /* last stage: grad last[k] += h zv[k]^T, then gz[k] = last[k]^T h into zv[k]'s place */
            float *zl = z[D - 2];
            for (int k = 0; k < R; k++) {
                float *slice = zl + k * batch * rn * Lt;
                if (grads) panel_reduce(ht, (int)nl, slice, (int)rn, batch, Lt, acc[D - 1] + k * nl * rn);
                panel_mm(ops_t[D - 1] + k * rn * nl, (int)rn, (int)nl, ht, slice, batch, Lt, 0);
            }
            float *g = zl;
            long lead = (long)R * (width / nl);
            for (int d = D - 2; d >= 1; d--) {
                long m = p.n[d];
                lead /= m;
                long cols = p.big / (lead * R * m);
                if (grads) panel_reduce(g, (int)(m * R), z[d - 1], (int)(R * m), lead, cols, acc[d]);
                panel_mm(ops_t[d], (int)(R * m), (int)(m * R), g, z[d - 1], lead, cols, 0);
                g = z[d - 1];
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
   accumulated into grads when grads is not NULL. h and gx are addressed like x; gx may be h itself
   (a tile of h is read, into the work space and by store_tile, before that tile of gx is written). */
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
