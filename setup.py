"""Build script: compiles the optional C core via cffi (csrc/build.py).

The C core is optional.  When it cannot be built (no compiler, no Python
headers) the package still installs and runs on its stdlib backend, and the
reason is recorded in afunix/_core_missing.txt for ``python -m afunix info``.
Set AFUNIX_REQUIRE_C=1 to make a failed build an error (CI does).
"""
import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

REQUIRE_C = os.environ.get("AFUNIX_REQUIRE_C", "") not in ("", "0")
MISSING_NOTE = os.path.join("afunix", "_core_missing.txt")


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

    def run(self):
        self._write_note("")
        try:
            super().run()
        except Exception as exc:  # compiler missing, headers missing, ...
            self._fail(exc)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:
            self._fail(exc)

    def _fail(self, exc):
        if REQUIRE_C:
            raise
        # First line only, and bounded: a failed compiler command is long.
        reason = ("%s: %s" % (type(exc).__name__, exc)).splitlines()[0][:300]
        _tell(NOT_BUILT % reason)
        self._write_note(reason)

    def _write_note(self, reason):
        # The note lives next to the package, in the build tree (and in the
        # source tree for editable installs), so the installed package can
        # say why the core is missing.
        for root in {self.build_lib, "src"}:
            path = os.path.join(root, MISSING_NOTE)
            if os.path.isdir(os.path.dirname(path)):
                if reason:
                    with open(path, "w") as f:
                        f.write(reason + "\n")
                elif os.path.exists(path):
                    os.remove(path)


setup(
    cffi_modules=["csrc/build.py:ffibuilder"],
    cmdclass={"build_ext": optional_build_ext},
)
