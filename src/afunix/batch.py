"""Batched sending: send_many over sendmmsg, and the message checks shared by every send.

The receiving side (recv_many, RecvBatch) is in receive.py.
"""
from __future__ import annotations

import errno
import itertools
import operator
import socket
from typing import Any, Callable, Iterable, List, Optional, Tuple

from . import _backend, _checks, _io
from .addresses import encode_destination
from ._contract import Outgoing
from ._kernel import MSG_NOSIGNAL
from ._limits import MAX_BATCH, SCM_MAX_FD
from .message import Message

#: Most messages one call takes or returns (UIO_MAXIOV): the public name of MAX_BATCH.
MAX_MESSAGES = MAX_BATCH

# Plain ints: the socket module's constants are enum members, and every
# | or & on them builds a new enum object (as costly as a system call).
_DONTWAIT = int(socket.MSG_DONTWAIT)
# A byte stream goes through socket.sendall, which does not add it: without
# it a hung-up peer raises SIGPIPE, fatal where the handler is SIG_DFL.
_NOSIGNAL = MSG_NOSIGNAL
_STREAM = int(socket.SOCK_STREAM)
_SOCKET = socket.socket
_C_INT_MAX = _checks.C_INT_MAX


def _fd_of(obj: Any) -> int:
    if isinstance(obj, int) and not isinstance(obj, bool):
        fd = obj
    elif hasattr(obj, "fileno"):
        fd = obj.fileno()
    else:
        raise TypeError("descriptors must be ints or have fileno(), not %s" % type(obj).__name__)
    return _checks.descriptor(fd)


def checked_fds(fds: Any) -> tuple[int, ...]:
    """Descriptors to pass, as a tuple of ints, within SCM_MAX_FD."""
    out = tuple(_fd_of(f) for f in fds)
    if len(out) > SCM_MAX_FD:
        raise ValueError("at most %d descriptors per message (SCM_MAX_FD), got %d"
                         % (SCM_MAX_FD, len(out)))
    return out


def pinned(data: Any) -> Tuple[Any, int]:
    """`data` in a form whose size cannot change while it is held, and its byte count.

    bytes cannot change.  Any other buffer is held through a memoryview of it,
    a buffer export: while afunix holds it, another thread that resizes the
    object gets BufferError, as it would while a stdlib send has it, so the
    count stays the count of the bytes that are joined and sent.

    Raises:
        TypeError: not a bytes-like object.
        ValueError: not C-contiguous.
    """
    if type(data) is bytes:
        return data, len(data)
    try:
        view = memoryview(data)
    except TypeError:
        raise TypeError("a message must be bytes-like or afunix.Message, not %s"
                        % type(data).__name__) from None
    if not view.c_contiguous:
        raise ValueError("message buffers must be C-contiguous")
    return view, view.nbytes


_BYTES_TYPES = frozenset((bytes, bytearray))
_SEQUENCES = frozenset((tuple, list))
_NBYTES = operator.attrgetter("nbytes")
_C_CONTIGUOUS = operator.attrgetter("c_contiguous")
_VIEW: Callable[[Any], memoryview] = memoryview


def plain_pinned(items: List[Any]) -> Optional[Tuple[List[Any], List[int]]]:
    """`items` pinned (see `pinned`) and their byte counts, when all are bytes/bytearray or all contiguous memoryviews; else None.

    The fast path of every send, with no check per message in Python.  A
    bytearray is replaced by a memoryview of it, which pins it; bytes and
    memoryviews (themselves exports) are kept as they are.  len() is the
    byte count of bytes and bytearray but not of every buffer (an array of
    shorts; a view with an empty inner dimension has len() > 0 and no
    bytes), so any other type takes the per-message path.
    """
    types = set(map(type, items))
    if types <= _BYTES_TYPES:
        if bytearray in types:
            items = (list(map(_VIEW, items)) if len(types) == 1 else
                     [memoryview(x) if type(x) is bytearray else x for x in items])
        return items, list(map(len, items))
    if types == {memoryview} and all(map(_C_CONTIGUOUS, items)):
        return items, list(map(_NBYTES, items))
    return None


