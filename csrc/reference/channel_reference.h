/* The channel's framing in plain C, no Python: the limit the benchmark's
 * channel rows are compared with.  Frames as docs/PROTOCOL.md writes them;
 * payload i starts with i as a little-endian uint64.  Every function returns
 * a count (>= 0) or -errno.
 */
#ifndef AFUNIX_CHANNEL_REFERENCE_H
#define AFUNIX_CHANNEL_REFERENCE_H

#include <stdint.h>

/* Send `count` frames of `size` (>= 8) payload bytes over fd (a stream or
 * SEQPACKET socket), `batch` frames packed per write (at most 64 KiB a write
 * on SEQPACKET); payload i starts with i as a little-endian uint64. */
int64_t afunix_chan_ref_send(int fd, int count, int size, int batch, int seqpacket);
/* Receive `count` frames from fd, parsing the byte stream in C; adds the
 * number that starts each payload to *checksum; a frame of another length is
 * -EBADMSG.  Returns the frames received. */
int64_t afunix_chan_ref_recv(int fd, int count, int size, uint64_t *checksum);

#endif
