/* Chain products of tensor-ring cores (tlora.functional.tr): the residual's factor matrices
   U (O, R^2) and V (I, R^2) and their gradients, each in one call.

   In torch these are a few dozen small ops per layer and pass (permutes, copies, tiny GEMMs of
   O R^3 multiply-adds): on a CPU each op's fixed cost is far above its arithmetic, and the fused
   node needs U, V in its forward and again in its backward (rebuilt there, not kept: see
   _trm_fused._residual_factors).

   Cores C_d (n_d, R, R) contiguous; the product's index p = (i_1, ..., i_D) is row-major (the
   first core's index slowest), prod[p] = C_1[i_1] @ C_2[i_2] @ ... @ C_D[i_D] (R x R).
   Inside, a product over the first k cores is laid out (R, P_k, R) as tr._chain_prefixes does,
   X[r][p][s] = prod[p][r, s], so each next core is one GEMM (R P_k x R) @ (R x n R) whose
   output is already the next layout: its rows are axpys over n R contiguous floats, which the
   compiler vectorizes. */
#include <stdlib.h>
#include <string.h>

#define RING_MAX_CORES 16

typedef struct {
    int D, R;
    long n[RING_MAX_CORES], P[RING_MAX_CORES]; /* P[k] = n_0 ... n_k */
    long prefix_floats; /* all products X_0 .. X_{D-1} */
} ring_t;

static int ring_plan(ring_t *q, int D, int R, const int *sizes) {
    if (D < 1 || D > RING_MAX_CORES || R < 1) return 1;
    q->D = D;
    q->R = R;
    q->prefix_floats = 0;
    long count = 1;
    for (int d = 0; d < D; d++) {
        if (sizes[d] < 1) return 1;
        q->n[d] = sizes[d];
        count *= sizes[d];
        q->P[d] = count;
        q->prefix_floats += count * R * R;
    }
    return 0;
}

/* a . b with 8 independent partial sums (a float reduction the compiler may not reorder itself). */
static float dot(const float *a, const float *b, long n) {
    float part[8] = {0};
    long e = 0;
    for (; e + 8 <= n; e += 8)
        for (int l = 0; l < 8; l++) part[l] += a[e + l] * b[e + l];
    float sum = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
    for (; e < n; e++) sum += a[e] * b[e];
    return sum;
}

/* cp[t][(i, s)] = core[i][t][s]: the core as the right operand (R x n R) of a chain step. */
static void core_panel(const float *core, long n, int R, float *cp) {
    for (long i = 0; i < n; i++)
        for (int t = 0; t < R; t++)
            memcpy(cp + t * n * R + i * R, core + (i * R + t) * R, R * sizeof(float));
}

/* The products X_0 .. X_{D-1} into `space` (X_k at offsets[k]); `panel` holds n R^2 floats. */
static void products(const ring_t *q, const float *const *cores, float *space, long *offsets, float *panel) {
    int R = q->R;
    long at = 0;
    offsets[0] = 0;
    for (long i = 0; i < q->n[0]; i++) /* X_0[r][i][s] = C_0[i][r][s] */
        for (int r = 0; r < R; r++) memcpy(space + (r * q->n[0] + i) * R, cores[0] + (i * R + r) * R, R * sizeof(float));
    at = q->P[0] * R * R;
    for (int k = 1; k < q->D; k++) {
        long n = q->n[k], rows = R * q->P[k - 1], cols = n * R;
        const float *prev = space + offsets[k - 1];
        float *next = space + at;
        core_panel(cores[k], n, R, panel);
        for (long row = 0; row < rows; row++) {
            float *out = next + row * cols;
            memset(out, 0, cols * sizeof(float));
            for (int t = 0; t < R; t++) {
                float a = prev[row * R + t];
                const float *c = panel + t * cols;
                for (long e = 0; e < cols; e++) out[e] += a * c[e];
            }
        }
        offsets[k] = at;
        at += q->P[k] * R * R;
    }
}

