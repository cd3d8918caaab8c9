/* afunix C core.  See afunix.h for the contract of each function. */
#include "afunix.h"

#include <errno.h>
#include <unistd.h>
#include <fcntl.h>

#ifndef AFUNIX_VERSION
#error "AFUNIX_VERSION must be defined by the build (csrc/build.py)"
#endif

const char *afunix_version(void)
{
    return AFUNIX_VERSION;
}

/* Close fds[0..count) keeping errno: used on error paths only. */
static void close_all(const int *fds, int count)
{
    int saved = errno;
    for (int i = 0; i < count; i++)
        close(fds[i]);
    errno = saved;
}

#if !defined(SOCK_CLOEXEC)
/* macOS and older BSDs: no atomic flags on socket creation.  The race with a
 * concurrent fork+exec is the platform's; we set the flags right away. */
static int set_fd_flags(int fd, int nonblock)
{
    if (fcntl(fd, F_SETFD, FD_CLOEXEC) < 0)
        return -1;
    if (nonblock) {
        int fl = fcntl(fd, F_GETFL);
        if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0)
            return -1;
    }
    return 0;
}
#endif

int afunix_socketpairs(int type, int nonblock, int n, int *fds)
{
    if (n < 0)
        return -EINVAL;
#if defined(SOCK_CLOEXEC)
    int full_type = type | SOCK_CLOEXEC | (nonblock ? SOCK_NONBLOCK : 0);
#else
    int full_type = type;
#endif
    for (int i = 0; i < n; i++) {
        if (socketpair(AF_UNIX, full_type, 0, fds + 2 * i) < 0) {
            int err = errno;
            close_all(fds, 2 * i);
            return -err;
        }
#if !defined(SOCK_CLOEXEC)
        if (set_fd_flags(fds[2 * i], nonblock) < 0 ||
            set_fd_flags(fds[2 * i + 1], nonblock) < 0) {
            int err = errno;
            close_all(fds, 2 * i + 2);
            return -err;
        }
#endif
    }
    return n;
}

/* ---- batched message I/O ------------------------------------------------ */

#include <stdlib.h>
#include <string.h>
#include <stdint.h>
#include <sys/un.h>
#include <sys/uio.h>

#ifndef MSG_NOSIGNAL
#define MSG_NOSIGNAL 0 /* macOS: SO_NOSIGPIPE is the socket-level equivalent */
#endif
#ifndef MSG_CMSG_CLOEXEC
#define MSG_CMSG_CLOEXEC 0
#endif

#if !AFUNIX_HAS_SENDMMSG
struct mmsghdr {
    struct msghdr msg_hdr;
    unsigned int msg_len;
};
#endif

/* Control bytes one outgoing message needs. */
static size_t send_control_space(int nfds, int has_creds)
{
    size_t space = 0;
    if (nfds > 0)
        space += CMSG_SPACE((size_t)nfds * sizeof(int));
#if AFUNIX_HAS_PASSCRED
    if (has_creds)
        space += CMSG_SPACE(sizeof(struct ucred));
#else
    (void)has_creds;
#endif
    return space;
}

static int send_batch(int fd, struct mmsghdr *hdrs, int n, int flags)
{
    if (n == 1) {
        /* one message: sendmsg, which the kernel does with less work than
         * sendmmsg (no per-message header copy back) */
        ssize_t rc = sendmsg(fd, &hdrs[0].msg_hdr, flags);
        if (rc < 0)
            return -errno;
        hdrs[0].msg_len = (unsigned int)rc;
        return 1;
    }
#if AFUNIX_HAS_SENDMMSG
    int rc = sendmmsg(fd, hdrs, (unsigned int)n, flags);
    return rc < 0 ? -errno : rc;
#else
    for (int i = 0; i < n; i++) {
        ssize_t rc = sendmsg(fd, &hdrs[i].msg_hdr, flags);
        if (rc < 0)
            return i > 0 ? i : -errno;
        hdrs[i].msg_len = (unsigned int)rc;
    }
    return n;
#endif
}

