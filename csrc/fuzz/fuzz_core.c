/* libFuzzer harness for the C core's message building and parsing.
 *
 * The core is compiled in here (#include "../afunix.c") with its system calls
 * replaced by a fake kernel that answers from the fuzz input: recvmmsg hands
 * back arbitrary lengths, flags, addresses and control data (cmsg_len larger
 * than the buffer, as a macOS kernel reports; truncated and zero headers;
 * descriptors in any number), sendmmsg checks every msghdr the core built,
 * and socketpair fails part-way.  Every descriptor the fake kernel hands out
 * is tracked: the core must keep it or close it exactly once, never close
 * one it was not given.
 *
 * Build and run (see README, "Reliability"; .ci/fuzz does both):
 *   clang -g -O1 -std=c99 -fsanitize=fuzzer,address,undefined \
 *       -o fuzz_core csrc/fuzz/fuzz_core.c
 *   ./fuzz_core -max_total_time=60 corpus/
 */
#define _GNU_SOURCE 1
#define AFUNIX_VERSION "fuzz"

/* Every header afunix.c includes, first, so that the renames below touch
 * only the core's calls, not the system's declarations. */
#include <errno.h>
#include <fcntl.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

static int fake_close(int fd);
static int fake_recvmmsg(int fd, struct mmsghdr *hdrs, unsigned int n, int flags,
                         struct timespec *timeout);
static int fake_sendmmsg(int fd, struct mmsghdr *hdrs, unsigned int n, int flags);
static ssize_t fake_recvmsg(int fd, struct msghdr *m, int flags);
static ssize_t fake_sendmsg(int fd, const struct msghdr *m, int flags);
static int fake_socketpair(int domain, int type, int protocol, int sv[2]);

#define close fake_close
#define recvmmsg fake_recvmmsg
#define sendmmsg fake_sendmmsg
#define recvmsg fake_recvmsg
#define sendmsg fake_sendmsg
#define socketpair fake_socketpair
#include "../afunix.c"
#undef close
#undef recvmmsg
#undef sendmmsg
#undef recvmsg
#undef sendmsg
#undef socketpair

#define CHECK(cond)                                                          \
    do {                                                                     \
        if (!(cond)) {                                                       \
            fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, \
                    #cond);                                                  \
            abort();                                                         \
        }                                                                    \
    } while (0)

/* ---- the fuzz input, read front to back; zeros once it runs out ---------- */

static const uint8_t *in_data;
static size_t in_left;

static uint8_t take_u8(void)
{
    if (in_left == 0)
        return 0;
    in_left--;
    return *in_data++;
}

static uint32_t take_u32(void)
{
    uint32_t v = 0;
    for (int i = 0; i < 4; i++)
        v = (v << 8) | take_u8();
    return v;
}

static void take_bytes(void *dst, size_t n)
{
    size_t k = n < in_left ? n : in_left;
    memcpy(dst, in_data, k);
    memset((char *)dst + k, 0, n - k);
    in_data += k;
    in_left -= k;
}

/* ---- descriptors handed out by the fake kernel --------------------------- */

#define FD_BASE 100000       /* far above anything real, never closed for real */
#define MAX_ISSUED 8192

enum fd_state { FD_FREE, FD_ISSUED, FD_CLOSED };
static enum fd_state fd_states[MAX_ISSUED];
static int issued;

static int issue_fd(void)
{
    if (issued == MAX_ISSUED)
        return -1;
    fd_states[issued] = FD_ISSUED;
    return FD_BASE + issued++;
}

/* Set while the fake kernel writes raw bytes as control data: the
 * "descriptors" in it are arbitrary numbers the core may close. */
static int lying;

static int fake_close(int fd)
{
    if (lying && !(fd >= FD_BASE && fd < FD_BASE + issued))
        return 0;
    /* the core closes only descriptors it was given, and each once */
    CHECK(fd >= FD_BASE && fd < FD_BASE + issued);
    CHECK(fd_states[fd - FD_BASE] == FD_ISSUED);
    fd_states[fd - FD_BASE] = FD_CLOSED;
    return 0;
}

