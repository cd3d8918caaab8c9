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

# Every csrc/*.cdef is part of the interface, every csrc/*.h is included and
# every csrc/*.c compiled: adding a file is all it takes.
ffibuilder = FFI()
ffibuilder.cdef("\n".join(p.read_text() for p in sorted(HERE.glob("*.cdef"))))
ffibuilder.set_source(
    "afunix._afunix_core",
    "\n".join('#include "%s"' % p.name for p in sorted(HERE.glob("*.h"))),
    # Relative to the working directory: setuptools wants relative paths.
    sources=sorted(os.path.relpath(p) for p in HERE.glob("*.c")),
    include_dirs=[str(HERE)],
    define_macros=[("_GNU_SOURCE", "1"), ("AFUNIX_VERSION", '"%s"' % VERSION)],
    extra_compile_args=["-std=c99", "-O2", "-Wall", "-Wextra"]
    + shlex.split(os.environ.get("AFUNIX_CFLAGS", "")),
    extra_link_args=shlex.split(os.environ.get("AFUNIX_LDFLAGS", "")),
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
