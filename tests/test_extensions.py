"""The two compiled modules: the product's core, and the benchmark's C reference loops apart.

afunix._afunix_core is what users run; afunix.bench._afunix_reference holds
the plain-C loops the benchmark compares with.  The reference is optional:
its failed build never fails an install (AFUNIX_REQUIRE_C covers the core
only; AFUNIX_REQUIRE_REFERENCE=1 covers the reference), and without it the
benchmark leaves out its C column and says why, once.
"""
from __future__ import annotations

import importlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from conftest import REQUIRE_C

ROOT = Path(__file__).resolve().parent.parent
REQUIRE_REFERENCE = os.environ.get("AFUNIX_REQUIRE_REFERENCE", "") not in ("", "0")
BENCHMARK_NAMES = (b"afunix_ref_", b"afunix_chan_ref_")


def _compiled(name: str, required: bool) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        if required:
            raise
        pytest.skip("%s not built: %s" % (name, exc))


def _dynamic_symbols(path: str) -> list[str]:
    """The names the shared object exports, from `nm -D` (binutils)."""
    proc = subprocess.run(["nm", "-D", "--defined-only", path], capture_output=True, text=True,
                          timeout=60, check=True)
    return [line.split()[-1] for line in proc.stdout.splitlines() if line.strip()]


def test_the_product_core_holds_no_benchmark_code() -> None:
    core = _compiled("afunix._afunix_core", REQUIRE_C)
    assert core.__file__ is not None
    image = Path(core.__file__).read_bytes()
    # Every name the file holds (exported, internal or in cffi's tables), not
    # only what the cdef declares.
    assert b"afunix_send_many" in image
    for name in BENCHMARK_NAMES:
        assert name not in image, name
    assert not [n for n in dir(core.lib) if n.startswith(("afunix_ref_", "afunix_chan_ref_"))]
    if shutil.which("nm") is None:
        if os.environ.get("CI"):
            pytest.fail("nm (binutils) is needed to list the core's symbols")
        return
    symbols = _dynamic_symbols(core.__file__)
    assert "afunix_send_many" in symbols and "afunix_frames_parse" in symbols
    assert [s for s in symbols if s.startswith(("afunix_ref_", "afunix_chan_ref_"))] == []


def test_the_reference_module_holds_every_reference_loop() -> None:
    reference = _compiled("afunix.bench._afunix_reference", REQUIRE_REFERENCE)
    assert reference.__file__ is not None
    image = Path(reference.__file__).read_bytes()
    for name in BENCHMARK_NAMES:
        assert name in image, name
    assert {"afunix_ref_send", "afunix_ref_ping", "afunix_chan_ref_send",
            "afunix_chan_ref_recv"} <= set(dir(reference.lib))
    # The benchmark's C code is its own: none of the product's functions.
    assert b"afunix_send_many" not in image and b"afunix_frames_parse" not in image


def test_the_reference_loops_move_what_they_say(backend: str) -> None:
    from afunix.bench import _reference
    import socket

    if _reference.MISSING is not None:
        if REQUIRE_REFERENCE:
            pytest.fail(_reference.MISSING)
        pytest.skip(_reference.MISSING)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        assert _reference.chan_send(a.fileno(), 100, 64, 16, False) == 100
        assert _reference.chan_recv(b.fileno(), 100, 64) == (100, 100 * 99 // 2)
        a.send(b"\x00" * 8 + b"x" * 64)  # a header that is not a frame's
        with pytest.raises(OSError) as err:
            _reference.chan_recv(b.fileno(), 1, 64)
        assert err.value.errno == 74  # EBADMSG


# ---- without the reference module -----------------------------------------------------------

_WITHOUT_REFERENCE = """
import sys
sys.modules["afunix.bench._afunix_reference"] = None  # as if it had never been built
from afunix.__main__ import main
sys.exit(main(["bench", "--tiny", "--only", "dgram", "--only", "single-send",
               "--only", "c-framing", "--placement", "one-cpu"]))
"""


def test_without_the_reference_module_only_the_c_column_goes_with_one_note(
        backend: str) -> None:
    proc = subprocess.run([sys.executable, "-c", _WITHOUT_REFERENCE], capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, AFUNIX_BACKEND=backend))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    rows = [line for line in out.splitlines() if line.startswith("DGRAM ")]
    assert rows
    for row in rows:
        fields = row.split()
        # DGRAM 64 B x32 1 msg/s <base> <af[stdlib]> <af[c]> n/a <af/base> -
        assert fields[-3:] == ["n/a", fields[-2], "-"], row
        assert "n/a" not in fields[:-3] and "FAILED" not in row, row
    assert re.search(r"^C framing .* n/a", out, re.M), out
    lines: list[str] = []  # wrapped notes joined back on
    for line in out.splitlines():
        if line.startswith("  ") and lines and not line.startswith("  ^"):
            lines[-1] += " " + line.strip()
        else:
            lines.append(line)
    notes = [line for line in lines if line.startswith("n/a")]
    assert notes == ["n/a C: not available: the C reference loops are not built (import of"
                     " afunix.bench._afunix_reference halted; None in sys.modules)"], out
    # The rows whose other side is the plain C loop in every column cannot run at all.
    assert [line for line in lines if line.startswith("skipped")] == [
        "skipped 1-call send rows: their other side is the plain C loop, and the C reference"
        " loops are not built (import of afunix.bench._afunix_reference halted; None in"
        " sys.modules)"], out
    assert "1-call send 64 B" not in out


