/* afunix message channel: framing in C (plain C99, no Python API).
 *
 * A channel is a byte stream of frames (docs/PROTOCOL.md): an 8-byte
 * little-endian header (payload length, descriptor count, flags, version,
 * magic) followed by the payload.  These functions pack many frames into one
 * buffer and parse many out of one, so Python crosses into C once per batch.
 * Every function returns a count (>= 0) or -errno.
 */
#ifndef AFUNIX_CHANNEL_H
#define AFUNIX_CHANNEL_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "afunix_limits.h" /* AFUNIX_FRAME_HEADER, _VERSION, _MAGIC; AFUNIX_SCM_MAX_FD */

/* Where afunix_frames_parse writes: per frame, the offset of its payload in
 * the parsed buffer, its length and its descriptor count.  The caller owns
 * the struct and its three arrays of `capacity` entries (set uniform to -1). */
struct afunix_frames {
    int capacity;        /* room in the arrays */
    uint32_t *offsets;   /* payload offsets, from the start of buf */
    uint32_t *lengths;   /* payload lengths */
    uint32_t *nfds;      /* declared descriptor counts */
    int count;           /* frames found by the last parse */
    size_t consumed;     /* bytes of those frames, headers included */
    int64_t uniform;     /* the length every frame found has; -1 when they differ or none */
    int with_fds;        /* frames found that declare descriptors */
    size_t need;         /* bytes the first incomplete frame needs in all (header
                            included; 8 while its header is incomplete), 0 when none */
};

/* Parse up to max_frames complete frames (at most frames->capacity) from
 * buf[start, end).  Stops at the first incomplete frame, and before a frame
 * whose header is bad when frames were found ahead of it, so that they are
 * delivered first.  Returns the count, -EBADMSG for a malformed header
 * (magic, version, flags or descriptor count) or -EMSGSIZE for a length over
 * max_frame, in both cases only when it is the first frame at `start`.
 * Offsets must fit in 32 bits: end <= UINT32_MAX, else -EINVAL. */
int afunix_frames_parse(struct afunix_frames *frames, const char *buf, size_t start,
                        size_t end, int max_frames, uint32_t max_frame);

/* Pack n frames into out: frame i is a header declaring lens[i] bytes (or
 * uniform_len when lens is NULL) and nfds[i] descriptors (0 when nfds is
 * NULL), then its payload, taken in order from `data` (all payloads back to
 * back, datalen bytes).  nfds_count is the number of entries nfds holds.
 * Returns the bytes written; -EINVAL, before anything is written, when the
 * lengths do not add up to exactly datalen, nfds does not hold n entries or
 * a descriptor count is out of range; -ENOBUFS when out is too small. */
int64_t afunix_frames_pack(char *out, size_t outlen, const char *data, size_t datalen,
                           const uint32_t *lens, uint32_t uniform_len,
                           const uint32_t *nfds, size_t nfds_count, int n);

/* ---- receiving: the hand-over recorded by the call that receives ------------ */

#define AFUNIX_CHAN_READS 8           /* reads with descriptors held at once */

/* A channel's receive state.  afunix_chan_recv appends what one recvmsg
 * brought to the caller's buffer and records it here in the same call: the
 * bytes by moving `end`, the descriptors as a held read.  An exception that
 * interrupts the caller's bookkeeping afterwards (a Python signal handler)
 * so loses nothing.  The caller owns the struct (zeroed, then head = tail)
 * and moves start-of-buffer state (base, end) itself when it compacts. */
struct afunix_chan_rx {
    size_t end;          /* buffer bytes [0, end) hold data; a read appends at end */
    int64_t base;        /* stream offset of buffer[0] */
    int errors;          /* MSG_TRUNC / MSG_CTRUNC of any read, AFUNIX_CHAN_FDS_NO_DATA */
    int64_t head, tail;  /* held reads [head, tail); read r is in slot r % AFUNIX_CHAN_READS */
    int64_t lo[AFUNIX_CHAN_READS];    /* stream offsets of the bytes read r brought: [lo, hi) */
    int64_t hi[AFUNIX_CHAN_READS];
    int64_t frame[AFUNIX_CHAN_READS]; /* stream offset of the frame that claimed them, -1: none */
    int nfds[AFUNIX_CHAN_READS];      /* its descriptors; 0 once given to the caller */
    int fds[AFUNIX_CHAN_READS * AFUNIX_SCM_MAX_FD];  /* slot s at s * AFUNIX_SCM_MAX_FD */
    int deferred;        /* a read afunix_chan_recv_records took and did not report
                            yet: CHAN_DEFERRED and the errors it brings; 0: none */
};

#define AFUNIX_CHAN_FDS_NO_DATA 0x40000000 /* descriptors came with no byte */
#define AFUNIX_CHAN_EMPTY_RECORD 0x20000000 /* an empty SOCK_SEQPACKET record, followed by more */

/* One recvmsg (MSG_CMSG_CLOEXEC | flags) of at most min(maxlen, cap - end)
 * bytes into buf + rx->end.  Adds the bytes to end, the kernel's MSG_TRUNC
 * and MSG_CTRUNC to errors, and descriptors as held read `tail`.  Refuses
 * with -ENOBUFS, before any system call, when no slot is free or there is
 * no room (end >= cap); -EINVAL for end > cap.  Returns the bytes or -errno. */
int64_t afunix_chan_recv(int fd, struct afunix_chan_rx *rx, char *buf, size_t cap,
                         size_t maxlen, int flags);

/* SOCK_SEQPACKET: up to max_records records (and at most one per free slot
 * for held reads) with one recvmmsg (MSG_WAITFORONE: waiting, as `flags`
 * say, for the first only), each read into room for AFUNIX_RECORD_MAX bytes
 * and appended back to back at buf + rx->end, each recorded as
 * afunix_chan_recv records one read.  A record that reads as the end of
 * stream, is cut (MSG_TRUNC, MSG_CTRUNC) or brings descriptors with no byte,
 * after the first, is not reported with the records before it: the next call
 * reports it, with no system call, as that read alone would have been
 * (0 bytes, its errors).  Records the kernel gave after such a record are
 * dropped, their descriptors closed: every such record is a protocol error,
 * except the end of stream, after which no record comes.  Returns the bytes
 * or -errno, as afunix_chan_recv. */
int64_t afunix_chan_recv_records(int fd, struct afunix_chan_rx *rx, char *buf, size_t cap,
                                 int max_records, int flags);

/* Close the descriptors of held reads from head on and let go of them: all
 * of them when `all`, else while the read was claimed by a frame before
 * stream offset `upto` (frame >= 0 and frame < upto).  Returns the
 * descriptors closed. */
int afunix_chan_drop(struct afunix_chan_rx *rx, int64_t upto, int all);

#endif
