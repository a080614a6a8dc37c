/* Training-mode BatchNorm followed by a ReLU over channels-last tensors stored as (M, C) rows
 * (M = N * H * W), in bf16 or fp32, with fp32 parameters: the forward (batch statistics, the
 * running-statistics update, the normalised and rectified output) and the backward (the input's,
 * the weight's and the bias's gradients).
 *
 * torch runs these as BatchNorm's kernels and then ReLU's: on a bf16 channels-last tensor of a
 * fastcnn step they took 20-50x as long as a copy of it. Here the forward makes two passes over
 * memory (statistics; output) and the backward two (its sums; the input's gradient).
 *
 * Sums are taken of each value minus its channel's value in the first row (the shifted-data
 * algorithm: no cancellation when a channel's mean is large against its spread), in fp32 over
 * blocks of BLOCK rows and in double across blocks and threads.
 *
 * Work is split over rows between OpenMP threads (parallel.h).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"
/* Two passes over each element and its sums: 256 x 32 x 3 x 3 (74k) ran 1.6x faster on two
 * threads than on one. */
#define MIN_PER_THREAD (1 << 14)
#include "parallel.h"

#define BLOCK 64

typedef struct {
    const void *x;   /* (M, C): the input */
    const void *g;   /* backward: (M, C), the output's gradient */
    void *out;       /* forward: y; backward: the input's gradient */
    const float *t;  /* (4, C) terms: mean, invstd, scale, shift (y = relu(x * scale + shift)) */
    const float *k;  /* backward: (3, C): dx = kg * masked g + kx * x + kc */
    double *sums;    /* (parts, 2, C): each part's two sums per channel */
    int64_t c, begin, end;
} job;

