/* bf16 storage: the upper half of an fp32's bits. */
#include <stdint.h>
#include <string.h>

static inline float bf16_value(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}
