/* Reference loops for `python -m afunix bench` (see reference.h).
 *
 * Plain C99 and POSIX/Linux calls only: this is the code a C programmer would
 * write for each workload, the ceiling the Python implementations are
 * compared against.  EINTR is reported, not retried: the benchmark treats an
 * interrupted run as failed rather than measuring it.
 */
#include "reference.h"
#include "afunix_limits.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/socket.h>
#include <sys/uio.h>

/* Bounds that keep the buffers below reasonable; the benchmark uses far less. */
#define REF_MAX_BATCH AFUNIX_MAX_BATCH
#define REF_MAX_SIZE (1 << 24)
#define REF_MAX_FDS AFUNIX_SCM_MAX_FD

static void put_u64(unsigned char *p, uint64_t v)
{
    /* Little-endian whatever the host: the Python side packs with "<Q". */
    for (int i = 0; i < 8; i++)
        p[i] = (unsigned char)(v >> (8 * i));
}

static uint64_t get_u64(const unsigned char *p)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v |= (uint64_t)p[i] << (8 * i);
    return v;
}

static int bad_args(int count, int size, int batch)
{
    return count < 0 || size < 8 || size > REF_MAX_SIZE || batch < 1 || batch > REF_MAX_BATCH;
}

int64_t afunix_ref_socketpairs(int type, int n, int *fds)
{
    for (int i = 0; i < n; i++) {
        if (socketpair(AF_UNIX, type | SOCK_CLOEXEC, 0, fds + 2 * i) < 0) {
            int err = errno;
            afunix_ref_close_all(fds, 2 * i);
            return -err;
        }
    }
    return n;
}

int64_t afunix_ref_close_all(const int *fds, int n)
{
    for (int i = 0; i < n; i++)
        close(fds[i]);
    return n;
}

/* One arena for a batch of messages: payloads, iovecs, headers and (when
 * cmsg_space > 0) one control buffer per message. */
struct arena {
    unsigned char *data;
    struct iovec *iov;
    struct mmsghdr *msgs;
    unsigned char *control;
};

static void arena_free(struct arena *a)
{
    free(a->data);
    free(a->iov);
    free(a->msgs);
    free(a->control);
}

static int arena_init(struct arena *a, int batch, int size, size_t cmsg_space)
{
    memset(a, 0, sizeof *a);
    a->data = calloc((size_t)batch, (size_t)size);
    a->iov = calloc((size_t)batch, sizeof *a->iov);
    a->msgs = calloc((size_t)batch, sizeof *a->msgs);
    /* malloc's alignment suits struct cmsghdr; CMSG_SPACE keeps each slot aligned. */
    a->control = cmsg_space ? calloc((size_t)batch, cmsg_space) : NULL;
    if (!a->data || !a->iov || !a->msgs || (cmsg_space && !a->control)) {
        arena_free(a);
        return -ENOMEM;
    }
    for (int i = 0; i < batch; i++) {
        a->iov[i].iov_base = a->data + (size_t)i * (size_t)size;
        a->iov[i].iov_len = (size_t)size;
        a->msgs[i].msg_hdr.msg_iov = &a->iov[i];
        a->msgs[i].msg_hdr.msg_iovlen = 1;
        if (cmsg_space) {
            a->msgs[i].msg_hdr.msg_control = a->control + (size_t)i * cmsg_space;
            a->msgs[i].msg_hdr.msg_controllen = cmsg_space;
        }
    }
    return 0;
}

/* Send msgs[0..n) completely, resuming after a partial sendmmsg. */
static int send_all(int fd, struct mmsghdr *msgs, int n)
{
    int done = 0;
    while (done < n) {
        int rc = sendmmsg(fd, msgs + done, (unsigned int)(n - done), 0);
        if (rc < 0)
            return -errno;
        done += rc;
    }
    return 0;
}

/* Send `count` messages of `size` bytes numbered 0, 1, ... (a little-endian
 * u64 at the start of each), `batch` per sendmmsg, through the prepared
 * arena.  Returns count, or -errno. */
static int64_t send_numbered(int fd, struct arena *a, int count, int size, int batch)
{
    int64_t sent = 0;
    while (sent < count) {
        int n = count - sent < batch ? (int)(count - sent) : batch;
        for (int i = 0; i < n; i++)
            put_u64(a->data + (size_t)i * (size_t)size, (uint64_t)(sent + i));
        int rc = send_all(fd, a->msgs, n);
        if (rc < 0)
            return rc;
        sent += n;
    }
    return sent;
}

