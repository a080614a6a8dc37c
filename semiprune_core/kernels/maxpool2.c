/* 2x2 max-pooling, stride 2, floor mode, over channels-last tensors stored as (N, H, W, C), in bf16
 * or fp32: the forward with a one-byte index of each window's maximum, and the backward from it.
 *
 * Bit for bit what torch's CPU kernel (max_pool2d_with_indices and its backward) gives: each
 * window is scanned in row-major order and an element replaces the maximum when it is greater or
 * NaN, so the first maximum wins a tie and a NaN always wins. torch's kernel writes an int64 index
 * per output element and its backward first zero-fills the input gradient and then scatters into
 * it; here the index is one byte, and the backward writes every element of the input gradient
 * once: one pass over memory where torch's makes two.
 *
 * Work is split over output rows (forward) or images (backward) between OpenMP threads (parallel.h).
 */
#include <stdint.h>
#include <string.h>

#include "bf16.h"
#include "parallel.h"

typedef struct {
    const void *in;  /* forward: x (N, H, W, C); backward: grad of y (N, H/2, W/2, C) */
    void *out;       /* forward: y; backward: grad of x */
    uint8_t *idx;    /* (N, H/2, W/2, C): 0..3, the window position of the maximum; NULL: not kept */
    const float *scale, *shift;  /* (C,): inference's BatchNorm + ReLU applied to y (bf16.h); NULL: none */
    int64_t h, w, c, begin, end;
} job;

/* `bf16`, `keep` and `affine` are constants at every call, so each combination compiles to its own
 * vectorised loop; the running maximum is kept as stored bits and as a float to compare. */
static inline __attribute__((always_inline)) void forward_rows(const job *j, int bf16, int keep, int affine) {
    const int64_t w = j->w, c = j->c, oh = j->h / 2, ow = j->w / 2, size = bf16 ? 2 : 4;
    for (int64_t r = j->begin; r < j->end; r++) {  /* r: (image, output row) */
        const char *row0 = (const char *)j->in + ((r / oh) * j->h + 2 * (r % oh)) * w * c * size;
        const char *row1 = row0 + w * c * size;
        for (int64_t col = 0; col < ow; col++) {
            const char *p[4] = {row0 + 2 * col * c * size, row0 + (2 * col + 1) * c * size,
                                row1 + 2 * col * c * size, row1 + (2 * col + 1) * c * size};
            int64_t o = (r * ow + col) * c;
            uint8_t *restrict index = keep ? j->idx + o : NULL;  /* restrict: a byte store may alias anything */
            if (bf16) {
                const uint16_t *a = (const uint16_t *)p[0], *b = (const uint16_t *)p[1],
                               *d = (const uint16_t *)p[2], *e = (const uint16_t *)p[3];
                uint16_t *restrict y = (uint16_t *)j->out + o;
#pragma GCC ivdep
                for (int64_t k = 0; k < c; k++) {
                    float m = bf16_value(a[k]), v;
                    uint16_t bits = a[k];
                    uint8_t at = 0;
                    int u;
                    v = bf16_value(b[k]); u = (v > m) | (v != v); m = u ? v : m; bits = u ? b[k] : bits; at = u ? 1 : at;
                    v = bf16_value(d[k]); u = (v > m) | (v != v); m = u ? v : m; bits = u ? d[k] : bits; at = u ? 2 : at;
                    v = bf16_value(e[k]); u = (v > m) | (v != v); bits = u ? e[k] : bits; at = u ? 3 : at;
                    y[k] = affine ? bf16_round(bn_relu(bf16_value(bits), j->scale[k], j->shift[k])) : bits;
                    if (keep) index[k] = at;
                }
            } else {
                const float *a = (const float *)p[0], *b = (const float *)p[1],
                            *d = (const float *)p[2], *e = (const float *)p[3];
                float *restrict y = (float *)j->out + o;
#pragma GCC ivdep
                for (int64_t k = 0; k < c; k++) {
                    float m = a[k], v;
                    uint8_t at = 0;
                    int u;
                    v = b[k]; u = (v > m) | (v != v); m = u ? v : m; at = u ? 1 : at;
                    v = d[k]; u = (v > m) | (v != v); m = u ? v : m; at = u ? 2 : at;
                    v = e[k]; u = (v > m) | (v != v); m = u ? v : m; at = u ? 3 : at;
                    y[k] = affine ? bn_relu(m, j->scale[k], j->shift[k]) : m;
                    if (keep) index[k] = at;
                }
            }
        }
    }
}

/* Each element of the input gradient is written once: the output's gradient where the index
 * points to it, zero elsewhere (and on the odd last row or column that floor mode drops). */
#define BACKWARD(NAME, T)                                                                          \
    static void NAME(const job *j) {                                                               \
        const int64_t h = j->h, w = j->w, c = j->c, oh = h / 2, ow = w / 2;                        \
        for (int64_t n = j->begin; n < j->end; n++) {                                              \
            T *image = (T *)j->out + n * h * w * c;                                                \
            for (int64_t i = 0; i < oh; i++) {                                                     \
                T *row0 = image + 2 * i * w * c, *row1 = row0 + w * c;                             \
                for (int64_t col = 0; col < ow; col++) {                                           \
                    int64_t o = ((n * oh + i) * ow + col) * c;                                     \
                    const T *g = (const T *)j->in + o;                                             \
                    const uint8_t *restrict at = j->idx + o;                                       \
                    T *restrict a = row0 + 2 * col * c, *restrict b = a + c;                       \
                    T *restrict d = row1 + 2 * col * c, *restrict e = d + c;                       \
                    _Pragma("GCC ivdep") for (int64_t k = 0; k < c; k++) {                         \
                        T v = g[k];                                                                \
                        a[k] = v & (T) - (at[k] == 0);                                             \
                        b[k] = v & (T) - (at[k] == 1);                                             \
                        d[k] = v & (T) - (at[k] == 2);                                             \
                        e[k] = v & (T) - (at[k] == 3);                                             \
                    }                                                                              \
                }                                                                                  \
                if (w & 1) {                                                                       \
                    memset(row0 + (w - 1) * c, 0, c * sizeof(T));                                  \
                    memset(row1 + (w - 1) * c, 0, c * sizeof(T));                                  \
                }                                                                                  \
            }                                                                                      \
            if (h & 1) memset(image + (h - 1) * w * c, 0, w * c * sizeof(T));                      \
        }                                                                                          \
    }

