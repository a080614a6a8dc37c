/* The augmentation views' geometric copies of uint8 image batches (N, C, H, W), and RandAugment's colour ops.
 *
 * pad_crop_u8, the weak view's per-sample translation and mirror, in one pass over memory: output
 * pixel (i, j) of sample b reads input row i + dy[b] and column j + dx[b], or column
 * (W - 1 - j) + dx[b] where the sample is mirrored; a source outside the image reads its reflection
 * (without repeating the edge) or zero. augment.pad_crop computes the same bytes with torch's ops:
 * an int64 index per output pixel and a gather through it, nine kernels for what is a copy of the
 * batch (454 us of a 512-image training step of 8-13 ms). Here each sample's source rows and columns
 * are tabled once, and each row is a plain copy but for the few columns whose source lies outside
 * the image. Samples are split between OpenMP threads (parallel.h).
 *
 * cutout_u8, the strong view's cutout, fills each sample's box in place; colour_ops_f32 (below) runs
 * one RandAugment round's colour ops on an fp32 batch.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "parallel.h"

/* Source index of output position `i` shifted by `d` in [0, n): reflected, or -1 (zero) outside.
 * Reflection by folding at the edges until inside, which is torch's "reflect" (period 2 (n - 1))
 * without the integer division: a division per row and column took most of the kernel's time. */
static inline int64_t source(int64_t i, int64_t d, int64_t n, int reflect) {
    int64_t s = i + d;
    if (!reflect) return s >= 0 && s < n ? s : -1;
    while (s < 0 || s >= n) s = s < 0 ? -s : 2 * (n - 1) - s;  /* n >= 2 (views.py checks) */
    return s;
}

/* Output row `o` (w pixels) from source row `src`: columns [lo, hi) read the image directly, at
 * j + dx (a memcpy) or, mirrored, w - 1 - j + dx; the few columns outside that run go through the
 * table `cols`. */
static inline void copy_row(uint8_t *restrict o, const uint8_t *restrict src, const int64_t *cols, int64_t w,
                            int64_t lo, int64_t hi, int64_t dx, int mirror) {
    for (int64_t j = 0; j < lo; j++) o[j] = cols[j] < 0 ? 0 : src[cols[j]];
    if (mirror) {
        for (int64_t j = lo; j < hi; j++) o[j] = src[w - 1 - j + dx];
    } else if (hi > lo) {
        memcpy(o + lo, src + lo + dx, hi - lo);  /* a short row: glibc's overlapping vector moves */
    }
    for (int64_t j = hi; j < w; j++) o[j] = cols[j] < 0 ? 0 : src[cols[j]];
}

/* x, out: (n, c, h, w) contiguous; shift: (2, n) row then column offsets; flip: (n,) 0/1 or NULL. */
void pad_crop_u8(const uint8_t *x, uint8_t *out, const int64_t *shift, const uint8_t *flip, int64_t n, int64_t c,
                 int64_t h, int64_t w, int reflect, int threads) {
    const int parts = parts_for(n, n * c * h * w, threads);
#pragma omp parallel for num_threads(parts) schedule(static, 1) if (parts > 1)
    for (int t = 0; t < parts; t++) {
        int64_t rows[h], cols[w];
        for (int64_t b = part_begin(n, t, parts); b < part_begin(n, t + 1, parts); b++) {
            const int mirror = flip && flip[b];
            const int64_t dx = shift[n + b];
            /* the columns whose source j + dx (mirrored: w - 1 - j + dx) lies inside the image */
            int64_t lo = mirror ? dx : -dx, hi = lo + w;
            lo = lo < 0 ? 0 : lo > w ? w : lo;
            hi = hi > w ? w : hi < lo ? lo : hi;
            for (int64_t i = 0; i < h; i++) rows[i] = source(i, shift[b], h, reflect);
            for (int64_t j = 0; j < w; j++) cols[j] = source(mirror ? w - 1 - j : j, dx, w, reflect);
            for (int64_t k = 0; k < c; k++) {
                const uint8_t *image = x + (b * c + k) * h * w;
                uint8_t *o = out + (b * c + k) * h * w;
                for (int64_t i = 0; i < h; i++, o += w) {
                    if (rows[i] < 0) memset(o, 0, w);
                    else copy_row(o, image + rows[i] * w, cols, w, lo, hi, dx, mirror);
                }
            }
        }
    }
}

