/* Reference loops for `python -m afunix bench`: the same workloads as the
 * Python implementations, in plain C99 with no Python API, so the benchmark
 * can show how close Python comes to what this machine allows.
 *
 * Message payloads carry a little-endian uint64 sequence number in their
 * first 8 bytes; receivers add the numbers up into *checksum so the caller
 * can verify that exactly what was sent arrived.  Every function returns a
 * count (>= 0) or -errno.
 */
#ifndef AFUNIX_REFERENCE_H
#define AFUNIX_REFERENCE_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE 1 /* sendmmsg, recvmmsg, MSG_WAITFORONE, MSG_CMSG_CLOEXEC */
#endif

#include <stdint.h>

/* Create n socketpairs of `type` into fds (room for 2 * n ints). */
int64_t afunix_ref_socketpairs(int type, int n, int *fds);
/* Close the n descriptors in fds; returns n. */
int64_t afunix_ref_close_all(const int *fds, int n);

/* Send `count` messages of `size` (>= 8) bytes, `batch` per sendmmsg. */
int64_t afunix_ref_send(int fd, int count, int size, int batch);
/* Receive `count` messages of up to `size` bytes, `batch` per recvmmsg;
 * a message of another length is -EBADMSG. */
int64_t afunix_ref_recv(int fd, int count, int size, int batch, uint64_t *checksum);

/* Write `count` chunks of `size` (>= 8) bytes, `batch` chunks per sendmmsg. */
int64_t afunix_ref_stream_send(int fd, int count, int size, int batch);
/* Read the byte stream of `count` chunks of `size` bytes; adds the number
 * that starts each chunk to *checksum; returns the chunks read. */
int64_t afunix_ref_stream_recv(int fd, int count, int size, uint64_t *checksum);

/* Send `count` messages of `size` bytes, each carrying the nfds descriptors
 * in fds (SCM_RIGHTS), `batch` per sendmmsg. */
int64_t afunix_ref_send_fds(int fd, int count, int size, int batch, const int *fds, int nfds);
/* Receive `count` messages with up to maxfds descriptors each, `batch` per
 * recvmmsg; closes every descriptor received and counts it in *nfds_closed. */
int64_t afunix_ref_recv_fds(int fd, int count, int size, int batch, int maxfds,
                            uint64_t *checksum, int64_t *nfds_closed);

/* Ping-pong client: `count` round trips of `size`-byte messages; stores each
 * round trip in nanoseconds in rtt_ns[i]; a reply that is not the ping is
 * -EBADMSG. */
int64_t afunix_ref_ping(int fd, int count, int size, int64_t *rtt_ns);
/* Ping-pong server: echo `count` messages of up to `size` bytes. */
int64_t afunix_ref_echo(int fd, int count, int size);

#endif
