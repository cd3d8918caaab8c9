"""The lock that makes concurrent `afunix.listen` calls on one socket path take turns.

Deciding that a socket file is stale and replacing it takes several system
calls (probe, lstat, unlink, bind, listen), and there is no
unlink-if-still-this-inode call, so two callers that both found the same stale
file could each remove what the other had just put in its place.  `PathLock`
serialises them with an flock() on a lock file beside the socket: PATH plus
LOCK_SUFFIX.  The holder removes the file before it lets go, so nothing stays
behind; a caller that then gets the lock on the removed file sees that the path
no longer names it and starts again on a new one.  flock() locks belong to the
open file description, so threads of one process exclude each other too, and
the kernel drops the lock of a process that dies.
"""
from __future__ import annotations

import errno
import fcntl
import os
import stat
import time
from types import TracebackType
from typing import Optional, Tuple, Type

__all__ = ["LOCK_SUFFIX", "LOCK_WAIT", "PathLock"]

#: Appended to the socket path to name its lock file; distinctive, because the
#: holder removes the file (other servers keep their own "X.sock.lock" files).
LOCK_SUFFIX = b".afunix-lock"

#: Seconds a caller waits for the lock before giving up with EADDRINUSE.  The
#: holder's turn is short (at most a few probes 50 ms apart): a longer wait
#: means a stopped or stuck process holds it.
LOCK_WAIT = 10.0

# Waiting is a poll (flock has no timeout): from 1 ms, doubling, to 20 ms.
_POLL_FIRST = 0.001
_POLL_MAX = 0.02

# Creating the lock file fails with these when the directory does not let us
# create anything (missing, not a directory, no write or search permission,
# read-only).  Then we cannot bind or unlink there either, so we cannot race
# anyone there; listen goes on unlocked and the bind reports the error.
_CANNOT_CREATE = frozenset(
    {errno.ENOENT, errno.ENOTDIR, errno.EACCES, errno.EPERM, errno.EROFS}
)

# flock() refused by the filesystem (NFS without a lock manager, some FUSE
# filesystems): listen keeps working there as it did without the lock.
_NO_LOCKING = frozenset({errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL})

# O_RDWR: NFS emulates flock() with a byte-range lock, and an exclusive one
# needs a file open for writing.  O_NONBLOCK: opening a FIFO someone put at
# the lock path must not hang (it is refused after fstat).  Never O_TRUNC and
# nothing is ever written: the file's content is not ours to change.
_OPEN_FLAGS = os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def _ident(st: os.stat_result) -> Tuple[int, int]:
    return st.st_dev, st.st_ino


def _not_a_lock_file(path: bytes) -> FileExistsError:
    return FileExistsError(
        errno.EEXIST,
        "the listen() lock path exists and is not a regular file; afunix never removes it",
        os.fsdecode(path),
    )


def _create(path: bytes) -> Optional[int]:
    """Create the lock file (0600); its descriptor, -1 if it cannot be created, None if it exists."""
    try:
        fd = os.open(path, _OPEN_FLAGS | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return None
    except OSError as exc:
        if exc.errno in _CANNOT_CREATE:
            return -1
        raise
    try:
        os.fchmod(fd, 0o600)  # whatever the umask: the owner must be able to reopen it
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open(path: bytes) -> int:
    """Open the lock file at `path`, creating it if missing; -1 if it cannot be created."""
    while True:
        # Open an existing file without O_CREAT: in a sticky world-writable
        # directory, fs.protected_regular refuses O_CREAT opens of another
        # user's file even when its mode would allow them.
        try:
            fd = os.open(path, _OPEN_FLAGS)
        except FileNotFoundError:
            created = _create(path)
            if created is None:
                continue  # another caller created it first: open theirs
            if created < 0:
                return -1
            fd = created
        except PermissionError:
            try:
                os.lstat(path)
            except OSError:
                return -1  # the directory cannot be searched: nothing to race for here
            raise PermissionError(
                errno.EACCES,
                "cannot open the listen() lock file (another user's: in use by their "
                "listen(), or left behind by one that died; remove it if no listen() runs)",
                os.fsdecode(path),
            ) from None
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
                raise _not_a_lock_file(path) from None  # symlink, directory, socket
            raise
        break
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise _not_a_lock_file(path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _still_named(path: bytes, fd: int) -> bool:
    """Whether `path` still names the file open at `fd` (the holder removes it when done)."""
    try:
        return _ident(os.lstat(path)) == _ident(os.fstat(fd))
    except FileNotFoundError:
        return False


def _acquire(path: bytes) -> int:
    """The descriptor of the locked lock file at `path`, or -1 where there is nothing to lock."""
    deadline = time.monotonic() + LOCK_WAIT
    pause = _POLL_FIRST
    fd = -1
    try:
        while True:
            if fd < 0:
                fd = _open(path)
                if fd < 0:
                    return -1
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                locked = True
            except BlockingIOError:
                locked = False
            except OSError as exc:
                if exc.errno not in _NO_LOCKING:
                    raise
                unlockable, fd = fd, -1
                _release(path, unlockable)  # do not leave a file that locks nothing
                return -1
            # Only a lock on the file the path names counts: the previous
            # holder removes its file before letting go, and a waiter
            # polling a removed file would wait for nothing.
            if _still_named(path, fd):
                if locked:
                    held, fd = fd, -1
                    return held
                removed = False
            else:
                stale_fd, fd = fd, -1
                os.close(stale_fd)
                removed = True
            left = deadline - time.monotonic()
            if left <= 0:
                raise OSError(
                    errno.EADDRINUSE,
                    "Address already in use (another listen() has held %s for %g s)"
                    % (os.fsdecode(path), LOCK_WAIT),
                    os.fsdecode(path[: -len(LOCK_SUFFIX)]),
                )
            if not removed:
                time.sleep(min(pause, left))
                pause = min(pause * 2, _POLL_MAX)
    finally:
        if fd >= 0:
            os.close(fd)


def _release(path: bytes, fd: int) -> None:
    try:
        # Remove the file while still holding it, so the next caller creates
        # a fresh one and any waiter on this one starts over (see _acquire).
        # A file that cannot be removed (read-only remount, another user's
        # in a sticky directory) stays, unlocked and harmless, for the next
        # listen() to reuse.
        if _still_named(path, fd):
            os.unlink(path)
    except OSError:
        pass
    finally:
        os.close(fd)


class PathLock:
    """Holds the listen() lock of a socket path for the duration of a ``with`` block.

    Args:
        raw: the socket path, encoded; the lock file is ``raw + LOCK_SUFFIX``.

    Raises (on entering):
        OSError: EADDRINUSE when another caller has held the lock for
            LOCK_WAIT seconds.
        PermissionError: the lock file exists and belongs to another user.
        FileExistsError: something that is not a regular file is at the lock path.
    """

    __slots__ = ("lock_path", "_fd")

    def __init__(self, raw: bytes) -> None:
        self.lock_path = raw + LOCK_SUFFIX
        self._fd = -1

    def __enter__(self) -> "PathLock":
        self._fd = _acquire(self.lock_path)
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            _release(self.lock_path, fd)
