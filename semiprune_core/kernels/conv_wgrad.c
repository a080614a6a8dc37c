/* The weight gradient of a 3x3 convolution (stride 1, padding 1) on Intel AMX tiles: bf16
 * channels-last x (N, H, W, C) and y's gradient g (N, H, W, O) -> dw (9, C, O) in fp32, and on request
 * a bias's gradient db (O), g summed per channel.
 *
 * oneDNN's backward-weights kernel took 3-10x as long as its forward on fastcnn's maps of 14x14 down
 * to 3x3 (1.32 of 0.35 ms for 32 -> 64 channels at 7x7, batch 512, two cores of a Xeon with AMX). Here the
 * gradient is nine matrix products over positions, dw[tap] = sum_k x(k + shift(tap))^T g(k), on AMX
 * tiles (TDPBF16PS: 16 x 16 fp32 sums of 32 bf16 products at a time).
 *
 * The layout that makes every tap a constant shift: a block of images is laid out as rows of W + 1
 * positions (the extra one is the zero padding between rows, the right edge of one row and the left
 * of the next) and H + 1 rows per image (the extra one is the zero row between images), so
 * S = (H + 1)(W + 1) positions per image. Output position (i, j) of image m is k = m S + i (W + 1) + j
 * and its tap (ky, kx) reads input position k + ky (W + 1) + kx, whatever i and j. The padding costs
 * (H + 1)(W + 1) / (H W) more products: 1.31x at 7x7, 1.15x at 14x14, 1.78x at 3x3.
 *
 * Per block: xt, x transposed to (C, positions) (a tile's rows run along the summed dimension), and
 * gv, g in AMX's pair-interleaved layout ((positions / 2, O) of bf16 pairs), zero where g has no
 * position. Then, 512 positions at a time (they stay in the level-1 cache), each 16-channel block of
 * x, 32-channel block of g and pair of taps accumulates four 16 x 16 tiles of dw (a last block of 16
 * channels of g two tiles; a layer of fewer than 16 channels uses the tiles' first rows or columns). Every product of
 * two bf16 values is exact in fp32, and the sums are fp32 (AMX flushes denormal results to zero),
 * where oneDNN's kernel rounds the gradient to bf16. A NaN or infinity in x makes every tap of its
 * channel NaN (padding positions multiply it by zero), where oneDNN's makes the taps that read it NaN.
 * Images are split between OpenMP threads; each part sums into its own dw, which the caller adds up.
 *
 * Built without AMX (another CPU, another compiler), conv3x3_wgrad_ready() says 0 and the caller
 * keeps oneDNN's kernel.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"
#include "parallel.h"

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18
#define KBLOCK 512 /* positions per pass over the tiles: A and B stay in L1 */

/* The kernel grants a process AMX's tile registers only when asked (Linux 5.16 and later). */
int conv3x3_wgrad_ready(void) {
    static int ready = -1;
    if (ready < 0) ready = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
    return ready;
}

typedef struct __attribute__((packed)) {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

/* Tiles 0, 1, 4, 5: sums (cr channels of x x ob channels of g, fp32); 2, 3: g (16 pairs of positions x
 * ob channels); 6, 7: x (cr channels x 32 positions). cr and ob are 16 except for a layer with fewer
 * channels, which has a single block of them. */
static void configure_tiles(int cr, int ob) {
    tile_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; t++) {
        cfg.rows[t] = t == 2 || t == 3 ? 16 : cr;
        cfg.colsb[t] = t == 6 || t == 7 ? 64 : ob * 4;
    }
    _tile_loadconfig(&cfg);
}

typedef uint16_t v16 __attribute__((vector_size(32)));
typedef uint32_t v8 __attribute__((vector_size(32)));
typedef uint64_t v4 __attribute__((vector_size(32)));

/* r: 16 rows of 16 bf16 (positions x channels) -> 16 rows (channels x positions), in four rounds of
 * interleaves (16, 32, 64 and 128 bits) within and across the 128-bit halves. */
