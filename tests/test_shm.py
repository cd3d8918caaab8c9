"""Shared-memory regions, slots and loans (afunix.shm, afunix.slots), and the object helpers (afunix.objects).

Real memfds, peers in other processes that receive or send the region's
descriptor with nothing but socket.send_fds / socket.recv_fds, and the
hostile cases: a region without its seals, of another size, not a memfd, a
peer shrinking it, slots out of range or overlapping, second closes, views
that outlive their region.  The module does not depend on the backend; the
suite runs it on both all the same.
"""
from __future__ import annotations

import array
import ctypes
import errno
import fcntl
import gc
import hashlib
import mmap
import os
import pickle
import platform
import random
import socket
import subprocess
import sys
import textwrap
import types
from typing import List, Optional

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import afunix
from afunix import ProtocolError, _backend, _kernel, objects, shm
from conftest import region_mappings
from afunix.slots import Slot, SlotAllocator, SlotLedger

from conftest import open_fds, run_python

PYPY = platform.python_implementation() == "PyPy"
REASON = shm.unsupported_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason="shared-memory regions: %s" % REASON)

MiB = 1 << 20
T = 60.0



def memfd(size: int, seals: Optional[int], reserved: Optional[int] = None) -> int:
    """A memfd of `size` bytes, its first `reserved` bytes allocated (None: all of
    them), with `seals` added (None: made without sealing allowed)."""
    flags = os.MFD_CLOEXEC | (0 if seals is None else os.MFD_ALLOW_SEALING)
    fd = os.memfd_create("test", flags)
    os.ftruncate(fd, size)
    reserved = size if reserved is None else reserved
    if reserved:
        error = os.posix_fallocate(fd, 0, reserved)  # PyPy 3.9 returns the error number
        assert not error, os.strerror(error)
    if seals:
        fcntl.fcntl(fd, _kernel.F_ADD_SEALS, seals)  # type: ignore[arg-type]
    return fd


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError as exc:
        assert exc.errno == errno.EBADF
        return False
    return True


# ---- the region --------------------------------------------------------------


def test_a_created_region_is_sealed_sized_and_shared(fd_baseline: set) -> None:
    with shm.Region.create(3 * 4096 + 5) as region:
        fd = region.fileno()
        assert region.size == os.fstat(fd).st_size == 3 * 4096 + 5
        assert region.writable and not region.closed
        seals = fcntl.fcntl(fd, _kernel.F_GET_SEALS)  # type: ignore[arg-type]
        assert seals & shm.REQUIRED_SEALS == shm.REQUIRED_SEALS
        # the file can neither shrink nor grow, and no seal can be added or taken away
        for size in (0, 4096, 4 * 4096):
            with pytest.raises(PermissionError):
                os.ftruncate(fd, size)
        with pytest.raises(PermissionError):
            fcntl.fcntl(fd, _kernel.F_ADD_SEALS, 0x0008)  # type: ignore[arg-type]  # F_SEAL_WRITE
        assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        # what is written through a view is in the file
        region.view(4096, 5)[:] = b"hello"
        assert os.pread(fd, 5, 4096) == b"hello"
        assert region_mappings() >= 1
    assert region.closed
    assert region_mappings() == 0


def test_no_hole_can_be_punched_in_a_created_region(fd_baseline: set) -> None:
    # The receiver checks that the whole region is allocated, so that reading
    # it allocates nothing on its account.  Before F_SEAL_FUTURE_WRITE the
    # sender could punch holes afterwards (FALLOC_FL_PUNCH_HOLE passes the
    # shrink, grow and seal seals), and every read of one allocated a page
    # again, charged to the receiver.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
    size = 1 * MiB
    with shm.Region.create(size) as region:
        fd = region.fileno()
        seals = fcntl.fcntl(fd, _kernel.F_GET_SEALS)  # type: ignore[arg-type]
        assert seals & _kernel.F_SEAL_FUTURE_WRITE
        ctypes.set_errno(0)
        assert libc.fallocate(fd, 0x01 | 0x02, 0, size) == -1  # KEEP_SIZE | PUNCH_HOLE
        assert ctypes.get_errno() == errno.EPERM
        assert os.fstat(fd).st_blocks * 512 >= size
        # no new way to write it either; the region's own mapping still writes
        with pytest.raises(PermissionError):
            os.pwrite(fd, b"x", 0)
        with pytest.raises(PermissionError):
            mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        region.view(0, 5)[:] = b"still"
        assert os.pread(fd, 5, 0) == b"still"
    gc.collect()  # PyPy's mmap keeps the descriptor it dup'd for the refused mapping till then


def test_a_kernel_without_the_future_write_seal_makes_no_region(
        monkeypatch: pytest.MonkeyPatch, fd_baseline: set) -> None:
    # Before Linux 5.1, F_ADD_SEALS with F_SEAL_FUTURE_WRITE is EINVAL: no
    # region (a receiver would refuse it), said as where memfd is missing.
    def old_kernel(fd: int, cmd: int, arg: int = 0) -> int:
        if cmd == _kernel.F_ADD_SEALS and arg & _kernel.F_SEAL_FUTURE_WRITE:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return fcntl.fcntl(fd, cmd, arg)

    maps = region_mappings()
    monkeypatch.setattr(shm, "fcntl", types.SimpleNamespace(fcntl=old_kernel))
    with pytest.raises(OSError) as info:
        shm.Region.create(4096)
    assert info.value.errno == errno.ENOSYS and "5.1" in str(info.value)
    assert region_mappings() == maps


def test_bad_arguments_are_refused_before_any_system_call(fd_baseline: set) -> None:
    with pytest.raises(TypeError):
        shm.Region.create("4096")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        shm.Region.create(0)
    with pytest.raises(ValueError):
        shm.Region.create(shm.MAX_REGION_SIZE + 1)
    with shm.Region.create(100) as region:
        for offset, length in ((-1, 1), (0, 101), (100, 1), (50, 51)):
            with pytest.raises(ValueError):
                region.view(offset, length)
        with pytest.raises(TypeError):
            region.view(0.0, 1)  # type: ignore[arg-type]
        assert region.view(100, 0).nbytes == 0
    with pytest.raises(ValueError):
        SlotAllocator(100, alignment=3)
    with pytest.raises(ValueError):
        SlotAllocator(0)


