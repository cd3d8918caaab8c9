"""Batched sending: send_many over sendmmsg, and the message checks shared by every send.

The receiving side (recv_many, RecvBatch) is in receive.py.
"""
from __future__ import annotations

import itertools
import operator
import socket
from typing import Any, Iterable, List, Optional

from . import _backend, _checks, _io
from ._kernel import MSG_NOSIGNAL
from .message import Message

#: Most messages one call takes or returns (UIO_MAXIOV).
MAX_MESSAGES = 1024
_SCM_MAX_FD = 253

# Plain ints: the socket module's constants are enum members, and every
# | or & on them builds a new enum object (as costly as a system call).
_DONTWAIT = int(socket.MSG_DONTWAIT)
# A byte stream goes through socket.sendall, which does not add it: without
# it a hung-up peer raises SIGPIPE, fatal where the handler is SIG_DFL.
_NOSIGNAL = MSG_NOSIGNAL
_STREAM = int(socket.SOCK_STREAM)


def _fd_of(obj: Any) -> int:
    if isinstance(obj, int) and not isinstance(obj, bool):
        fd = obj
    elif hasattr(obj, "fileno"):
        fd = obj.fileno()
    else:
        raise TypeError("descriptors must be ints or have fileno(), not %s" % type(obj).__name__)
    if fd < 0:
        raise ValueError("descriptor must be >= 0, got %d" % fd)
    return int(fd)


def checked_fds(fds: Any) -> tuple[int, ...]:
    """Descriptors to pass, as a tuple of ints, within SCM_MAX_FD."""
    out = tuple(_fd_of(f) for f in fds)
    if len(out) > _SCM_MAX_FD:
        raise ValueError("at most %d descriptors per message (SCM_MAX_FD), got %d"
                         % (_SCM_MAX_FD, len(out)))
    return out


def _nbytes(data: Any) -> int:
    try:
        view = memoryview(data)
    except TypeError:
        raise TypeError("a message must be bytes-like or afunix.Message, not %s"
                        % type(data).__name__) from None
    if not view.c_contiguous:
        raise ValueError("message buffers must be C-contiguous")
    return view.nbytes


_BYTES_TYPES = frozenset((bytes, bytearray))
_SEQUENCES = frozenset((tuple, list))
_NBYTES = operator.attrgetter("nbytes")
_C_CONTIGUOUS = operator.attrgetter("c_contiguous")


def plain_sizes(items: List[Any]) -> Optional[List[int]]:
    """Byte counts of `items` when all are bytes/bytearray, or all contiguous memoryviews; else None.

    The fast path of every send, with no check per message in Python.  len()
    is the byte count of bytes and bytearray but not of every buffer (an
    array of shorts; a view with an empty inner dimension has len() > 0 and
    no bytes), so any other type takes the per-message path.
    """
    types = set(map(type, items))
    if types <= _BYTES_TYPES:
        return list(map(len, items))
    if types == {memoryview} and all(map(_C_CONTIGUOUS, items)):
        return list(map(_NBYTES, items))
    return None


def outgoing(messages: Iterable[Any]) -> _io.Outgoing:
    """Check `messages` and split them into the parallel lists the backends take."""
    items = messages if isinstance(messages, list) else list(messages)
    if not items:
        return _io.Outgoing(items, [], None, None, None, b"")
    sizes = plain_sizes(items)
    if sizes is not None:  # the common case: plain byte strings
        return _io.Outgoing(items, sizes, None, None, None, b"".join(items))
    if set(map(type, items)) == {Message}:
        fast = _messages_with_fds(items)
        if fast is not None:
            return fast
    datas: List[Any] = []
    lengths: List[int] = []
    fds: List[tuple[int, ...]] = []
    addrs: List[Optional[bytes]] = []
    creds: List[Optional[tuple[int, int, int]]] = []
    for item in items:
        if isinstance(item, Message):
            datas.append(item.data)
            fds.append(checked_fds(item.fds))
            addrs.append(None if item.address is None else _io.encode_address(item.address))
            if item.credentials is None:
                creds.append(None)
            else:
                pid, uid, gid = (_checks.as_int(v, "credentials") for v in item.credentials)
                creds.append((pid, uid, gid))
        else:
            datas.append(item)
            fds.append(())
            addrs.append(None)
            creds.append(None)
        lengths.append(_nbytes(datas[-1]))
    return _io.Outgoing(
        datas, lengths,
        fds if any(fds) else None,
        addrs if any(a is not None for a in addrs) else None,
        creds if any(c is not None for c in creds) else None,
    )


_DATA, _FDS, _ADDRESS, _CREDENTIALS = (operator.itemgetter(i) for i in (0, 1, 2, 4))


