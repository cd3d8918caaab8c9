"""AF_UNIX addresses and servers: checked paths, abstract names, safe listen/connect.

A filesystem address is a path (str, bytes or os.PathLike) of at most
MAX_PATH_BYTES encoded bytes.  An abstract address (Linux) is the stdlib's own
form, ``b"\\0" + name``, made by `abstract`; `AUTOBIND` asks the kernel for a
unique abstract name.  `listen` replaces a stale socket file left by a crash,
never steals a live server's, never removes anything that is not a socket,
can give the file exact permission bits without a window, and returns a
`ListeningSocket` that removes its own file, and only its own, on close.
Concurrent `listen` calls on one path take turns (see `pathlock`), so exactly
one of them gets it.
"""
from __future__ import annotations

import contextlib
import errno
import math
import os
import socket
import stat
import sys
import tempfile
import time
from typing import Any, Optional, Tuple, Union

from . import _checks
from ._kernel import O_PATH
from ._limits import ADDR_MAX
from .capabilities import MAX_PATH_BYTES, supports
from .message import AddressLike
from .pathlock import PathLock

__all__ = ["AUTOBIND", "ListeningSocket", "abstract", "connect", "listen"]

#: Longest abstract name: sun_path (108 bytes on Linux) minus the leading NUL.
MAX_ABSTRACT_BYTES = ADDR_MAX - 1

# The kernel caps the backlog at net.core.somaxconn anyway; asking for the
# platform maximum lets the administrator's setting decide.
DEFAULT_BACKLOG = socket.SOMAXCONN

# How many times `listen` replaces a stale file and binds again before it
# gives up: more than one only when other processes keep racing for the path.
#: Pause before a refused probe is asked again (see _probe).
_STALE_RECHECK = 0.05
_BIND_ATTEMPTS = 5