static inline void transpose16(v16 r[16]) {
    v16 t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = __builtin_shufflevector(r[i], r[i + 1], 0, 16, 1, 17, 2, 18, 3, 19, 8, 24, 9, 25, 10, 26, 11, 27);
        t[i + 1] = __builtin_shufflevector(r[i], r[i + 1], 4, 20, 5, 21, 6, 22, 7, 23, 12, 28, 13, 29, 14, 30, 15, 31);
    }
    v8 u[16];
    for (int i = 0; i < 16; i += 4)
        for (int h = 0; h < 2; h++) {
            const v8 a = (v8)t[i + h], b = (v8)t[i + 2 + h];
            u[i + 2 * h] = __builtin_shufflevector(a, b, 0, 8, 1, 9, 4, 12, 5, 13);
            u[i + 2 * h + 1] = __builtin_shufflevector(a, b, 2, 10, 3, 11, 6, 14, 7, 15);
        }
    v4 w[16];
    for (int i = 0; i < 16; i += 8)
        for (int h = 0; h < 4; h++) {
            const v4 a = (v4)u[i + h], b = (v4)u[i + 4 + h];
            w[i + 2 * h] = __builtin_shufflevector(a, b, 0, 4, 2, 6);
            w[i + 2 * h + 1] = __builtin_shufflevector(a, b, 1, 5, 3, 7);
        }
    for (int h = 0; h < 8; h++) {
        r[h] = (v16)__builtin_shufflevector(w[h], w[8 + h], 0, 1, 4, 5);
        r[h + 8] = (v16)__builtin_shufflevector(w[h], w[8 + h], 2, 3, 6, 7);
    }
}

/* n (up to 16) positions of c (< 16) channels at xs -> c rows of 16 at xt (rows lx apart), zeros past n.
 * Apart from lay_out so that its variable-length copies do not keep lay_out's 16-channel blocks out
 * of registers (25 % slower at 16 -> 32 channels on 14x14 maps). */
static __attribute__((noinline)) void few_channels(const uint16_t *xs, int64_t c, int64_t n, uint16_t *xt, int64_t lx) {
    v16 v[16];
    for (int64_t p = 0; p < 16; p++) {
        v[p] = (v16){0};
        if (p < n) memcpy(&v[p], xs + p * c, c * sizeof *xs);
    }
    transpose16(v);
    for (int64_t ch = 0; ch < c; ch++) memcpy(xt + ch * lx, &v[ch], sizeof v[ch]);
}

typedef struct {
    const uint16_t *x, *g;
    float *dw;  /* (parts, 9, C, O) */
    float *db;  /* (parts, O), the bias's gradient, or NULL */
    int64_t h, w, c, o, images; /* images: per block */
} job;

/* Lays out images [a, a + m) in xt (c rows of lx, zeros where no pixel lands: the caller zeroes it
 * once, and only zeros are ever written there) and gv (kp / 2 rows of o pairs, likewise). */
static void lay_out(const job *j, int64_t a, int64_t m, int64_t kp, int64_t lx, uint16_t *xt, uint32_t *gv, float *db) {
    const int64_t h = j->h, w = j->w, c = j->c, o = j->o, w1 = w + 1, s = (h + 1) * w1;
    if (m < j->images) { /* a last, shorter block: the images of the block before lie past its end */
        for (int64_t ch = 0; ch < c; ch++) memset(xt + ch * lx + m * s, 0, (lx - m * s) * sizeof *xt);
        memset(gv + (m * s >> 1) * o, 0, (kp / 2 - (m * s >> 1)) * o * sizeof *gv);
    }
    for (int64_t im = 0; im < m; im++)
        for (int64_t r = 0; r < h; r++) {
            const uint16_t *xs = j->x + ((a + im) * h + r) * w * c;
            const int64_t q0 = im * s + (r + 1) * w1 + 1;
            /* 16 positions x 16 channels at a time; past the row's end the block is zeros, which land
             * on the padding or on later rows that overwrite them */
            for (int64_t s0 = 0; s0 < w; s0 += 16) {
                const int64_t n = w - s0 < 16 ? w - s0 : 16;
                if (c < 16) { /* a layer of fewer than 16 channels */
                    few_channels(xs + s0 * c, c, n, xt + q0 + s0, lx);
                    continue;
                }
                for (int64_t cb = 0; cb < c; cb += 16) {
                    v16 v[16];
                    for (int64_t p = 0; p < 16; p++) {
                        if (p < n) memcpy(&v[p], xs + (s0 + p) * c + cb, sizeof v[p]);
                        else v[p] = (v16){0};
                    }
                    transpose16(v);
                    for (int64_t ch = 0; ch < 16; ch++) memcpy(xt + (cb + ch) * lx + q0 + s0, &v[ch], sizeof v[ch]);
                }
            }
        }
    /* gv: row by row, the pairs of positions that hold a pixel of g (the rest stay zero): a pair that
     * starts at the padding before the row, the pairs inside it, one that ends at the padding after it */
    for (int64_t im = 0; im < m; im++)
        for (int64_t r = 0; r < h; r++) {
            const uint16_t *src = j->g + ((a + im) * h + r) * w * o;
            const int64_t q = im * s + r * w1;
            int64_t p = 0;
            if (q & 1) {
                uint32_t *dst = gv + (q >> 1) * o;
                for (int64_t ch = 0; ch < o; ch++) dst[ch] = (uint32_t)src[ch] << 16;
                p = 1;
            }
            for (; p + 1 < w; p += 2) {
                const uint16_t *lo = src + p * o, *hi = lo + o;
                uint32_t *dst = gv + ((q + p) >> 1) * o;
                for (int64_t ch = 0; ch < o; ch++) dst[ch] = lo[ch] | (uint32_t)hi[ch] << 16;
            }
            if (p < w) {
                uint32_t *dst = gv + ((q + p) >> 1) * o;
                for (int64_t ch = 0; ch < o; ch++) dst[ch] = src[p * o + ch];
            }
            if (db) /* the row is in the level-1 cache now */
                for (p = 0; p < w; p++)
                    for (int64_t ch = 0; ch < o; ch++) db[ch] += bf16_value(src[p * o + ch]);
        }
}