static int is_open(int fd)
{
    return fd >= FD_BASE && fd < FD_BASE + issued && fd_states[fd - FD_BASE] == FD_ISSUED;
}

/* ---- receive: recvmmsg answers from the input ---------------------------- */

/* For each message: whether every descriptor handed out sits in a complete
 * SCM_RIGHTS header inside msg_controllen ("honest"), as Linux writes them;
 * then every one must be kept or closed. */
static int honest[AFUNIX_MAX_BATCH], raw[AFUNIX_MAX_BATCH];
static int first_fd[AFUNIX_MAX_BATCH], fd_count[AFUNIX_MAX_BATCH];

static void fill_control(struct msghdr *m, int i)
{
    size_t room = m->msg_controllen; /* the core's buffer: exactly this big */
    char *buf = m->msg_control;
    uint8_t shape = take_u8();
    honest[i] = 1;
    raw[i] = 0;
    first_fd[i] = FD_BASE + issued;
    fd_count[i] = 0;
    if (shape & 0x80) {
        /* raw bytes: headers of any shape, lengths of any size */
        take_bytes(buf, room);
        /* made-up numbers only: none may name a descriptor handed out
         * earlier, which the core could then close a second time */
        for (size_t at = 0; at + sizeof(int) <= room; at += sizeof(int)) {
            int v;
            memcpy(&v, buf + at, sizeof v);
            if (v >= FD_BASE && v < FD_BASE + MAX_ISSUED) {
                v = -1;
                memcpy(buf + at, &v, sizeof v);
            }
        }
        size_t len = take_u32() % (room * 2 + 64);
        m->msg_controllen = len; /* larger than the buffer: a kernel lie */
        honest[i] = 0;
        raw[i] = 1;
        lying = 1;
        return;
    }
    size_t off = 0;
    int parts = shape % 4;
    for (int p = 0; p < parts && off + CMSG_LEN(0) <= room; p++) {
        struct cmsghdr hdr;
        uint8_t kind = take_u8();
        size_t payload_room = room - off - CMSG_LEN(0);
        memset(&hdr, 0, sizeof hdr);
        if (kind % 3 == 0) {
            /* SCM_RIGHTS with as many descriptors as fit, or fewer */
            size_t max = payload_room / sizeof(int);
            size_t k = max ? take_u8() % (max + 1) : 0;
            hdr.cmsg_level = SOL_SOCKET;
            hdr.cmsg_type = SCM_RIGHTS;
            hdr.cmsg_len = CMSG_LEN(k * sizeof(int));
            for (size_t j = 0; j < k; j++) {
                int fd = issue_fd();
                if (fd < 0) { /* out of fake descriptors: stop handing out */
                    k = j;
                    hdr.cmsg_len = CMSG_LEN(k * sizeof(int));
                    break;
                }
                memcpy(buf + off + CMSG_LEN(0) + j * sizeof(int), &fd, sizeof fd);
                fd_count[i]++;
            }
        } else if (kind % 3 == 1 && payload_room >= sizeof(struct ucred)) {
            struct ucred uc;
            take_bytes(&uc, sizeof uc);
            hdr.cmsg_level = SOL_SOCKET;
            hdr.cmsg_type = SCM_CREDENTIALS;
            hdr.cmsg_len = CMSG_LEN(sizeof uc);
            memcpy(buf + off + CMSG_LEN(0), &uc, sizeof uc);
        } else {
            /* another level or type, any length: the core must skip it */
            hdr.cmsg_level = (int)take_u32();
            hdr.cmsg_type = (int)take_u32();
            if (hdr.cmsg_level == SOL_SOCKET)
                hdr.cmsg_type |= 0x4000; /* not SCM_RIGHTS: its payload is not descriptors */
            hdr.cmsg_len = take_u32() % (payload_room + CMSG_LEN(0) + 1);
            if (hdr.cmsg_len < CMSG_LEN(0))
                honest[i] = hdr.cmsg_len == 0 ? honest[i] : 0;
        }
        memcpy(buf + off, &hdr, sizeof hdr);
        if (hdr.cmsg_len < CMSG_LEN(0))
            break;
        off += CMSG_ALIGN(hdr.cmsg_len);
    }
    if (off > room)
        off = room;
    m->msg_controllen = off;
    if (take_u8() % 8 == 0) {
        /* cut the control data at any byte: a truncated header or payload */
        m->msg_controllen = take_u32() % (off + 1);
        if (m->msg_controllen < off)
            honest[i] = 0;
    }
}

