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

#include "afunix_limits.h"

/* The package version this core was built for; the Python side refuses to
 * run a core whose version differs (a stale build in the source tree). */
const char *afunix_version(void);

/* Create n socketpairs of `type` (SOCK_STREAM, SOCK_DGRAM, SOCK_SEQPACKET),
 * close-on-exec, and non-blocking when `nonblock` is non-zero.  fds must have
 * room for 2 * n ints.  Returns n, or -errno after closing every descriptor
 * it had made. */
int afunix_socketpairs(int type, int nonblock, int n, int *fds);

/* ---- batched message I/O ------------------------------------------------ */

/* AFUNIX_MAX_BATCH, AFUNIX_SCM_MAX_FD, AFUNIX_ADDR_MAX: afunix_limits.h. */

#if defined(__linux__)
#define AFUNIX_HAS_SENDMMSG 1
#define AFUNIX_HAS_PASSCRED 1
#else
#define AFUNIX_HAS_SENDMMSG 0
#define AFUNIX_HAS_PASSCRED 0
#endif

/* Send up to AFUNIX_MAX_BATCH messages in one sendmmsg (a sendmsg loop where
 * the platform lacks it).  Message i is lens[i] bytes of `data`, which holds
 * all the messages back to back in datalen bytes; when lens is NULL every
 * message is uniform_len bytes (fixed-size records need no length array).
 * Optional per-message parts, NULL when no
 * message has them:
 *   nfds[i] descriptors taken in order from `fds`, which holds nfds_total;
 *   addrlens[i] bytes of sun_path taken in order from `addrs` (addrslen
 *     bytes in all), -1 for none;
 *   creds[4*i .. 4*i+3] = present, pid, uid, gid (SCM_CREDENTIALS).
 * The lengths and counts must add up to exactly datalen, nfds_total and
 * addrslen, the sizes of what the caller handed over: -EINVAL otherwise,
 * before any system call, so that nothing past them is read or sent.
 * MSG_NOSIGNAL is always added.  Returns how many messages went (> 0 even
 * when an error stopped the rest), or -errno when none did. */
int afunix_send_many(int fd, int n, const char *data, size_t datalen,
                     const size_t *lens, size_t uniform_len,
                     const int *fds, size_t nfds_total, const int *nfds,
                     const char *addrs, size_t addrslen, const int *addrlens,
                     const int *creds, int flags);

/* Send one message with one sendmsg: len bytes of data, nfds descriptors
 * from fds (SCM_RIGHTS, none when nfds is 0) and, when creds is not NULL,
 * creds[0..2] = pid, uid, gid (SCM_CREDENTIALS).  MSG_NOSIGNAL is always
 * added.  On SOCK_STREAM this puts all of a message's bytes on the write
 * that carries its control data, as socket.send_fds does.  Returns the
 * bytes the kernel took (on SOCK_STREAM possibly fewer than len), or
 * -errno. */
ssize_t afunix_send_message(int fd, const char *data, size_t len,
                            const int *fds, int nfds, const int *creds, int flags);

/* Send one message of len bytes with no control data (send(2)): the single
 * message of send_many([m]).  MSG_NOSIGNAL is always added.  Returns the
 * bytes the kernel took, or -errno. */
ssize_t afunix_send_one(int fd, const char *data, size_t len, int flags);

/* A reusable receive area for up to max_messages messages of bufsize bytes
 * (0: descriptors without data) and maxfds descriptors each.  The arrays are
 * outputs of afunix_recv_many, valid until the next call.  The data area is
 * the caller's: views of the messages may outlive the arena, so whoever hands
 * them out owns it.
 *
 * Hand-over state.  What the kernel handed over is recorded by the same call
 * that received it, so an exception that interrupts the caller's bookkeeping
 * (a Python signal handler) loses nothing:
 *   messages [delivered, count) were received and not yet given to the
 *   caller: the next afunix_recv_many returns them again (count - delivered)
 *   without asking the kernel;
 *   the descriptors of message i are held by the arena, which closes them
 *   (at the next receive, afunix_arena_release or afunix_arena_clear), while
 *   i >= delivered, or while neither all_handed nor handed[i] is set.
 * The caller gives messages over by raising delivered, and descriptors by
 * setting handed[i] or all_handed: plain stores, no call. */