/* cutout_u8: x (n, c, h, w) contiguous, in place: sample b's rows [top, top + side) and columns
 * [left, left + side), clipped to the image, set to `fill` in every channel. torch's masked_fill
 * needed the whole (n, h, w) mask built first: 0.33 ms of a 448-image strong view; this writes the
 * boxes alone. */
void cutout_u8(uint8_t *x, const int64_t *top, const int64_t *left, const int64_t *side, uint8_t fill, int64_t n,
               int64_t c, int64_t h, int64_t w) {
    for (int64_t b = 0; b < n; b++) {
        const int64_t r0 = top[b] < 0 ? 0 : top[b], r1 = top[b] + side[b] > h ? h : top[b] + side[b];
        const int64_t c0 = left[b] < 0 ? 0 : left[b], c1 = left[b] + side[b] > w ? w : left[b] + side[b];
        if (r1 <= r0 || c1 <= c0) continue;
        for (int64_t k = 0; k < c; k++)
            for (int64_t r = r0; r < r1; r++) memset(x + ((b * c + k) * h + r) * w + c0, fill, c1 - c0);
    }
}

/* colour_ops_f32: one RandAugment round's colour op on every sample of x (n, c, h, w) fp32 on the 0..255
 * scale, in place: sample b gets op[b] (COLOR_OPS' index, -1 none) with its parameter param[b] (the
 * enhance factor, posterize's step q or solarize's threshold, computed by augment.py) and, for
 * contrast, the mean mean[b] of its grey image (computed by torch, whose reduction order this cannot
 * reproduce). Each op is augment._color_op's float32 arithmetic in its order, so the values are the
 * same bits: no contraction into fused multiply-adds (torch rounds every product and sum), and
 * `255 / d` as `(1 / d) * 255`, as torch computes a scalar divided by a tensor. torch's path grouped the
 * samples by op and ran each op on its group: about 150 small calls per 448-image strong view. */
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")

enum { IDENTITY, AUTOCONTRAST, EQUALIZE, BRIGHTNESS, CONTRAST, COLOR, SHARPNESS, POSTERIZE, SOLARIZE };

static inline float clamp255(float v) { return v < 0.0f ? 0.0f : v > 255.0f ? 255.0f : v; }

/* _blend: other + f (img - other), clamped */
static inline float blend(float img, float other, float f) { return clamp255(other + f * (img - other)); }

static inline float grey(float r, float g, float b) { return floorf(0.299f * r + 0.587f * g + 0.114f * b); }

static void autocontrast(float *p, int64_t hw) {
    float lo = p[0], hi = p[0];
    for (int64_t i = 1; i < hw; i++) lo = p[i] < lo ? p[i] : lo, hi = p[i] > hi ? p[i] : hi;
    if (!(hi > lo)) {
        for (int64_t i = 0; i < hw; i++) p[i] = clamp255(p[i] * 1.0f);
        return;
    }
    const float d = hi - lo, scale = (1.0f / (d > 1e-6f ? d : 1e-6f)) * 255.0f;
    for (int64_t i = 0; i < hw; i++) p[i] = clamp255((p[i] - lo) * scale);
}

/* PIL's equalisation on the rounded pixels, all in integers (torch's floats hold them exactly); -1,
 * the image unchanged, where a pixel does not round into 0..255 (torch's path fails there too) */
static int equalize(float *p, int64_t hw) {
    int64_t hist[256] = {0}, lut[256];
    for (int64_t i = 0; i < hw; i++)
        if (!(nearbyintf(p[i]) >= 0.0f && nearbyintf(p[i]) <= 255.0f)) return -1;  /* a NaN too */
    for (int64_t i = 0; i < hw; i++) hist[(int)nearbyintf(p[i])]++;
    int last = 255;
    while (last > 0 && hist[last] == 0) last--;
    const int64_t step = (hw - hist[last]) / 255;
    if (step <= 0) {
        for (int64_t i = 0; i < hw; i++) p[i] = nearbyintf(p[i]);
        return 0;
    }
    for (int64_t v = 0, below = 0; v < 256; below += hist[v], v++) {
        const int64_t l = (below + step / 2) / step;
        lut[v] = l > 255 ? 255 : l;
    }
    for (int64_t i = 0; i < hw; i++) p[i] = (float)lut[(int)nearbyintf(p[i])];
    return 0;
}