int afunix_send_many(int fd, int n, const char *data, size_t datalen,
                     const size_t *lens, size_t uniform_len,
                     const int *fds, size_t nfds_total, const int *nfds,
                     const char *addrs, size_t addrslen, const int *addrlens,
                     const int *creds, int flags)
{
    if (n < 0 || n > AFUNIX_MAX_BATCH)
        return -EINVAL;
    if (n == 0)
        return 0;
    if (data == NULL || (nfds && !fds) || (!fds && nfds_total) || (addrs && !addrlens)
        || (addrlens && !addrs) || (!addrs && addrslen))
        return -EINVAL;

    /* Every length and count is checked against the size of what it is
     * taken from before anything is read: a caller whose buffer changed
     * size between measuring and joining gets -EINVAL, not bytes or
     * descriptors from past the end.  One allocation holds the headers,
     * iovecs, addresses and control data. */
    size_t control_total = 0;
    size_t data_left = datalen, fds_left = nfds_total, addrs_left = addrslen;
    for (int i = 0; i < n; i++) {
        size_t len = lens ? lens[i] : uniform_len;
        if (len > data_left)
            return -EINVAL;
        data_left -= len;
        int k = nfds ? nfds[i] : 0;
        if (k < 0 || k > AFUNIX_SCM_MAX_FD || (size_t)k > fds_left)
            return -EINVAL;
        fds_left -= (size_t)k;
        if (addrlens && addrlens[i] >= 0) {
            if (addrlens[i] > (int)sizeof(((struct sockaddr_un *)0)->sun_path)
                || (size_t)addrlens[i] > addrs_left)
                return -EINVAL;
            addrs_left -= (size_t)addrlens[i];
        }
        control_total += send_control_space(k, creds && creds[4 * i]);
    }
    if (data_left != 0 || fds_left != 0 || addrs_left != 0)
        return -EINVAL; /* more handed over than the messages take: the lengths are wrong */
    size_t head = (size_t)n * (sizeof(struct mmsghdr) + sizeof(struct iovec)
                               + (addrs ? sizeof(struct sockaddr_un) : 0));
    /* control data must be aligned for struct cmsghdr */
    head = (head + sizeof(size_t) - 1) / sizeof(size_t) * sizeof(size_t);
    /* Small batches (the common case, and every single message) use the
     * stack: no allocator call on the hot path. */
    union {
        long double ld;
        void *p;
        long long ll;
        char bytes[4096];
    } local;
    size_t need = head + control_total;
    char *block = need <= sizeof local.bytes ? local.bytes : malloc(need);
    if (block == NULL)
        return -ENOMEM;
    memset(block, 0, need);
    struct mmsghdr *hdrs = (struct mmsghdr *)block;
    struct iovec *iovs = (struct iovec *)(hdrs + n);
    struct sockaddr_un *names = (struct sockaddr_un *)(iovs + n);
    char *control = block + head;

    const char *next_data = data;
    const int *next_fd = fds;
    const char *next_addr = addrs;
    for (int i = 0; i < n; i++) {
        struct msghdr *m = &hdrs[i].msg_hdr;
        size_t len = lens ? lens[i] : uniform_len;
        iovs[i].iov_base = (void *)next_data;
        iovs[i].iov_len = len;
        next_data += len;
        m->msg_iov = &iovs[i];
        m->msg_iovlen = 1;
        if (addrs && addrlens[i] >= 0) {
            names[i].sun_family = AF_UNIX;
            memcpy(names[i].sun_path, next_addr, (size_t)addrlens[i]);
            next_addr += addrlens[i];
            m->msg_name = &names[i];
            m->msg_namelen = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + (size_t)addrlens[i]);
        }
        int k = nfds ? nfds[i] : 0;
        int has_creds = creds && creds[4 * i];
        size_t space = send_control_space(k, has_creds);
        if (space == 0)
            continue;
        m->msg_control = control;
        m->msg_controllen = space;
        control += space;
        struct cmsghdr *c = CMSG_FIRSTHDR(m);
#if AFUNIX_HAS_PASSCRED
        if (has_creds) {
            struct ucred uc;
            uc.pid = creds[4 * i + 1];
            uc.uid = (uid_t)creds[4 * i + 2];
            uc.gid = (gid_t)creds[4 * i + 3];
            c->cmsg_level = SOL_SOCKET;
            c->cmsg_type = SCM_CREDENTIALS;
            c->cmsg_len = CMSG_LEN(sizeof uc);
            memcpy(CMSG_DATA(c), &uc, sizeof uc);
            c = CMSG_NXTHDR(m, c);
        }
#endif
        if (k > 0) {
            c->cmsg_level = SOL_SOCKET;
            c->cmsg_type = SCM_RIGHTS;
            c->cmsg_len = CMSG_LEN((size_t)k * sizeof(int));
            memcpy(CMSG_DATA(c), next_fd, (size_t)k * sizeof(int));
            next_fd += k;
        }
    }
    int rc = send_batch(fd, hdrs, n, flags | MSG_NOSIGNAL);
    if (block != local.bytes)
        free(block);
    return rc;
}