class _Autobind:
    """Type of `AUTOBIND`: one instance, compared by identity."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "afunix.AUTOBIND"

    def __reduce__(self) -> str:
        return "AUTOBIND"


#: Pass to `listen` to let the kernel pick a unique abstract name (Linux);
#: ``sock.getsockname()`` tells which.
AUTOBIND = _Autobind()


def _require_abstract() -> None:
    if not supports("abstract"):
        raise OSError(
            errno.EAFNOSUPPORT,
            "abstract AF_UNIX addresses are Linux only (supports('abstract') is False)",
        )


def abstract(name: Union[str, bytes]) -> bytes:
    """An abstract-namespace address for `name`, usable with listen, connect and the stdlib.

    The result is ``b"\\0" + name``, the form ``socket.bind``/``socket.connect``
    take for the Linux abstract namespace.  Abstract sockets have no file:
    permissions do not apply (anyone in the same network namespace can
    connect) and the name disappears with the last socket bound to it.

    Args:
        name: str (encoded with os.fsencode) or bytes, 1 to 107 bytes.

    Returns:
        The address, as bytes starting with a NUL byte.

    Raises:
        TypeError: `name` is not str or bytes.
        ValueError: `name` is empty (use AUTOBIND for a kernel-chosen name)
            or longer than 107 bytes.
        OSError: EAFNOSUPPORT where the platform has no abstract namespace.
    """
    if isinstance(name, str):
        raw = os.fsencode(name)
    elif isinstance(name, (bytes, bytearray)):
        raw = bytes(name)
    else:
        raise TypeError("abstract name must be str or bytes, not %s" % type(name).__name__)
    if not raw:
        raise ValueError("abstract name must not be empty; use afunix.AUTOBIND for a kernel-chosen name")
    if len(raw) > MAX_ABSTRACT_BYTES:
        raise ValueError(
            "abstract name is %d bytes; the limit is %d" % (len(raw), MAX_ABSTRACT_BYTES)
        )
    _require_abstract()
    return b"\0" + raw


def encode_address(address: Any) -> Tuple[bytes, bool]:
    """`address` as (sun_path bytes, is_abstract): the one encoder of every address afunix takes.

    A path (str, bytes, os.PathLike) or the stdlib's abstract form
    ``b"\\0" + name``.  listen, connect and every send with a destination
    go through it, so all refuse the same bad addresses the same way.

    Raises:
        TypeError, ValueError: not an address, empty, a NUL inside a path, or
            longer than sun_path; before any system call.
        OSError: EAFNOSUPPORT for an abstract address where there are none.
    """
    if address is AUTOBIND:
        raise ValueError("AUTOBIND is only valid for listen")
    try:
        path = os.fspath(address)
    except TypeError:
        raise TypeError(
            "address must be str, bytes or os.PathLike, not %s" % type(address).__name__
        ) from None
    raw = os.fsencode(path)
    if not raw:
        raise ValueError("address must not be empty")
    if raw[:1] == b"\0":
        # The stdlib spelling of an abstract address, as made by abstract().
        if len(raw) - 1 > MAX_ABSTRACT_BYTES:
            raise ValueError(
                "abstract name is %d bytes; the limit is %d"
                % (len(raw) - 1, MAX_ABSTRACT_BYTES)
            )
        if len(raw) == 1:
            raise ValueError("abstract name must not be empty; use afunix.AUTOBIND")
        _require_abstract()
        return raw, True
    if b"\0" in raw:
        raise ValueError("path contains a NUL byte: %r" % (path,))
    if len(raw) > MAX_PATH_BYTES:
        raise ValueError(
            "path is %d bytes; the sun_path limit is %d bytes" % (len(raw), MAX_PATH_BYTES)
        )
    return raw, False


def encode_destination(address: Any) -> bytes:
    """sun_path bytes of a send's destination: as `socket.sendto` takes it.

    The type and the length are checked (TypeError, ValueError, before any
    system call); the rest is the kernel's to judge, as for the stdlib: an
    empty address is its EINVAL, ``b"\\0"`` (the empty abstract name a peer
    may be bound to, and recv_fds returns) is a valid destination, and a
    path with a NUL inside reaches the path before the NUL.
    """
    if address is AUTOBIND:
        raise ValueError("AUTOBIND is only valid for listen")
    try:
        raw = os.fsencode(os.fspath(address))
    except TypeError:
        raise TypeError(
            "address must be str, bytes or os.PathLike, not %s" % type(address).__name__
        ) from None
    limit = MAX_PATH_BYTES + (1 if raw[:1] == b"\0" else 0)
    if len(raw) > limit:
        raise ValueError("AF_UNIX address is %d bytes, the limit is %d" % (len(raw), limit))
    return raw


def _checked_timeout(timeout: Any) -> Optional[float]:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError("timeout must be a number or None, not %s" % type(timeout).__name__)
    value = float(timeout)
    if not value >= 0.0 or math.isinf(value):  # also refuses NaN
        raise ValueError("timeout must be a finite number >= 0, got %r" % (timeout,))
    return value


class ListeningSocket(socket.socket):
    """A ``socket.socket`` that removes its socket file on close, if the file is still its own.

    Made by `listen`; usable wherever a socket.socket is (accept, fileno,
    selectors, asyncio's ``loop.sock_accept``).  ``accept()`` returns plain
    ``socket.socket`` connections.  The file is removed by ``close()`` (and so
    by ``with``), only in the process that created it, and only when the
    directory entry still names the inode this socket created (same st_dev and
    st_ino): a server restarted at the same path keeps its file when the old
    one closes late.  ``detach()`` hands over the descriptor and leaves the
    file in place.  A ``dup()`` does not own the file.

    Attributes:
        path: the filesystem path this socket owns (str, as getsockname
            reports paths); None for an abstract or autobound socket, and
            after close() or detach().
    """

    __slots__ = ("_afunix_path", "_afunix_raw", "_afunix_ident", "_afunix_pid")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._afunix_path: Optional[str] = None
        self._afunix_raw: Optional[bytes] = None
        self._afunix_ident: Optional[Tuple[int, int]] = None
        self._afunix_pid = 0

    @property
    def path(self) -> Optional[str]:
        """The socket file's path, or None (abstract, autobound, closed, detached, dup)."""
        return self._afunix_path

    def _own(self, raw: bytes, ident: Tuple[int, int]) -> None:
        self._afunix_raw = raw
        self._afunix_path = os.fsdecode(raw)
        self._afunix_ident = ident
        self._afunix_pid = os.getpid()

    def _disown(self) -> None:
        self._afunix_path = None
        self._afunix_raw = None
        self._afunix_ident = None

    def getsockname(self) -> Any:
        """Like ``socket.getsockname``, but gives `path` for a file socket.

        With ``mode=``, the kernel recorded the temporary name the socket was
        bound under before it was moved into place; the public path is what a
        caller wants to hand to clients.
        """
        if self._afunix_path is not None:
            return self._afunix_path
        return super().getsockname()

    def close(self) -> None:
        """Like ``socket.close``, and first removes the socket file if it is still this socket's."""
        self._remove_file()
        super().close()

    def detach(self) -> int:
        """Like ``socket.detach``: the caller takes the descriptor, and the file stays."""
        self._disown()
        return super().detach()

    def _remove_file(self) -> None:
        raw, ident = self._afunix_raw, self._afunix_ident
        self._disown()
        # A forked child closing its inherited copy must not pull the file
        # out from under the parent that still serves on it.
        if raw is None or ident is None or self._afunix_pid != os.getpid():
            return
        try:
            st = os.lstat(raw)
            if (st.st_dev, st.st_ino) == ident:
                # Another server can only have taken the path by replacing
                # the entry, which changes the inode (ours cannot be reused:
                # the bound socket holds it until the descriptor closes,
                # which is after this).  A window remains only between this
                # lstat and the unlink: there is no unlink-if-inode call.
                os.unlink(raw)
        except OSError:
            pass  # already gone, or the directory is no longer ours to touch


def _probe(raw: bytes, type: int) -> Tuple[bool, str]:
    """Whether a server answers at `raw`, without blocking; and why we think so.

    A refused connection is asked again after a short pause before it counts
    as stale: a server that has just bound the path but not yet called
    listen() refuses too, for the few microseconds in between, and must not
    lose its file to a concurrent listen().  (An afunix listen() holds the
    path's lock from its bind to its listen, so the pause is for servers that
    do not use afunix.)
    """
    live, why = _probe_once(raw, type)
    if why == "stale":
        time.sleep(_STALE_RECHECK)
        live, why = _probe_once(raw, type)
    return live, why


def _probe_once(raw: bytes, type: int) -> Tuple[bool, str]:
    probe = socket.socket(socket.AF_UNIX, type)
    try:
        # A blocking connect to a live listener whose backlog is full would
        # wait for a free slot: non-blocking, a full backlog is EAGAIN.
        probe.setblocking(False)
        probe.connect(raw)
    except ConnectionRefusedError:
        return False, "stale"
    except BlockingIOError:
        return True, "a live server answers (backlog full)"
    except OSError as exc:
        if exc.errno == errno.EPROTOTYPE:
            return True, "a live server of another socket type answers"
        if exc.errno == errno.ENOENT:
            return False, "gone"
        # EACCES and the like: we cannot tell, so the file is not ours to remove.
        return True, "cannot probe it: %s" % (exc.strerror or exc)
    finally:
        probe.close()
    return True, "a live server answers"


def _clear_stale(raw: bytes, type: int) -> None:
    """Remove the socket file at `raw` if it is stale; raise if it is live or not a socket."""
    # Hold the probed inode open (O_PATH, Linux) until the unlink decision:
    # a stale socket's inode is otherwise free, and its number can be given
    # at once to a new file created in its place, defeating the st_ino check.
    pin = -1
    try:
        if O_PATH:
            pin = os.open(raw, O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
            before = os.fstat(pin)
        else:
            before = os.lstat(raw)
    except FileNotFoundError:
        return
    try:
        if not stat.S_ISSOCK(before.st_mode):
            raise FileExistsError(
                errno.EEXIST, "exists and is not a socket; afunix never removes it",
                os.fsdecode(raw),
            )
        live, why = _probe(raw, type)
        if live:
            raise OSError(
                errno.EADDRINUSE, "Address already in use (%s)" % why, os.fsdecode(raw)
            )
        if why == "gone":
            return
        try:
            after = os.lstat(raw)
            # Unlink only the file we probed: if the entry changed in between,
            # someone else replaced it and the next bind attempt decides again.
            if (after.st_dev, after.st_ino) == (before.st_dev, before.st_ino):
                os.unlink(raw)
        except FileNotFoundError:
            pass
    finally:
        if pin >= 0:
            os.close(pin)


def _ident(raw: bytes) -> Tuple[int, int]:
    st = os.lstat(raw)
    return st.st_dev, st.st_ino


def _bind_path(sock: ListeningSocket, raw: bytes, type: int, backlog: int) -> None:
    """Bind `sock` at `raw` directly, replacing a stale file, then listen.

    The path's lock is held from the first bind to listen(): another
    listen() must not probe the file between the two, when it refuses
    connections like a stale one.
    """
    with PathLock(raw):
        for _ in range(_BIND_ATTEMPTS):
            try:
                sock.bind(raw)
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
                _clear_stale(raw, type)
                continue
            try:
                ident = _ident(raw)
            except OSError:
                ident = None  # pragma: no cover - removed by someone else at once
            if ident is not None:
                sock._own(raw, ident)
            if type != socket.SOCK_DGRAM:
                sock.listen(backlog)
            return
    raise OSError(errno.EADDRINUSE, "Address already in use (path keeps being taken)", os.fsdecode(raw))


def _bind_path_with_mode(
    sock: ListeningSocket, raw: bytes, type: int, backlog: int, mode: int
) -> None:
    """Bind `sock` so that the file at `raw` only ever exists with exactly `mode`.

    chmod after bind leaves a window with the umask's bits, and changing the
    umask is process-wide (other threads would create files with it).  So the
    socket is bound inside a fresh directory next to the target (mkdtemp:
    mode 0700, nobody else can reach the file there), chmod'ed there, put in
    listening state, and only then linked to the final path.  link() is
    atomic and fails with EEXIST instead of replacing, so a live server's file
    is never clobbered, and the file appears with its final mode and already
    accepting, so a concurrent listen() cannot mistake it for stale.  A
    connect resolves the path to the inode, so the link reaches the socket.
    The path's lock is held around the link and any stale-file removal.
    """
    parent = os.path.dirname(raw) or b"."
    tmpdir = tempfile.mkdtemp(prefix=b".afx", dir=parent)
    dir_fd = -1
    tmp = os.path.join(tmpdir, b"s")
    try:
        bind_name = tmp
        if len(tmp) > MAX_PATH_BYTES:
            # The temporary name is longer than the target (short basename
            # near the limit): reach the directory through its descriptor.
            if not sys.platform.startswith("linux"):
                raise ValueError(
                    "path is too long to bind with mode= here (temporary name %d bytes; limit %d)"
                    % (len(tmp), MAX_PATH_BYTES)
                )
            dir_fd = os.open(tmpdir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            bind_name = b"/proc/self/fd/%d/s" % dir_fd
        sock.bind(bind_name)
        os.chmod(tmp, mode)
        if type != socket.SOCK_DGRAM:
            sock.listen(backlog)
        ident = _ident(tmp)
        with PathLock(raw):
            for _ in range(_BIND_ATTEMPTS):
                try:
                    os.link(tmp, raw)
                except FileExistsError:
                    _clear_stale(raw, type)
                    continue
                sock._own(raw, ident)
                return
        raise OSError(errno.EADDRINUSE, "Address already in use (path keeps being taken)", os.fsdecode(raw))
    finally:
        if dir_fd >= 0:
            os.close(dir_fd)
        # never hide the error that brought us here behind a cleanup error
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        with contextlib.suppress(OSError):
            os.rmdir(tmpdir)


def listen(
    address: Union[AddressLike, _Autobind],
    type: int = socket.SOCK_STREAM,
    *,
    backlog: int = DEFAULT_BACKLOG,
    mode: Optional[int] = None,
) -> ListeningSocket:
    """A listening STREAM/SEQPACKET socket, or a bound DGRAM socket, at `address`.

    Like ``socket.create_server`` for AF_UNIX.  A socket file already at the
    path is probed with a non-blocking connect: when nothing answers (left by a
    crash) it is removed and the bind goes ahead; when a server answers, the
    file is left alone and OSError(EADDRINUSE) is raised.  Anything at the path
    that is not a socket is never removed.  The probe shows up at a live
    server as a connection that closes at once.  Concurrent calls on one path
    take turns through a lock file beside it (PATH + ".afunix-lock", removed
    again when done), so exactly one of them wins.

    Args:
        address: a path (str, bytes, os.PathLike; at most MAX_PATH_BYTES
            encoded bytes), an abstract address from `abstract`, or AUTOBIND.
        type: socket.SOCK_STREAM, SOCK_SEQPACKET or SOCK_DGRAM (bound, no listen).
        backlog: the listen() backlog, default socket.SOMAXCONN.
        mode: exact permission bits of the socket file (e.g. 0o600); the file
            never exists with other bits.  None: the umask decides.  Not valid
            with abstract addresses, which have no permissions.

    Returns:
        A `ListeningSocket` (a socket.socket) that removes its file on close
        if the file is still its own.

    Raises:
        TypeError, ValueError: bad address, type, backlog or mode, before any
            system call (path too long, empty, NUL inside).
        FileExistsError: something that is not a socket is at the path, or
            something that is not a regular file at the lock path.
        PermissionError: the lock file beside the path is another user's.
        OSError: EADDRINUSE when a live server has the address, or another
            listen() has held the path's lock for pathlock.LOCK_WAIT seconds;
            other errors from the kernel; nothing is leaked.
    """
    t = _checks.supported_socket_type(type)
    n = _checks.in_range(backlog, "backlog", 0, 1 << 30)
    bits = None if mode is None else _checks.in_range(mode, "mode", 0, 0o777)
    if address is AUTOBIND:
        raw, is_abstract = b"", True
        _require_abstract()
    else:
        raw, is_abstract = encode_address(address)
    if is_abstract and bits is not None:
        raise ValueError("mode does not apply to abstract addresses: they have no permissions")

    sock = ListeningSocket(socket.AF_UNIX, t)
    try:
        if is_abstract:
            # An empty address (sun_path length 0) makes Linux autobind.
            sock.bind(raw)
            if t != socket.SOCK_DGRAM:
                sock.listen(n)
        elif bits is None:
            _bind_path(sock, raw, t, n)
        else:
            _bind_path_with_mode(sock, raw, t, n, bits)
    except BaseException:
        sock.close()
        raise
    return sock


def connect(
    address: AddressLike, type: int = socket.SOCK_STREAM, *, timeout: Optional[float] = None
) -> socket.socket:
    """A socket connected to the AF_UNIX server at `address`.

    Like ``socket.create_connection`` for AF_UNIX: `timeout` bounds the
    connect and stays set on the returned socket.  Unlike the stdlib, a
    timeout also covers a server whose backlog is full (the kernel answers
    EAGAIN at once; this waits and retries until the deadline).

    Args:
        address: a path (str, bytes, os.PathLike) or an abstract address.
        type: socket.SOCK_STREAM, SOCK_SEQPACKET or SOCK_DGRAM.
        timeout: seconds, 0 for non-blocking; None keeps the default
            (socket.getdefaulttimeout(), normally blocking).

    Returns:
        A connected socket.socket, owned by the caller.

    Raises:
        TypeError, ValueError: bad address, type or timeout, before any system call.
        TimeoutError: the server did not accept within `timeout`.
        OSError: from the kernel (ENOENT, ECONNREFUSED, ...); nothing is leaked.
    """
    raw, _ = encode_address(address)
    t = _checks.supported_socket_type(type)
    seconds = _checked_timeout(timeout)
    sock = socket.socket(socket.AF_UNIX, t)
    try:
        if seconds is not None:
            sock.settimeout(seconds)
        else:
            seconds = sock.gettimeout()  # the default timeout, as the stdlib applies it
        if seconds:
            _connect_until(sock, raw, time.monotonic() + seconds)
        else:
            sock.connect(raw)
    except BaseException:
        sock.close()
        raise
    return sock


def _connect_until(sock: socket.socket, raw: bytes, deadline: float) -> None:
    # A connect to a listener with a full backlog fails with EAGAIN on a
    # socket with a timeout (there is nothing to poll for), so retry with a
    # growing pause until the deadline, like a blocking connect would wait.
    pause = 0.001
    while True:
        try:
            sock.connect(raw)
            return
        except BlockingIOError:
            left = deadline - time.monotonic()
            if left <= 0:
                # socket.timeout: TimeoutError on 3.10+, its own OSError subclass on 3.9.
                raise socket.timeout("timed out") from None
            time.sleep(min(pause, left))
            pause = min(pause * 2, 0.05)
