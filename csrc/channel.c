/* afunix message channel: framing in C.  See channel.h for the contracts and
 * docs/PROTOCOL.md for the wire format. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE 1
#endif
#include "channel.h"

#include <errno.h>
#include <string.h>
#include <unistd.h>
#include <sys/socket.h>
#include <sys/uio.h>

#ifndef MSG_NOSIGNAL
#define MSG_NOSIGNAL 0 /* macOS: SO_NOSIGPIPE is the socket-level equivalent */
#endif

/* The three top header bytes of every version-1 frame: flags 0, version 1,
 * magic 0xAF, read as one little-endian field. */
#define HEADER_TAG (((uint32_t)AFUNIX_FRAME_MAGIC << 16) | ((uint32_t)AFUNIX_FRAME_VERSION << 8))

/* Byte by byte, so the wire is little-endian on every host; compilers turn
 * these into single loads and stores where that is correct. */
static uint32_t get_le32(const unsigned char *p)
{
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

static void put_header(unsigned char *p, uint32_t length, uint32_t nfds)
{
    p[0] = (unsigned char)(length & 0xff);
    p[1] = (unsigned char)((length >> 8) & 0xff);
    p[2] = (unsigned char)((length >> 16) & 0xff);
    p[3] = (unsigned char)(length >> 24);
    p[4] = (unsigned char)nfds;
    p[5] = 0;
    p[6] = AFUNIX_FRAME_VERSION;
    p[7] = AFUNIX_FRAME_MAGIC;
}

int afunix_frames_parse(struct afunix_frames *frames, const char *buf, size_t start,
                        size_t end, int max_frames, uint32_t max_frame)
{
    if (frames == NULL || start > end || end > UINT32_MAX || max_frames < 0)
        return -EINVAL;
    if (max_frames > frames->capacity)
        max_frames = frames->capacity;
    const unsigned char *b = (const unsigned char *)buf;
    size_t pos = start;
    int count = 0, with_fds = 0;
    int64_t uniform = -1;
    int rc = 0;
    frames->need = 0;
    while (count < max_frames) {
        size_t avail = end - pos;
        if (avail < AFUNIX_FRAME_HEADER) {
            if (avail > 0)
                frames->need = AFUNIX_FRAME_HEADER;
            break;
        }
        const unsigned char *h = b + pos;
        uint32_t length = get_le32(h);
        uint32_t nfds = h[4];
        uint32_t tag = (uint32_t)h[5] | ((uint32_t)h[6] << 8) | ((uint32_t)h[7] << 16);
        if (tag != HEADER_TAG || nfds > AFUNIX_SCM_MAX_FD) {
            rc = -EBADMSG;
            break;
        }
        if (length > max_frame) {
            rc = -EMSGSIZE;
            break;
        }
        /* avail >= 8 and length <= UINT32_MAX: no overflow in size_t. */
        if (avail - AFUNIX_FRAME_HEADER < (size_t)length) {
            frames->need = AFUNIX_FRAME_HEADER + (size_t)length;
            break;
        }
        frames->offsets[count] = (uint32_t)(pos + AFUNIX_FRAME_HEADER);
        frames->lengths[count] = length;
        frames->nfds[count] = nfds;
        if (count == 0)
            uniform = length;
        else if (uniform != (int64_t)length)
            uniform = -1;
        with_fds += nfds != 0;
        count++;
        pos += AFUNIX_FRAME_HEADER + (size_t)length;
    }
    if (count == 0 && rc < 0) {
        frames->count = 0;
        frames->consumed = 0;
        frames->uniform = -1;
        frames->with_fds = 0;
        return rc;
    }
    /* A bad header behind good frames is reported by the next parse, which
     * starts at it. */
    frames->count = count;
    frames->consumed = pos - start;
    frames->uniform = count ? uniform : -1;
    frames->with_fds = with_fds;
    return count;
}

int64_t afunix_frames_pack(char *out, size_t outlen, const char *data, size_t datalen,
                           const uint32_t *lens, uint32_t uniform_len,
                           const uint32_t *nfds, size_t nfds_count, int n)
{
    if (n < 0 || (n > 0 && (out == NULL || data == NULL))
        || (nfds != NULL && nfds_count != (size_t)n))
        return -EINVAL;
    /* The payloads must be exactly the data handed over, checked before
     * anything is written: a frame never promises bytes that are not there. */
    size_t left = datalen;
    for (int i = 0; i < n; i++) {
        uint32_t length = lens != NULL ? lens[i] : uniform_len;
        if ((size_t)length > left || (nfds != NULL && nfds[i] > AFUNIX_SCM_MAX_FD))
            return -EINVAL;
        left -= length;
    }
    if (left != 0)
        return -EINVAL;
    if (datalen > outlen || (outlen - datalen) / AFUNIX_FRAME_HEADER < (size_t)n)
        return -ENOBUFS;
    size_t total = datalen + (size_t)n * AFUNIX_FRAME_HEADER; /* <= outlen: no overflow */
    if (total > (size_t)INT64_MAX)
        return -EINVAL;
    unsigned char *o = (unsigned char *)out;
    size_t pos = 0, in = 0;
    for (int i = 0; i < n; i++) {
        uint32_t length = lens != NULL ? lens[i] : uniform_len;
        uint32_t k = nfds != NULL ? nfds[i] : 0;
        put_header(o + pos, length, k);
        memcpy(o + pos + AFUNIX_FRAME_HEADER, data + in, length);
        pos += AFUNIX_FRAME_HEADER + (size_t)length;
        in += length;
    }
    return (int64_t)total;
}

/* ---- receiving ------------------------------------------------------------ */

#ifndef MSG_CMSG_CLOEXEC
#define MSG_CMSG_CLOEXEC 0
#endif

/* Room for a full SCM_RIGHTS array, plus SCM_CREDENTIALS that arrive ahead of
 * it when SO_PASSCRED is on. */
#define CHAN_CONTROL (CMSG_SPACE(AFUNIX_SCM_MAX_FD * sizeof(int)) + CMSG_SPACE(64))

/* The descriptors of SCM_RIGHTS entries in the control data recvmsg filled
 * (m->msg_controllen bytes of `control`, at most `space`), kept in out (room
 * for AFUNIX_SCM_MAX_FD); returns how many. */
static int take_fds(const struct msghdr *m, const char *control, size_t space, int *out)
{
    int kept = 0;
    size_t total = m->msg_controllen < space ? m->msg_controllen : space;
    for (size_t off = 0; m->msg_control != NULL && total - off >= CMSG_LEN(0);) {
        struct cmsghdr hdr;
        memcpy(&hdr, control + off, sizeof hdr);
        if (hdr.cmsg_len < CMSG_LEN(0))
            break;
        size_t clen = hdr.cmsg_len < total - off ? hdr.cmsg_len : total - off;
        if (hdr.cmsg_level == SOL_SOCKET && hdr.cmsg_type == SCM_RIGHTS) {
            size_t count = (clen - CMSG_LEN(0)) / sizeof(int);
            for (size_t j = 0; j < count; j++) {
                int got;
                memcpy(&got, control + off + CMSG_LEN(0) + j * sizeof(int), sizeof got);
                if (kept < AFUNIX_SCM_MAX_FD)
                    out[kept++] = got;
                else
                    close(got); /* cannot be: SCM_MAX_FD; never keep what has no room */
            }
        }
        size_t step = (hdr.cmsg_len + sizeof(size_t) - 1) / sizeof(size_t) * sizeof(size_t);
        if (step == 0 || step > total - off)
            break;
        off += step;
    }
    return kept;
}

/* Record one read of n bytes already at buf + rx->end, with `kept`
 * descriptors already in its slot (rx->tail) and msg flags `mflags`. */
static void record_read(struct afunix_chan_rx *rx, size_t n, int kept, int mflags)
{
    int slot = (int)(rx->tail % AFUNIX_CHAN_READS);
    int64_t lo = rx->base + (int64_t)rx->end;
    rx->end += n;
    rx->errors |= mflags & (MSG_TRUNC | MSG_CTRUNC);
    if (kept > 0) {
        if (n == 0)
            rx->errors |= AFUNIX_CHAN_FDS_NO_DATA;
        rx->lo[slot] = lo;
        rx->hi[slot] = lo + (int64_t)n;
        rx->frame[slot] = -1;
        rx->nfds[slot] = kept;
        rx->tail++;
    }
}

/* In rx->deferred: a read is waiting to be reported (with its errors). */
#define CHAN_DEFERRED 0x10000000

static int check_rx(const struct afunix_chan_rx *rx, const char *buf, size_t cap)
{
    return rx != NULL && buf != NULL && rx->end <= cap && rx->tail >= rx->head
        && rx->tail - rx->head <= AFUNIX_CHAN_READS;
}

/* The read an earlier afunix_chan_recv_records took and did not report:
 * reported now, as it would have been (0 bytes, its errors). */
static int64_t report_deferred(struct afunix_chan_rx *rx)
{
    rx->errors |= rx->deferred & ~CHAN_DEFERRED;
    rx->deferred = 0;
    return 0;
}

int64_t afunix_chan_recv(int fd, struct afunix_chan_rx *rx, char *buf, size_t cap,
                         size_t maxlen, int flags)
{
    if (!check_rx(rx, buf, cap))
        return -EINVAL;
    if (rx->deferred)
        return report_deferred(rx);
    if (rx->tail - rx->head == AFUNIX_CHAN_READS || rx->end == cap)
        return -ENOBUFS;
    size_t len = cap - rx->end < maxlen ? cap - rx->end : maxlen;
    union {
        struct cmsghdr align;
        char bytes[CHAN_CONTROL];
    } control;
    struct iovec iov;
    iov.iov_base = buf + rx->end;
    iov.iov_len = len;
    struct msghdr m;
    memset(&m, 0, sizeof m);
    m.msg_iov = &iov;
    m.msg_iovlen = 1;
    m.msg_control = control.bytes;
    m.msg_controllen = sizeof control.bytes;
    ssize_t n = recvmsg(fd, &m, flags | MSG_CMSG_CLOEXEC);
    if (n < 0)
        return -errno;
    if ((size_t)n > len)
        n = (ssize_t)len; /* MSG_TRUNC in flags reports the record's length */
    int slot = (int)(rx->tail % AFUNIX_CHAN_READS);
    int kept = take_fds(&m, control.bytes, sizeof control.bytes,
                        rx->fds + slot * AFUNIX_SCM_MAX_FD);
    /* Recorded before returning: from here on, the bytes and descriptors are
     * the caller's state, not a return value that could be dropped. */
    record_read(rx, (size_t)n, kept, m.msg_flags);
    return (int64_t)n;
}

static void close_all(const int *fds, int n)
{
    for (int j = 0; j < n; j++)
        close(fds[j]);
}

int64_t afunix_chan_recv_records(int fd, struct afunix_chan_rx *rx, char *buf, size_t cap,
                                 int max_records, int flags)
{
    if (!check_rx(rx, buf, cap) || max_records < 1)
        return -EINVAL;
    if (rx->deferred)
        return report_deferred(rx);
    /* one record per free slot (each may bring descriptors), each with room
     * for the largest record, as a read of its own has */
    int64_t k = AFUNIX_CHAN_READS - (rx->tail - rx->head);
    if ((size_t)k > (cap - rx->end) / AFUNIX_RECORD_MAX)
        k = (int64_t)((cap - rx->end) / AFUNIX_RECORD_MAX);
    if (k > max_records)
        k = max_records;
    if (k <= 1)
        return afunix_chan_recv(fd, rx, buf, cap, AFUNIX_RECORD_MAX, flags);
#if defined(__linux__)
    struct mmsghdr hdrs[AFUNIX_CHAN_READS];
    struct iovec iovs[AFUNIX_CHAN_READS];
    union {
        size_t align; /* as struct cmsghdr (its flexible array cannot be an element) */
        char bytes[CHAN_CONTROL];
    } controls[AFUNIX_CHAN_READS];
    memset(hdrs, 0, sizeof hdrs);
    for (int i = 0; i < (int)k; i++) {
        iovs[i].iov_base = buf + rx->end + (size_t)i * AFUNIX_RECORD_MAX;
        iovs[i].iov_len = AFUNIX_RECORD_MAX;
        hdrs[i].msg_hdr.msg_iov = &iovs[i];
        hdrs[i].msg_hdr.msg_iovlen = 1;
        hdrs[i].msg_hdr.msg_control = controls[i].bytes;
        hdrs[i].msg_hdr.msg_controllen = sizeof controls[i].bytes;
    }
    int got = recvmmsg(fd, hdrs, (unsigned int)k, flags | MSG_CMSG_CLOEXEC | MSG_WAITFORONE,
                       NULL);
    if (got < 0)
        return -errno;
    if (got > (int)k)
        got = (int)k; /* never more headers than were given */
    /* Each record recorded as a read of its own, moved down behind the one
     * before it (they were read RECORD_MAX apart); all before returning. */
    int64_t total = 0;
    int stop = 0;           /* 1: after a 0-byte read; 2: after a read that fails the channel */
    int empty_record = 0;   /* bytes or descriptors came after a 0-byte read */
    for (int i = 0; i < got; i++) {
        struct msghdr *m = &hdrs[i].msg_hdr;
        size_t n = hdrs[i].msg_len < AFUNIX_RECORD_MAX ? hdrs[i].msg_len : AFUNIX_RECORD_MAX;
        int cut = m->msg_flags & (MSG_TRUNC | MSG_CTRUNC);
        int slot = (int)(rx->tail % AFUNIX_CHAN_READS);
        int *out = rx->fds + slot * AFUNIX_SCM_MAX_FD;
        int kept = take_fds(m, controls[i].bytes, sizeof controls[i].bytes, out);
        int odd = n == 0 || cut;
        if (stop) {
            /* the end of stream reads as 0 bytes again and again: bytes
             * after a 0-byte read show it was an empty record, and the
             * channel fails.  Descriptors with no byte do not: the stdlib
             * backend, reading a record per call, asks the kernel how many
             * bytes wait behind the 0-byte read, and ends the stream when
             * none do; both backends must end the same way. */
            close_all(out, kept);
            if (stop == 1 && n > 0)
                empty_record = 1;
            continue;
        }
        if (odd && i > 0) {
            /* reported by the next call, after the records before it */
            close_all(out, kept);
            rx->deferred = CHAN_DEFERRED | cut
                | (kept > 0 && n == 0 ? AFUNIX_CHAN_FDS_NO_DATA : 0);
        } else {
            if (i > 0)
                memmove(buf + rx->end, iovs[i].iov_base, n);
            record_read(rx, n, kept, m->msg_flags);
            total += (int64_t)n;
        }
        if (odd)
            stop = n == 0 && kept == 0 && !cut ? 1 : 2;
    }
    if (empty_record) {
        if (rx->deferred)
            rx->deferred |= AFUNIX_CHAN_EMPTY_RECORD;
        else
            rx->errors |= AFUNIX_CHAN_EMPTY_RECORD;
    }
    return total;
#else
    (void)max_records;
    return afunix_chan_recv(fd, rx, buf, cap, AFUNIX_RECORD_MAX, flags);
#endif
}

int afunix_chan_drop(struct afunix_chan_rx *rx, int64_t upto, int all)
{
    int closed = 0;
    if (rx == NULL || rx->tail < rx->head || rx->tail - rx->head > AFUNIX_CHAN_READS)
        return -EINVAL;
    while (rx->head < rx->tail) {
        int slot = (int)(rx->head % AFUNIX_CHAN_READS);
        if (!all && !(rx->frame[slot] >= 0 && rx->frame[slot] < upto))
            break;
        int k = rx->nfds[slot];
        if (k > AFUNIX_SCM_MAX_FD)
            k = AFUNIX_SCM_MAX_FD;
        for (int j = 0; j < k; j++)
            close(rx->fds[slot * AFUNIX_SCM_MAX_FD + j]);
        closed += k > 0 ? k : 0;
        rx->nfds[slot] = 0;
        rx->head++;
    }
    return closed;
}

