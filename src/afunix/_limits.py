"""The wire and limit constants: each written once for Python, here.

csrc/afunix_limits.h writes them once for C, as ``AFUNIX_`` + the same
name.  The build (csrc/build.py) reads this file and hands every number to
the compiler, and csrc/afunix_limits.h refuses to compile when one of its
own differs: the two cannot drift apart.  A leaf module: it imports nothing, so every
module may import it.  Only plain ``NAME = integer`` lines belong here.
"""

#: Most messages one sendmmsg / recvmmsg call moves (Linux UIO_MAXIOV); the
#: bound on ``max_messages``.
MAX_BATCH = 1024
#: Most descriptors one SCM_RIGHTS message may carry (Linux SCM_MAX_FD).
SCM_MAX_FD = 253
#: Bytes of sun_path kept per received address (its size on Linux).
ADDR_MAX = 108
#: Bytes of a channel frame header (docs/PROTOCOL.md).
FRAME_HEADER = 8
#: The frame format version written and accepted.
FRAME_VERSION = 1
#: The last byte of every frame header.
FRAME_MAGIC = 0xAF
#: Most bytes one SOCK_SEQPACKET record of a channel carries.
RECORD_MAX = 65536