def _joined_plain(items: List[Any], types: set[type]) -> Optional[Tuple[List[Any], List[int], bytes]]:
    """`items` pinned, their byte counts and their bytes joined, when all are bytes/bytearray or all memoryviews; else None.

    The batch sends' fast path (`plain_pinned` is the same check without
    the join).  `types` is set(map(type, items)), made once by the caller.
    A strided memoryview sends the batch the careful way (its ValueError);
    its contiguity is checked here, not left to the join: CPython's join
    refuses such a view, PyPy's copies its bytes.
    """
    if types <= _BYTES_TYPES:
        if bytearray in types:
            items = (list(map(_VIEW, items)) if len(types) == 1 else
                     [memoryview(x) if type(x) is bytearray else x for x in items])
        return items, list(map(len, items)), b"".join(items)
    if types == _MEMORYVIEW:
        sizes = list(map(_NBYTES, items))  # also refuses a released view (ValueError)
        if not all(map(_C_CONTIGUOUS, items)):
            return None
        return items, sizes, b"".join(items)
    return None


_MEMORYVIEW = {memoryview}
_MESSAGE = {Message}


def outgoing(messages: Iterable[Any]) -> Outgoing:
    """Check `messages` and split them into the parallel lists the backends take.

    Every buffer in the result is pinned (see `pinned`) for as long as the
    result is held, so its lengths stay the lengths of its data.
    """
    # One reading of the caller's list: another thread may change a list
    # between two passes over it, and a list subclass may show each pass
    # other items (C code such as bytes.join reads a list's storage).
    items = list(messages)
    if not items:
        return Outgoing(items, [], None, None, None, b"")
    types = set(map(type, items))
    plain = _joined_plain(items, types)
    if plain is not None:  # the common case: plain byte strings
        pins, sizes, joined = plain
        return Outgoing(pins, sizes, None, None, None, joined)
    if types == _MESSAGE:
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
            data = item.data
            fds.append(checked_fds(item.fds))  # may run the caller's fileno()
            addrs.append(None if item.address is None else encode_destination(item.address))
            if item.credentials is None:
                creds.append(None)
            else:
                creds.append(_checks.credentials(item.credentials))
        else:
            data = item
            fds.append(())
            addrs.append(None)
            creds.append(None)
        # measured and pinned last: from here on its size cannot change
        view, n = pinned(data)
        datas.append(view)
        lengths.append(n)
    return Outgoing(
        datas, lengths,
        fds if any(fds) else None,
        addrs if any(a is not None for a in addrs) else None,
        creds if any(c is not None for c in creds) else None,
    )


def _messages_with_fds(items: list[Message]) -> Optional[Outgoing]:
    """Messages with descriptors and nothing else, checked a batch at a time.

    None when the batch needs the per-message path: addresses, credentials,
    descriptors given as objects, non-bytes data, or an error to report.
    """
    n = len(items)
    # One pass splits the fields (a Message is a 5-tuple): data, fds,
    # address, flags (ignored on send), credentials.
    datas, fd_lists, addresses, _flags, credentials = zip(*items)
    if addresses.count(None) != n or credentials.count(None) != n:
        return None
    data_list = list(datas)
    plain = _joined_plain(data_list, set(map(type, data_list)))
    if plain is None:
        return None
    pins, sizes, joined = plain
    containers = set(map(type, fd_lists))
    if containers == _TUPLE:
        fd_tuples = list(fd_lists)  # tuples: what is checked is what is sent
    elif containers <= _SEQUENCES:
        # One copy of each list, in one C call each (tuple() of a tuple is
        # the tuple itself): another thread may change a list between the
        # pass that counts and the pass that flattens.
        fd_tuples = list(map(tuple, fd_lists))
    else:  # any other iterable: checked one by one
        return None
    counts = list(map(len, fd_tuples))
    if max(counts) > SCM_MAX_FD:
        return None
    flat = list(itertools.chain.from_iterable(fd_tuples))
    if not flat:
        return Outgoing(pins, sizes, None, None, None, joined)
    fd_array = _checks.descriptor_array(flat)  # None: bools, objects, out of range
    if fd_array is None:
        return None
    return Outgoing(pins, sizes, fd_tuples, None, None, joined, counts, fd_array)