/* Room for the most control data one message can carry. */
#if AFUNIX_HAS_PASSCRED
#define MESSAGE_CONTROL_MAX (CMSG_SPACE(AFUNIX_SCM_MAX_FD * sizeof(int)) \
                             + CMSG_SPACE(sizeof(struct ucred)))
#else
#define MESSAGE_CONTROL_MAX CMSG_SPACE(AFUNIX_SCM_MAX_FD * sizeof(int))
#endif

ssize_t afunix_send_message(int fd, const char *data, size_t len,
                            const int *fds, int nfds, const int *creds, int flags)
{
    if (nfds < 0 || nfds > AFUNIX_SCM_MAX_FD || (nfds > 0 && fds == NULL)
        || (data == NULL && len > 0))
        return -EINVAL;
    union {
        struct cmsghdr align;
        char bytes[MESSAGE_CONTROL_MAX];
    } control;
    struct iovec iov;
    iov.iov_base = (void *)data;
    iov.iov_len = len;
    struct msghdr m;
    memset(&m, 0, sizeof m);
    m.msg_iov = &iov;
    m.msg_iovlen = 1;
    size_t space = send_control_space(nfds, creds != NULL);
    if (space > 0) {
        memset(control.bytes, 0, space);
        m.msg_control = control.bytes;
        m.msg_controllen = space;
        struct cmsghdr *c = CMSG_FIRSTHDR(&m);
#if AFUNIX_HAS_PASSCRED
        if (creds != NULL) {
            struct ucred uc;
            uc.pid = creds[0];
            uc.uid = (uid_t)creds[1];
            uc.gid = (gid_t)creds[2];
            c->cmsg_level = SOL_SOCKET;
            c->cmsg_type = SCM_CREDENTIALS;
            c->cmsg_len = CMSG_LEN(sizeof uc);
            memcpy(CMSG_DATA(c), &uc, sizeof uc);
            c = CMSG_NXTHDR(&m, c);
        }
#endif
        if (nfds > 0) {
            c->cmsg_level = SOL_SOCKET;
            c->cmsg_type = SCM_RIGHTS;
            c->cmsg_len = CMSG_LEN((size_t)nfds * sizeof(int));
            memcpy(CMSG_DATA(c), fds, (size_t)nfds * sizeof(int));
        }
    }
    ssize_t rc = sendmsg(fd, &m, flags | MSG_NOSIGNAL);
    return rc < 0 ? -errno : rc;
}

