"""afunix: fast, safe Unix domain sockets.

Batched sendmmsg/recvmmsg, safe SCM_RIGHTS descriptor passing and socketpairs
in bulk, through a small C core (cffi) with a pure-stdlib fallback behind the
same functions.  ``afunix.BACKEND`` says which one runs: "c" or "stdlib".
"""
from __future__ import annotations

import importlib
from typing import Any

from . import _backend
from ._version import __version__
from .activation import listen_fds, listen_fds_with_names, notify
from .addresses import AUTOBIND, ListeningSocket, abstract, connect, listen
from .capabilities import CAPABILITIES, MAX_PATH_BYTES, SCM_MAX_FD, supports
from .batch import MAX_MESSAGES, send_many
from .channel import Channel, FrameBatch, ProtocolError, channel_pair
from .frames import MessageKindError
from .fds import pass_credentials, peer_credentials, peer_pidfd, recv_fds, send_fds
from .message import Credentials, Message, TruncatedError, close_fds
from .pairs import socketpair, socketpairs
from .receive import RecvBatch, recv_many
from .shm import Loan

__all__ = [
    "AUTOBIND",
    "BACKEND",
    "CAPABILITIES",
    "Channel",
    "Credentials",
    "FrameBatch",
    "Loan",
    "MAX_MESSAGES",
    "Message",
    "MessageKindError",
    "ProtocolError",
    "RecvBatch",
    "TruncatedError",
    "close_fds",
    "pass_credentials",
    "peer_credentials",
    "peer_pidfd",
    "recv_fds",
    "send_fds",
    "recv_many",
    "send_many",
    "ListeningSocket",
    "MAX_PATH_BYTES",
    "SCM_MAX_FD",
    "__version__",
    "abstract",
    "channel_pair",
    "connect",
    "listen",
    "listen_fds",
    "listen_fds_with_names",
    "notify",
    "socketpair",
    "socketpairs",
    "supports",
]


def __getattr__(name: str) -> Any:
    # BACKEND is read from _backend on every access, so it always names the
    # backend that actually runs.
    if name == "BACKEND":
        return _backend.name
    if name == "aio":
        # Imported on first use: asyncio costs more to import than all of afunix
        # (a lazy submodule, not a way round a cycle).
        return importlib.import_module(".aio", __name__)
    raise AttributeError("module 'afunix' has no attribute %r" % name)
