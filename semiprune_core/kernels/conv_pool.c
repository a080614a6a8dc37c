/* A 3x3 convolution (stride 1, padding 1, no bias) fused with the 2x2 max-pool (stride 2, floor
 * mode) after it, over channels-last tensors: x (N, H, W, CI) -> y (N, H/2, W/2, CO), in bf16 (as
 * under torch's bf16 autocast) or fp32, with a one-byte index of each window's maximum; and the
 * weight gradient from y's gradient and that index.
 *
 * Meant for a network's first layer, where the input has few channels and the full-resolution
 * activation dominates the cost: that activation (N, H, W, CO) and its gradient are never written.
 * Each pooled output computes the four convolution outputs of its window from the 4x4 input patch
 * under it, in fp32 (products of bf16 values are exact in fp32), rounds them to the storage type as
 * oneDNN's kernel does, and keeps the first maximum in row-major order (a NaN always wins), as
 * torch's pool does. Only the order of the fp32 sums differs from oneDNN's, so a value can differ
 * by one rounding step of the storage type.
 *
 * The weight gradient sums, over every pooled output, y's gradient times the 3x3 input patch under
 * the window position the index names: the convolution's gradient is zero everywhere else. Images
 * are split between threads; each image is summed in fp32, the images of a part in double.
 *
 * Buffers live on the stack: the caller keeps W * CI small (a few KB).
 */
#include <stdint.h>
#include <string.h>

#include "bf16.h"
#include "parallel.h"

typedef struct {
    const void *x;   /* (N, H, W, CI), bf16 or fp32 */
    const float *w;  /* (3, 3, CI, CO) fp32: forward, the weights (rounded to bf16 in bf16 mode) */
    void *y;         /* (N, H/2, W/2, CO): forward, the output; backward, its gradient */
    uint8_t *idx;    /* (N, H/2, W/2, CO): 0..3, the window position of the maximum; NULL: not kept */
    const float *scale, *shift; /* (CO,): inference's BatchNorm + ReLU applied to y (bf16.h); NULL: none */
    double *dw;      /* backward: (parts, 3, 3, CI, CO), each part's sum */
    int64_t h, w_, ci, co;
} job;

/* Input rows 2i-1 .. 2i+2 of image n (the 4 under pooled row i), as fp32 with a zero border: pad
 * is (4, W + 2, CI). */
static inline __attribute__((always_inline)) void patch_rows(const job *j, int64_t n, int64_t i, int bf16, float *pad) {
    const int64_t h = j->h, w = j->w_, ci = j->ci, stride = (w + 2) * ci;
    for (int64_t r = 0; r < 4; r++) {
        const int64_t y = 2 * i - 1 + r;
        float *out = pad + r * stride;
        memset(out, 0, ci * sizeof(float));
        memset(out + (w + 1) * ci, 0, ci * sizeof(float));
        if (y < 0 || y >= h) {
            memset(out, 0, stride * sizeof(float));
            continue;
        }
        const int64_t at = (n * h + y) * w * ci;
        if (bf16) {
            const uint16_t *src = (const uint16_t *)j->x + at;
            for (int64_t k = 0; k < w * ci; k++) out[ci + k] = bf16_value(src[k]);
        } else {
            memcpy(out + ci, (const float *)j->x + at, w * ci * sizeof(float));
        }
    }
}

/* Channels are computed a vector register at a time, in GCC's vector types: 16 with AVX-512, 8 with
 * AVX, 4 otherwise (a wider type than the registers spills: 7x slower without AVX-512). */
#if defined(__AVX512F__)
#define LANES 16
#elif defined(__AVX__)
#define LANES 8
#else
#define LANES 4
#endif
typedef float vf __attribute__((vector_size(4 * LANES)));
typedef int32_t vi __attribute__((vector_size(4 * LANES)));
typedef uint32_t vu __attribute__((vector_size(4 * LANES)));
typedef uint16_t vh __attribute__((vector_size(2 * LANES)));
typedef uint8_t vb __attribute__((vector_size(LANES)));

static inline vf load_f(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }

/* LANES stored values (bf16 or fp32) as fp32. */
static inline vf load_stored(const void *p, int64_t at, int bf16) {
    if (!bf16) return load_f((const float *)p + at);
    vh h;
    memcpy(&h, (const uint16_t *)p + at, sizeof h);
    return (vf)(__builtin_convertvector(h, vu) << 16);
}

/* fp32 -> bf16 bits (in the high half) as torch and oneDNN round: to nearest even, NaN to 0x7fc0. */
static inline vi round_bf16(vf v) {
    const vu u = (vu)v;
    const vi r = (vi)((u + 0x7fff + ((u >> 16) & 1)) & 0xffff0000u), nan = v != v;
    return (r & ~nan) | (0x7fc00000 & nan);
}

/* The four convolution outputs of the windows of `cols` adjacent pooled columns from `col` on, for
 * LANES channels from `b` on. Two columns at once give eight independent sums, enough to keep the
 * FMA units busy; each is summed over t = (ky, kx, c), the order oneDNN sums in. */