static int fake_recvmmsg(int fd, struct mmsghdr *hdrs, unsigned int n, int flags,
                         struct timespec *timeout)
{
    (void)fd;
    (void)flags;
    (void)timeout;
    lying = 0; /* the closes of the last round are over */
    uint8_t pick = take_u8();
    if (pick == 0xff) {
        errno = EAGAIN;
        return -1;
    }
    int got = (int)(pick % (n + 1));
    for (int i = 0; i < got; i++) {
        struct msghdr *m = &hdrs[i].msg_hdr;
        CHECK(m->msg_iovlen == 1 && m->msg_iov != NULL);
        hdrs[i].msg_len = take_u8() % 4 == 0 ? take_u32() : take_u8();
        size_t n_data = hdrs[i].msg_len < m->msg_iov->iov_len ? hdrs[i].msg_len
                                                               : m->msg_iov->iov_len;
        memset(m->msg_iov->iov_base, 'x', n_data); /* the core's buffer: all writable */
        uint8_t fl = take_u8();
        m->msg_flags = (fl & 1 ? MSG_TRUNC : 0) | (fl & 2 ? MSG_CTRUNC : 0)
                       | (fl & 4 ? MSG_CMSG_CLOEXEC : 0) | (fl & 8 ? MSG_EOR : 0);
        socklen_t room = m->msg_namelen;
        CHECK(room >= sizeof(struct sockaddr_un));
        take_bytes(m->msg_name, room);
        /* any length, even past the buffer */
        m->msg_namelen = (socklen_t)(take_u8() % 4 == 0 ? take_u32() % 4096 : take_u8() % 112);
        fill_control(m, i);
    }
    return got;
}

static void fuzz_recv(void)
{
    int max_messages = 1 + take_u8() % 6;
    size_t bufsize = 1 + take_u8() % 80;
    int maxfds = take_u8() % 8 == 0 ? (int)(take_u32() % 300) - 20 : take_u8() % 6;
    char *data = malloc((size_t)max_messages * bufsize);
    CHECK(data != NULL);
    struct afunix_arena arena;
    struct afunix_arena *a = &arena;
    int set_up = afunix_arena_init(a, max_messages, bufsize, maxfds, data);
    if (maxfds < 0 || maxfds > AFUNIX_SCM_MAX_FD) {
        CHECK(set_up == -EINVAL);
        free(data);
        return;
    }
    if (set_up != 0) {
        CHECK(set_up == -ENOMEM);
        free(data);
        return; /* out of memory */
    }
    for (int round = 0; round < 3 && in_left > 0; round++) {
        int got = afunix_recv_many(-1, a, 0);
        if (got < 0) {
            CHECK(got == -EAGAIN);
            continue;
        }
        CHECK(got <= max_messages);
        size_t kept_before = 0; /* descriptors are kept back to back */
        for (int i = 0; i < got; i++) {
            CHECK(a->lens[i] <= a->bufsize);
            CHECK(a->nfds[i] >= 0 && a->nfds[i] <= (maxfds > 0 ? maxfds : 0));
            CHECK(a->addrlens[i] >= -1 && a->addrlens[i] <= AFUNIX_ADDR_MAX);
            if (a->msg_flags[i] & MSG_CTRUNC)
                CHECK(a->nfds[i] == 0);
            const int *mine = a->fds + kept_before;
            kept_before += (size_t)a->nfds[i];
            for (int j = 0; j < a->nfds[i] && !raw[i]; j++) {
                /* kept: one of this message's, still open, in order */
                CHECK(mine[j] >= first_fd[i] && mine[j] < first_fd[i] + fd_count[i]);
                CHECK(is_open(mine[j]));
                CHECK(j == 0 || mine[j] > mine[j - 1]);
            }
            if (honest[i]) {
                /* nothing lost: every descriptor kept or already closed */
                int open_count = 0;
                for (int fd = first_fd[i]; fd < first_fd[i] + fd_count[i]; fd++)
                    open_count += is_open(fd);
                CHECK(open_count == a->nfds[i]);
            }
            for (int j = 0; j < a->nfds[i]; j++)
                if (!raw[i]) /* a raw message's "descriptors" are made-up numbers */
                    fake_close(mine[j]); /* the caller takes them */
        }
        CHECK(kept_before == (size_t)a->total_fds);
        CHECK(a->count == got && a->delivered == 0);
        if (got > 0) {
            CHECK(!a->all_handed);
            /* until given over, the same messages come back, the kernel not asked */
            CHECK(afunix_recv_many(-1, a, 0) == got);
        }
        a->delivered = a->count; /* the caller took messages and descriptors */
        a->all_handed = 1;
    }
    afunix_arena_clear(a);
    free(data);
}

