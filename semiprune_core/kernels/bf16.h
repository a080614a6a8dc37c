/* bf16 storage: the upper half of an fp32's bits. */
#include <stdint.h>
#include <string.h>

static inline float bf16_value(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* fp32 -> bf16 bits as torch rounds: to nearest even, NaN to 0x7fc0. */
static inline uint16_t bf16_round(float v) {
    uint32_t u;
    memcpy(&u, &v, sizeof u);
    return v != v ? 0x7fc0 : (uint16_t)((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}

/* Inference's BatchNorm and ReLU after a pool, as torch's eval-mode BatchNorm computes them for a
 * channels-last tensor: v * scale + shift per channel (scale = weight / sqrt(running_var + eps),
 * shift = bias - running_mean * scale), then max(0, .), a NaN kept. */
static inline float bn_relu(float v, float scale, float shift) {
    const float r = v * scale + shift;
    return (r > 0.0f) | (r != r) ? r : 0.0f;
}