static inline __attribute__((always_inline)) void windows(const float *pad, const float *w, int64_t stride, int64_t ci,
                                                          int64_t co, int64_t col, int64_t b, int cols, vf acc[][4]) {
    for (int q = 0; q < cols; q++) acc[q][0] = acc[q][1] = acc[q][2] = acc[q][3] = (vf){0};
    /* t = (ky, kx, c) as three loops: with `ci` a constant they unroll, and no tap computes its offsets
     * by division at run time (they took a third of the instructions with one input channel) */
#pragma GCC unroll 3
    for (int64_t ky = 0; ky < 3; ky++)
#pragma GCC unroll 3
        for (int64_t kx = 0; kx < 3; kx++)
#pragma GCC unroll 4
            for (int64_t c = 0; c < ci; c++) {
                const vf wv = load_f(w + ((ky * 3 + kx) * ci + c) * co + b);
                for (int q = 0; q < cols; q++) {
                    const float *top = pad + ky * stride + (2 * (col + q) + kx) * ci + c;
                    acc[q][0] += top[0] * wv;
                    acc[q][1] += top[ci] * wv;
                    acc[q][2] += top[stride] * wv;
                    acc[q][3] += top[stride + ci] * wv;
                }
            }
}

/* Each window's values as stored, then torch's pool: the first maximum, or a NaN; then, with
 * `affine`, inference's BatchNorm and ReLU of channels b.. (bn_relu in bf16.h), rounded once more.
 * Without the index, the maximum is taken before rounding to bf16 and rounded once: rounding is
 * monotone, so that is the maximum of the rounded values (up to the sign of a zero that only a value
 * below bf16's smallest one could round to): one rounding instead of four, and the first layer of
 * fastcnn inferred 1.11x faster in bf16 (1024 images: 1.86 -> 1.68 ms with the BatchNorm terms). */
static inline __attribute__((always_inline)) void pool_store(const job *j, const vf acc[4], int64_t at, int64_t b,
                                                             int bf16, int keep, int affine) {
    vi bits = bf16 && keep ? round_bf16(acc[0]) : (vi)acc[0], best = {0};
    vf m = (vf)bits;
    for (int k = 1; k < 4; k++) {
        const vi kb = bf16 && keep ? round_bf16(acc[k]) : (vi)acc[k];
        const vf v = (vf)kb;
        const vi u = (v > m) | (v != v);
        m = (vf)(((vi)v & u) | ((vi)m & ~u));
        if (keep) {
            bits = (kb & u) | (bits & ~u);
            best = (k & u) | (best & ~u);
        }
    }
    if (bf16 && !keep) m = (vf)(bits = round_bf16(m));
    if (affine) {
        const vf r = m * load_f(j->scale + b) + load_f(j->shift + b);
        m = (vf)((vi)r & ((r > 0) | (r != r)));
        if (bf16) bits = round_bf16(m);
    }
    if (bf16) {
        const vh h = __builtin_convertvector((vu)bits >> 16, vh);
        memcpy((uint16_t *)j->y + at, &h, sizeof h);
    } else {
        memcpy((float *)j->y + at, &m, sizeof m);
    }
    if (keep) {
        const vb i8 = __builtin_convertvector(best, vb);
        memcpy(j->idx + at, &i8, sizeof i8);
    }
}

/* `ci`, `bf16`, `keep` and `affine` are constants at each call below, so each combination compiles to
 * its own loops, with the accumulators in registers. */
static inline __attribute__((always_inline)) void forward_part(const job *j, int64_t begin, int64_t end, int64_t ci,
                                                               int bf16, int keep, int affine) {
    const int64_t co = j->co, oh = j->h / 2, ow = j->w_ / 2, stride = (j->w_ + 2) * ci;
    float pad[4 * stride]; /* the caller bounds W and CI: a few KB */
    vf acc[2][4];
    for (int64_t r = begin; r < end; r++) { /* r: (image, pooled row) */
        patch_rows(j, r / oh, r % oh, bf16, pad);
        for (int64_t b = 0; b < co; b += LANES) {
            int64_t col = 0;
            for (; col + 2 <= ow; col += 2) {
                windows(pad, j->w, stride, ci, co, col, b, 2, acc);
                pool_store(j, acc[0], (r * ow + col) * co + b, b, bf16, keep, affine);
                pool_store(j, acc[1], (r * ow + col + 1) * co + b, b, bf16, keep, affine);
            }
            if (col < ow) {
                windows(pad, j->w, stride, ci, co, col, b, 1, acc);
                pool_store(j, acc[0], (r * ow + col) * co + b, b, bf16, keep, affine);
            }
        }
    }
}