int64_t afunix_ref_send(int fd, int count, int size, int batch)
{
    if (bad_args(count, size, batch))
        return -EINVAL;
    struct arena a;
    if (arena_init(&a, batch, size, 0) < 0)
        return -ENOMEM;
    int64_t sent = send_numbered(fd, &a, count, size, batch);
    arena_free(&a);
    return sent;
}

int64_t afunix_ref_recv(int fd, int count, int size, int batch, uint64_t *checksum)
{
    if (bad_args(count, size, batch))
        return -EINVAL;
    struct arena a;
    if (arena_init(&a, batch, size, 0) < 0)
        return -ENOMEM;
    int64_t got = 0;
    uint64_t sum = 0;
    while (got < count) {
        int want = count - got < batch ? (int)(count - got) : batch;
        /* Wait for the first message, then take what is already queued. */
        int rc = recvmmsg(fd, a.msgs, (unsigned int)want, MSG_WAITFORONE, NULL);
        if (rc < 0) {
            arena_free(&a);
            return -errno;
        }
        if (rc == 0)
            break;
        for (int i = 0; i < rc; i++) {
            if (a.msgs[i].msg_len != (unsigned int)size || (a.msgs[i].msg_hdr.msg_flags & MSG_TRUNC)) {
                arena_free(&a);
                return -EBADMSG;
            }
            sum += get_u64(a.data + (size_t)i * (size_t)size);
        }
        got += rc;
    }
    arena_free(&a);
    *checksum = sum;
    return got;
}

int64_t afunix_ref_stream_send(int fd, int count, int size, int batch)
{
    if (bad_args(count, size, batch))
        return -EINVAL;
    struct arena a;
    if (arena_init(&a, batch, size, 0) < 0)
        return -ENOMEM;
    int64_t sent = 0;
    while (sent < count) {
        int n = count - sent < batch ? (int)(count - sent) : batch;
        for (int i = 0; i < n; i++)
            put_u64(a.data + (size_t)i * (size_t)size, (uint64_t)(sent + i));
        int done = 0;
        while (done < n) {
            int rc = sendmmsg(fd, a.msgs + done, (unsigned int)(n - done), 0);
            if (rc < 0) {
                arena_free(&a);
                return -errno;
            }
            /* A stream may take part of the last chunk: write the rest. */
            struct mmsghdr *last = &a.msgs[done + rc - 1];
            size_t off = last->msg_len;
            while (off < (size_t)size) {
                ssize_t w = send(fd, (unsigned char *)last->msg_hdr.msg_iov->iov_base + off,
                                 (size_t)size - off, 0);
                if (w < 0) {
                    arena_free(&a);
                    return -errno;
                }
                off += (size_t)w;
            }
            done += rc;
        }
        sent += n;
    }
    arena_free(&a);
    return sent;
}

int64_t afunix_ref_stream_recv(int fd, int count, int size, uint64_t *checksum)
{
    if (bad_args(count, size, 1))
        return -EINVAL;
    unsigned char *buf = malloc((size_t)size);
    if (!buf)
        return -ENOMEM;
    uint64_t total = (uint64_t)count * (uint64_t)size;
    uint64_t pos = 0, sum = 0, cur = 0;
    while (pos < total) {
        ssize_t n = recv(fd, buf, (size_t)size, 0);
        if (n < 0) {
            free(buf);
            return -errno;
        }
        if (n == 0)
            break;
        /* Reads fall anywhere in the stream: pick the 8-byte number at the
         * start of each chunk out byte by byte, skip the rest. */
        size_t off = 0;
        while (off < (size_t)n) {
            uint64_t in_chunk = pos % (uint64_t)size;
            if (in_chunk < 8) {
                cur |= (uint64_t)buf[off] << (8 * in_chunk);
                if (in_chunk == 7) {
                    sum += cur;
                    cur = 0;
                }
                off++;
                pos++;
            } else {
                uint64_t skip = (uint64_t)size - in_chunk;
                if (skip > (uint64_t)n - off)
                    skip = (uint64_t)n - off;
                off += (size_t)skip;
                pos += skip;
            }
        }
    }
    free(buf);
    *checksum = sum;
    return (int64_t)(pos / (uint64_t)size);
}