/* out (P, R, R) = the chain's products; with `transposed`, each block transposed (out[p] = prod[p]^T:
   V's layout, V[b, (r, s)] = prod[b][s, r]). Returns 1 on a bad plan, 2 without memory. */
int tlora_ring_product(int D, int R, const int *sizes, const float *const *cores, int transposed, float *out) {
    ring_t q;
    long offsets[RING_MAX_CORES], nmax = 0;
    if (ring_plan(&q, D, R, sizes)) return 1;
    for (int d = 0; d < D; d++) nmax = q.n[d] > nmax ? q.n[d] : nmax;
    float *space = (float *)malloc((q.prefix_floats + nmax * R * R) * sizeof(float));
    if (!space) return 2;
    products(&q, cores, space, offsets, space + q.prefix_floats);
    const float *x = space + offsets[D - 1];
    long P = q.P[D - 1], rr = (long)R * R;
    for (int r = 0; r < R; r++)
        for (long p = 0; p < P; p++)
            for (int s = 0; s < R; s++) out[p * rr + (transposed ? s * R + r : r * R + s)] = x[(r * P + p) * R + s];
    free(space);
    return 0;
}

/* grads[d] (n_d, R, R) = dL/dC_d from g (P, R, R) = dL/dprod (block-transposed with `transposed`,
   as tlora_ring_product's out); grads are overwritten. */
int tlora_ring_product_backward(int D, int R, const int *sizes, const float *const *cores, const float *g,
                                int transposed, float *const *grads) {
    ring_t q;
    long offsets[RING_MAX_CORES], nmax = 0;
    if (ring_plan(&q, D, R, sizes)) return 1;
    for (int d = 0; d < D; d++) nmax = q.n[d] > nmax ? q.n[d] : nmax;
    long P = q.P[D - 1], rr = (long)R * R;
    /* products, two gradient buffers (R, P, R), the core panel and its gradient */
    float *space = (float *)malloc((q.prefix_floats + 2 * P * rr + 2 * nmax * rr) * sizeof(float));
    if (!space) return 2;
    float *cur = space + q.prefix_floats, *next = cur + P * rr, *panel = next + P * rr, *gpanel = panel + nmax * rr;
    if (D > 1) products(&q, cores, space, offsets, panel); /* X_{D-1} is computed but not needed */
    for (int r = 0; r < R; r++)
        for (long p = 0; p < P; p++)
            for (int s = 0; s < R; s++) cur[(r * P + p) * R + s] = g[p * rr + (transposed ? s * R + r : r * R + s)];
    for (int k = D - 1; k >= 1; k--) {
        long n = q.n[k], rows = R * q.P[k - 1], cols = n * R;
        const float *left = space + offsets[k - 1];
        core_panel(cores[k], n, R, panel);
        memset(gpanel, 0, R * cols * sizeof(float));
        for (long row = 0; row < rows; row++) {
            const float *gr = cur + row * cols;
            for (int t = 0; t < R; t++) {
                /* dL/dpanel[t] += left[row][t] gm[row];  dL/dleft[row][t] = gm[row] . panel[t] */
                float a = left[row * R + t];
                float *gp = gpanel + t * cols;
                for (long e = 0; e < cols; e++) gp[e] += a * gr[e];
                next[row * R + t] = dot(gr, panel + t * cols, cols);
            }
        }
        for (long i = 0; i < n; i++) /* gradient panel back to the core's (n, R, R) */
            for (int t = 0; t < R; t++) memcpy(grads[k] + (i * R + t) * R, gpanel + t * cols + i * R, R * sizeof(float));
        float *swap = cur;
        cur = next;
        next = swap;
    }
    for (long i = 0; i < q.n[0]; i++)
        for (int r = 0; r < R; r++) memcpy(grads[0] + (i * R + r) * R, cur + (r * q.n[0] + i) * R, R * sizeof(float));
    free(space);
    return 0;
}