/* ---- send: sendmmsg checks what the core built --------------------------- */

struct send_case {
    int n;
    const char *data;
    size_t data_len;
    const size_t *lens;
    const int *fds, *nfds;
    const char *addrs;
    const int *addrlens;
    const int *creds;
};
static const struct send_case *sending;

static int fake_sendmmsg(int fd, struct mmsghdr *hdrs, unsigned int n, int flags)
{
    const struct send_case *c = sending;
    (void)fd;
    CHECK(flags & MSG_NOSIGNAL);
    CHECK((int)n == c->n);
    const char *next_data = c->data;
    const int *next_fd = c->fds;
    const char *next_addr = c->addrs;
    for (unsigned int i = 0; i < n; i++) {
        const struct msghdr *m = &hdrs[i].msg_hdr;
        CHECK(m->msg_iovlen == 1);
        CHECK(m->msg_iov[0].iov_base == next_data && m->msg_iov[0].iov_len == c->lens[i]);
        next_data += c->lens[i];
        if (c->addrlens && c->addrlens[i] >= 0) {
            const struct sockaddr_un *sun = m->msg_name;
            CHECK(sun != NULL && sun->sun_family == AF_UNIX);
            CHECK(m->msg_namelen == offsetof(struct sockaddr_un, sun_path) + (size_t)c->addrlens[i]);
            CHECK(memcmp(sun->sun_path, next_addr, (size_t)c->addrlens[i]) == 0);
            next_addr += c->addrlens[i];
        } else {
            CHECK(m->msg_name == NULL && m->msg_namelen == 0);
        }
        int want_fds = c->nfds ? c->nfds[i] : 0;
        int want_creds = c->creds && c->creds[4 * i];
        int saw_fds = 0, saw_creds = 0;
        volatile char sink = 0;
        for (struct cmsghdr *h = CMSG_FIRSTHDR(m); h != NULL; h = CMSG_NXTHDR((struct msghdr *)m, h)) {
            /* the whole header and payload lie inside msg_control */
            CHECK((char *)h + h->cmsg_len <= (char *)m->msg_control + m->msg_controllen);
            for (size_t b = 0; b < h->cmsg_len; b++)
                sink ^= ((const char *)h)[b]; /* ASan checks every byte */
            if (h->cmsg_type == SCM_RIGHTS) {
                CHECK(h->cmsg_len == CMSG_LEN((size_t)want_fds * sizeof(int)));
                CHECK(memcmp(CMSG_DATA(h), next_fd, (size_t)want_fds * sizeof(int)) == 0);
                saw_fds = 1;
            } else {
                CHECK(h->cmsg_type == SCM_CREDENTIALS);
                struct ucred uc;
                memcpy(&uc, CMSG_DATA(h), sizeof uc);
                CHECK(uc.pid == c->creds[4 * i + 1]);
                CHECK(uc.uid == (uid_t)c->creds[4 * i + 2]);
                CHECK(uc.gid == (gid_t)c->creds[4 * i + 3]);
                saw_creds = 1;
            }
        }
        (void)sink;
        CHECK(saw_fds == (want_fds > 0));
        CHECK(saw_creds == want_creds);
        if (want_fds > 0)
            next_fd += want_fds;
    }
    uint8_t pick = take_u8();
    if (pick % 5 == 0) {
        errno = pick % 2 ? EAGAIN : EPIPE;
        return -1;
    }
    return 1 + (int)(pick % n);
}