/* Adds positions [kb, ke) of the laid-out block to the sums of x's channels [cb, cb + cr), g's
 * [ob, ob + 16 * (1 + two)) and taps `tap` and `tap + 1` (tap 8 alone), in tiles of cr x ow. */
static inline __attribute__((always_inline)) void tile_products(const job *j, int64_t kb, int64_t ke, int64_t lx,
        const uint16_t *xt, const uint32_t *gv, float *acc, int64_t cb, int64_t ob, int tap, int two, int ow) {
    const int64_t c = j->c, o = j->o, w1 = j->w + 1, stride_c = o * sizeof(float), stride_g = o * sizeof(uint32_t);
    const int64_t shift0 = tap / 3 * w1 + tap % 3, shift1 = (tap + 1) / 3 * w1 + (tap + 1) % 3;
    float *c0 = acc + (tap * c + cb) * o + ob, *c1 = c0 + c * o;
    const uint16_t *a = xt + cb * lx;
    _tile_loadd(0, c0, stride_c);
    if (two) _tile_loadd(1, c0 + ow, stride_c);
    if (tap < 8) { /* two taps share each tile of g */
        _tile_loadd(4, c1, stride_c);
        if (two) _tile_loadd(5, c1 + ow, stride_c);
        for (int64_t k = kb; k < ke; k += 32) {
            _tile_loadd(2, gv + (k >> 1) * o + ob, stride_g);
            if (two) _tile_loadd(3, gv + (k >> 1) * o + ob + ow, stride_g);
            _tile_loadd(6, a + k + shift0, lx * sizeof *a);
            _tile_loadd(7, a + k + shift1, lx * sizeof *a);
            _tile_dpbf16ps(0, 6, 2);
            if (two) _tile_dpbf16ps(1, 6, 3);
            _tile_dpbf16ps(4, 7, 2);
            if (two) _tile_dpbf16ps(5, 7, 3);
        }
        _tile_stored(4, c1, stride_c);
        if (two) _tile_stored(5, c1 + ow, stride_c);
    } else {
        for (int64_t k = kb; k < ke; k += 32) {
            _tile_loadd(2, gv + (k >> 1) * o + ob, stride_g);
            if (two) _tile_loadd(3, gv + (k >> 1) * o + ob + ow, stride_g);
            _tile_loadd(6, a + k + shift0, lx * sizeof *a);
            _tile_dpbf16ps(0, 6, 2);
            if (two) _tile_dpbf16ps(1, 6, 3);
        }
    }
    _tile_stored(0, c0, stride_c);
    if (two) _tile_stored(1, c0 + ow, stride_c);
}

