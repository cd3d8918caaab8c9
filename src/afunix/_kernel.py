"""Kernel constants that an interpreter's socket and os modules may lack.

PyPy 3.9 (7.3) has no ``socket.MSG_NOSIGNAL``, ``MSG_CMSG_CLOEXEC``,
``SO_PEERCRED``, ``SO_PASSCRED`` or ``SCM_CREDENTIALS`` and no ``os.O_PATH``,
though its sockets pass any flag or option number straight to the kernel.
Without them a send to a closed peer raises SIGPIPE, received descriptors
are inheritable, and peer credentials cannot be asked for.  Each name here
is the interpreter's own value when it has one, else the value of the Linux
UAPI headers, else 0 (a flag that adds nothing) or None (an option that
is not there).  This module is the one owner of these numbers.

PyPy 3.9 also has no ``fcntl.F_ADD_SEALS``, ``F_GET_SEALS`` or ``F_SEAL_*``,
and CPython before 3.10 no ``mmap.MAP_POPULATE``: the shared-memory lane
(afunix.shm) seals and maps its memfd regions with these numbers.
"""
from __future__ import annotations

import fcntl
import mmap
import os
import platform
import socket
import sys
from types import ModuleType
from typing import Optional

_LINUX = sys.platform.startswith("linux")
# SO_PASSCRED, SO_PEERCRED and O_PATH have other numbers on these
# architectures (asm/socket.h, asm/fcntl.h of each); there only the
# interpreter's own values are used.
_GENERIC_ABI = _LINUX and not platform.machine().lower().startswith(
    ("alpha", "mips", "parisc", "hppa", "ppc", "powerpc", "sparc"))


def _value(module: ModuleType, name: str, linux: Optional[int]) -> Optional[int]:
    own = getattr(module, name, None)
    if own is not None:
        return int(own)
    return linux


# linux/socket.h: the same on every architecture.
#: Send flag: a closed peer is EPIPE, never SIGPIPE (0 where unknown).
MSG_NOSIGNAL: int = _value(socket, "MSG_NOSIGNAL", 0x4000 if _LINUX else None) or 0
#: Receive flag: descriptors arrive close-on-exec (0 where unknown).
MSG_CMSG_CLOEXEC: int = _value(socket, "MSG_CMSG_CLOEXEC", 0x40000000 if _LINUX else None) or 0
#: Control message type of struct ucred (None where unknown).
SCM_CREDENTIALS: Optional[int] = _value(socket, "SCM_CREDENTIALS", 2 if _LINUX else None)

#: Socket option: a pidfd of the connected peer (Linux >= 6.5; older socket
#: modules lack the name).  The generic number is used everywhere, as before:
#: where the kernel has no such option it answers ENOPROTOOPT.
SO_PEERPIDFD: int = _value(socket, "SO_PEERPIDFD", 77) or 77

# asm-generic/socket.h and asm-generic/fcntl.h.
#: Socket option: the connected peer's struct ucred (None where unknown).
SO_PEERCRED: Optional[int] = _value(socket, "SO_PEERCRED", 17 if _GENERIC_ABI else None)
#: Socket option: receive SCM_CREDENTIALS with every message (None where unknown).
SO_PASSCRED: Optional[int] = _value(socket, "SO_PASSCRED", 16 if _GENERIC_ABI else None)
#: open() flag: a descriptor that only names a file (0 where unknown).
O_PATH: int = _value(os, "O_PATH", 0o10000000 if _GENERIC_ABI else None) or 0

# linux/fcntl.h: F_LINUX_SPECIFIC_BASE (1024) + 9 and + 10, and the seal
# bits, the same on every architecture.
#: fcntl command: add seals to a memfd (None where unknown).
F_ADD_SEALS: Optional[int] = _value(fcntl, "F_ADD_SEALS", 1033 if _LINUX else None)
#: fcntl command: the seals of a memfd (None where unknown).
F_GET_SEALS: Optional[int] = _value(fcntl, "F_GET_SEALS", 1034 if _LINUX else None)
#: Seal: no more seals can be added.
F_SEAL_SEAL: int = _value(fcntl, "F_SEAL_SEAL", 0x0001) or 0x0001
#: Seal: the file cannot shrink (so a mapping of it never meets SIGBUS).
F_SEAL_SHRINK: int = _value(fcntl, "F_SEAL_SHRINK", 0x0002) or 0x0002
#: Seal: the file cannot grow.
F_SEAL_GROW: int = _value(fcntl, "F_SEAL_GROW", 0x0004) or 0x0004
#: Seal (Linux 5.1): no new write access (write(2), a new writable
#: mapping, a hole punched), while mappings made before stay writable.
F_SEAL_FUTURE_WRITE: int = _value(fcntl, "F_SEAL_FUTURE_WRITE", 0x0010) or 0x0010
#: os.memfd_create flags (linux/memfd.h): close-on-exec, and seals allowed.
MFD_CLOEXEC: int = _value(os, "MFD_CLOEXEC", 0x0001 if _LINUX else None) or 0
MFD_ALLOW_SEALING: int = _value(os, "MFD_ALLOW_SEALING", 0x0002 if _LINUX else None) or 0

# asm-generic/mman-common.h; other numbers on the architectures above.
#: mmap flag: fault every page of the mapping in at once (0 where unknown).
MAP_POPULATE: int = _value(mmap, "MAP_POPULATE", 0x8000 if _GENERIC_ABI else None) or 0
