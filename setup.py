"""Build script: compiles the optional C core via cffi (csrc/build.py).

The C core is optional.  When it cannot be built (no compiler, no Python
headers) the package still installs and runs on its stdlib backend, and the
reason is recorded in afunix/_core_missing.txt for ``python -m afunix info``.
Set AFUNIX_REQUIRE_C=1 to make a failed build an error (CI does).

The benchmark's plain-C reference loops (csrc/reference/build.py) are a
second, separate extension, afunix.bench._afunix_reference.  Its failure
never fails the install, AFUNIX_REQUIRE_C or not: it only takes the C column
out of ``python -m afunix bench`` (the reason goes to
afunix/bench/_reference_missing.txt).  AFUNIX_REQUIRE_REFERENCE=1 makes it an
error (CI does).
"""
import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

REQUIRE_C = os.environ.get("AFUNIX_REQUIRE_C", "") not in ("", "0")
REQUIRE_REFERENCE = os.environ.get("AFUNIX_REQUIRE_REFERENCE", "") not in ("", "0")
MISSING_NOTE = os.path.join("afunix", "_core_missing.txt")
REFERENCE = "afunix.bench._afunix_reference"
REFERENCE_MISSING_NOTE = os.path.join("afunix", "bench", "_reference_missing.txt")


NOT_BUILT = """
*** afunix: the C core was NOT built (%s).
*** afunix will run on its stdlib backend: every function works, without the C core's speed.
*** To get the C core, install a C compiler and the Python headers
***   (Debian/Ubuntu: apt-get install gcc python3-dev, or pypy3-dev for PyPy;
***    Fedora: dnf install gcc python3-devel), then build afunix again:
***   pip install --force-reinstall --no-deps --no-cache-dir afunix
***   (from a checkout: `.` in place of afunix).
*** `python -m afunix info` says which backend runs and why.

"""

REFERENCE_NOT_BUILT = """
*** afunix: the benchmark's C reference loops were not built (%s);
*** `python -m afunix bench` will run without its C column.

"""


def _tell(message):
    """Say `message` where the person installing sees it.

    pip shows a successful build's output only with -v, so the message also
    goes straight to the terminal when there is one.
    """
    sys.stderr.write(message)
    sys.stderr.flush()
    if os.isatty(2):
        return  # stderr is the terminal already (setup.py run by hand)
    try:
        with open("/dev/tty", "w") as tty:
            tty.write(message)
    except OSError:
        pass  # no terminal (CI, a container build): pip -v and `afunix info` say it


class optional_build_ext(build_ext):
    """build_ext that turns a C build failure into a recorded warning."""

    reference_required_and_failed = False

    def run(self):
        self._write_note("")
        self._write_note("", REFERENCE_MISSING_NOTE)
        try:
            super().run()
        except Exception as exc:  # compiler missing, headers missing, ...
            if self.reference_required_and_failed:
                raise
            self._fail(exc)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:
            if ext.name == REFERENCE:
                self._reference_failed(exc)
            else:
                self._fail(exc)

    def _reference_failed(self, exc):
        # Benchmark code, not the product: never a reason to fail an install
        # unless asked for.  Said on stderr only (pip -v shows it): the
        # person installing has nothing to do about it.
        if REQUIRE_REFERENCE:
            self.reference_required_and_failed = True
            raise
        reason = ("%s: %s" % (type(exc).__name__, exc)).splitlines()[0][:300]
        sys.stderr.write(REFERENCE_NOT_BUILT % reason)
        self._write_note(reason, REFERENCE_MISSING_NOTE)

    def _fail(self, exc):
        if REQUIRE_C:
            raise
        # First line only, and bounded: a failed compiler command is long.
        reason = ("%s: %s" % (type(exc).__name__, exc)).splitlines()[0][:300]
        _tell(NOT_BUILT % reason)
        self._write_note(reason)

    def _write_note(self, reason, note=MISSING_NOTE):
        # The note lives next to the package, in the build tree (and in the
        # source tree for editable installs), so the installed package can
        # say why the core (or the reference module) is missing.
        for root in {self.build_lib, "src"}:
            path = os.path.join(root, note)
            if os.path.isdir(os.path.dirname(path)):
                if reason:
                    with open(path, "w") as f:
                        f.write(reason + "\n")
                elif os.path.exists(path):
                    os.remove(path)


setup(
    # The core first: when it cannot be built, the reference module would
    # fail for the same reason, and the core's message is the one that counts.
    cffi_modules=["csrc/build.py:ffibuilder", "csrc/reference/build.py:ffibuilder"],
    cmdclass={"build_ext": optional_build_ext},
)