int64_t afunix_ref_send_fds(int fd, int count, int size, int batch, const int *fds, int nfds)
{
    if (bad_args(count, size, batch) || nfds < 1 || nfds > REF_MAX_FDS)
        return -EINVAL;
    size_t space = CMSG_SPACE((size_t)nfds * sizeof(int));
    struct arena a;
    if (arena_init(&a, batch, size, space) < 0)
        return -ENOMEM;
    for (int i = 0; i < batch; i++) {
        struct cmsghdr *c = CMSG_FIRSTHDR(&a.msgs[i].msg_hdr);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN((size_t)nfds * sizeof(int));
        memcpy(CMSG_DATA(c), fds, (size_t)nfds * sizeof(int));
        a.msgs[i].msg_hdr.msg_controllen = CMSG_LEN((size_t)nfds * sizeof(int));
    }
    int64_t sent = send_numbered(fd, &a, count, size, batch);
    arena_free(&a);
    return sent;
}

int64_t afunix_ref_recv_fds(int fd, int count, int size, int batch, int maxfds,
                            uint64_t *checksum, int64_t *nfds_closed)
{
    if (bad_args(count, size, batch) || maxfds < 1 || maxfds > REF_MAX_FDS)
        return -EINVAL;
    size_t space = CMSG_SPACE((size_t)maxfds * sizeof(int));
    struct arena a;
    if (arena_init(&a, batch, size, space) < 0)
        return -ENOMEM;
    int64_t got = 0, closed = 0;
    uint64_t sum = 0;
    int64_t result = 0;
    while (got < count) {
        int want = count - got < batch ? (int)(count - got) : batch;
        /* The kernel shrinks msg_controllen to what arrived: reset it. */
        for (int i = 0; i < want; i++)
            a.msgs[i].msg_hdr.msg_controllen = space;
        int rc = recvmmsg(fd, a.msgs, (unsigned int)want, MSG_WAITFORONE | MSG_CMSG_CLOEXEC, NULL);
        if (rc < 0) {
            result = -errno;
            break;
        }
        if (rc == 0)
            break;
        for (int i = 0; i < rc; i++) {
            struct msghdr *h = &a.msgs[i].msg_hdr;
            for (struct cmsghdr *c = CMSG_FIRSTHDR(h); c; c = CMSG_NXTHDR(h, c)) {
                if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
                    continue;
                size_t n = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
                for (size_t k = 0; k < n; k++) {
                    int received;
                    memcpy(&received, CMSG_DATA(c) + k * sizeof(int), sizeof received);
                    close(received);
                    closed++;
                }
            }
            if (a.msgs[i].msg_len != (unsigned int)size || (h->msg_flags & (MSG_TRUNC | MSG_CTRUNC)))
                result = -EBADMSG;
            sum += get_u64(a.data + (size_t)i * (size_t)size);
        }
        got += rc;
        if (result < 0)
            break;
    }
    arena_free(&a);
    *checksum = sum;
    *nfds_closed = closed;
    return result < 0 ? result : got;
}

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

int64_t afunix_ref_ping(int fd, int count, int size, int64_t *rtt_ns)
{
    if (bad_args(count, size, 1))
        return -EINVAL;
    unsigned char *out = calloc(2, (size_t)size);
    if (!out)
        return -ENOMEM;
    unsigned char *in = out + size;
    int64_t result = 0;
    for (int64_t i = 0; i < count; i++) {
        put_u64(out, (uint64_t)i);
        int64_t start = now_ns();
        ssize_t w = send(fd, out, (size_t)size, 0);
        if (w < 0) {
            result = -errno;
            break;
        }
        ssize_t n = recv(fd, in, (size_t)size, 0);
        int64_t end = now_ns();
        if (n < 0) {
            result = -errno;
            break;
        }
        if (w != (ssize_t)size || n != (ssize_t)size || get_u64(in) != (uint64_t)i) {
            result = -EBADMSG;
            break;
        }
        rtt_ns[i] = end - start;
        result = i + 1;
    }
    free(out);
    return result;
}

int64_t afunix_ref_echo(int fd, int count, int size)
{
    if (bad_args(count, size, 1))
        return -EINVAL;
    unsigned char *buf = malloc((size_t)size);
    if (!buf)
        return -ENOMEM;
    int64_t done = 0;
    int64_t result = 0;
    while (done < count) {
        ssize_t n = recv(fd, buf, (size_t)size, 0);
        if (n < 0) {
            result = -errno;
            break;
        }
        if (n == 0) /* the peer hung up: report how many were echoed */
            break;
        if (send(fd, buf, (size_t)n, 0) < 0) {
            result = -errno;
            break;
        }
        done++;
    }
    free(buf);
    return result < 0 ? result : done;
}
