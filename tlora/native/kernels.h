/* Vector kernels of the compiled chain (chain.c): register-tiled small GEMMs and reductions
   on token-inner panels, the per-thread work space, and the tile transposes in and out.
   Included by chain.c only (static functions: one translation unit). */
#ifndef TLORA_KERNELS_H
#define TLORA_KERNELS_H
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512F__)
#define VW 16
#define MT_MAX 8 /* rows of mm_tile's register tile: 8 x 2 accumulators of 32 zmm registers */
#else
#define VW 8
#define MT_MAX 6 /* 6 x 2 accumulators of 16 ymm registers */
#endif
typedef float vec __attribute__((vector_size(VW * 4)));
static size_t padded(size_t floats) { return (floats + 15) / 16 * 16; } /* 64-byte multiples */

/* Y0, Y1 (mt x VW each, row stride C) (+)= W (mt x K) @ X0, X1 (K x VW each, row stride C);
   W rows of length K. The second column block (nv = 2) may lie in another batch than the first:
   a stage whose batches are one vector wide (the last stage on a tile of VW tokens) still gets
   two vectors of accumulators per row, enough independent FMAs to hide their latency. */
static inline __attribute__((always_inline)) void mm_tile(const float *W, int K, const float *X0, const float *X1,
                                                          float *Y0, float *Y1, long C, const int mt, const int nv,
                                                          int accumulate) {
    vec acc[MT_MAX][2];
    for (int i = 0; i < mt; i++) {
        acc[i][0] = accumulate ? *(const vec *)(Y0 + i * C) : (vec){0};
        if (nv > 1) acc[i][1] = accumulate ? *(const vec *)(Y1 + i * C) : (vec){0};
    }
    for (int k = 0; k < K; k++) {
        vec x0 = *(const vec *)(X0 + k * C);
        vec x1 = nv > 1 ? *(const vec *)(X1 + k * C) : x0;
        for (int i = 0; i < mt; i++) {
            float w = W[i * K + k];
            acc[i][0] += w * x0;
            if (nv > 1) acc[i][1] += w * x1;
        }
    }
    for (int i = 0; i < mt; i++) {
        *(vec *)(Y0 + i * C) = acc[i][0];
        if (nv > 1) *(vec *)(Y1 + i * C) = acc[i][1];
    }
}

/* Balanced tiling: n rows in ceil(n / most) tiles whose sizes differ by at most one, so no
   tile is left with one or two rows (a lone accumulator chain waits on FMA latency). */
static inline int tile_count(int n, int most) { return (n + most - 1) / most; }
static inline int tile_start(int n, int tiles, int t) { return (int)(((long)n * t) / tiles); }

#define MM_CASE(MT, NV) \
    case MT: mm_tile(W + m * K, K, x0, x1, y0 + m * C, y1 + m * C, C, MT, NV, accumulate); break
#if MT_MAX > 6
#define MM_WIDE_CASES(NV) MM_CASE(8, NV); MM_CASE(7, NV);
#else
#define MM_WIDE_CASES(NV)
#endif
#define MM_ROWS(NV)                                                                     \
    for (int t = 0; t < tiles; t++) {                                                   \
        int m = MT_MAX * t, mt = M - m < MT_MAX ? M - m : MT_MAX;                       \
        switch (mt) { MM_WIDE_CASES(NV) MM_CASE(6, NV); MM_CASE(5, NV); MM_CASE(4, NV); \
                      MM_CASE(3, NV); MM_CASE(2, NV); MM_CASE(1, NV); default: break; } \
    }

/* For b < B: Y[b] (M x C) (+)= W (M x K) @ X[b] (K x C); panels contiguous, C % VW == 0. */
static void panel_mm(const float *W, int M, int K, const float *X, float *Y, long B, long C, int accumulate) {
    /* Full MT_MAX-row tiles and one remainder tile: measured faster here than balancing (the X
       rows are reloaded per tile). Column vectors are taken in pairs across batch boundaries. */
    int tiles = tile_count(M, MT_MAX);
    long per = C / VW, total = B * per, v = 0;
    for (; v + 2 <= total; v += 2) {
        long b0 = v / per, b1 = (v + 1) / per, l0 = v % per * VW, l1 = (v + 1) % per * VW;
        const float *x0 = X + b0 * K * C + l0, *x1 = X + b1 * K * C + l1;
        float *y0 = Y + b0 * M * C + l0, *y1 = Y + b1 * M * C + l1;
        MM_ROWS(2)
    }
    if (v < total) {
        long b0 = v / per, l0 = v % per * VW;
        const float *x0 = X + b0 * K * C + l0, *x1 = x0;
        float *y0 = Y + b0 * M * C + l0, *y1 = y0;
        MM_ROWS(1)
    }
}