static void fuzz_send(void)
{
    static size_t lens[AFUNIX_MAX_BATCH + 8];
    static int nfds[AFUNIX_MAX_BATCH + 8], addrlens[AFUNIX_MAX_BATCH + 8];
    static int creds[4 * (AFUNIX_MAX_BATCH + 8)];
    uint8_t shape = take_u8();
    int n = shape & 0x80 ? (int)(take_u32() % 1040) - 8 : shape % 9;
    int bound = n < 0 ? 0 : n > AFUNIX_MAX_BATCH + 8 ? AFUNIX_MAX_BATCH + 8 : n;
    int with_fds = shape & 1, with_addrs = shape & 2, with_creds = shape & 4;
    int valid = n >= 0 && n <= AFUNIX_MAX_BATCH;
    size_t data_len = 0, fd_total = 0, addr_total = 0;
    for (int i = 0; i < bound; i++) {
        lens[i] = take_u8() % 24;
        data_len += lens[i];
        uint8_t f = take_u8();
        nfds[i] = f % 16 == 0 ? (int)(take_u32() % 300) - 30 : f % 5;
        if (with_fds && (nfds[i] < 0 || nfds[i] > AFUNIX_SCM_MAX_FD))
            valid = 0;
        else if (with_fds)
            fd_total += (size_t)nfds[i];
        uint8_t l = take_u8();
        addrlens[i] = l % 16 == 0 ? (int)(take_u32() % 130) - 5 : (int)(l % 20) - 1;
        if (with_addrs && addrlens[i] > (int)sizeof(((struct sockaddr_un *)0)->sun_path))
            valid = 0;
        else if (with_addrs && addrlens[i] > 0)
            addr_total += (size_t)addrlens[i];
        creds[4 * i] = take_u8() & 1;
        creds[4 * i + 1] = (int)take_u32();
        creds[4 * i + 2] = (int)take_u32();
        creds[4 * i + 3] = (int)take_u32();
    }
    /* exactly as much memory as the arguments describe, so ASan sees overreads */
    char *data = malloc(data_len + 1);
    int *fds = malloc(fd_total * sizeof(int) + 1);
    char *addrs = malloc(addr_total + 1);
    CHECK(data && fds && addrs);
    take_bytes(data, data_len);
    for (size_t j = 0; j < fd_total; j++)
        fds[j] = (int)take_u32();
    take_bytes(addrs, addr_total);
    struct send_case c = {
        n, data, data_len, lens,
        with_fds ? fds : NULL, with_fds ? nfds : NULL,
        with_addrs ? addrs : NULL, with_addrs ? addrlens : NULL,
        with_creds ? creds : NULL,
    };
    /* Now and then a size that is not what is handed over (a buffer that
     * changed size between measuring and joining): refused before any read. */
    size_t data_arg = data_len, fds_arg = with_fds ? fd_total : 0;
    size_t addrs_arg = with_addrs ? addr_total : 0;
    uint8_t lie = take_u8();
    int lied = 1;
    switch (lie % 16) {
    case 1: data_arg += 1 + lie / 16; break;
    case 2: if (data_len > 0) data_arg -= 1; else lied = 0; break;
    case 3: fds_arg += 1 + lie / 16; break;
    case 4: if (fds_arg > 0) fds_arg -= 1; else lied = 0; break;
    case 5: addrs_arg += 1 + lie / 16; break;
    case 6: if (addrs_arg > 0) addrs_arg -= 1; else lied = 0; break;
    default: lied = 0; break;
    }
    if (lied && n != 0)
        valid = 0;
    sending = &c;
    int rc = afunix_send_many(-1, n, data, data_arg, lens, 0, c.fds, fds_arg, c.nfds,
                              c.addrs, addrs_arg, c.addrlens, c.creds, 0);
    sending = NULL;
    if (!valid)
        CHECK(rc == -EINVAL);
    else if (n == 0)
        CHECK(rc == 0);
    else
        CHECK(rc == -EAGAIN || rc == -EPIPE || (rc >= 1 && rc <= n));
    free(data);
    free(fds);
    free(addrs);
}