def test_a_region_larger_than_the_machine_is_refused_before_anything_is_allocated(
        monkeypatch: pytest.MonkeyPatch, fd_baseline: set) -> None:
    # A region's memory is allocated whole when it is made, and a memfd is
    # not counted against overcommit: the kernel's answer to a region it
    # cannot hold is the OOM killer.  Made to believe the machine has
    # 1 MiB, nothing large is allocated here.
    monkeypatch.setattr(shm, "_physical_memory", lambda: 1 << 20, raising=False)

    def no_memfd(*args: object) -> int:
        raise AssertionError("a memfd was made for a region the machine cannot hold")

    monkeypatch.setattr(os, "memfd_create", no_memfd)
    with pytest.raises(OSError) as info:
        shm.Region.create(2 << 20)
    assert info.value.errno == errno.ENOMEM
    a, b = socket.socketpair()
    with a, b:
        with pytest.raises(OSError) as info:
            afunix.Channel(a, shm_size=(1 << 20) + 1)
        assert info.value.errno == errno.ENOMEM
        # over the bound a peer accepts: ValueError, before any system call
        with pytest.raises(ValueError):
            afunix.Channel(a, shm_size=shm.MAX_REGION_SIZE + 1)
    monkeypatch.undo()
    with shm.Region.create(1 << 20) as region:
        assert region.size == 1 << 20


def _child(code: str, backend: str, sock: socket.socket) -> "tuple[int, str, str]":
    """Run `code` in another interpreter with `sock` as descriptor SOCK (a variable)."""
    prelude = "import os, socket, sys\nSOCK = socket.socket(fileno=%d)\n" % sock.fileno()
    done = run_python(prelude + textwrap.dedent(code), backend, pass_fds=(sock.fileno(),))
    return done.returncode, done.stdout, done.stderr


def _spawn(code: str, backend: str, sock: socket.socket) -> "subprocess.Popen[bytes]":
    """Start `code` in another interpreter, with `sock` as SOCK, running beside this test."""
    prelude = "import os, socket, sys\nSOCK = socket.socket(fileno=%d)\n" % sock.fileno()
    return subprocess.Popen([sys.executable, "-c", prelude + textwrap.dedent(code)],
                            pass_fds=(sock.fileno(),), stderr=subprocess.PIPE,
                            env=dict(os.environ, AFUNIX_BACKEND=backend))


def test_a_peer_process_adopts_the_region_and_reads_it_in_place(backend: str, fd_baseline: set) -> None:
    a, b = socket.socketpair()
    with a, b, shm.RegionWriter(4 * MiB) as writer:
        payload = bytes(random.Random(1).getrandbits(8) for _ in range(1000)) * 1000
        slot = writer.try_copy(payload)
        assert slot is not None
        writer.sending(*slot)
        socket.send_fds(a, [b"%d %d %d" % (writer.size, slot.offset, slot.length)], [writer.fileno()])
        code, out, err = _child("""
            import hashlib
            from afunix import shm
            data, fds, _, _ = socket.recv_fds(SOCK, 100, 1)
            size, offset, length = map(int, data.split())
            with shm.RegionReader(fds[0], size) as reader:
                view = reader.claim(offset, length)
                assert view.readonly
                try:
                    view[0] = 0
                except TypeError:
                    pass
                else:
                    raise AssertionError("the peer's view is writable")
                digest = hashlib.sha256(view).hexdigest()
                reader.release(offset, length)
            SOCK.sendall(("%s %d %d" % (digest, offset, length)).encode())
        """, backend, b)
        assert code == 0, err
        a.settimeout(T)
        digest, offset, length = a.recv(200).split()
        assert digest.decode() == hashlib.sha256(payload).hexdigest()
        writer.give_back(int(offset), int(length))
        assert writer.allocator.slots_in_use == 0


HOSTILE_REGIONS = {
    # name: (seals, size made, size announced)
    "unsealed": (None, 8192, 8192),
    "sealing allowed, no seal": (0, 8192, 8192),
    "no shrink seal": (_kernel.F_SEAL_GROW | _kernel.F_SEAL_SEAL, 8192, 8192),
    "no grow seal": (_kernel.F_SEAL_SHRINK | _kernel.F_SEAL_SEAL, 8192, 8192),
    "no seal seal": (_kernel.F_SEAL_SHRINK | _kernel.F_SEAL_GROW, 8192, 8192),
    "no future-write seal": (_kernel.F_SEAL_SHRINK | _kernel.F_SEAL_GROW | _kernel.F_SEAL_SEAL,
                             8192, 8192),
    "smaller than announced": (shm.REQUIRED_SEALS, 4096, 8192),
    "larger than announced": (shm.REQUIRED_SEALS, 3 * 4096, 8192),
    "empty": (shm.REQUIRED_SEALS, 0, 8192),
}


@pytest.mark.parametrize("reserved", [0, 4096, 64 * MiB - 4096])
def test_a_region_whose_memory_is_not_reserved_is_a_protocol_error(reserved: int, fd_baseline: set) -> None:
    # A sealed but sparse memfd costs its sender nothing; mapping it with
    # MAP_POPULATE would make the receiver allocate all of it (up to
    # MAX_REGION_SIZE) before any check could stop it.
    size = 64 * MiB
    fd = memfd(size, shm.REQUIRED_SEALS, reserved=reserved)
    maps = region_mappings()
    with pytest.raises(ProtocolError) as info:
        shm.Region.adopt(fd, size)
    assert "reserved" in str(info.value)
    assert not is_open(fd) and region_mappings() == maps
    # the same region with every byte allocated is adopted
    fd = memfd(size, shm.REQUIRED_SEALS)
    shm.Region.adopt(fd, size).close()


@pytest.mark.parametrize("kind", sorted(HOSTILE_REGIONS))
def test_a_region_without_its_seals_or_size_is_a_protocol_error(kind: str, fd_baseline: set) -> None:
    seals, made, announced = HOSTILE_REGIONS[kind]
    fd = memfd(made, seals)
    maps = region_mappings()
    with pytest.raises(ProtocolError) as info:
        shm.Region.adopt(fd, announced)
    assert info.value.errno == errno.EPROTO
    assert not is_open(fd)  # taken over and closed: fd_baseline checks nothing else is left
    assert region_mappings() == maps


@pytest.mark.parametrize("kind", ["pipe", "socket", "regular file", "directory"])
def test_a_descriptor_that_is_no_memfd_is_a_protocol_error(kind: str, tmp_path: object, fd_baseline: set) -> None:
    others: List[int] = []
    if kind == "pipe":
        fd, other = os.pipe()
        others.append(other)
    elif kind == "socket":
        s1, s2 = socket.socketpair()
        fd, other = s1.detach(), s2.detach()
        others.append(other)
    elif kind == "regular file":
        path = os.path.join(str(tmp_path), "f")
        with open(path, "wb") as f:
            f.write(b"x" * 8192)
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    else:
        fd = os.open("/", os.O_RDONLY | os.O_CLOEXEC)
    with pytest.raises(ProtocolError):
        shm.Region.adopt(fd, 8192)
    assert not is_open(fd)
    for other in others:
        os.close(other)


