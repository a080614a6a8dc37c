/* The weight gradient of an fp32 3x3 convolution (stride 1, padding 1) with AVX2 FMA: channels-last
 * x (N, H, W, C) and y's gradient g (N, H, W, O) -> dw (9, C, O), and on request a bias's gradient
 * db (O), g summed per channel.
 *
 * On CPUs without AMX (AVX2 laptops and servers) training runs in fp32, where oneDNN's backward-weights
 * kernel reached 100-130 GFLOP/s on fastcnn's maps against 140-260 for its forward and input gradient
 * (2 cores of an AMD EPYC, batch 512): the largest part of a step. Here each tap's gradient is a matrix
 * product over positions, dw[tap] = sum_k x(k + shift(tap))^T g(k), with the products of a block of 6
 * input channels by 16 output channels held in 12 vector registers while the block's positions stream
 * past: per position, two loads of g, six broadcasts of x and twelve FMAs.
 *
 * Images are taken a block at a time (about BLOCK_POSITIONS positions, so that the block's g and x stay
 * in the level-2 cache while every tap, channel block and output block passes over them), x copied
 * into a zero-padded (H + 2, W + 2) map per image so that the taps need no bounds checks. Images are
 * split between OpenMP threads; each part sums into its own dw, which the caller adds up. The sums are
 * fp32, in an order of their own (oneDNN's differs).
 *
 * Built for another CPU (no AVX2 or FMA, or AVX-512), conv3x3_wgrad_f32_ready() says 0 and the caller
 * keeps oneDNN's kernel.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MIN_PER_THREAD (1 << 15) /* g's elements per thread: each is used 9 C times */
#include "parallel.h"

/* Only where the CPU has AVX2 and FMA but not AVX-512 (measured against oneDNN's AVX2 kernel; with
 * AVX-512 oneDNN's kernel has twice the vector width, unmeasured against this one). */
#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
#include <immintrin.h>

#define BLOCK_POSITIONS 128
#define CB 6 /* input channels per register block */

int conv3x3_wgrad_f32_ready(void) { return 1; }

typedef struct {
    const float *x, *g;
    float *dw, *db;
    int64_t h, w, c, o;
} job;

/* Which positions a pass covers: rows [r0, r1) of m images laid out from xp and g. */
typedef struct {
    const float *xp, *g;
    int64_t m, r0, r1;
} block;

/* One step of the sums: x[q + shift][0 .. nc) (x) g[q][0 .. 8 nv). */
#define STEP(xr, gr)                                                                                 \
    do {                                                                                             \
        __m256 gv[2];                                                                                \
        for (int v = 0; v < nv; v++) gv[v] = _mm256_loadu_ps((gr) + 8 * v);                          \
        for (int i = 0; i < nc; i++) {                                                               \
            const __m256 xb = _mm256_broadcast_ss((xr) + i);                                         \
            for (int v = 0; v < nv; v++) sum[i][v] = _mm256_fmadd_ps(xb, gv[v], sum[i][v]);          \
        }                                                                                            \
    } while (0)

/* acc (nc x 8 nv sums, in dw (c, o) at row stride o) += sum over the block's positions of
 * x[q + shift][c0 .. c0 + nc) (x) g[q][o0 .. o0 + 8 nv), xp and g offset to c0 and o0. Inlined with
 * constant nc and nv, the sums live in registers for the whole block. The innermost loop runs along
 * a row, or across the images where they outnumber a row's positions (small maps). */
static inline __attribute__((always_inline)) void products(const job *j, const block *b, float *acc, int64_t shift,
                                                           int nc, int nv) {
    const int64_t h = j->h, w = j->w, c = j->c, o = j->o, w2 = w + 2, sx = (h + 2) * w2 * c, sg = h * w * o;
    __m256 sum[CB][2];
    for (int i = 0; i < nc; i++)
        for (int v = 0; v < nv; v++) sum[i][v] = _mm256_loadu_ps(acc + i * o + 8 * v);
    if (b->m > w) {
        for (int64_t r = b->r0; r < b->r1; r++)
            for (int64_t q = 0; q < w; q++) {
                const float *xr = b->xp + ((r + 1) * w2 + 1 + q + shift) * c, *gr = b->g + (r * w + q) * o;
                for (int64_t im = 0; im < b->m; im++, xr += sx, gr += sg) STEP(xr, gr);
            }
    } else {
        for (int64_t im = 0; im < b->m; im++)
            for (int64_t r = b->r0; r < b->r1; r++) {
                const float *xr = b->xp + im * sx + ((r + 1) * w2 + 1 + shift) * c, *gr = b->g + im * sg + r * w * o;
                for (int64_t q = 0; q < w; q++, xr += c, gr += o) STEP(xr, gr);
            }
    }
    for (int i = 0; i < nc; i++)
        for (int v = 0; v < nv; v++) _mm256_storeu_ps(acc + i * o + 8 * v, sum[i][v]);
}