/* One message goes through recvmsg/sendmsg (a batch of one): the same fake
 * kernel, for a batch of one. */
static ssize_t fake_recvmsg(int fd, struct msghdr *m, int flags)
{
    struct mmsghdr one;
    one.msg_hdr = *m;
    one.msg_len = 0;
    int got = fake_recvmmsg(fd, &one, 1, flags, NULL);
    if (got < 0)
        return -1;
    if (got == 0) { /* nothing queued: what a recvmsg that would block says */
        errno = EAGAIN;
        return -1;
    }
    *m = one.msg_hdr;
    return (ssize_t)one.msg_len;
}

static ssize_t fake_sendmsg(int fd, const struct msghdr *m, int flags)
{
    struct mmsghdr one;
    one.msg_hdr = *m;
    one.msg_len = 0;
    if (fake_sendmmsg(fd, &one, 1, flags) < 0)
        return -1;
    size_t len = 0;
    for (size_t i = 0; i < (size_t)m->msg_iovlen; i++)
        len += m->msg_iov[i].iov_len;
    return (ssize_t)len;
}

/* ---- socketpairs: a failure part-way closes exactly what was made -------- */

static int pairs_fail_at;
static int pairs_made;

static int fake_socketpair(int domain, int type, int protocol, int sv[2])
{
    (void)domain;
    (void)type;
    (void)protocol;
    if (pairs_made == pairs_fail_at) {
        errno = EMFILE;
        return -1;
    }
    sv[0] = issue_fd();
    sv[1] = issue_fd();
    if (sv[0] < 0 || sv[1] < 0) {
        errno = ENFILE;
        return -1;
    }
    pairs_made++;
    return 0;
}

static void fuzz_socketpairs(void)
{
    int n = (int)(take_u8() % 40) - 2;
    pairs_fail_at = take_u8() % 48;
    pairs_made = 0;
    int first = FD_BASE + issued;
    int *fds = malloc(sizeof(int) * (size_t)(n > 0 ? 2 * n : 1));
    CHECK(fds != NULL);
    int rc = afunix_socketpairs(0, take_u8() & 1, n, fds);
    if (n < 0) {
        CHECK(rc == -EINVAL);
    } else if (rc < 0) {
        CHECK(rc == -EMFILE || rc == -ENFILE);
        for (int fd = first; fd < FD_BASE + issued; fd++)
            CHECK(!is_open(fd)); /* nothing left behind */
    } else {
        CHECK(rc == n);
        for (int i = 0; i < 2 * n; i++) {
            CHECK(is_open(fds[i]));
            fake_close(fds[i]);
        }
    }
    free(fds);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    in_data = data;
    in_left = size;
    issued = 0;
    lying = 0;
    switch (take_u8() % 3) {
    case 0:
        fuzz_recv();
        break;
    case 1:
        fuzz_send();
        break;
    default:
        fuzz_socketpairs();
        break;
    }
    return 0;
}
