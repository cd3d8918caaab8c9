"""cffi builder for the afunix C core (out-of-line API mode).

setup.py names this file in ``cffi_modules``; it can also be run by hand:
``python csrc/build.py`` builds ``_afunix_core`` in the current directory.
Knobs, all environment variables (see README):
  AFUNIX_CFLAGS   extra compiler flags (e.g. -fsanitize=address,undefined)
  AFUNIX_LDFLAGS  extra linker flags
"""
import ast
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


def limit_macros(path=HERE.parent / "src" / "afunix" / "_limits.py"):
    """AFUNIX_EXPECT_<NAME>=<number> for each ``NAME = number`` of src/afunix/_limits.py.

    csrc/afunix_limits.h checks its own numbers against these
    (AFUNIX_LIMITS_EXPECTED turns the checks on): each constant is written once for Python and once
    for C, and the build stops when the two disagree.  Read with ast, not
    imported: the package is not importable while it is being built.
    """
    macros = [("AFUNIX_LIMITS_EXPECTED", "1")]
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign):
            (target,) = node.targets
            macros.append(("AFUNIX_EXPECT_" + target.id, str(int(ast.literal_eval(node.value)))))
    return macros


# What the product extension is made of, named one by one: csrc/ also holds
# code that is not the product's (csrc/reference/, the benchmark's C loops,
# built by csrc/reference/build.py; csrc/fuzz/).
CDEFS = ["afunix_limits.cdef", "afunix.cdef", "channel.cdef", "copy.cdef"]
HEADERS = ["afunix_limits.h", "afunix.h", "channel.h", "copy.h"]
SOURCES = ["afunix.c", "channel.c", "copy.c"]

ffibuilder = FFI()
ffibuilder.cdef("\n".join((HERE / name).read_text() for name in CDEFS))
ffibuilder.set_source(
    "afunix._afunix_core",
    "\n".join('#include "%s"' % name for name in HEADERS),
    # Relative to the working directory: setuptools wants relative paths.
    sources=[os.path.relpath(HERE / name) for name in SOURCES],
    include_dirs=[str(HERE)],
    define_macros=[("_GNU_SOURCE", "1"), ("AFUNIX_VERSION", '"%s"' % VERSION)]
    + limit_macros(),
    extra_compile_args=["-std=c99", "-O2", "-Wall", "-Wextra"]
    + shlex.split(os.environ.get("AFUNIX_CFLAGS", "")),
    extra_link_args=shlex.split(os.environ.get("AFUNIX_LDFLAGS", "")),
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