def test_adopt_closes_the_descriptor_on_bad_arguments_too(fd_baseline: set) -> None:
    for size in (0, -1, shm.MAX_REGION_SIZE + 1):
        fd = memfd(4096, shm.REQUIRED_SEALS)
        with pytest.raises(ValueError):
            shm.Region.adopt(fd, size)
        assert not is_open(fd)
    fd = memfd(4096, shm.REQUIRED_SEALS)
    with pytest.raises(TypeError):
        shm.Region.adopt(fd, "4096")  # type: ignore[arg-type]
    assert not is_open(fd)


def test_a_reader_refuses_a_bad_max_slots_before_it_looks_at_the_descriptor(fd_baseline: set) -> None:
    # An argument error comes before any system call: the pipe is never
    # asked for seals (which would make it a ProtocolError), only closed.
    for max_slots, error in ((0, ValueError), (1 << 30, ValueError), ("8", TypeError)):
        r, w = os.pipe()
        with pytest.raises(error):
            shm.RegionReader(r, 4096, max_slots=max_slots)  # type: ignore[arg-type]
        assert not is_open(r)
        os.close(w)


def test_a_hostile_peer_process_sends_bad_regions(backend: str, fd_baseline: set) -> None:
    # the peer makes each region itself and announces a size: every one is refused
    a, b = socket.socketpair()
    with a, b:
        a.settimeout(T)
        code, out, err = _child("""
            import fcntl
            from afunix import _kernel, shm
            def send(fd, size):
                socket.send_fds(SOCK, [str(size).encode().ljust(32)], [fd])
                os.close(fd)
            fd = os.memfd_create("x", os.MFD_CLOEXEC); os.ftruncate(fd, 8192); send(fd, 8192)
            fd = os.memfd_create("x", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING); os.ftruncate(fd, 8192)
            fcntl.fcntl(fd, _kernel.F_ADD_SEALS, shm.REQUIRED_SEALS); send(fd, 16384)
            r, w = os.pipe(); send(r, 8192); os.close(w)
        """, backend, b)
        assert code == 0, err
        for _ in range(3):
            data, fds, _, _ = socket.recv_fds(a, 32, 1)
            assert len(fds) == 1
            with pytest.raises(ProtocolError):
                shm.RegionReader(fds[0], int(data))
            assert not is_open(fds[0])
        assert region_mappings() == 0


def test_the_peer_cannot_shrink_the_region_under_a_reader(backend: str, fd_baseline: set) -> None:
    # Were the shrink to succeed, reading the lost pages would kill this
    # process with SIGBUS; the seals make it EPERM in the peer, and every
    # page reads.
    a, b = socket.socketpair()
    with a, b:
        a.settimeout(T)
        child = _spawn("""
            from afunix import shm
            with shm.Region.create(64 * 4096) as region:
                region.view(0, region.size)[:] = b"\\x5a" * region.size
                socket.send_fds(SOCK, [b"%d" % region.size], [region.fileno()])
                assert SOCK.recv(2) == b"go"
                for size in (0, 4096):
                    try:
                        os.ftruncate(region.fileno(), size)
                    except PermissionError:
                        pass
                    else:
                        raise AssertionError("the region shrank")
                try:  # PyPy 3.9 returns the error number instead of raising it
                    error = os.posix_fallocate(region.fileno(), 0, 2 * region.size)
                except PermissionError:
                    error = 1
                assert error == 1 and os.fstat(region.fileno()).st_size == region.size, error
                SOCK.sendall(b"tried")
                assert SOCK.recv(4) == b"done"
        """, backend, b)
        try:
            data, fds, _, _ = socket.recv_fds(a, 32, 1)
            with shm.Region.adopt(fds[0], int(data)) as region:
                a.sendall(b"go")
                assert a.recv(5) == b"tried"
                whole = region.view(0, region.size)
                assert whole.tobytes() == b"\x5a" * region.size  # every page, after the attempts
                whole.release()
                a.sendall(b"done")
        finally:
            _, err = child.communicate(timeout=T)
        assert child.returncode == 0, err.decode()


@pytest.mark.parametrize("how", ["raised", "returned"])
def test_a_region_whose_memory_cannot_be_reserved_is_an_oserror(how: str, monkeypatch: pytest.MonkeyPatch,
                                                                 fd_baseline: set) -> None:
    # ENOSPC from posix_fallocate, raised (CPython) or returned (PyPy 3.9):
    # an OSError from create, the memfd closed, nothing mapped.
    def fallocate(fd: int, offset: int, length: int) -> int:
        if how == "raised":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return errno.ENOSPC
    monkeypatch.setattr(os, "posix_fallocate", fallocate)
    with pytest.raises(OSError) as info:
        shm.RegionWriter(MiB)
    assert info.value.errno == errno.ENOSPC
    assert region_mappings() == 0


RUN_OUT_OF_DESCRIPTORS = """
import errno, os, platform, resource
from afunix import shm
# PyPy 3.9's os.memfd_create raises with a stale errno (0, ENOTTY) instead of EMFILE
PYPY = platform.python_implementation() == "PyPy"
def count():
    return len(os.listdir("/proc/self/fd"))
made = 0
for spare in range(4):
    before = count()
    lowest = os.dup(0)  # the lowest free descriptor number: the next memfd gets it
    os.close(lowest)
    # no descriptor, one (the memfd: CPython before 3.13 also dups it for mmap), two, three
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowest + spare, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    try:
        shm.Region.create(1 << 16).close()
        made += 1
    except OSError as exc:
        assert exc.errno == errno.EMFILE or PYPY, exc
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    assert count() == before, (spare, before, count())
print(made)
"""


def test_running_out_of_descriptors_in_create_leaves_none_open(backend: str) -> None:
    done = run_python(RUN_OUT_OF_DESCRIPTORS, backend)
    assert done.returncode == 0, done.stderr
    assert 2 <= int(done.stdout) <= 3  # no room for the memfd: EMFILE; room for two: made