_TUPLE = {tuple}


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
    concatenation: all are written, or it raises (on a non-blocking socket,
    or with MSG_DONTWAIT, a BlockingIOError whose `characters_written` says
    how many bytes went, as the io module's writers report it); a message with descriptors
    or credentials goes in one sendmsg with all of its bytes, as
    ``socket.send_fds`` sends one (see `send_with_control`).

    Returns:
        How many messages were sent, in order from the first.

    Raises:
        TypeError, ValueError: bad messages, before any system call.
        BlockingIOError: nothing could be sent on a non-blocking socket.
        TimeoutError: nothing could be sent before the socket's timeout.
        OSError: from the kernel, when nothing was sent.
    """
    if (type(messages) is list and len(messages) == 1 and type(flags) is int
            and 0 <= flags <= _C_INT_MAX and type(sock) is _SOCKET):
        # The common call, one plain message on a socket.socket, checked
        # with exact-type tests and sent with one backend call; anything
        # else, or what the backend hands back (-1), goes the careful way.
        try:
            (data,) = messages  # one reading: another thread may change the list
        except ValueError:
            data = None
        kind = type(data)
        if (kind is bytes or kind is bytearray or (kind is memoryview and data.c_contiguous)) \
                and _backend.impl.try_send_one(sock, data, flags) >= 0:
            return 1
    flags = _checks.msg_flags(flags)
    out = outgoing(messages)  # every check before the first system call
    t = _io.target(sock)
    try:
        if t.type == _STREAM:
            return send_stream(t, out, flags)
        return send_records(t, out, flags)
    finally:
        if t.shadow:
            t.sock.detach()


def send_records(t: _io.Target, out: Outgoing, flags: int) -> int:
    total = len(out.datas)
    if not total:
        return 0  # an empty batch: nothing to do, whatever the socket's mode
    send_batch = _backend.impl.send_batch
    sent = 0
    flags, deadline, may_wait = _io.wait_setup(t, flags)
    if deadline is None and total <= MAX_BATCH and not flags & _DONTWAIT:
        # a blocking socket and one call's worth: the common case, tried first
        try:
            sent = send_batch(t.sock, out, 0, total, flags)
        except (BlockingIOError, InterruptedError):
            pass  # nothing went: the loop below waits or retries
        # (any other error is raised as it is: the kernel reports some only
        # once, as the ECONNREFUSED that disconnects a DGRAM socket)
        if sent == total:
            return sent
    while sent < total:
        count = min(total - sent, MAX_BATCH)
        try:
            sent += _io.call_when_ready(t.fd, True, deadline, may_wait,
                                        send_batch, t.sock, out, sent, count, flags)
        except OSError:  # BlockingIOError, the timeout, the kernel's errors
            if sent:
                return sent  # k > 0 went: a count, never a loss (as sendmmsg reports it)
            raise
    return sent


def send_stream(t: _io.Target, out: Outgoing, flags: int) -> int:
    # A byte stream has no boundaries: a half-written message cannot be
    # expressed as a count, so this is sendall of the concatenation.  A
    # message with descriptors or credentials goes out as socket.send_fds
    # sends it (see send_with_control); runs of plain messages between
    # such messages are joined into one sendall.
    if out.addresses is not None:
        raise ValueError("a connected SOCK_STREAM socket takes no per-message address")
    nonblocking = t.timeout == 0.0 or bool(flags & _DONTWAIT)
    if out.fds is None and out.credentials is None:
        joined = out.joined if out.joined is not None else b"".join(out.datas)
        _write_all(t, joined, flags, nonblocking)
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
    n = len(out.datas)
    i = 0
    written = 0  # bytes of this call on the wire, for a partial write's report
    try:
        while i < n:
            fds, cred = extras[i]
            if fds or cred is not None:
                written += write_with_control(t, out.datas[i], out.lengths[i], fds, cred, flags)
                i += 1
                continue
            j = i + 1
            while j < n and not extras[j][0] and extras[j][1] is None:
                j += 1
            written += _write_all(t, out.datas[i] if j == i + 1 else b"".join(out.datas[i:j]),
                                  flags, nonblocking)
            i = j
    except BlockingIOError as exc:
        if written:  # bytes already went: say how many, as io's writers do
            exc.characters_written = written + _characters_written(exc)
        raise
    return n


def _characters_written(exc: BlockingIOError) -> int:
    try:
        return exc.characters_written
    except AttributeError:  # not set: nothing was written
        return 0


def _write_all(t: _io.Target, data: Any, flags: int, nonblocking: bool) -> int:
    """Write all of `data` on a stream; its byte count.

    Blocking or with a timeout, this is sendall.  On a non-blocking socket
    (or with MSG_DONTWAIT) sendall would raise BlockingIOError part-way and
    lose how much went: here the BlockingIOError carries it in
    `characters_written`, as the io module's writers do.
    """
    if not nonblocking:
        t.sock.sendall(data, flags | _NOSIGNAL)
        return len(data) if type(data) is bytes else memoryview(data).nbytes
    view = memoryview(data).cast("B")
    total, done = len(view), 0
    send = t.sock.send
    while done < total:
        try:
            done += send(view[done:], flags | _NOSIGNAL)
        except BlockingIOError:
            raise BlockingIOError(errno.EAGAIN, "the socket took %d of %d bytes; the rest "
                                  "was not sent" % (done, total), done) from None
    return done


def write_with_control(t: _io.Target, data: Any, nbytes: int, fds: tuple[int, ...],
                       credentials: Optional[tuple[int, int, int]], flags: int) -> int:
    """All `nbytes` of `data` on a stream: one sendmsg with the control data, then the rest as sendall.

    Returns `nbytes`.  On a non-blocking socket (or with MSG_DONTWAIT) a
    short write whose rest the socket does not take raises BlockingIOError
    with `characters_written`: the bytes (and the control data) that went.
    """
    sent = _send_with_control(t, data, fds, credentials, flags)
    if sent < nbytes:  # a short write: the rest, without the control data
        nonblocking = t.timeout == 0.0 or bool(flags & _DONTWAIT)
        try:
            _write_all(t, memoryview(data).cast("B")[sent:], flags, nonblocking)
        except BlockingIOError as exc:
            exc.characters_written = sent + _characters_written(exc)
            raise
    return nbytes


def send_with_control(sock: Any, data: Any, fds: tuple[int, ...],
                      credentials: Optional[tuple[int, int, int]], flags: int = 0) -> int:
    """One sendmsg carrying all of `data` with its descriptors and credentials; the bytes it took.

    Like ``socket.send_fds`` (one ``sock.sendmsg``): on SOCK_STREAM the
    kernel attaches the control data to the bytes of that write, so a reader
    gets a small message whole, with its descriptors, in one recvmsg.  Only
    a short write (a signal, a full socket) takes fewer bytes than `data`
    holds; the caller writes the rest, without control data.  Waits as the
    socket's blocking mode and timeout say.  Arguments are checked by the caller.

    Raises:
        BlockingIOError, TimeoutError, OSError: when nothing was sent.
    """
    t = _io.target(sock)
    try:
        return _send_with_control(t, memoryview(data).cast("B"), fds, credentials, flags)
    finally:
        if t.shadow:
            t.sock.detach()


def _send_with_control(t: _io.Target, data: Any, fds: tuple[int, ...],
                       credentials: Optional[tuple[int, int, int]], flags: int) -> int:
    flags, deadline, may_wait = _io.wait_setup(t, flags)
    return _io.call_when_ready(t.fd, True, deadline, may_wait,
                               _backend.impl.send_message, t.sock, data, fds, credentials, flags)
