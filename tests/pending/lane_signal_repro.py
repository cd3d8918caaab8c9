"""Exceptions from signal handlers inside the lane's bookkeeping: two deterministic reproducers.

An exception raised (by a line trace) exactly where CPython 3.11+ may run a
signal handler: right after a call returned.
"""
import sys
import afunix
from afunix import channel_pair, codec, lane, ProtocolError


def raise_at(code, text, call):
    lines = [i for i, l in enumerate(open(code.co_filename), 1) if text in l]
    target = lines[0]

    def tracer(frame, event, arg):
        if frame.f_code is not code:
            return None

        def local(frame, event, arg):
            if event == "line" and frame.f_lineno == target:
                sys.settrace(None)
                raise KeyboardInterrupt
            return local
        return local
    sys.settrace(tracer)
    try:
        call()
    except KeyboardInterrupt:
        print("  interrupted at %s:%d" % (code.co_filename.split("/")[-1], target))
    finally:
        sys.settrace(None)


print("1. receiver: interrupted after the slot was claimed, before the commit")
a, b = channel_pair(shm_size=1 << 20, shm_threshold=1024)
a.send(b"x" * 5000)
raise_at(codec.FrameReader._lane_frames.__code__,
         "self.lane_msg = SlotMessage(offset, size, view, fdslot)", b.recv)
try:
    print("  next recv:", len(b.recv()))
except ProtocolError as exc:
    print("  next recv: ProtocolError:", exc, "| channel closed:", b.closed)

print("2. sender: interrupted after a returned slot was freed, before `room` is set")
a, b = channel_pair(shm_size=1 << 20, shm_threshold=1024)
a.send(b"x" * 5000)
assert b.recv() == b"x" * 5000  # b writes the RETURN frame
raise_at(lane.LaneSender.give_back.__code__, "self.room.set()", lambda: a.send(b"y" * 5000) or a.recv())
try:
    a.socket.settimeout(1)
    print("  next recv:", a.recv())
except ProtocolError as exc:
    print("  next recv: ProtocolError:", exc, "| channel closed:", a.closed)
except Exception as exc:
    print("  next recv:", type(exc).__name__, exc)