ADOPT_AT_THE_DESCRIPTOR_LIMIT = """
import errno, os, resource
from afunix import ProtocolError, shm
writer = shm.RegionWriter(1 << 16)
fd = os.dup(writer.fileno())
lowest = os.dup(0)  # the lowest free descriptor number
os.close(lowest)
resource.setrlimit(resource.RLIMIT_NOFILE, (lowest, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
try:
    shm.Region.adopt(fd, writer.size).close()
    print("adopted")  # this mmap needs no descriptor of its own (CPython 3.13: trackfd=False)
except ProtocolError as exc:
    print("protocol error", exc)
except OSError as exc:
    print("oserror", errno.errorcode.get(exc.errno or 0))
"""


def test_running_out_of_descriptors_in_adopt_is_not_the_peers_fault(backend: str) -> None:
    # mmap duplicates the descriptor (CPython before 3.13, PyPy): EMFILE is
    # this process's limit, not a region the peer got wrong.
    done = run_python(ADOPT_AT_THE_DESCRIPTOR_LIMIT, backend)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() in ("adopted", "oserror EMFILE"), done.stdout


def test_close_twice_and_use_after_close(fd_baseline: set) -> None:
    region = shm.Region.create(4096)
    fd = region.fileno()
    region.close()
    region.close()
    assert region.closed and not is_open(fd)
    with pytest.raises(ValueError):
        region.fileno()
    with pytest.raises(ValueError):
        region.view(0, 1)
    writer = shm.RegionWriter(4096)
    writer.close()
    writer.close()
    with pytest.raises(ValueError):
        writer.try_loan(10)
    with pytest.raises(ValueError):
        writer.try_copy(b"x")
    reader = shm.RegionReader(memfd(4096, shm.REQUIRED_SEALS), 4096)
    reader.close()
    reader.close()
    with pytest.raises(ValueError):
        reader.claim(0, 10)


def test_a_region_dropped_without_close_gives_its_descriptor_back(fd_baseline: set) -> None:
    region = shm.Region.create(4096)
    fd = region.fileno()
    del region
    gc.collect()
    assert not is_open(fd)


VIEWS_OUTLIVE = """
import gc, platform
from afunix import shm
def maps():
    with open("/proc/self/maps") as f:
        return sum(1 for line in f if "memfd:" + shm.REGION_NAME in line)
writer = shm.RegionWriter(1 << 20)
loan = writer.try_loan(4096)
loan.view[:5] = b"abcde"
kept = writer.region.view(0, 4096)            # a view the region made
sliced = kept[1:3]                            # and one derived from it
fd = writer.fileno()
writer.close()
writer.close()
try:
    os.fstat(fd)
    raise AssertionError("descriptor still open")
except OSError:
    pass
gc.collect()
if platform.python_implementation() == "PyPy":
    # PyPy's mmap unmaps at close and shows its views as empty
    assert len(kept) == 0 and bytes(kept) == b"" and bytes(sliced) == b"", bytes(kept[:5])
    assert maps() == 0
    print("empty")
else:
    # CPython: mmap.close refuses while views exist; the mapping stays theirs
    assert bytes(kept[:5]) == b"abcde" and bytes(sliced) == b"bc"
    kept[0] = ord("z")                        # still the region's memory, still writable
    assert bytes(loan.view[:1]) == b"z"
    assert maps() == 1
    del kept, sliced, loan
    gc.collect()
    assert maps() == 0, maps()                # unmapped when the last view went
    print("kept")
"""


def test_views_that_outlive_close_never_crash(backend: str) -> None:
    # in a process of its own: a view of unmapped memory would be a SIGSEGV
    done = run_python("import os\n" + VIEWS_OUTLIVE, backend)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ("empty" if PYPY else "kept")


def test_a_reader_views_outlive_close(fd_baseline: set) -> None:
    with shm.RegionWriter(MiB) as writer:
        slot = writer.try_copy(b"payload")
        assert slot is not None
        reader = shm.RegionReader(os.dup(writer.fileno()), writer.size)
        view = reader.claim(*slot)
        kept = view[:]  # a slice the reader cannot release
        reader.close()
        with pytest.raises(ValueError):
            view[0]  # the claimed view itself is released by close
        assert bytes(kept) == (b"" if PYPY else b"payload")  # see Region: CPython keeps, PyPy empties
        del kept
        gc.collect()


# ---- slots -------------------------------------------------------------------


def test_slots_are_aligned_first_fit_and_coalesce() -> None:
    alloc = SlotAllocator(1000, alignment=64)
    a = alloc.try_allocate(100)
    b = alloc.try_allocate(1)
    c = alloc.try_allocate(64)
    assert (a, b, c) == (Slot(0, 100), Slot(128, 1), Slot(192, 64))
    assert alloc.bytes_in_use == 128 + 64 + 64 and alloc.slots_in_use == 3
    # the last range of the region is shorter than a rounded length: the slot takes the rest
    d = alloc.try_allocate(1000 - 256)
    assert d == Slot(256, 744) and alloc.largest_free == 0
    assert alloc.bytes_in_use == 1000  # the last slot reserves only what is left
    assert alloc.try_allocate(1) is None  # full: no wait, None
    for slot in (a, b, c, d):
        alloc.sending(*slot)
    alloc.free(*b)
    assert alloc.try_allocate(65) is None and alloc.try_allocate(64) == Slot(128, 64)
    alloc.withdraw(128, 64)  # never sent: given up
    for slot in (c, a, d):  # out of order: the free ranges join up again
        alloc.free(*slot)
    assert alloc.slots_in_use == 0 and alloc.bytes_in_use == 0
    assert alloc.try_allocate(1000) == Slot(0, 1000)
    with pytest.raises(ValueError):
        alloc.try_allocate(1001)  # never fits: not None
    with pytest.raises(ValueError):
        alloc.try_allocate(0)


def test_a_bad_return_is_a_protocol_error_and_changes_nothing() -> None:
    alloc = SlotAllocator(4096, alignment=64)
    a = alloc.try_allocate(100)
    b = alloc.try_allocate(200)
    assert a is not None and b is not None
    alloc.sending(*a)
    alloc.sending(*b)
    bad = [
        (4000, 200),    # out of range
        (-64, 100),     # out of range
        (0, 0),         # empty
        (0, 99),        # not the slot's length
        (64, 36),       # inside a slot
        (0, 300),       # overlapping two
        (1024, 64),     # free space
        (a.offset + 1, 100),
    ]
    for offset, length in bad:
        with pytest.raises(ProtocolError):
            alloc.free(offset, length)
        assert alloc.slots_in_use == 2 and alloc.bytes_in_use == 128 + 256
    with pytest.raises(TypeError):
        alloc.free(0.0, 100)  # type: ignore[arg-type]
    alloc.free(*a)
    with pytest.raises(ProtocolError):
        alloc.free(*a)  # twice
    alloc.free(*b)
    assert alloc.try_allocate(4096) == Slot(0, 4096)


