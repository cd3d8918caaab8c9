/* Copies into a shared-memory region (afunix.shm): see copy.c. */
#ifndef AFUNIX_COPY_H
#define AFUNIX_COPY_H

#include <stddef.h>

/* Copy n bytes from src to dst; the stores bypass the cache where the CPU
 * has such stores (SSE2), and the copy is a memmove when the two overlap. */
void afunix_copy_streaming(void *dst, const void *src, size_t n);

#endif