static void sharpness(float *p, float *smooth, int64_t h, int64_t w, float f) {
    memcpy(smooth, p, h * w * sizeof *p);
    if (h > 2 && w > 2)
        for (int64_t i = 1; i < h - 1; i++)
            for (int64_t j = 1; j < w - 1; j++) {
                float box = 0.0f;
                for (int dj = -1; dj <= 1; dj++) {  /* vertical sums of three, then across: torch's order */
                    const float column = (p[(i - 1) * w + j + dj] + p[i * w + j + dj]) + p[(i + 1) * w + j + dj];
                    box = dj == -1 ? column : box + column;
                }
                smooth[i * w + j] = nearbyintf((box + 4.0f * p[i * w + j]) / 13.0f);
            }
    for (int64_t i = 0; i < h * w; i++) p[i] = blend(p[i], smooth[i], f);
}

/* 0, or -1 where equalize met a pixel outside 0..255 */
static int colour_op(float *x, int64_t c, int64_t h, int64_t w, int op, float param, float mean, float *scratch) {
    const int64_t hw = h * w;
    switch (op) {
    case AUTOCONTRAST: for (int64_t k = 0; k < c; k++) autocontrast(x + k * hw, hw); break;
    case EQUALIZE:
        for (int64_t k = 0; k < c; k++)
            if (equalize(x + k * hw, hw)) return -1;
        break;
    case BRIGHTNESS: for (int64_t i = 0; i < c * hw; i++) x[i] = blend(x[i], 0.0f, param); break;
    case CONTRAST: for (int64_t i = 0; i < c * hw; i++) x[i] = blend(x[i], mean, param); break;
    case COLOR:
        if (c == 3)
            for (int64_t i = 0; i < hw; i++) {
                const float g = grey(x[i], x[hw + i], x[2 * hw + i]);
                for (int64_t k = 0; k < 3; k++) x[k * hw + i] = blend(x[k * hw + i], g, param);
            }
        break;
    case SHARPNESS: for (int64_t k = 0; k < c; k++) sharpness(x + k * hw, scratch, h, w, param); break;
    case POSTERIZE: for (int64_t i = 0; i < c * hw; i++) x[i] = floorf(x[i] / param) * param; break;
    case SOLARIZE: for (int64_t i = 0; i < c * hw; i++) x[i] = x[i] >= param ? 255.0f - x[i] : x[i]; break;
    default: break;  /* identity, or a geometric op (applied later, as one warp) */
    }
    return 0;
}

/* Returns 0; -1 where a thread could not allocate its scratch image; -2 where equalize met a pixel
 * outside 0..255 (that sample's image unchanged, the others done). */
int colour_ops_f32(float *x, const int32_t *op, const float *param, const float *mean, int64_t n, int64_t c,
                   int64_t h, int64_t w, int threads) {
    const int parts = parts_for(n, n * c * h * w, threads);
    int no_memory = 0, out_of_range = 0;
#pragma omp parallel for num_threads(parts) schedule(static, 1) if (parts > 1) reduction(| : no_memory, out_of_range)
    for (int t = 0; t < parts; t++) {
        float *scratch = malloc(h * w * sizeof *scratch);
        if (!scratch) {
            no_memory = 1;
            continue;
        }
        for (int64_t b = part_begin(n, t, parts); b < part_begin(n, t + 1, parts); b++)
            out_of_range |= colour_op(x + b * c * h * w, c, h, w, op[b], param[b], mean[b], scratch) != 0;
        free(scratch);
    }
    return no_memory ? -1 : out_of_range ? -2 : 0;
}

#pragma GCC pop_options