def test_a_return_of_a_slot_lent_and_never_sent_is_a_protocol_error() -> None:
    # A slot is the peer's to return only once the frame naming it is made
    # (`sending`); before, the peer has never heard of it (PROTOCOL.md).
    alloc = SlotAllocator(4096, alignment=64)
    lent = alloc.try_allocate(100)
    assert lent is not None
    with pytest.raises(ProtocolError, match="never sent"):
        alloc.free(*lent)
    assert alloc.slots_in_use == 1 and alloc.slots_lent == 1  # nothing changed
    alloc.sending(*lent)
    alloc.recall(*lent)  # its frame was not written after all: lent again
    with pytest.raises(ProtocolError, match="never sent"):
        alloc.free(*lent)
    with pytest.raises(ValueError):
        alloc.recall(*lent)  # not sent
    alloc.withdraw(*lent)
    with pytest.raises(ValueError):
        alloc.withdraw(*lent)  # not lent any more
    sent = alloc.try_allocate(100)
    assert sent == lent
    alloc.sending(*sent)
    with pytest.raises(ValueError):
        alloc.withdraw(*sent)  # the peer's now
    alloc.free(*sent)
    with pytest.raises(ProtocolError, match="returned before"):
        alloc.recall(*sent)  # returned already: only a peer that guessed it could
    assert alloc.slots_in_use == 0 and alloc.try_allocate(4096) == Slot(0, 4096)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 3000), st.integers(0, 1 << 30)), max_size=120),
       st.sampled_from([1, 8, 64, 4096]))
def test_slot_allocator_property(steps: "list[tuple[bool, int, int]]", alignment: int) -> None:
    size = 10007
    alloc = SlotAllocator(size, alignment=alignment)
    ledger = SlotLedger(size)  # the receiver's view of the same slots
    used: List[Slot] = []
    for take, length, pick in steps:
        if take or not used:
            slot = alloc.try_allocate(length)
            if slot is None:
                assert alloc.largest_free < length
                continue
            assert slot.offset % alignment == 0 and 0 <= slot.offset <= size - length
            assert slot.length == length
            ledger.claim(*slot)  # would raise if it overlapped a slot in use
            alloc.sending(*slot)
            used.append(slot)
        else:
            slot = used.pop(pick % len(used))
            ledger.release(*slot)
            alloc.free(*slot)
        assert alloc.slots_in_use == len(used) == len(ledger)
    for slot in used:
        alloc.free(*slot)
    assert alloc.try_allocate(size) == Slot(0, size)


def test_the_receiver_refuses_slots_out_of_range_or_overlapping() -> None:
    ledger = SlotLedger(1000, max_slots=4)
    assert ledger.claim(100, 100) == Slot(100, 100)
    for offset, length in [(0, 0), (-1, 10), (995, 10), (1000, 1), (1 << 64, 1),
                           (100, 100), (150, 10), (50, 51), (199, 5), (0, 1000)]:
        with pytest.raises(ProtocolError):
            ledger.claim(offset, length)
    assert ledger.held() == [Slot(100, 100)]
    assert ledger.claim(0, 100) and ledger.claim(200, 800)  # touching is not overlapping
    ledger.release(0, 100)
    assert ledger.claim(50, 50) and ledger.claim(0, 50)  # the freed range, in two
    assert len(ledger) == 4
    one = SlotLedger(1000, max_slots=1)
    one.claim(0, 1)
    with pytest.raises(ProtocolError):
        one.claim(10, 1)
    with pytest.raises(ValueError):
        ledger.release(1, 1)


# ---- loans -------------------------------------------------------------------


def test_a_loan_is_filled_in_place_and_released_at_commit(fd_baseline: set) -> None:
    with shm.RegionWriter(MiB) as writer:
        loan = writer.try_loan(1000)
        assert loan is not None and loan.open and not loan.view.readonly
        loan.view[:] = b"\x07" * 1000
        view = loan.view
        slot = loan.commit()
        assert slot == loan.slot and not loan.open
        with pytest.raises(ValueError):
            loan.view
        with pytest.raises(ValueError):
            view[0]  # the view handed out is released, as memoryview.release does
        with pytest.raises(ValueError):
            loan.commit()
        with pytest.raises(ValueError):
            loan.abandon()
        assert writer.allocator.slots_in_use == 1  # in flight until the peer returns it
        assert bytes(writer.region.view(slot.offset, slot.length)) == b"\x07" * 1000
        writer.give_back(*slot)

        with writer.try_loan(10) as loan2:  # not committed: abandoned by the with block
            loan2.view[:2] = b"ab"
        assert not loan2.open and writer.allocator.slots_in_use == 0
        with pytest.raises(RuntimeError):
            with writer.try_loan(10):
                raise RuntimeError
        assert writer.allocator.slots_in_use == 0
        big = writer.try_loan(MiB)
        assert big is not None and writer.try_loan(1) is None  # no room now: None, no wait
        big.abandon()
        with pytest.raises(ValueError):
            writer.try_loan(MiB + 1)


def test_a_loan_outliving_its_writer_is_given_up_quietly(fd_baseline: set) -> None:
    # The writer closes (the channel ends) while a loan is being filled:
    # leaving the loan's block must not report the peer broken, nor hide
    # the exception the block raised.
    writer = shm.RegionWriter(MiB)
    with pytest.raises(RuntimeError):
        with writer.try_loan(100) as loan:
            loan.view[:3] = b"abc"
            writer.close()
            raise RuntimeError("the block's own error")
    assert not loan.open
    writer = shm.RegionWriter(MiB)
    with writer.try_loan(100) as loan:
        writer.close()
    assert not loan.open
    writer = shm.RegionWriter(MiB)
    loan = writer.try_loan(100)
    assert loan is not None
    writer.close()
    loan.abandon()
    assert not loan.open
    with pytest.raises(ValueError):
        loan.abandon()


@pytest.mark.skipif(PYPY, reason="PyPy's memoryview does not count the buffers exported from it")
def test_a_loan_with_a_buffer_exported_stays_open() -> None:
    with shm.RegionWriter(MiB) as writer:
        loan = writer.try_loan(100)
        assert loan is not None
        held = pickle.PickleBuffer(loan.view)
        with pytest.raises(BufferError):
            loan.commit()
        assert loan.open
        del held
        loan.commit()


