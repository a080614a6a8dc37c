/* How the kernels split their work between OpenMP threads. Loaded into a process that runs torch, a
 * kernel library binds to torch's libgomp (the same soname), so these are torch's own intra-op
 * threads: no second pool competes with them for the cores. */
#include <stdint.h>

/* Input elements a thread must have to pay for handing it work: 256 x 32 x 7 x 7 bf16 (401k)
 * pooled 1.6x faster on two threads than on one. A kernel that does more per element may set a
 * lower bound before including this file. */
#ifndef MIN_PER_THREAD
#define MIN_PER_THREAD (1 << 17)
#endif

/* How many contiguous parts of `total` work units (holding `elements` elements) to run at once:
 * up to `threads`, one per MIN_PER_THREAD elements at most, at least one. */
static inline int parts_for(int64_t total, int64_t elements, int threads) {
    if (threads > elements / MIN_PER_THREAD) threads = (int)(elements / MIN_PER_THREAD);
    if (threads > total) threads = (int)total;
    return threads < 1 ? 1 : threads;
}

/* The first unit of part `t` of `parts`; part t runs [part_begin(t), part_begin(t + 1)). */
static inline int64_t part_begin(int64_t total, int t, int parts) { return total * t / parts; }