ssize_t afunix_send_one(int fd, const char *data, size_t len, int flags)
{
    if (data == NULL && len > 0)
        return -EINVAL;
    /* send(2) is sendmsg with one iovec and no control data, without the
     * msghdr the kernel would copy in */
    ssize_t rc = send(fd, data, len, flags | MSG_NOSIGNAL);
    return rc < 0 ? -errno : rc;
}

/* Receive side ------------------------------------------------------------ */

static size_t recv_control_space(int maxfds)
{
    /* Room for the descriptors asked for, plus SCM_CREDENTIALS: with
     * SO_PASSCRED on, credentials come first on every message, and a buffer
     * sized for descriptors alone would cut them. */
    size_t space = CMSG_SPACE((size_t)(maxfds > 0 ? maxfds : 1) * sizeof(int));
#if AFUNIX_HAS_PASSCRED
    space += CMSG_SPACE(sizeof(struct ucred));
#endif
    return space;
}

/* Whether the arena still holds message i's descriptors (afunix.h). */
static int holds_fds(const struct afunix_arena *a, int i)
{
    return i >= a->delivered || (!a->all_handed && !a->handed[i]);
}

int afunix_arena_release(struct afunix_arena *a)
{
    int closed = 0, at = 0;
    int count = a->count < a->max_messages ? a->count : a->max_messages;
    for (int i = 0; i < count; i++) {
        int k = a->nfds[i];
        if (k > 0 && holds_fds(a, i)) {
            close_all(a->fds + at, k);
            closed += k;
        }
        at += k > 0 ? k : 0;
    }
    a->delivered = a->count;
    a->all_handed = 1;
    return closed;
}

void afunix_arena_clear(struct afunix_arena *a)
{
    if (a == NULL)
        return;
    if (a->handed != NULL)  /* set up: close what it still holds */
        afunix_arena_release(a);
    free(a->handed);
    /* a->data is the caller's (see afunix_arena_init) */
    free(a->lens);
    free(a->msg_flags);
    free(a->nfds);
    free(a->fds);
    free(a->creds);
    free(a->addrlens);
    free(a->addrs);
    free(a->hdrs);
    free(a->names);
    free(a->control);
    memset(a, 0, sizeof *a);
}

int afunix_arena_init(struct afunix_arena *a, int max_messages, size_t bufsize, int maxfds,
                      char *data)
{
    /* bufsize 0 (descriptors without data) still needs a valid data pointer */
    if (a == NULL || data == NULL || max_messages < 1 || max_messages > AFUNIX_MAX_BATCH
        || bufsize > SIZE_MAX / (size_t)max_messages
        || maxfds < 0 || maxfds > AFUNIX_SCM_MAX_FD)
        return -EINVAL;
    memset(a, 0, sizeof *a);
    size_t n = (size_t)max_messages;
    a->max_messages = max_messages;
    a->bufsize = bufsize;
    a->maxfds = maxfds;
    a->control_space = recv_control_space(maxfds);
    a->data = data;
    a->lens = calloc(n, sizeof *a->lens);
    a->msg_flags = calloc(n, sizeof *a->msg_flags);
    a->nfds = calloc(n, sizeof *a->nfds);
    a->fds = calloc(n * (size_t)(maxfds > 0 ? maxfds : 1), sizeof *a->fds);
    a->creds = calloc(4 * n, sizeof *a->creds);
    a->addrlens = calloc(n, sizeof *a->addrlens);
    a->addrs = calloc(n, AFUNIX_ADDR_MAX);
    /* the iovecs live right after the headers, in the same allocation */
    a->hdrs = calloc(n, sizeof(struct mmsghdr) + sizeof(struct iovec));
    a->names = calloc(n, sizeof(struct sockaddr_un));
    a->control = calloc(n, a->control_space);
    a->all_handed = 1;
    /* handed last: clear() takes a non-NULL handed to mean "set up" */
    a->handed = calloc(n, 1);
    if (!a->lens || !a->msg_flags || !a->nfds || !a->fds || !a->creds || !a->addrlens
        || !a->addrs || !a->hdrs || !a->names || !a->control || !a->handed) {
        afunix_arena_clear(a);
        return -ENOMEM;
    }
    return 0;
}