def _messages_with_fds(items: list[Message]) -> Optional[_io.Outgoing]:
    """Messages with descriptors and nothing else, checked a batch at a time.

    None when the batch needs the per-message path: addresses, credentials,
    descriptors given as objects, non-bytes data, or an error to report.
    """
    n = len(items)
    if list(map(_ADDRESS, items)).count(None) != n or list(map(_CREDENTIALS, items)).count(None) != n:
        return None
    datas = list(map(_DATA, items))
    sizes = plain_sizes(datas)
    if sizes is None:
        return None
    joined = b"".join(datas)
    fd_lists = list(map(_FDS, items))
    if not set(map(type, fd_lists)) <= _SEQUENCES:  # any other iterable: checked one by one
        return None
    counts = list(map(len, fd_lists))
    flat = list(itertools.chain.from_iterable(fd_lists))
    if max(counts) > _SCM_MAX_FD or (flat and (set(map(type, flat)) != {int} or min(flat) < 0)):
        return None
    return _io.Outgoing(datas, sizes, fd_lists if flat else None, None, None, joined,
                        counts if flat else None, flat if flat else None)


def send_many(sock: Any, messages: Iterable[Any], flags: int = 0) -> int:
    """Send many messages with as few sendmmsg calls as possible (1024 a call).

    Like calling ``sock.sendmsg`` once per message.  `messages` holds
    bytes-like objects or `Message`s (with descriptors, a destination address
    for an unconnected SOCK_DGRAM socket, or explicit credentials).

    Partial results are counts, never losses: when k > 0 messages went and
    the next would block (non-blocking socket, or the timeout ran out), k is
    returned; an error after k > 0 messages also returns k (the kernel
    reports it again on the next call, as sendmmsg does).  On SOCK_STREAM,
    which has no message boundaries, it behaves as ``sendall`` of the
    concatenation: all are written, or it raises.

    Returns:
        How many messages were sent, in order from the first.

    Raises:
        TypeError, ValueError: bad messages, before any system call.
        BlockingIOError: nothing could be sent on a non-blocking socket.
        TimeoutError: nothing could be sent before the socket's timeout.
        OSError: from the kernel, when nothing was sent.
    """
    flags = _checks.as_int(flags, "flags")
    out = outgoing(messages)  # every check before the first system call
    t = _io.target(sock)
    try:
        if t.type == _STREAM:
            return _send_stream(t, out, flags)
        return _send_messages(t, out, flags)
    finally:
        if t.shadow:
            t.sock.detach()


def _send_messages(t: _io.Target, out: _io.Outgoing, flags: int) -> int:
    total = len(out.datas)
    send_batch = _backend.impl.send_batch
    sent = 0
    deadline = None
    may_wait = t.timeout != 0.0 and not flags & _DONTWAIT
    if t.timeout is not None:
        deadline = _io.deadline_of(t.timeout)
        flags |= _DONTWAIT  # waiting is done here, against the deadline
    if deadline is None and total <= MAX_MESSAGES and not flags & _DONTWAIT:
        # a blocking socket and one call's worth: the common case, tried first
        try:
            sent = send_batch(t.sock, out, 0, total, flags)
        except OSError:
            pass  # nothing went: the loop below retries or reports it
        if sent == total:
            return sent
    while sent < total:
        count = min(total - sent, MAX_MESSAGES)
        try:
            sent += send_batch(t.sock, out, sent, count, flags)
        except InterruptedError:
            continue  # PEP 475: handlers ran; retry
        except BlockingIOError:
            if not may_wait:
                if sent:
                    return sent
                raise
            if not _io.wait(t.fd, True, deadline):
                if sent:
                    return sent
                raise socket.timeout("timed out") from None
        except OSError:
            if sent:
                return sent
            raise
    return sent


def _send_stream(t: _io.Target, out: _io.Outgoing, flags: int) -> int:
    # A byte stream has no boundaries: a half-written message cannot be
    # expressed as a count, so this is sendall of the concatenation.
    # Descriptors ride on the first byte of their message.
    if out.addresses is not None:
        raise ValueError("a connected SOCK_STREAM socket takes no per-message address")
    if out.fds is None and out.credentials is None:
        joined = out.joined if out.joined is not None else b"".join(out.datas)
        t.sock.sendall(joined, flags | _NOSIGNAL)
        return len(out.datas)
    extras = [
        (out.fds[i] if out.fds is not None else (),
         out.credentials[i] if out.credentials is not None else None)
        for i in range(len(out.datas))
    ]
    for (fds, cred), length in zip(extras, out.lengths):
        if (fds or cred is not None) and length == 0:
            raise ValueError("on SOCK_STREAM a message carrying descriptors or credentials "
                             "needs at least one data byte")
    for data, (fds, cred) in zip(out.datas, extras):
        if not fds and cred is None:
            t.sock.sendall(data, flags | _NOSIGNAL)
            continue
        view = memoryview(data).cast("B")
        first = _io.Outgoing([view[:1]], [1], [fds], None, None if cred is None else [cred])
        _send_messages(t, first, flags)  # raises unless the byte went
        t.sock.sendall(view[1:], flags | _NOSIGNAL)
    return len(out.datas)
