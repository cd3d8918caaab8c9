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
