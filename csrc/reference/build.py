"""cffi builder for the benchmark's plain-C reference loops (out-of-line API mode).

``afunix.bench._afunix_reference`` is what ``python -m afunix bench`` shows in
its C column: the same workloads written in plain C, no Python.  It is not
part of the product (afunix._afunix_core never contains it), and setup.py
builds it as optional: when it fails, afunix installs anyway and the
benchmark leaves out only its C column.  AFUNIX_REQUIRE_REFERENCE=1 makes a
failed build an error (CI sets it).  ``python csrc/reference/build.py``
builds it in the current directory.  AFUNIX_CFLAGS and AFUNIX_LDFLAGS apply
here as to the core.
"""
import os
import shlex
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
CSRC = HERE.parent

CDEFS = ["reference.cdef", "channel_reference.cdef"]
HEADERS = ["reference.h", "channel_reference.h"]
SOURCES = ["reference.c", "channel_reference.c"]

ffibuilder = FFI()
ffibuilder.cdef("\n".join((HERE / name).read_text() for name in CDEFS))
ffibuilder.set_source(
    "afunix.bench._afunix_reference",
    "\n".join('#include "%s"' % name for name in HEADERS),
    # Relative to the working directory: setuptools wants relative paths.
    sources=[os.path.relpath(HERE / name) for name in SOURCES],
    # csrc/ itself for the protocol's constants (channel.h), never its code.
    include_dirs=[str(HERE), str(CSRC)],
    define_macros=[("_GNU_SOURCE", "1")],
    extra_compile_args=["-std=c99", "-O2", "-Wall", "-Wextra"]
    + shlex.split(os.environ.get("AFUNIX_CFLAGS", "")),
    extra_link_args=shlex.split(os.environ.get("AFUNIX_LDFLAGS", "")),
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