/* Copy message i's descriptors and credentials out of its control data.
 * Parses defensively: a cmsg_len that runs past the buffer (some kernels
 * report one) is clipped to what is there.  Returns the number of
 * descriptors the control data held, kept or not. */
static int parse_control(struct afunix_arena *a, int i, const struct msghdr *m)
{
    /* room for maxfds per message, so the compacted array never overflows */
    int *out = a->fds + a->total_fds;
    int kept = 0, seen = 0;
    const char *base = (const char *)m->msg_control;
    size_t total = m->msg_controllen;
    if (base == NULL || total > a->control_space)
        total = base == NULL ? 0 : a->control_space;
    size_t off = 0;
    a->creds[4 * i] = 0;
    while (total - off >= CMSG_LEN(0)) {
        struct cmsghdr hdr;
        memcpy(&hdr, base + off, sizeof hdr);
        if (hdr.cmsg_len < CMSG_LEN(0))
            break;
        size_t len = hdr.cmsg_len;
        if (len > total - off)
            len = total - off;
        const char *payload = base + off + CMSG_LEN(0);
        size_t payload_len = len - CMSG_LEN(0);
        if (hdr.cmsg_level == SOL_SOCKET && hdr.cmsg_type == SCM_RIGHTS) {
            size_t count = payload_len / sizeof(int);
            for (size_t j = 0; j < count; j++) {
                int fd;
                memcpy(&fd, payload + j * sizeof(int), sizeof fd);
                if (kept < a->maxfds)
                    out[kept++] = fd;
                else
                    close(fd); /* more than asked for: see the caller */
                seen++;
            }
        }
#if AFUNIX_HAS_PASSCRED
        else if (hdr.cmsg_level == SOL_SOCKET && hdr.cmsg_type == SCM_CREDENTIALS
                 && payload_len >= sizeof(struct ucred)) {
            struct ucred uc;
            memcpy(&uc, payload, sizeof uc);
            a->creds[4 * i] = 1;
            a->creds[4 * i + 1] = (int)uc.pid;
            a->creds[4 * i + 2] = (int)uc.uid;
            a->creds[4 * i + 3] = (int)uc.gid;
        }
#endif
        size_t step = CMSG_ALIGN(hdr.cmsg_len);
        if (step == 0 || step > total - off)
            break;
        off += step;
    }
    a->nfds[i] = kept;
    a->total_fds += kept;
    return seen;
}

static int recv_batch(int fd, struct mmsghdr *hdrs, int n, int flags)
{
    if (n == 1) {
        /* one slot (a batch of one, or MSG_PEEK): recvmsg, cheaper in the
         * kernel than recvmmsg; MSG_WAITFORONE means nothing for one */
        ssize_t rc = recvmsg(fd, &hdrs[0].msg_hdr, flags);
        if (rc < 0)
            return -errno;
        hdrs[0].msg_len = (unsigned int)rc;
        return 1;
    }
#if AFUNIX_HAS_SENDMMSG
    int rc = recvmmsg(fd, hdrs, (unsigned int)n, flags | MSG_WAITFORONE, NULL);
    return rc < 0 ? -errno : rc;
#else
    for (int i = 0; i < n; i++) {
        ssize_t rc = recvmsg(fd, &hdrs[i].msg_hdr, i > 0 ? flags | MSG_DONTWAIT : flags);
        if (rc < 0)
            return i > 0 ? i : -errno;
        hdrs[i].msg_len = (unsigned int)rc;
    }
    return n;
#endif
}