static inline __attribute__((always_inline)) void backward_part(const job *j, int64_t begin, int64_t end, int part,
                                                                int64_t ci, int bf16) {
    const int64_t co = j->co, oh = j->h / 2, ow = j->w_ / 2, stride = (j->w_ + 2) * ci;
    float pad[4 * stride];
    double *dw = j->dw + part * 9 * ci * co;
    for (int64_t n = begin; n < end; n++)
        for (int64_t b = 0; b < co; b += LANES) {
            vf acc[9 * ci]; /* this image's gradient of these channels' taps */
            for (int64_t t = 0; t < 9 * ci; t++) acc[t] = (vf){0};
            for (int64_t i = 0; i < oh; i++) {
                patch_rows(j, n, i, bf16, pad);
                for (int64_t col = 0; col < ow; col++) {
                    const int64_t at = ((n * oh + i) * ow + col) * co + b;
                    vb i8;
                    memcpy(&i8, j->idx + at, sizeof i8);
                    const vi best = __builtin_convertvector(i8, vi), g = (vi)load_stored(j->y, at, bf16);
                    /* the gradient at each window position: zero but at the maximum */
                    const vf g0 = (vf)(g & (best == 0)), g1 = (vf)(g & (best == 1)), g2 = (vf)(g & (best == 2)),
                             g3 = (vf)(g & (best == 3));
                    for (int64_t t = 0; t < 9 * ci; t++) {
                        const float *top = pad + (t / (3 * ci)) * stride + (2 * col + t / ci % 3) * ci + t % ci;
                        acc[t] += g0 * top[0] + g1 * top[ci] + g2 * top[stride] + g3 * top[stride + ci];
                    }
                }
            }
            for (int64_t t = 0; t < 9 * ci; t++)
                for (int k = 0; k < LANES; k++) dw[t * co + b + k] += acc[t][k];
        }
}

static void forward(const job *j, int64_t begin, int64_t end, int bf16) {
    const int keep = j->idx != NULL, affine = j->scale != NULL;
#define FORWARD(CI)                                                     \
    if (bf16) {                                                         \
        if (keep) forward_part(j, begin, end, CI, 1, 1, 0);             \
        else if (affine) forward_part(j, begin, end, CI, 1, 0, 1);      \
        else forward_part(j, begin, end, CI, 1, 0, 0);                  \
    } else {                                                            \
        if (keep) forward_part(j, begin, end, CI, 0, 1, 0);             \
        else if (affine) forward_part(j, begin, end, CI, 0, 0, 1);      \
        else forward_part(j, begin, end, CI, 0, 0, 0);                  \
    }
    if (j->ci == 1) { FORWARD(1) } else if (j->ci == 3) { FORWARD(3) } else { FORWARD(j->ci) }
#undef FORWARD
}

static void backward(const job *j, int64_t begin, int64_t end, int part, int bf16) {
#define BACKWARD(CI)                                                    \
    if (bf16) backward_part(j, begin, end, part, CI, 1);                \
    else backward_part(j, begin, end, part, CI, 0);
    if (j->ci == 1) { BACKWARD(1) } else if (j->ci == 3) { BACKWARD(3) } else { BACKWARD(j->ci) }
#undef BACKWARD
}

/* x: (n, h, w, ci) contiguous; w: (3, 3, ci, co) fp32; y: (n, h/2, w/2, co); idx: the same size in
 * bytes, or NULL; scale and shift: (co,) fp32 for inference's BatchNorm + ReLU on y (only without idx),
 * or NULL. bf16: x and y are bf16 (and w holds bf16 values), else fp32. */
void conv_pool_forward(const void *x, const float *w, void *y, uint8_t *idx, const float *scale, const float *shift,
                       int64_t n, int64_t h, int64_t wd, int64_t ci, int64_t co, int bf16, int threads) {
    const job j = {x, w, y, idx, scale, shift, NULL, h, wd, ci, co};
    const int64_t total = n * (h / 2);
    const int parts = parts_for(total, n * h * wd * co, threads);
#pragma omp parallel for num_threads(parts) schedule(static, 1) if (parts > 1)
    for (int t = 0; t < parts; t++) forward(&j, part_begin(total, t, parts), part_begin(total, t + 1, parts), bf16);
}

/* grad_y: (n, h/2, w/2, co) contiguous, with the forward's x and idx; dw: (threads, 3, 3, ci, co)
 * zeros, into which each part adds its images' weight gradient (the caller sums the parts). */
void conv_pool_backward_weight(const void *x, const void *grad_y, const uint8_t *idx, double *dw, int64_t n,
                               int64_t h, int64_t wd, int64_t ci, int64_t co, int bf16, int threads) {
    const int parts = parts_for(n, n * h * wd * co, threads);
    const job j = {x, NULL, (void *)grad_y, (uint8_t *)idx, NULL, NULL, dw, h, wd, ci, co};
#pragma omp parallel for num_threads(parts) schedule(static, 1) if (parts > 1)
    for (int t = 0; t < parts; t++) backward(&j, part_begin(n, t, parts), part_begin(n, t + 1, parts), t, bf16);
}