def test_try_copy_takes_any_contiguous_buffer(fd_baseline: set) -> None:
    with shm.RegionWriter(MiB) as writer:
        ints = array.array("i", range(1000))
        grid = memoryview(bytearray(range(256)) * 4).cast("B", (32, 32))
        for data, expected in ((ints, ints.tobytes()), (grid, grid.tobytes()),
                               (bytearray(b"ba"), b"ba"), (memoryview(b"xyz")[1:], b"yz")):
            slot = writer.try_copy(data)
            assert slot is not None and slot.length == len(expected)
            assert bytes(writer.region.view(*slot)) == expected
            writer.withdraw(*slot)
        with pytest.raises(BufferError):
            writer.try_copy(memoryview(b"abcdef")[::2])  # strided: refused, no slot taken
        with pytest.raises(TypeError):
            writer.try_copy("text")
        with pytest.raises(ValueError):
            writer.try_copy(b"")
        with pytest.raises(ValueError):
            writer.try_copy(bytes(MiB + 1))  # never fits
        assert writer.allocator.slots_in_use == 0


def test_a_reader_releases_a_slot_whose_view_the_caller_released(fd_baseline: set) -> None:
    with shm.RegionWriter(MiB) as writer:
        reader = shm.RegionReader(os.dup(writer.fileno()), writer.size)
        assert not reader.region.writable
        slot = writer.try_copy(b"abc")
        assert slot is not None
        reader.claim(*slot).release()
        assert reader.release(*slot) == slot
        with pytest.raises(ValueError):
            reader.release(*slot)  # not held any more
        reader.close()


@pytest.mark.skipif(PYPY, reason="PyPy's memoryview does not count the buffers exported from it")
def test_a_slot_whose_view_is_exported_stays_held() -> None:
    with shm.RegionWriter(MiB) as writer:
        reader = shm.RegionReader(os.dup(writer.fileno()), writer.size)
        slot = writer.try_copy(b"abc")
        assert slot is not None
        held = pickle.PickleBuffer(reader.claim(*slot))
        with pytest.raises(BufferError):
            reader.release(*slot)
        assert reader.ledger.held() == [slot]  # the sender cannot get it back yet
        del held
        assert reader.release(*slot) == slot
        reader.close()


def test_ten_thousand_cycles_leave_descriptors_and_mappings_flat(fd_baseline: set) -> None:
    rng = random.Random(7)
    with shm.RegionWriter(4 * MiB) as writer:
        reader = shm.RegionReader(os.dup(writer.fileno()), writer.size)
        fds, maps = open_fds(), region_mappings()
        for i in range(10000):
            n = rng.randrange(1, 256 << 10)
            if i % 2:
                slot = writer.try_copy(b"\x01" * n)
                assert slot is not None
                writer.sending(*slot)
            else:
                loan = writer.try_loan(n)
                assert loan is not None
                loan.view[:1] = b"\x01"
                slot = loan.commit()
            assert slot is not None
            view = reader.claim(*slot)
            assert view[0] == 1
            writer.give_back(*reader.release(*slot))
        assert open_fds() == fds and region_mappings() == maps
        assert writer.allocator.slots_in_use == 0 and len(reader.ledger) == 0
        reader.close()
    assert region_mappings() == 0


def test_region_create_and_close_cycles_leave_nothing(fd_baseline: set) -> None:
    for _ in range(500):
        with shm.RegionWriter(64 << 10) as writer:
            shm.RegionReader(os.dup(writer.fileno()), writer.size).close()
    gc.collect()
    assert region_mappings() == 0


# ---- large copies into a region --------------------------------------------------


def test_copy_streaming_copies_every_byte_at_any_alignment() -> None:
    data = hashlib.shake_256(b"streaming").digest(4096)
    target = bytearray(4096 + 64)
    for length in [0, 1, 15, 16, 63, 64, 65, 79, 200, 4000]:
        for dst in [0, 1, 7, 15, 16, 33]:
            for src in [0, 3, 16]:
                target[:] = bytes(len(target))
                _backend.impl.copy_streaming(memoryview(target)[dst:dst + length],
                                             memoryview(data)[src:src + length])
                assert target[dst:dst + length] == data[src:src + length]
                assert not any(target[:dst]) and not any(target[dst + length:])


def test_copy_streaming_overlapping_buffers_copy_as_memmove() -> None:
    for shift in [-17, -1, 1, 64, 100]:
        buf = bytearray(hashlib.shake_256(b"overlap").digest(1000))
        expected = bytearray(buf)
        expected[300 + shift:800 + shift] = buf[300:800]
        view = memoryview(buf)
        _backend.impl.copy_streaming(view[300 + shift:800 + shift], view[300:800])
        assert buf == expected


def test_copy_streaming_refuses_buffers_of_different_lengths() -> None:
    target = bytearray(10)
    with pytest.raises(ValueError):
        _backend.impl.copy_streaming(memoryview(target), memoryview(b"x" * 11))
    assert target == bytearray(10)


def test_a_copy_over_the_streaming_size_lands_whole(fd_baseline: set) -> None:
    size = shm.STREAMING_COPY_MIN + 4099
    data = hashlib.shake_256(b"large").digest(size)
    with shm.RegionWriter(2 * size) as writer:
        reader = shm.RegionReader(os.dup(writer.fileno()), writer.size)
        try:
            first = writer.try_copy(b"x" * 5)  # the next slot starts past it
            slot = writer.try_copy(data)
            assert first is not None and slot is not None
            with reader.claim(slot.offset, slot.length) as view:
                assert view == data
            reader.release(slot.offset, slot.length)
        finally:
            reader.close()


# ---- Python objects ----------------------------------------------------------


def _round_trip(obj: object, writer: Optional[shm.RegionWriter], reader: Optional[shm.RegionReader],
                threshold: int = 1024) -> "tuple[object, List[Optional[Slot]]]":
    with objects.pickle_object(obj, threshold=threshold) as pickled:
        placed = objects.place_parts(pickled, writer, threshold=threshold)
        for slot in placed:
            if slot is not None:
                assert writer is not None
                writer.sending(*slot)
        payload = b"".join(bytes(part) for part in objects.encode_object(pickled, placed))
    envelope = objects.parse_envelope(payload)
    parts = []
    for part in envelope.parts:
        if isinstance(part, Slot):
            assert reader is not None
            parts.append(bytes(reader.claim(*part)))  # a copy: the slot goes back at once
            assert writer is not None
            writer.give_back(*reader.release(*part))
        else:
            parts.append(part)
    return objects.load_object(parts[0], parts[1:]), placed


