/* The channel's framing in plain C, for `python -m afunix bench` (see
 * channel_reference.h): the limit any Python channel row is compared with.
 * The frame header is read and written here by hand, as a C program speaking
 * the protocol would (docs/PROTOCOL.md), with the product's constants.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE 1
#endif
#include "channel_reference.h"
#include "afunix_limits.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/socket.h>

#ifndef MSG_NOSIGNAL
#define MSG_NOSIGNAL 0 /* macOS: SO_NOSIGPIPE is the socket-level equivalent */
#endif

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

#define REF_RECV_BUF (256 * 1024)

static void put_le64(unsigned char *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (unsigned char)(v >> (8 * i));
}

static uint64_t get_le64(const unsigned char *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

/* Write all of buf[0, len), in records of at most AFUNIX_RECORD_MAX on SEQPACKET. */
static int write_all(int fd, const unsigned char *buf, size_t len, int seqpacket)
{
    size_t done = 0;
    while (done < len) {
        size_t chunk = len - done;
        if (seqpacket && chunk > AFUNIX_RECORD_MAX)
            chunk = AFUNIX_RECORD_MAX;
        ssize_t w = send(fd, buf + done, chunk, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        done += (size_t)w;
    }
    return 0;
}

int64_t afunix_chan_ref_send(int fd, int count, int size, int batch, int seqpacket)
{
    if (count < 0 || size < 8 || batch < 1)
        return -EINVAL;
    size_t frame = AFUNIX_FRAME_HEADER + (size_t)size;
    if (seqpacket && frame > AFUNIX_RECORD_MAX)
        batch = 1;
    else if (seqpacket && frame * (size_t)batch > AFUNIX_RECORD_MAX)
        batch = (int)(AFUNIX_RECORD_MAX / frame);
    unsigned char *out = calloc((size_t)batch, frame);
    if (out == NULL)
        return -ENOMEM;
    for (int i = 0; i < batch; i++)
        put_header(out + (size_t)i * frame, (uint32_t)size, 0);
    int64_t sent = 0;
    while (sent < count) {
        int n = count - sent < batch ? (int)(count - sent) : batch;
        for (int i = 0; i < n; i++)
            put_le64(out + (size_t)i * frame + AFUNIX_FRAME_HEADER, (uint64_t)(sent + i));
        int rc = write_all(fd, out, (size_t)n * frame, seqpacket);
        if (rc < 0) {
            free(out);
            return rc;
        }
        sent += n;
    }
    free(out);
    return sent;
}

int64_t afunix_chan_ref_recv(int fd, int count, int size, uint64_t *checksum)
{
    if (count < 0 || size < 8 || checksum == NULL)
        return -EINVAL;
    size_t frame = AFUNIX_FRAME_HEADER + (size_t)size;
    size_t cap = REF_RECV_BUF;
    while (cap < frame + AFUNIX_RECORD_MAX)
        cap *= 2;
    unsigned char *buf = malloc(cap);
    if (buf == NULL)
        return -ENOMEM;
    size_t start = 0, end = 0;
    int64_t got = 0;
    uint64_t sum = 0;
    int64_t rc = 0;
    while (got < count) {
        /* parse every complete frame */
        while (end - start >= AFUNIX_FRAME_HEADER) {
            const unsigned char *h = buf + start;
            uint32_t length = get_le32(h);
            if (h[7] != AFUNIX_FRAME_MAGIC || length != (uint32_t)size) {
                rc = -EBADMSG;
                goto out;
            }
            if (end - start < frame)
                break;
            sum += get_le64(h + AFUNIX_FRAME_HEADER);
            start += frame;
            got++;
        }
        if (got >= count)
            break;
        if (start == end) {
            start = end = 0;
        } else if (cap - end < AFUNIX_RECORD_MAX) {
            memmove(buf, buf + start, end - start);
            end -= start;
            start = 0;
        }
        ssize_t r = recv(fd, buf + end, cap - end, 0);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            rc = -errno;
            goto out;
        }
        if (r == 0)
            break;
        end += (size_t)r;
    }
    rc = got;
out:
    *checksum = sum;
    free(buf);
    return rc;
}
