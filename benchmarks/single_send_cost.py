"""What one single-message send costs, layer by layer, in instructions counted by callgrind.

Wall-clock ratios of single calls move with the machine's load; the number
of instructions a loop executes does not.  Each variant sends N 64-byte
messages on a SOCK_SEQPACKET socketpair, each taken at once with
``recv_into``; run every variant twice, with two values of N, under
callgrind, and the difference of the totals divided by the difference of
the N is the cost of one send and one receive, start-up excluded:

    for n in 1000 3000; do
        valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
            python benchmarks/single_send_cost.py VARIANT $n 2>&1 | grep refs
    done

(kernel time is not counted: the system calls are the same in every
variant).  The variants:

- ``sock``: ``sock.send(m)``, the stdlib twin;
- ``core``: the C core's single send (``lib.afunix_send_one``) called bare,
  arguments made once (C backend);
- ``fast``: the active backend's fast path (``try_send_one``) called
  directly, without ``send_many`` around it;
- ``send_many``: ``afunix.send_many(sock, [m])``, the public call;
- ``thinnest``: the least a Python function can do and still make the
  public call's checks (list of one, int flags in range, a socket.socket,
  bytes-like message, AF_UNIX, not a stream, open, blocking or
  non-blocking) before ``sock.send``: the floor for any afunix call
  written in Python.

Set AFUNIX_BACKEND=c or stdlib to choose the backend for ``fast`` and
``send_many``.
"""
from __future__ import annotations

import _socket
import socket
import sys
from typing import Any, Callable, Dict, List

import afunix
from afunix import _backend
from afunix._kernel import MSG_NOSIGNAL

_SOCKET = socket.socket
_C_INT_MAX = 2 ** 31 - 1
_STREAM = int(socket.SOCK_STREAM)
_AF_UNIX = int(socket.AF_UNIX)
raw_type = _socket.socket.type.__get__
raw_family = _socket.socket.family.__get__


def thinnest(sock: Any, messages: List[Any], flags: int = 0) -> int:
    """send_many's checks for one plain message, then sock.send: no backend, no frame more."""
    if (type(messages) is list and len(messages) == 1 and type(flags) is int
            and 0 <= flags <= _C_INT_MAX and type(sock) is _SOCKET):
        (data,) = messages
        kind = type(data)
        if kind is bytes or kind is bytearray or (kind is memoryview and data.c_contiguous):
            timeout = sock.gettimeout()
            if (not timeout and sock.fileno() >= 0 and raw_family(sock) == _AF_UNIX
                    and raw_type(sock) != _STREAM):
                try:
                    sock.send(data, flags | MSG_NOSIGNAL)
                    return 1
                except BlockingIOError:
                    if timeout == 0.0:
                        raise
    raise RuntimeError("not the case this variant measures")


def main() -> None:
    variant, n = sys.argv[1], int(sys.argv[2])
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    m = b"x" * 64
    buf = bytearray(2048)
    fd = a.fileno()
    impl = _backend.impl
    variants: Dict[str, Callable[[], Any]] = {
        "sock": lambda: a.send(m),
        "fast": lambda: impl.try_send_one(a, m, 0),
        "send_many": lambda: afunix.send_many(a, [m]),
        "thinnest": lambda: thinnest(a, [m]),
    }
    if _backend.name == "c":
        lib = getattr(impl, "lib")
        variants["core"] = lambda: lib.afunix_send_one(fd, m, 64, 0)
    send = variants[variant]
    receive = b.recv_into
    for _ in range(n):
        send()
        receive(buf)
    a.close()
    b.close()


if __name__ == "__main__":
    main()