class Blob:
    """A protocol-5 type with one buffer, as numpy arrays are."""

    def __init__(self, data: bytearray) -> None:
        self.data = data

    def __reduce_ex__(self, protocol: object) -> object:
        return Blob, (pickle.PickleBuffer(self.data),)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Blob) and bytes(self.data) == bytes(other.data)


def test_objects_round_trip_with_large_buffers_in_slots(fd_baseline: set) -> None:
    with shm.RegionWriter(4 * MiB) as writer:
        reader = shm.RegionReader(os.dup(writer.fileno()), writer.size)
        cases = [
            b"x" * 5000,                                   # large bytes given itself
            bytearray(b"y" * 3000),
            b"small",
            {"blob": Blob(bytearray(b"z" * 4000)), "tiny": Blob(bytearray(b"t")), "n": [1, 2.5]},
            [b"q" * 100000, "text"],                      # large bytes inside: in the stream
        ]
        for obj in cases:
            out, placed = _round_trip(obj, writer, reader)
            assert out == obj and type(out) is type(obj)
        assert _round_trip(b"x" * 5000, writer, reader)[1][1] is not None   # out of band, in a slot
        assert _round_trip(b"small", writer, reader)[1] == [None]
        blob_parts = _round_trip({"b": Blob(bytearray(5000)), "s": Blob(bytearray(10))}, writer, reader)[1]
        assert len(blob_parts) == 2 and blob_parts[1] is not None          # only the large one
        assert _round_trip([b"q" * 100000], writer, reader)[1][0] is not None  # the stream in a slot
        # without a region every part is inline
        out, placed = _round_trip({"blob": Blob(bytearray(5000))}, None, None)
        assert placed == [None, None] and out == {"blob": Blob(bytearray(5000))}
        assert writer.allocator.slots_in_use == 0
        reader.close()


def test_the_parts_of_a_pickled_object_are_flat_bytes_whatever_the_buffer_format() -> None:
    # PyPy's PickleBuffer.raw() keeps the exporter's format ("i" here): a
    # part's len() would then count items, not bytes.
    ints = array.array("i", range(5000))
    grid = memoryview(bytearray(range(256)) * 16).cast("B", (64, 64))
    obj = {"ints": Blob(ints), "grid": Blob(grid)}  # type: ignore[arg-type]
    with objects.pickle_object(obj, threshold=1024) as pickled:
        assert len(pickled.parts) == 3
        for part in pickled.parts:
            assert (part.format, part.ndim, part.readonly) == ("B", 1, True)
            assert len(part) == part.nbytes
        assert bytes(pickled.buffers[0]) == ints.tobytes()
        assert bytes(pickled.buffers[1]) == grid.tobytes()


def test_a_pickled_object_lets_go_of_its_buffers_when_released() -> None:
    # Without waiting for the cycle collector: a pickler that held itself
    # (through its buffer callback) kept every object it pickled, and their
    # buffer exports, until a collection.  Until then the bytearray could
    # not be resized, the loan not committed; at exit CPython crashed
    # clearing a memoryview that was still exported.
    enabled = gc.isenabled()
    gc.disable()
    try:
        data = bytearray(b"x" * 5000)
        with objects.pickle_object(data, threshold=1024) as pickled:
            assert len(pickled.buffers) == 1
        data.append(1)  # BufferError while an export is alive
        with shm.RegionWriter(MiB) as writer:
            loan = writer.try_loan(5000)
            assert loan is not None
            with objects.pickle_object([Blob(loan.view)], threshold=1024) as pickled:  # type: ignore[arg-type]
                assert len(pickled.buffers) == 1
            loan.commit()
    finally:
        if enabled:
            gc.enable()


CRASH_AT_EXIT = """
import pickle
from afunix import objects
class Blob:
    def __init__(self, data): self.data = data
    def __reduce_ex__(self, protocol): return bytearray, (pickle.PickleBuffer(self.data),)
for view in [memoryview(bytearray(4096)), memoryview(bytearray(4096)).cast("B", (64, 64))]:
    with objects.pickle_object(Blob(view), threshold=1024) as pickled:
        pass
print("done")
"""


def test_pickling_a_memoryview_does_not_crash_the_interpreter_at_exit(backend: str) -> None:
    done = run_python(CRASH_AT_EXIT, backend)
    assert done.returncode == 0 and done.stdout == "done\n", (done.returncode, done.stderr)


def test_failed_pickling_and_placing_give_back_what_they_took(fd_baseline: set) -> None:
    data = bytearray(5000)
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)) as info:
        objects.pickle_object([Blob(data), lambda: None], threshold=1024)  # type: ignore[arg-type]
    data.append(1)  # the out-of-band view of it was released (its list lives on in the traceback)
    del info

    class FailingWriter(shm.RegionWriter):
        copies = 0

        def try_copy(self, data: object, keep: Optional[List[Slot]] = None) -> Optional[Slot]:
            FailingWriter.copies += 1
            if FailingWriter.copies == 2:
                raise RuntimeError("the second copy fails")
            return super().try_copy(data, keep)

    with FailingWriter(MiB) as writer:
        with objects.pickle_object([Blob(bytearray(5000)), b"s" * 5000], threshold=1024) as pickled:  # type: ignore[arg-type]
            with pytest.raises(RuntimeError):
                objects.place_parts(pickled, writer, threshold=10)
            assert writer.allocator.slots_in_use == 0
            with pytest.raises(ValueError):
                objects.encode_object(pickled, [Slot(0, 1), None])  # a slot of another length
            with pytest.raises(ValueError):
                objects.encode_object(pickled, [None])  # one entry per part


def test_an_object_larger_than_the_free_space_goes_inline(fd_baseline: set) -> None:
    with shm.RegionWriter(64 << 10) as writer:
        reader = shm.RegionReader(os.dup(writer.fileno()), writer.size)
        out, placed = _round_trip(b"w" * (100 << 10), writer, reader)
        assert out == b"w" * (100 << 10) and placed[1] is None
        reader.close()


def test_parts_are_flagged_read_only_as_the_objects_own_buffers_are() -> None:
    blob = Blob(bytearray(5000))
    for obj, read_only in [(b"r" * 5000, [True, True]), (bytearray(5000), [True, False]),
                           ([blob, pickle.PickleBuffer(b"s" * 5000)], [True, False, True])]:
        with objects.pickle_object(obj, threshold=1024) as pickled:
            assert pickled.read_only == read_only
            payload = b"".join(bytes(part) for part in
                               objects.encode_object(pickled, [None] * len(pickled.parts)))
        assert objects.parse_envelope(payload).read_only == read_only


