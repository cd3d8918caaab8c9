/* afunix message channel: framing in C.  See channel.h for the contracts and
 * docs/PROTOCOL.md for the wire format. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE 1
#endif
#include "channel.h"

#include <errno.h>
#include <string.h>

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