/* Adds positions [0, kp) of the laid-out block to acc (9, c, o): g's channels 32 at a time (two tiles
 * per tile of x), a last 16 (or all of them, up to 16) in one. */
static void accumulate(const job *j, int64_t kp, int64_t lx, const uint16_t *xt, const uint32_t *gv, float *acc) {
    const int64_t c = j->c, o = j->o;
    const int ow = o < 16 ? (int)o : 16;
    for (int64_t kb = 0; kb < kp; kb += KBLOCK) {
        const int64_t ke = kb + KBLOCK < kp ? kb + KBLOCK : kp;
        for (int64_t cb = 0; cb < c; cb += 16)
            for (int64_t ob = 0; ob < o; ob += 32)
                for (int tap = 0; tap < 9; tap += 2) {
                    if (o - ob >= 32) tile_products(j, kb, ke, lx, xt, gv, acc, cb, ob, tap, 1, 16);
                    else tile_products(j, kb, ke, lx, xt, gv, acc, cb, ob, tap, 0, ow);
                }
    }
}

/* Images [begin, end) into part `part` of dw; 0 where its buffers could not be allocated. */
static int run_part(const job *j, int64_t begin, int64_t end, int part) {
    const int64_t w1 = j->w + 1, s = (j->h + 1) * w1, c = j->c, o = j->o;
    const int64_t kmax = (j->images * s + 31) / 32 * 32, lx = kmax + 2 * w1 + 2 + 32;
    float *acc = j->dw + part * 9 * c * o, *db = j->db ? j->db + part * o : NULL;
    memset(acc, 0, 9 * c * o * sizeof *acc);
    if (db) memset(db, 0, o * sizeof *db);
    uint16_t *xt = aligned_alloc(64, (c * lx * sizeof *xt + 63) / 64 * 64);
    uint32_t *gv = aligned_alloc(64, (kmax / 2 * o * sizeof *gv + 63) / 64 * 64);
    const int ok = xt != NULL && gv != NULL;
    if (ok) {
        memset(xt, 0, c * lx * sizeof *xt); /* the padding, which stays zero */
        memset(gv, 0, kmax / 2 * o * sizeof *gv);
        configure_tiles(c < 16 ? (int)c : 16, o < 16 ? (int)o : 16);
        for (int64_t a = begin; a < end; a += j->images) {
            const int64_t m = end - a < j->images ? end - a : j->images, kp = (m * s + 31) / 32 * 32;
            lay_out(j, a, m, kp, lx, xt, gv, db);
            accumulate(j, kp, lx, xt, gv, acc);
        }
        _tile_release();
    }
    free(xt);
    free(gv);
    return ok;
}

/* x: (n, h, w, c) bf16, g: (n, h, w, o) bf16, both contiguous; c and o each a multiple of 16 or 1 to
 * 16. dw: (threads, 9, c, o) fp32; db: (threads, o) fp32 for g's sums per channel (a bias's gradient),
 * or NULL. Returns how many parts of dw (and db) hold sums (the rest are not written), or -1 where a
 * part could not allocate its buffers. */
int conv3x3_wgrad(const uint16_t *x, const uint16_t *g, float *dw, float *db, int64_t n, int64_t h, int64_t w, int64_t c,
                  int64_t o, int threads) {
    const int64_t s = (h + 1) * (w + 1);
    const int64_t images = s >= 2048 ? 1 : 2048 / s < 8 ? 2048 / s : 8; /* a block of about 2048 positions */
    const job j = {x, g, dw, db, h, w, c, o, images};
    const int parts = parts_for(n, n * h * w * o, threads);
    int failed = 0;
#pragma omp parallel for num_threads(parts) schedule(static, 1) if (parts > 1) reduction(| : failed)
    for (int t = 0; t < parts; t++) failed |= !run_part(&j, part_begin(n, t, parts), part_begin(n, t + 1, parts), t);
    return failed ? -1 : parts;
}

#else

int conv3x3_wgrad_ready(void) { return 0; }

int conv3x3_wgrad(const uint16_t *x, const uint16_t *g, float *dw, float *db, int64_t n, int64_t h, int64_t w, int64_t c,
                  int64_t o, int threads) {
    (void)x, (void)g, (void)dw, (void)db, (void)n, (void)h, (void)w, (void)c, (void)o, (void)threads;
    return -1;
}

#endif