# ---- building it: never a reason to fail an install ---------------------------------------

def _copy_with_a_broken_reference(dest: Path) -> Path:
    if not (ROOT / "setup.py").exists():
        pytest.skip("needs the source checkout")
    src = dest / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", "build", "*.so", "*.o", "__pycache__", "_afunix_core.c", "_afunix_reference.c",
        "_core_missing.txt", "_reference_missing.txt", ".hypothesis", "*.egg-info"))
    with open(src / "csrc" / "reference" / "reference.c", "a") as f:
        f.write('\n#error "a reference loop that does not compile"\n')
    return src


def _install(src: Path, target: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environ = dict(os.environ, **env)
    environ.pop("AFUNIX_REQUIRE_REFERENCE", None)
    environ.update(env)
    return subprocess.run(
        [sys.executable, "-m", "pip", "install", "-v", "--no-deps", "--no-cache-dir", "--target",
         str(target), str(src)], env=environ, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="session")
def built_with_a_broken_reference(tmp_path_factory: pytest.TempPathFactory) -> str:
    """afunix installed, with AFUNIX_REQUIRE_C=1, from a copy whose reference does not compile."""
    work = tmp_path_factory.mktemp("broken-reference")
    src = _copy_with_a_broken_reference(work)
    proc = _install(src, work / "site", AFUNIX_REQUIRE_C="1")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "the benchmark's C reference loops were not built" in proc.stdout + proc.stderr
    return str(work / "site")


@pytest.mark.slow
def test_a_reference_that_fails_to_build_fails_no_install(
        backend: str, built_with_a_broken_reference: str) -> None:
    site = Path(built_with_a_broken_reference)
    assert list((site / "afunix").glob("_afunix_core*.so"))  # the product is complete
    assert not list((site / "afunix" / "bench").glob("_afunix_reference*"))
    code = ("import afunix; from afunix.bench import _reference\n"
            "print(afunix.BACKEND); print(_reference.MISSING)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, cwd="/",
                          env=dict(os.environ, PYTHONPATH=str(site), AFUNIX_BACKEND=backend))
    assert proc.returncode == 0, proc.stderr
    active, missing = proc.stdout.splitlines()
    assert active == backend
    assert missing.startswith("the C reference loops are not built (its build failed: ")
    assert "a reference loop that does not compile" in missing or "CompileError" in missing


@pytest.fixture(scope="session")
def require_reference_install(
        tmp_path_factory: pytest.TempPathFactory) -> subprocess.CompletedProcess[str]:
    """The same install with AFUNIX_REQUIRE_REFERENCE=1 (as CI sets it)."""
    work = tmp_path_factory.mktemp("required-reference")
    return _install(_copy_with_a_broken_reference(work), work / "site",
                    AFUNIX_REQUIRE_REFERENCE="1")


@pytest.mark.slow
def test_require_reference_makes_its_failed_build_an_error(
        require_reference_install: subprocess.CompletedProcess[str]) -> None:
    proc = require_reference_install
    assert proc.returncode != 0
    assert "a reference loop that does not compile" in proc.stdout + proc.stderr
