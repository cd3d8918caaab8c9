"""The shared-memory lane of afunix.aio.Channel, under asyncio, uvloop and trio (anyio's plugin).

Large messages go through slots and wait for returned slots on the event
loop, never on the socket; a send or loan cancelled while it waits for room
has taken no slot and sent nothing of its message; a peer that goes away
while a send waits ends the wait with the stream's error.  Both backends.
"""
from __future__ import annotations

import os
import socket
from typing import Any, List

import anyio
import pytest

import afunix.aio as aio
from afunix import ProtocolError, shm

pytestmark = [pytest.mark.anyio,
              pytest.mark.skipif(shm.unsupported_reason() is not None,
                                 reason=str(shm.unsupported_reason()))]

KiB = 1 << 10
BOUND = 30.0



def payload(i: int, n: int) -> bytes:
    return (i.to_bytes(4, "little") * (n // 4 + 1))[:n]


def in_flight(ch: aio.Channel) -> int:
    lane = ch._ch._lane
    assert lane is not None
    return lane.in_flight


def lane_pair(**options: Any) -> "tuple[aio.Channel, aio.Channel]":
    # over max_frame: only the lane can carry 200 KiB, so every one needs a
    # slot, and a 256 KiB region holds one at a time
    options = dict(dict(shm_size=256 * KiB, shm_threshold=16 * KiB, max_frame=100 * KiB),
                   **options)
    return aio.channel_pair(**options)


async def test_messages_through_the_lane_wait_for_returned_slots_on_the_loop(clean: None) -> None:
    a, b = lane_pair()
    with anyio.fail_after(BOUND):
        async with a, b:
            got: List[bytes] = []
            reply: List[bytes] = []

            async def receive() -> None:
                async for m in b:
                    got.append(m)
                    if len(got) == 30:
                        break
                await b.send(b"done")

            async def await_reply() -> None:
                # a receive of `a` waiting alongside its sender: it may take
                # the RETURN frames in, and the sender must still wake
                reply.append(await a.recv())

            async with anyio.create_task_group() as tg:
                tg.start_soon(receive)
                tg.start_soon(await_reply)
                for i in range(30):
                    await a.send(payload(i, 200 * KiB))
            assert got == [payload(i, 200 * KiB) for i in range(30)]
            assert reply == [b"done"]
            assert in_flight(a) <= 1


async def test_a_send_cancelled_while_it_waits_for_room_takes_no_slot(clean: None) -> None:
    a, b = lane_pair()
    with anyio.fail_after(BOUND):
        async with a, b:
            await a.send(payload(0, 200 * KiB))
            assert in_flight(a) == 1
            with anyio.move_on_after(0.2) as scope:
                await a.send(payload(1, 200 * KiB))  # b takes nothing: no room
            assert scope.cancelled_caught
            assert in_flight(a) == 1 and a.pending == 0
            with anyio.move_on_after(0.2) as scope:
                await a.loan(200 * KiB)  # the same for a loan
            assert scope.cancelled_caught and in_flight(a) == 1
            assert await b.recv() == payload(0, 200 * KiB)
            await a.send(payload(2, 200 * KiB))  # the returned slot, reused
            assert await b.recv() == payload(2, 200 * KiB)  # nothing of payload 1 went


async def test_an_aio_loan_is_sent_without_a_copy(clean: None) -> None:
    a, b = lane_pair()
    with anyio.fail_after(BOUND):
        async with a, b:
            loan = await a.loan(150 * KiB)
            data = os.urandom(150 * KiB)
            loan.view[:] = data
            offset = loan.slot.offset
            await a.send_loan(loan)
            assert not loan.open
            batch = await b.recv_batch()
            assert bytes(batch[0]) == data
            assert b._reader.lane_held == [(offset, 150 * KiB)]
            del batch
            # a second loan waits for the first slot's return, on the loop
            async with anyio.create_task_group() as tg:
                async def take() -> None:
                    await anyio.sleep(0.05)
                    await b.recv()

                tg.start_soon(take)
                second = await a.loan(200 * KiB)
                tg.cancel_scope.cancel()  # take() waits for a next message: none comes
            second.abandon()
            assert in_flight(a) == 0
            with pytest.raises(ValueError, match="no shared-memory lane"):
                plain, other = aio.channel_pair()
                async with plain, other:
                    await plain.loan(10)


async def test_a_peer_closing_while_a_send_waits_for_room_ends_the_wait(clean: None) -> None:
    a, b = lane_pair()
    with anyio.fail_after(BOUND):
        async with a:
            await a.send(payload(0, 200 * KiB))

            async def close_peer() -> None:
                await anyio.sleep(0.1)
                b.close()

            async with anyio.create_task_group() as tg:
                tg.start_soon(close_peer)
                with pytest.raises((BrokenPipeError, ConnectionResetError)):
                    await a.send(payload(1, 200 * KiB))
            assert in_flight(a) == 1  # the slot of the message never returned


async def test_a_sender_waiting_for_room_wakes_when_another_receive_takes_the_returns(
        clean: None) -> None:
    a, b = lane_pair()
    with anyio.fail_after(BOUND):
        async with a, b:
            await a.send(payload(0, 200 * KiB))
            async with anyio.create_task_group() as tg:
                tg.start_soon(a.send, payload(1, 200 * KiB))  # no room: it waits
                await anyio.sleep(0.1)
                # ready at once (no wait on the loop): b's RETURN frame is
                # written as this receive returns ...
                assert await b.recv() == payload(0, 200 * KiB)
                # ... and a receive of `a` takes it in before the loop sees
                # the socket readable: the lane must wake the waiting send
                with pytest.raises(BlockingIOError):
                    a._ch.recv()
            assert await b.recv() == payload(1, 200 * KiB)


async def test_send_object_waiting_for_room_waits_on_the_loop_without_spinning(
        clean: None) -> None:
    a, b = lane_pair()
    with anyio.fail_after(BOUND):
        async with a, b:
            await a.send(payload(0, 200 * KiB))  # the region's one slot
            tries = 0
            send_object = a._ch.send_object

            def counted(obj: Any) -> None:
                nonlocal tries
                tries += 1
                send_object(obj)

            a._ch.send_object = counted  # type: ignore[method-assign]
            big = bytearray(payload(1, 200 * KiB))  # over max_frame inline: needs a slot
            async with anyio.create_task_group() as tg:
                tg.start_soon(a.send_object, big)
                await anyio.sleep(0.3)
                # waiting for the peer's returns, not trying again and again
                # on a socket that is writable all along
                assert tries <= 3, tries
                assert await b.recv() == payload(0, 200 * KiB)
            assert await b.recv_object() == big
