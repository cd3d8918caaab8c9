/* afunix_copy_streaming: a memcpy whose stores bypass the cache.
 *
 * Why: a large slot the sender fills is read by the peer, on another core,
 * never by the sender again.  Cached stores first read every destination
 * line (write-allocate) and push the sender's next source out of the cache;
 * non-temporal stores write the lines straight to memory.  glibc switches to
 * them only above a threshold it derives from the cache size the CPU
 * reports, which under a hypervisor can be far above any slot's size.  Used
 * for large copies only (afunix.shm decides): a small slot the peer reads at
 * once is better left in the cache.
 */
#include "copy.h"

#include <stdint.h>
#include <string.h>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

void afunix_copy_streaming(void *dst, const void *src, size_t n)
{
    uintptr_t d0 = (uintptr_t)dst, s0 = (uintptr_t)src;
    if (n == 0)
        return;
    if (d0 < s0 + n && s0 < d0 + n) {
        memmove(dst, src, n);
        return;
    }
#if defined(__SSE2__)
    {
        unsigned char *d = dst;
        const unsigned char *s = src;
        size_t head = (size_t)((16u - (d0 & 15u)) & 15u); /* to a 16-byte boundary of dst */
        if (n < head + 64) {
            memcpy(d, s, n);
            return;
        }
        memcpy(d, s, head);
        d += head;
        s += head;
        n -= head;
        for (; n >= 64; d += 64, s += 64, n -= 64) {
            __m128i a = _mm_loadu_si128((const __m128i *)(const void *)s);
            __m128i b = _mm_loadu_si128((const __m128i *)(const void *)(s + 16));
            __m128i c = _mm_loadu_si128((const __m128i *)(const void *)(s + 32));
            __m128i e = _mm_loadu_si128((const __m128i *)(const void *)(s + 48));
            _mm_stream_si128((__m128i *)(void *)d, a);
            _mm_stream_si128((__m128i *)(void *)(d + 16), b);
            _mm_stream_si128((__m128i *)(void *)(d + 32), c);
            _mm_stream_si128((__m128i *)(void *)(d + 48), e);
        }
        _mm_sfence(); /* the streamed stores are ordered before what follows (the frame naming the slot) */
        memcpy(d, s, n);
    }
#else
    memcpy(dst, src, n);
#endif
}
