/* afunix C core: plain C99, no Python API.
 *
 * Every function takes descriptors, buffers and arrays, makes at most one
 * system call per batch, and returns a count (>= 0) or -errno.  The Python
 * side (src/afunix/_cbackend.py) turns -errno into OSError.
 */
#ifndef AFUNIX_H
#define AFUNIX_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE 1 /* sendmmsg, recvmmsg, struct ucred, MSG_CMSG_CLOEXEC */
#endif

#include <stddef.h>
#include <sys/types.h>
#include <sys/socket.h>

/* The package version this core was built for; the Python side refuses to
 * run a core whose version differs (a stale build in the source tree). */
const char *afunix_version(void);

/* Create n socketpairs of `type` (SOCK_STREAM, SOCK_DGRAM, SOCK_SEQPACKET),
 * close-on-exec, and non-blocking when `nonblock` is non-zero.  fds must have
 * room for 2 * n ints.  Returns n, or -errno after closing every descriptor
 * it had made. */
int afunix_socketpairs(int type, int nonblock, int n, int *fds);

#endif