static void forward_bf16(const job *j) { forward_rows(j, 1, 1, 0); }
static void forward_bf16_values(const job *j) { forward_rows(j, 1, 0, 0); }
static void forward_bf16_bn_relu(const job *j) { forward_rows(j, 1, 0, 1); }
static void forward_f32(const job *j) { forward_rows(j, 0, 1, 0); }
static void forward_f32_values(const job *j) { forward_rows(j, 0, 0, 0); }
static void forward_f32_bn_relu(const job *j) { forward_rows(j, 0, 0, 1); }
BACKWARD(backward_16, uint16_t)
BACKWARD(backward_32, uint32_t)

/* Runs `fn` over [0, total) in contiguous parts on OpenMP's threads (see parallel.h). */
static void run(void (*fn)(const job *), job base, int64_t total, int64_t elements, int threads) {
    const int parts = parts_for(total, elements, threads);
#pragma omp parallel for num_threads(parts) schedule(static, 1) if (parts > 1)
    for (int t = 0; t < parts; t++) {
        job part = base;
        part.begin = part_begin(total, t, parts);
        part.end = part_begin(total, t + 1, parts);
        fn(&part);
    }
}

/* x: (n, h, w, c) contiguous; y: (n, h/2, w/2, c); idx: the same size in bytes, or NULL; scale and
 * shift: (c,) fp32 for inference's BatchNorm + ReLU on y (only without idx), or NULL. */
void maxpool2_forward(const void *x, void *y, uint8_t *idx, const float *scale, const float *shift, int64_t n,
                     int64_t h, int64_t w, int64_t c, int bf16, int threads) {
    job j = {x, y, idx, scale, shift, h, w, c, 0, 0};
    void (*fn)(const job *) = idx ? (bf16 ? forward_bf16 : forward_f32)
                            : scale ? (bf16 ? forward_bf16_bn_relu : forward_f32_bn_relu)
                                    : (bf16 ? forward_bf16_values : forward_f32_values);
    run(fn, j, n * (h / 2), n * h * w * c, threads);
}

/* grad_y: (n, h/2, w/2, c) contiguous; grad_x: (n, h, w, c), every element written. */
void maxpool2_backward(const void *grad_y, const uint8_t *idx, void *grad_x, int64_t n, int64_t h, int64_t w,
                      int64_t c, int bf16, int threads) {
    job j = {grad_y, grad_x, (uint8_t *)idx, NULL, NULL, h, w, c, 0, 0};
    run(bf16 ? backward_16 : backward_32, j, n, n * h * w * c, threads);
}

/* x: (n, hw, c) contiguous; out: (n, c). Inference's BatchNorm + ReLU followed by a global max-pool:
 * bn_relu rounded to the storage type is monotone in its input (nondecreasing where scale >= 0,
 * nonincreasing where it is negative), so the maximum of the outputs is the output of each channel's
 * maximum (or minimum) input: the same bits as the three layers, from one read of x. A NaN anywhere
 * in a channel gives NaN, as torch's max-pool does. */
static inline __attribute__((always_inline)) void global_extremes(const void *x, float *restrict hi,
                                                                   float *restrict lo, int64_t hw, int64_t c, int bf16) {
    for (int64_t k = 0; k < c; k++) hi[k] = lo[k] = bf16 ? bf16_value(((const uint16_t *)x)[k]) : ((const float *)x)[k];
    for (int64_t p = 1; p < hw; p++) {
        for (int64_t k = 0; k < c; k++) {  /* a NaN, once taken, stays: no comparison with it holds */
            const float v = bf16 ? bf16_value(((const uint16_t *)x)[p * c + k]) : ((const float *)x)[p * c + k];
            hi[k] = (v > hi[k]) | (v != v) ? v : hi[k];
            lo[k] = (v < lo[k]) | (v != v) ? v : lo[k];
        }
    }
}

void bn_relu_global_max(const void *x, void *out, const float *scale, const float *shift, int64_t n, int64_t hw,
                        int64_t c, int bf16, int threads) {
    const int parts = parts_for(n, n * hw * c, threads);
#pragma omp parallel for num_threads(parts) schedule(static, 1) if (parts > 1)
    for (int t = 0; t < parts; t++) {
        float hi[c], lo[c];
        for (int64_t b = part_begin(n, t, parts); b < part_begin(n, t + 1, parts); b++) {
            if (bf16) global_extremes((const uint16_t *)x + b * hw * c, hi, lo, hw, c, 1);
            else global_extremes((const float *)x + b * hw * c, hi, lo, hw, c, 0);
            for (int64_t k = 0; k < c; k++) {
                const float r = bn_relu(scale[k] >= 0.0f ? hi[k] : lo[k], scale[k], shift[k]);
                if (bf16) ((uint16_t *)out)[b * c + k] = bf16_round(r);
                else ((float *)out)[b * c + k] = r;
            }
        }
    }
}