int afunix_recv_many(int fd, struct afunix_arena *a, int flags)
{
    /* An earlier call's messages come first: the kernel already gave them
     * to us, and the caller's bookkeeping was interrupted before it took
     * them (a Python exception from a signal handler). */
    if (a->delivered >= 0 && a->delivered < a->count)
        return a->count - a->delivered; /* delivered is the caller's to set: checked */
    afunix_arena_release(a);
    a->count = a->delivered = 0;
    /* MSG_PEEK leaves the head message queued: every further slot would
     * peek that same message again, so a peek takes one. */
    int n = (flags & MSG_PEEK) ? 1 : a->max_messages;
    struct mmsghdr *hdrs = a->hdrs;
    struct iovec *iovs = (struct iovec *)(hdrs + n);
    struct sockaddr_un *names = a->names;
    for (int i = 0; i < n; i++) {
        struct msghdr *m = &hdrs[i].msg_hdr;
        iovs[i].iov_base = a->data + (size_t)i * a->bufsize;
        iovs[i].iov_len = a->bufsize;
        m->msg_iov = &iovs[i];
        m->msg_iovlen = 1;
        m->msg_name = &names[i];
        m->msg_namelen = sizeof names[i];
        m->msg_control = a->control + (size_t)i * a->control_space;
        m->msg_controllen = a->control_space;
        m->msg_flags = 0;
    }
    int got = recv_batch(fd, hdrs, n, flags | MSG_CMSG_CLOEXEC);
    a->extras = 0;
    a->total_fds = 0;
    for (int i = 0; i < got; i++) {
        struct msghdr *m = &hdrs[i].msg_hdr;
        /* With MSG_TRUNC in flags, Linux reports a datagram's full length,
         * which may exceed the buffer: keep lens within the bytes we hold. */
        a->lens[i] = hdrs[i].msg_len < a->bufsize ? hdrs[i].msg_len : a->bufsize;
        int mflags = m->msg_flags;
        int seen = parse_control(a, i, m);
        if ((mflags & MSG_CTRUNC) || seen > a->maxfds) {
            /* Cut control data: the descriptors that did arrive are not the
             * ones the sender meant as a whole; close them, flag the cut. */
            a->total_fds -= a->nfds[i]; /* this message's are the last kept */
            close_all(a->fds + a->total_fds, a->nfds[i]);
            a->nfds[i] = 0;
            mflags |= MSG_CTRUNC;
        }
        /* Linux echoes MSG_CMSG_CLOEXEC, which we add ourselves: report the
         * flags as a plain recvmsg with the caller's flags would. */
        if (!(flags & MSG_CMSG_CLOEXEC))
            mflags &= ~MSG_CMSG_CLOEXEC;
        a->msg_flags[i] = mflags;
        size_t path_off = offsetof(struct sockaddr_un, sun_path);
        if (m->msg_namelen == 0 || m->msg_namelen < path_off) {
            a->addrlens[i] = -1;
        } else {
            size_t len = m->msg_namelen - path_off;
            if (len > AFUNIX_ADDR_MAX)
                len = AFUNIX_ADDR_MAX;
            if (len > sizeof names[i].sun_path)
                len = sizeof names[i].sun_path;
            memcpy(a->addrs + (size_t)i * AFUNIX_ADDR_MAX, names[i].sun_path, len);
            a->addrlens[i] = (int)len;
        }
        if (a->addrlens[i] >= 0 || a->nfds[i] > 0 || a->creds[4 * i])
            a->extras++;
    }
    if (got > 0) {
        /* Recorded here, in the call that received them: from now on the
         * messages and descriptors are the arena's until given over. */
        memset(a->handed, 0, (size_t)got);
        a->all_handed = 0;
        a->count = got;
        /* a peeked message stays queued: never hand it out a second time */
        a->delivered = (flags & MSG_PEEK) ? got : 0;
    }
    return got;
}

int afunix_close_fds(const int *fds, int n)
{
    for (int i = 0; i < n; i++)
        close(fds[i]);
    return n < 0 ? 0 : n;
}
