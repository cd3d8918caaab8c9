"""A stateful property test: random interleavings of the batch and descriptor calls.

One SOCK_SEQPACKET pair at a time; a model holds what is in flight.  After
every step nothing is lost, reordered or duplicated, received descriptors
name the files that were sent, and /proc/self/fd holds exactly the pair and
the source files.  Runs once per backend (the autouse fixture).
"""
from __future__ import annotations

import collections
import os
import socket
import tempfile
from typing import Any, Deque, List, Optional, Tuple

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, invariant, precondition, rule,
                                 run_state_machine_as_test)

import afunix
from afunix import Message
from conftest import open_fds as listed_fds


def open_fds() -> set[int]:
    """Open descriptors, without the one listing the directory used (gone by now)."""
    out = set()
    for fd in listed_fds():
        try:
            os.fstat(fd)
        except OSError:
            continue
        out.add(fd)
    return out

MSG_TRUNC = socket.MSG_TRUNC
MSG_CTRUNC = socket.MSG_CTRUNC
SOURCES = 4  # files whose descriptors the messages carry

# (payload, inode of each descriptor sent with it)
Sent = Tuple[bytes, Tuple[int, ...]]

payloads = st.binary(min_size=0, max_size=300)
fd_picks = st.lists(st.integers(0, SOURCES - 1), max_size=5)


class BatchMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.baseline = open_fds()
        self.files = [tempfile.TemporaryFile() for _ in range(SOURCES)]
        self.inodes = [os.fstat(f.fileno()).st_ino for f in self.files]
        self.serial = 0
        self.a: Optional[socket.socket] = None
        self.b: Optional[socket.socket] = None
        self.in_flight: Deque[Sent] = collections.deque()
        self._new_pair()

    def _new_pair(self) -> None:
        self.a, self.b = afunix.socketpair(socket.SOCK_SEQPACKET)
        self.a.settimeout(0.0)  # the sender never blocks: a full buffer is a partial count
        self.b.settimeout(0.0)
        self.in_flight.clear()
        self.peer_closed = False

    def _payload(self, body: bytes) -> bytes:
        # a serial number up front makes a duplicate or a reorder visible
        self.serial += 1
        return self.serial.to_bytes(4, "big") + body

    # ---- sending ----------------------------------------------------------

    @precondition(lambda self: not self.peer_closed)
    @rule(bodies=st.lists(payloads, min_size=1, max_size=40))
    def send_plain(self, bodies: List[bytes]) -> None:
        assert self.a is not None
        msgs = [self._payload(b) for b in bodies]
        self._send(msgs, [()] * len(msgs))

    @precondition(lambda self: not self.peer_closed)
    @rule(items=st.lists(st.tuples(payloads, fd_picks), min_size=1, max_size=10))
    def send_with_fds(self, items: List[Tuple[bytes, List[int]]]) -> None:
        msgs: List[Any] = []
        picks: List[Tuple[int, ...]] = []
        for body, pick in items:
            data = self._payload(body)
            msgs.append(Message(data, fds=tuple(self.files[i].fileno() for i in pick)))
            picks.append(tuple(self.inodes[i] for i in pick))
        self._send(msgs, picks)

    def _send(self, msgs: List[Any], inodes: List[Tuple[int, ...]]) -> None:
        try:
            sent = afunix.send_many(self.a, msgs)
        except BlockingIOError:
            sent = 0
        assert 0 <= sent <= len(msgs)
        for m, ino in zip(msgs[:sent], inodes):
            self.in_flight.append((bytes(m.data if isinstance(m, Message) else m), ino))

    # ---- receiving --------------------------------------------------------

    @rule(max_messages=st.integers(1, 64), bufsize=st.integers(1, 320),
          maxfds=st.integers(0, 6))
    def recv_many(self, max_messages: int, bufsize: int, maxfds: int) -> None:
        try:
            got = afunix.recv_many(self.b, max_messages, bufsize, maxfds=maxfds)
        except (BlockingIOError, socket.timeout):
            assert not self.in_flight and not self.peer_closed
            return
        self._check(got, max_messages, bufsize, maxfds)

    @rule(max_messages=st.integers(1, 64), bufsize=st.integers(1, 320),
          maxfds=st.integers(0, 6), take_fds=st.booleans())
    def recv_batch(self, max_messages: int, bufsize: int, maxfds: int, take_fds: bool) -> None:
        batch = afunix.RecvBatch(max_messages, bufsize, maxfds=maxfds)
        try:
            count = batch.recv(self.b)
        except (BlockingIOError, socket.timeout):
            assert not self.in_flight and not self.peer_closed
            return
        if take_fds:
            got = batch.messages()
        else:
            # leave the descriptors in the batch: close() must close them
            got = [Message(bytes(batch[i]), (), None, batch.flags(i)) for i in range(count)]
            batch.close()
        self._check(got, max_messages, bufsize, maxfds, fds_taken=take_fds)

    def _check(self, got: List[Message], max_messages: int, bufsize: int, maxfds: int,
               fds_taken: bool = True) -> None:
        assert len(got) <= max_messages
        if not got:
            # end of stream: only once the peer is gone and all was read
            assert self.peer_closed and not self.in_flight
            return
        assert len(got) <= len(self.in_flight), "more messages than were sent"
        for m in got:
            data, inodes = self.in_flight.popleft()
            try:
                assert m.data == data[:bufsize], "lost, reordered or duplicated"
                assert bool(m.flags & MSG_TRUNC) == (len(data) > bufsize)
                if not fds_taken:
                    continue
                if len(inodes) <= maxfds:
                    assert not m.flags & MSG_CTRUNC
                    assert [os.fstat(fd).st_ino for fd in m.fds] == list(inodes)
                    assert all(not os.get_inheritable(fd) for fd in m.fds)
                else:
                    # too many for maxfds: flagged, and none handed over
                    assert m.flags & MSG_CTRUNC and m.fds == ()
            finally:
                afunix.close_fds(m.fds)

    # ---- modes and peers --------------------------------------------------

    @rule(mode=st.sampled_from(["nonblocking", "timeout", "blocking"]))
    def switch_mode(self, mode: str) -> None:
        assert self.b is not None
        if mode == "blocking" and not self.in_flight and not self.peer_closed:
            mode = "timeout"  # a blocking read with nothing queued would wait forever
        self.b.settimeout({"nonblocking": 0.0, "timeout": 0.01, "blocking": None}[mode])

    @precondition(lambda self: not self.peer_closed)
    @rule()
    def peer_closes(self) -> None:
        assert self.a is not None
        self.a.close()
        self.peer_closed = True

    @precondition(lambda self: self.peer_closed and not self.in_flight)
    @rule()
    def reconnect(self) -> None:
        assert self.b is not None
        assert afunix.recv_many(self.b, 4, 16) == []  # end of stream, nothing more
        self.b.close()
        self._new_pair()

    # ---- after every step ---------------------------------------------------

    @invariant()
    def descriptors_are_exactly_ours(self) -> None:
        ours = {f.fileno() for f in self.files} | {s.fileno() for s in (self.a, self.b)
                                                     if s is not None and s.fileno() >= 0}
        assert open_fds() == self.baseline | ours

    @invariant()
    def blocking_only_with_something_queued(self) -> None:
        # a step that blocks with nothing to read would hang the run
        if self.b is not None and self.b.gettimeout() is None:
            if not self.in_flight and not self.peer_closed:
                self.b.settimeout(0.0)

    def teardown(self) -> None:
        for s in (self.a, self.b):
            if s is not None:
                s.close()  # the kernel closes descriptors still queued
        for f in self.files:
            f.close()


def test_random_interleavings_lose_nothing_and_leak_nothing(fd_baseline: set[int]) -> None:
    before = open_fds()
    run_state_machine_as_test(
        BatchMachine,
        settings=settings(max_examples=60, stateful_step_count=30, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow]),
    )
    assert open_fds() == before