static inline __attribute__((always_inline)) float load(const void *p, int64_t i, int bf16) {
    return bf16 ? bf16_value(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static inline __attribute__((always_inline)) void store(void *p, int64_t i, float v, int bf16) {
    if (bf16)
        ((uint16_t *)p)[i] = bf16_round(v);
    else
        ((float *)p)[i] = v;
}

/* Each channel's two sums over rows begin..end, in fp32 within blocks of BLOCK rows and in double
 * across them. Forward (`grad` 0): of d = x - x[0] and of d * d. Backward: of the gradient where the
 * ReLU let it through (as the forward's output decides it; a NaN passes), gm, and of gm * (x - mean). */
static inline __attribute__((always_inline)) void sums_rows(const job *j, int bf16, int grad) {
    const int64_t c = j->c;
    const float *scale = j->t + 2 * c, *shift = j->t + 3 * c;
    double *s = j->sums, *q = s + c;
    float fs[c], fq[c], ref[c];
    for (int64_t k = 0; k < c; k++) ref[k] = grad ? j->t[k] : load(j->x, k, bf16), s[k] = q[k] = 0;
    for (int64_t r0 = j->begin; r0 < j->end; r0 += BLOCK) {
        const int64_t r1 = r0 + BLOCK < j->end ? r0 + BLOCK : j->end;
        memset(fs, 0, sizeof fs), memset(fq, 0, sizeof fq);
        for (int64_t r = r0; r < r1; r++) {
#pragma GCC ivdep
            for (int64_t k = 0; k < c; k++) {
                const float x = load(j->x, r * c + k, bf16), d = x - ref[k];
                const float g = grad ? load(j->g, r * c + k, bf16) : 0.0f;  /* loaded outside the select: vectorised */
                const float a = !grad ? d : bn_relu(x, scale[k], shift[k]) <= 0.0f ? 0.0f : g;
                fs[k] += a, fq[k] += a * (grad ? d : a);
            }
        }
        for (int64_t k = 0; k < c; k++) s[k] += fs[k], q[k] += fq[k];
    }
}

static inline __attribute__((always_inline)) void output_rows(const job *j, int bf16) {
    const int64_t c = j->c;
    const float *scale = j->t + 2 * c, *shift = j->t + 3 * c;
    for (int64_t r = j->begin; r < j->end; r++) {
#pragma GCC ivdep
        for (int64_t k = 0; k < c; k++) store(j->out, r * c + k, bn_relu(load(j->x, r * c + k, bf16), scale[k], shift[k]), bf16);
    }
}

static inline __attribute__((always_inline)) void grad_input_rows(const job *j, int bf16) {
    const int64_t c = j->c;
    const float *scale = j->t + 2 * c, *shift = j->t + 3 * c, *kg = j->k, *kx = j->k + c, *kc = j->k + 2 * c;
    for (int64_t r = j->begin; r < j->end; r++) {
#pragma GCC ivdep
        for (int64_t k = 0; k < c; k++) {
            const float x = load(j->x, r * c + k, bf16), g = load(j->g, r * c + k, bf16);
            const float gm = bn_relu(x, scale[k], shift[k]) <= 0.0f ? 0.0f : g;
            store(j->out, r * c + k, gm * kg[k] + (x * kx[k] + kc[k]), bf16);
        }
    }
}

static void stats_16(const job *j) { sums_rows(j, 1, 0); }
static void stats_32(const job *j) { sums_rows(j, 0, 0); }
static void grad_sums_16(const job *j) { sums_rows(j, 1, 1); }
static void grad_sums_32(const job *j) { sums_rows(j, 0, 1); }
static void output_16(const job *j) { output_rows(j, 1); }
static void output_32(const job *j) { output_rows(j, 0); }
static void grad_input_16(const job *j) { grad_input_rows(j, 1); }
static void grad_input_32(const job *j) { grad_input_rows(j, 0); }

/* Runs `fn` over rows [0, m) in `parts` contiguous parts on OpenMP's threads; part t's sums (if
 * any) go to base.sums + 2 * c * t. */
static void run(void (*fn)(const job *), job base, int64_t m, int parts) {
#pragma omp parallel for num_threads(parts) schedule(static, 1) if (parts > 1)
    for (int t = 0; t < parts; t++) {
        job part = base;
        part.begin = part_begin(m, t, parts);
        part.end = part_begin(m, t + 1, parts);
        if (part.sums) part.sums += 2 * base.c * t;
        fn(&part);
    }
}

/* Adds every part's sums into the first part's. */
static void reduce(double *sums, int64_t c, int parts) {
    for (int t = 1; t < parts; t++)
        for (int64_t k = 0; k < 2 * c; k++) sums[k] += sums[2 * c * t + k];
}

/* x, y: (m, c) contiguous, m >= 2; weight, bias: (c,) or NULL (1 and 0); terms: (4, c) written
 * (mean, invstd, scale, shift: what the backward needs); running_mean, running_var: (c,) updated
 * as running = (1 - momentum) * running + momentum * batch (the variance unbiased), or NULL.
 * Returns 0, or -1 where memory for the sums could not be had (nothing written then). */
int bn_relu_forward(const void *x, void *y, const float *weight, const float *bias, float *terms, float *running_mean,
                    float *running_var, double momentum, double eps, int64_t m, int64_t c, int bf16, int threads) {
    const int parts = parts_for(m, m * c, threads);
    double *sums = malloc(sizeof(double) * 2 * c * parts);
    if (!sums) return -1;
    job j = {x, NULL, y, terms, NULL, sums, c, 0, 0};
    run(bf16 ? stats_16 : stats_32, j, m, parts);
    reduce(sums, c, parts);
    for (int64_t k = 0; k < c; k++) {
        const double ref = load(x, k, bf16), d = sums[k] / m, var = fmax(sums[c + k] / m - d * d, 0.0);
        const double mean = ref + d, invstd = 1.0 / sqrt(var + eps), w = weight ? weight[k] : 1.0;
        terms[k] = (float)mean, terms[c + k] = (float)invstd;
        terms[2 * c + k] = (float)(w * invstd);
        terms[3 * c + k] = (float)((bias ? bias[k] : 0.0) - mean * (double)terms[2 * c + k]);
        if (running_mean) running_mean[k] = (float)((1 - momentum) * running_mean[k] + momentum * mean);
        if (running_var) running_var[k] = (float)((1 - momentum) * running_var[k] + momentum * var * m / (m - 1));
    }
    free(sums);
    j.sums = NULL;
    run(bf16 ? output_16 : output_32, j, m, parts);
    return 0;
}

/* g, x, dx: (m, c) contiguous; terms: the forward's; weight: (c,) or NULL; dweight, dbias: (c,)
 * written. Returns 0, or -1 where memory for the sums could not be had (nothing written then). */
int bn_relu_backward(const void *g, const void *x, void *dx, const float *terms, const float *weight, float *dweight,
                     float *dbias, int64_t m, int64_t c, int bf16, int threads) {
    const int parts = parts_for(m, m * c, threads);
    double *sums = malloc(sizeof(double) * 2 * c * parts + sizeof(float) * 3 * c);
    if (!sums) return -1;
    float *k3 = (float *)(sums + 2 * c * parts);
    job j = {x, g, dx, terms, k3, sums, c, 0, 0};
    run(bf16 ? grad_sums_16 : grad_sums_32, j, m, parts);
    reduce(sums, c, parts);
    for (int64_t k = 0; k < c; k++) {
        /* dx = w * invstd * (gm - mean(gm) - (x - mean) * invstd^2 * mean(gm * (x - mean))) */
        const double mean = terms[k], invstd = terms[c + k], a = (weight ? weight[k] : 1.0) * invstd;
        const double sg = sums[k], sgx = sums[c + k], kx = -a * invstd * invstd * sgx / m;
        dweight[k] = (float)(sgx * invstd), dbias[k] = (float)sg;
        k3[k] = (float)a, k3[c + k] = (float)kx, k3[2 * c + k] = (float)(-a * sg / m - kx * mean);
    }
    j.sums = NULL;
    run(bf16 ? grad_input_16 : grad_input_32, j, m, parts);
    free(sums);
    return 0;
}