#define PRODUCTS(NC, NV) products(j, &at, acc + c0 * o + o0, shift, NC, NV)

/* Adds the block's positions to acc (9, c, o). */
static void accumulate(const job *j, const block *b, float *acc9) {
    const int64_t c = j->c, o = j->o, w2 = j->w + 2;
    for (int tap = 0; tap < 9; tap++) {
        const int64_t shift = (tap / 3 - 1) * w2 + (tap % 3 - 1);
        float *acc = acc9 + tap * c * o;
        for (int64_t o0 = 0; o0 < o; o0 += 16) {
            const int nv = o - o0 >= 16 ? 2 : 1;
            for (int64_t c0 = 0; c0 < c; c0 += CB) {
                const int64_t nc = c - c0 < CB ? c - c0 : CB;
                const block at = {b->xp + c0, b->g + o0, b->m, b->r0, b->r1};
                switch (nc * 2 + nv - 1) { /* constant nc and nv: each case gets its own register block */
                case 2: PRODUCTS(1, 1); break;
                case 3: PRODUCTS(1, 2); break;
                case 4: PRODUCTS(2, 1); break;
                case 5: PRODUCTS(2, 2); break;
                case 6: PRODUCTS(3, 1); break;
                case 7: PRODUCTS(3, 2); break;
                case 8: PRODUCTS(4, 1); break;
                case 9: PRODUCTS(4, 2); break;
                case 10: PRODUCTS(5, 1); break;
                case 11: PRODUCTS(5, 2); break;
                case 12: PRODUCTS(6, 1); break;
                default: PRODUCTS(6, 2); break;
                }
            }
        }
    }
}

/* Images [begin, end) into part `part` of dw; 0 where its buffer could not be allocated. */
static int run_part(const job *j, int64_t begin, int64_t end, int part) {
    const int64_t h = j->h, w = j->w, c = j->c, o = j->o, w2 = w + 2, s2 = (h + 2) * w2;
    /* a block of about BLOCK_POSITIONS positions: whole images on small maps, else rows of one */
    int64_t images = BLOCK_POSITIONS / (h * w), rows = h;
    if (images < 1) {
        images = 1;
        rows = BLOCK_POSITIONS / w < 1 ? 1 : BLOCK_POSITIONS / w;
    }
    float *acc = j->dw + part * 9 * c * o, *db = j->db ? j->db + part * o : NULL;
    memset(acc, 0, 9 * c * o * sizeof *acc);
    if (db) memset(db, 0, o * sizeof *db);
    float *xp = malloc(images * s2 * c * sizeof *xp);
    if (xp == NULL) return 0;
    memset(xp, 0, images * s2 * c * sizeof *xp); /* the padding, which stays zero */
    for (int64_t a = begin; a < end; a += images) {
        const int64_t m = end - a < images ? end - a : images;
        const float *g = j->g + a * h * w * o;
        for (int64_t im = 0; im < m; im++)
            for (int64_t r = 0; r < h; r++)
                memcpy(xp + (im * s2 + (r + 1) * w2 + 1) * c, j->x + ((a + im) * h + r) * w * c, w * c * sizeof *xp);
        for (int64_t r0 = 0; r0 < h; r0 += rows) {
            const block b = {xp, g, m, r0, r0 + rows < h ? r0 + rows : h};
            accumulate(j, &b, acc);
        }
        if (db)
            for (int64_t k = 0; k < m * h * w; k++)
                for (int64_t q = 0; q < o; q++) db[q] += g[k * o + q];
    }
    free(xp);
    return 1;
}

/* x: (n, h, w, c) fp32, g: (n, h, w, o) fp32, both contiguous; o a multiple of 8. dw: (threads, 9, c, o);
 * db: (threads, o) for g's sums per channel (a bias's gradient), or NULL. Returns how many parts of dw
 * (and db) hold sums (the rest are not written), or -1 where a part could not allocate its buffer. */
int conv3x3_wgrad_f32(const float *x, const float *g, float *dw, float *db, int64_t n, int64_t h, int64_t w, int64_t c,
                      int64_t o, int threads) {
    const job j = {x, g, dw, db, h, w, c, o};
    const int parts = parts_for(n, n * h * w * o, threads);
    int failed = 0;
#pragma omp parallel for num_threads(parts) schedule(static, 1) if (parts > 1) reduction(| : failed)
    for (int t = 0; t < parts; t++) failed |= !run_part(&j, part_begin(n, t, parts), part_begin(n, t + 1, parts), t);
    return failed ? -1 : parts;
}

#else

int conv3x3_wgrad_f32_ready(void) { return 0; }

int conv3x3_wgrad_f32(const float *x, const float *g, float *dw, float *db, int64_t n, int64_t h, int64_t w, int64_t c,
                      int64_t o, int threads) {
    (void)x, (void)g, (void)dw, (void)db, (void)n, (void)h, (void)w, (void)c, (void)o, (void)threads;
    return -1;
}

#endif
