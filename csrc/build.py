"""cffi builder for the afunix C core (out-of-line API mode).

setup.py names this file in ``cffi_modules``; it can also be run by hand:
``python csrc/build.py`` builds ``_afunix_core`` in the current directory.
Knobs, all environment variables (see README):
  AFUNIX_CFLAGS   extra compiler flags (e.g. -fsanitize=address,undefined)
  AFUNIX_LDFLAGS  extra linker flags
"""
import os
import re
import shlex
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
VERSION = re.search(
    r'__version__ = "([^"]+)"',
    (HERE.parent / "src" / "afunix" / "_version.py").read_text(),
).group(1)

# What the product extension is made of, named one by one: csrc/ also holds
# code that is not the product's (csrc/reference/, the benchmark's C loops,
# built by csrc/reference/build.py; csrc/fuzz/).
CDEFS = ["afunix.cdef", "channel.cdef"]
HEADERS = ["afunix.h", "channel.h"]
SOURCES = ["afunix.c", "channel.c"]

ffibuilder = FFI()
ffibuilder.cdef("\n".join((HERE / name).read_text() for name in CDEFS))
ffibuilder.set_source(
    "afunix._afunix_core",
    "\n".join('#include "%s"' % name for name in HEADERS),
    # Relative to the working directory: setuptools wants relative paths.
    sources=[os.path.relpath(HERE / name) for name in SOURCES],
    include_dirs=[str(HERE)],
    define_macros=[("_GNU_SOURCE", "1"), ("AFUNIX_VERSION", '"%s"' % VERSION)],
    extra_compile_args=["-std=c99", "-O2", "-Wall", "-Wextra"]
    + shlex.split(os.environ.get("AFUNIX_CFLAGS", "")),
    extra_link_args=shlex.split(os.environ.get("AFUNIX_LDFLAGS", "")),
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