struct afunix_arena {
    int max_messages;
    size_t bufsize;
    int maxfds;
    char *data;          /* message i at data + i * bufsize (the caller's memory) */
    size_t *lens;        /* bytes received (<= bufsize) */
    int *msg_flags;      /* the kernel's msg_flags, plus MSG_CTRUNC when we cut */
    int *nfds;           /* descriptors kept for message i */
    int *fds;            /* all kept descriptors back to back, in message order */
    int total_fds;       /* how many fds holds */
    int *creds;          /* 4 per message: present, pid, uid, gid */
    int *addrlens;       /* sun_path bytes in addrs, -1 when no address */
    char *addrs;         /* message i's at addrs + i * AFUNIX_ADDR_MAX */
    int extras;          /* messages of the last call with fds, address or creds */
    int count;           /* messages received by the last call that asked the kernel */
    int delivered;       /* of those, how many the caller has taken */
    int all_handed;      /* every descriptor of [0, count) belongs to the caller */
    unsigned char *handed; /* handed[i]: message i's descriptors belong to the caller */
    /* private to afunix.c */
    void *hdrs;
    void *names;
    char *control;
    size_t control_space;
};

/* Set up the arena `a` (memory the caller owns, such as a Python-owned
 * struct) to receive into `data`: max_messages * bufsize bytes that the
 * caller owns and keeps for at least the arena's life (afunix_arena_clear
 * leaves them alone).  The caller allocates the struct, and can arrange for
 * afunix_arena_clear to run before it calls this, so that no exception
 * between the two calls can lose what init allocates.  Returns 0, -ENOMEM,
 * or -EINVAL when data is NULL or the sizes are out of range; on failure the
 * arena is left cleared. */
int afunix_arena_init(struct afunix_arena *a, int max_messages, size_t bufsize, int maxfds,
                      char *data);
/* Close the descriptors `a` still holds, free what afunix_arena_init
 * allocated and zero the struct (not `a` itself, nor its data).  Safe on a
 * zeroed struct and a second time. */
void afunix_arena_clear(struct afunix_arena *a);

/* Receive into `arena` with one recvmmsg(MSG_WAITFORONE | MSG_CMSG_CLOEXEC):
 * waits for the first message as recv would, then takes those already
 * queued (only the first with MSG_PEEK, which would repeat it).  A message whose control data was cut (MSG_CTRUNC), or that
 * carried more than maxfds descriptors, has all its descriptors closed and
 * MSG_CTRUNC in its flags.  MSG_CMSG_CLOEXEC is left out of the flags
 * stored unless the caller passed it.
 * When messages of an earlier call are still undelivered, returns their
 * number (count - delivered) and receives nothing; otherwise first closes
 * the descriptors the arena still holds (afunix_arena_release), then sets
 * count to what arrived and delivered to 0 (to count for MSG_PEEK: a peeked
 * message is still queued, so it is never redelivered from here; its
 * descriptors are held until handed over).  Returns the count, or -errno. */
int afunix_recv_many(int fd, struct afunix_arena *arena, int flags);

/* Close every descriptor the arena holds (see the hand-over state) and drop
 * undelivered messages: afterwards delivered == count and all_handed is set.
 * Returns the number of descriptors closed. */
int afunix_arena_release(struct afunix_arena *arena);

/* Close fds[0..n), whatever each close returns; returns n.  One crossing for
 * a whole batch of received descriptors. */
int afunix_close_fds(const int *fds, int n);

#endif