def _envelope(*entries: "tuple[int, int, bytes, int, int]", tail: bytes = b"",
              count: Optional[int] = None, reserved: int = 0) -> bytes:
    head = objects.ENVELOPE_HEADER.pack(len(entries) if count is None else count, reserved)
    return head + b"".join(objects.ENVELOPE_ENTRY.pack(*e) for e in entries) + tail


def test_a_bad_object_payload_is_a_protocol_error() -> None:
    z = bytes(6)
    good = _envelope((objects.INLINE, 0, z, 0, 4), (objects.IN_REGION, objects.READ_ONLY, z, 64, 10),
                     tail=b"abcd")
    envelope = objects.parse_envelope(good)
    assert bytes(envelope.pickle) == b"abcd" and envelope.buffers == [Slot(64, 10)]  # type: ignore[arg-type]
    assert envelope.read_only == [False, True]
    bad = [
        b"",
        b"\x01\x00\x00",
        _envelope(count=0),
        _envelope((objects.INLINE, 0, z, 0, 4), tail=b"abcd", reserved=1),
        _envelope((objects.INLINE, 0, z, 0, 4), tail=b"abc"),               # short
        _envelope((objects.INLINE, 0, z, 0, 4), tail=b"abcde"),             # trailing bytes
        _envelope((objects.INLINE, 0, z, 0, 0)),                            # empty stream
        _envelope((objects.INLINE, 0, bytes(5) + b"\x01", 0, 1), tail=b"a"),# a reserved byte
        _envelope((objects.INLINE, 2, z, 0, 1), tail=b"a"),                 # an unknown flag
        _envelope((objects.INLINE, 0, z, 8, 1), tail=b"a"),                 # an offset for inline bytes
        _envelope((objects.IN_REGION, 0, z, 0, 0)),                         # an empty slot
        _envelope((2, 0, z, 0, 1), tail=b"a"),                              # unknown kind
        _envelope((objects.INLINE, 0, z, 0, 1), count=1000, tail=b"a"),     # more entries than bytes
        _envelope((objects.INLINE, 0, z, 0, 1 << 63), tail=b"a"),
    ]
    for payload in bad:
        with pytest.raises(ProtocolError):
            objects.parse_envelope(payload)


def test_unpickling_is_refused_from_a_peer_of_another_uid() -> None:
    a, b = socket.socketpair()
    with a, b:
        uid = objects.peer_uid(a)
        assert uid == os.geteuid()
        objects.check_unpickle_peer(uid)
    with pytest.raises(PermissionError) as info:
        objects.check_unpickle_peer(os.geteuid() + 1)
    assert info.value.errno == errno.EACCES and "uid %d" % (os.geteuid() + 1) in str(info.value)
    with pytest.raises(PermissionError):
        objects.check_unpickle_peer(None)
    objects.check_unpickle_peer(os.geteuid() + 1, trusted=True)
    objects.check_unpickle_peer(None, trusted=True)
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)  # no SO_PEERCRED answer: unknown
    with s:
        assert objects.peer_uid(s) is None


def test_a_peer_of_another_uid_is_refused(short_dir: str) -> None:
    # SO_PEERCRED of a connection from a process that runs as nobody
    if os.geteuid() != 0:
        pytest.skip("needs root to run a peer as another user")
    os.chmod(short_dir, 0o777)
    path = os.path.join(short_dir, "s")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(path)
        os.chmod(path, 0o777)
        listener.listen(1)
        listener.settimeout(T)
        child = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
            import os, socket, sys
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c.connect(sys.argv[1])
            c.recv(1)
        """), path])
        try:
            conn, _ = listener.accept()
            with conn:
                uid = objects.peer_uid(conn)
                assert uid == 65534
                with pytest.raises(PermissionError):
                    objects.check_unpickle_peer(uid)
                objects.check_unpickle_peer(uid, trusted=True)
                conn.sendall(b"x")
        finally:
            assert child.wait(timeout=T) == 0


def _overflow_uid() -> int:
    try:
        with open("/proc/sys/kernel/overflowuid") as f:
            return int(f.read())
    except OSError:
        return 65534


def test_the_overflow_uid_is_an_unknown_peer() -> None:
    # Any uid the reader's user namespace does not map reads as the overflow
    # uid (65534, "nobody"): a peer showing it may be anyone, and a process
    # that runs as it would otherwise take every such peer for itself.
    overflow = _overflow_uid()
    with pytest.raises(PermissionError) as info:
        objects.check_unpickle_peer(overflow)
    assert info.value.errno == errno.EACCES and "overflow" in str(info.value)
    objects.check_unpickle_peer(overflow, trusted=True)


UNMAPPED_READER = """
import os, socket, sys
from afunix import objects
sock = socket.socket(fileno=int(sys.argv[1]))
uid = objects.peer_uid(sock)
try:
    objects.check_unpickle_peer(uid)
except PermissionError:
    print("refused", uid, os.geteuid())
else:
    print("accepted", uid, os.geteuid())
"""


def test_a_reader_in_a_user_namespace_without_a_uid_map_refuses_its_peer(backend: str) -> None:
    # In a new user namespace with no uid map, this process and every peer
    # read as the overflow uid: equal uids that say nothing about the peer.
    unshare = "/usr/bin/unshare"
    if not os.access(unshare, os.X_OK):
        pytest.skip("no unshare(1) here")
    a, b = socket.socketpair()
    with a, b:
        done = subprocess.run([unshare, "--user", sys.executable, "-c", UNMAPPED_READER, str(b.fileno())],
                              pass_fds=(b.fileno(),), capture_output=True, text=True, timeout=T,
                              env=dict(os.environ, AFUNIX_BACKEND=backend))
    if done.returncode != 0 and "unshare failed" in done.stderr:
        pytest.skip("user namespaces are not allowed here: %s" % done.stderr.strip())
    assert done.returncode == 0, done.stderr
    verdict, uid, own = done.stdout.split()
    assert int(uid) == int(own) == _overflow_uid() != os.geteuid()
    assert verdict == "refused"


def test_a_peer_without_credentials_has_no_uid(backend: str) -> None:
    # SO_PEERCRED answers uid -1 for a socket with no peer credentials (not
    # connected, or a datagram socket): unknown, not a uid.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as alone:
        assert objects.peer_uid(alone) is None
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server, \
            socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as client:
        server.bind("\0afunix-test-peer-uid-%d" % os.getpid())
        client.connect(server.getsockname())
        assert objects.peer_uid(client) is None and objects.peer_uid(server) is None
    with pytest.raises(PermissionError) as info:
        objects.check_unpickle_peer(objects.peer_uid(client))
    assert "unknown" in str(info.value)
