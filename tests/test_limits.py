"""Each wire and limit constant: once in Python (afunix._limits), once in C (csrc/afunix_limits.h).

The build hands the Python numbers to the compiler, and the header stops the
build when its own differ; these tests check that the check is there for
every constant and that it does stop a build.
"""
from __future__ import annotations

import ast
import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path
from types import ModuleType

import pytest

from afunix import _limits
from conftest import REQUIRE_C

ROOT = Path(__file__).resolve().parent.parent
HEADER = ROOT / "csrc" / "afunix_limits.h"
NAMES = [name for name in vars(_limits) if name.isupper()]


def _need_source() -> None:
    if not (ROOT / "setup.py").exists():
        pytest.skip("needs the source checkout")


def _build_script() -> ModuleType:
    _need_source()
    spec = importlib.util.spec_from_file_location("afunix_core_build", ROOT / "csrc" / "build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _compile_header(macros: list[tuple[str, str]]) -> subprocess.CompletedProcess[str]:
    gcc = shutil.which("gcc")
    if gcc is None:
        if os.environ.get("CI"):
            pytest.fail("gcc is needed to check csrc/afunix_limits.h")
        pytest.skip("no gcc")
    flags = ["-D%s=%s" % pair for pair in macros]
    source = '#include "afunix_limits.h"\nint afunix_limits_probe = AFUNIX_SCM_MAX_FD;\n'
    return subprocess.run([gcc, "-std=c99", "-Wall", "-Wextra", "-Werror", "-pedantic",
                           "-fsyntax-only", "-I", str(HEADER.parent), *flags, "-x", "c", "-"],
                          input=source, capture_output=True, text=True, timeout=60)


def test_the_python_module_is_a_leaf_of_plain_numbers() -> None:
    tree = ast.parse(Path(_limits.__file__).read_text())
    for node in tree.body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # the docstring
        assert isinstance(node, ast.Assign), ast.dump(node)  # no import, nothing else
        (target,) = node.targets
        assert isinstance(target, ast.Name) and isinstance(ast.literal_eval(node.value), int)
    assert NAMES == ["MAX_BATCH", "SCM_MAX_FD", "ADDR_MAX", "FRAME_HEADER", "FRAME_VERSION",
                     "FRAME_MAGIC", "RECORD_MAX"]


def test_every_constant_is_defined_once_in_c_and_checked() -> None:
    _need_source()
    text = HEADER.read_text()
    defined = re.findall(r"^#define AFUNIX_(\w+) ", text, re.M)
    checked = re.findall(r"^#if AFUNIX_(\w+) != AFUNIX_EXPECT_(\w+)$", text, re.M)
    assert defined == NAMES
    assert checked == [(name, name) for name in NAMES]
    # Nowhere else in the product's C is one of them defined again.
    for source in (ROOT / "csrc").glob("*.[ch]"):
        if source != HEADER:
            again = re.findall(r"^#define (AFUNIX_\w+)", source.read_text(), re.M)
            assert not set(again) & {"AFUNIX_" + n for n in NAMES}, (source, again)


def test_the_built_core_has_the_python_numbers() -> None:
    try:
        from afunix._afunix_core import lib
    except ImportError as exc:
        if REQUIRE_C:
            raise
        pytest.skip("C core not built: %s" % exc)
    assert {n: getattr(lib, "AFUNIX_" + n) for n in NAMES} == {n: getattr(_limits, n)
                                                                 for n in NAMES}


def test_the_build_passes_every_python_number_to_the_compiler() -> None:
    macros = dict(_build_script().limit_macros())
    assert macros.pop("AFUNIX_LIMITS_EXPECTED") == "1"
    assert macros == {"AFUNIX_EXPECT_" + n: str(getattr(_limits, n)) for n in NAMES}
    proc = _compile_header(list(_build_script().limit_macros()))
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("name", NAMES)
def test_a_number_that_differs_stops_the_build(name: str) -> None:
    macros = [(k, str(int(v) + 1) if k == "AFUNIX_EXPECT_" + name else v)
              for k, v in _build_script().limit_macros()]
    proc = _compile_header(macros)
    assert proc.returncode != 0
    assert "AFUNIX_%s differs from %s in src/afunix/_limits.py" % (name, name) in proc.stderr
    assert proc.stderr.count("error: #error") == 1, proc.stderr  # that one, not the others


def test_a_number_missing_in_python_stops_the_build() -> None:
    macros = [(k, v) for k, v in _build_script().limit_macros() if k != "AFUNIX_EXPECT_ADDR_MAX"]
    proc = _compile_header(macros)
    assert proc.returncode != 0
    assert "AFUNIX_ADDR_MAX differs from ADDR_MAX" in proc.stderr