/* Register tile of the reductions: RT_M rows of A by RT_K rows of X, RT_M x RT_K accumulators
   (AVX-512: 24 of its 32 registers; AVX2: 12 of 16). Fewer loads per FMA than a smaller tile,
   which matters where the panels stream from L2. */
#if VW == 16
#define RT_M 4
#define RT_K 6
#else
#define RT_M 3
#define RT_K 4
#endif

/* s (mt x kt sums, VW lanes each) += sum over b in [b0, b1) of A[b] rows m.. @ X[b] rows k..^T,
   over the columns [l0, l1) of each. */
static inline __attribute__((always_inline)) void red_tile(const float *A, int M, const float *X, int K, long b0,
                                                           long b1, long C, long l0, long l1, vec *acc, int m,
                                                           int k, const int mt, const int kt) {
    vec s[RT_M][RT_K];
    for (int i = 0; i < mt; i++)
        for (int j = 0; j < kt; j++) s[i][j] = acc[(m + i) * K + k + j];
    for (long b = b0; b < b1; b++) {
        const float *ab = A + b * M * C + m * C, *xb = X + b * K * C + k * C;
        for (long l = l0; l < l1; l += VW) {
            vec a[RT_M];
            for (int i = 0; i < mt; i++) a[i] = *(const vec *)(ab + i * C + l);
            for (int j = 0; j < kt; j++) {
                vec x = *(const vec *)(xb + j * C + l);
                for (int i = 0; i < mt; i++) s[i][j] += a[i] * x;
            }
        }
    }
    for (int i = 0; i < mt; i++)
        for (int j = 0; j < kt; j++) acc[(m + i) * K + k + j] = s[i][j];
}

#ifndef RED_BLOCK
#define RED_BLOCK 32768 /* floats of A and X per block (128 KB): in L2 beside the rest of a tile's work */
#endif
#define RED_CASE(MT, KT) case MT * 8 + KT: red_tile(A, M, X, K, b0, b1, C, l0, l1, acc, m, k, MT, KT); break
#define RED_CASES(MT) RED_CASE(MT, 1); RED_CASE(MT, 2); RED_CASE(MT, 3); RED_CASE(MT, 4)
#if RT_K > 4
#define RED_WIDE_CASES(MT) RED_CASE(MT, 5); RED_CASE(MT, 6)
#else
#define RED_WIDE_CASES(MT) do {} while (0)
#endif
#if RT_M > 3
#define RED_TALL_CASES RED_CASES(4); RED_WIDE_CASES(4)
#else
#define RED_TALL_CASES do {} while (0)
#endif

/* acc (M x K of VW-lane partial sums) += sum_b A[b] (M x C) @ X[b]^T (K x C); C % VW == 0.
   The partial sums stay VW wide until `flush` adds them into the gradient. */
static void panel_reduce(const float *A, int M, const float *X, int K, long B, long C, vec *acc) {
    /* Blocks of whole batches (small panels: C can be one tile's tokens) or of columns of one
       batch (large ones: the first stage's panels are R^2 I / n_1 floats per token) whose A and X
       stay cached while every register tile runs over them: each panel row is read from memory
       once, and each tile's sums are loaded and stored once per block. */
    int row_tiles = tile_count(M, RT_M), col_tiles = tile_count(K, RT_K);
    long per_batch = (long)(M + K) * C, chunk = 1, cols = C;
    if (per_batch <= RED_BLOCK) {
        chunk = RED_BLOCK / per_batch;
    } else {
        cols = RED_BLOCK / (M + K) / VW * VW;
        if (cols < VW) cols = VW;
    }
    for (long b0 = 0; b0 < B; b0 += chunk) {
        long b1 = b0 + chunk < B ? b0 + chunk : B;
        for (long l0 = 0; l0 < C; l0 += cols) {
            long l1 = l0 + cols < C ? l0 + cols : C;
            for (int rt = 0; rt < row_tiles; rt++) {
                int m = tile_start(M, row_tiles, rt), mt = tile_start(M, row_tiles, rt + 1) - m;
                for (int ct = 0; ct < col_tiles; ct++) {
                    int k = tile_start(K, col_tiles, ct), kt = tile_start(K, col_tiles, ct + 1) - k;
                    switch (mt * 8 + kt) {
                        RED_TALL_CASES; RED_CASES(3); RED_WIDE_CASES(3); RED_CASES(2); RED_WIDE_CASES(2);
                        RED_CASES(1); RED_WIDE_CASES(1);
                        default: break;
                    }
                }
            }
        }
    }
}

static void flush(const vec *acc, long n, float *grad) {
    for (long e = 0; e < n; e++) {
        vec v = acc[e];
        for (int w = VW / 2; w >= 1; w /= 2) /* pairwise: fold the upper half onto the lower */
            for (int q = 0; q < w; q++) v[q] += v[q + w];
        grad[e] += v[0];
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

#endif
