"""The backend contract, selection by AFUNIX_BACKEND, and the stale-core guard."""
from __future__ import annotations

import inspect
import subprocess
import sys

import pytest

import afunix
from afunix import _backend
from conftest import REQUIRE_C, run_python


def _public_functions(module: object) -> dict[str, inspect.Signature]:
    return {
        name: inspect.signature(obj)
        for name, obj in vars(module).items()
        if inspect.isfunction(obj)
        and not name.startswith("_")
        and obj.__module__ == module.__name__  # type: ignore[attr-defined]
    }


def test_both_backends_provide_exactly_the_contract() -> None:
    try:
        c = _backend.load("c")
    except ImportError as exc:
        if REQUIRE_C:
            raise
        pytest.skip("C core not built: %s" % exc)
    stdlib = _backend.load("stdlib")
    c_funcs = _public_functions(c)
    s_funcs = _public_functions(stdlib)
    # helpers the C adapter needs internally are public-looking only if they
    # are in the contract
    assert set(s_funcs) == set(_backend.FUNCTIONS)
    assert set(c_funcs) - {"checked_core"} == set(_backend.FUNCTIONS)
    for name in _backend.FUNCTIONS:
        assert c_funcs[name] == s_funcs[name], name
        # and both match the written contract, minus its `self`
        contract = inspect.signature(getattr(_backend.Backend, name))
        params = list(contract.parameters.values())[1:]
        assert c_funcs[name] == contract.replace(parameters=params), name


def test_backend_attribute_names_the_running_backend(backend: str) -> None:
    assert afunix.BACKEND == backend
    assert afunix._backend.impl is _backend.load(backend)


def test_unknown_backend_name_is_refused() -> None:
    with pytest.raises(ImportError, match="unknown backend"):
        _backend.load("fortran")


def _backend_in_child(value: str | None) -> subprocess.CompletedProcess[str]:
    import os

    env = dict(os.environ)
    env.pop("AFUNIX_BACKEND", None)
    if value is not None:
        env["AFUNIX_BACKEND"] = value
    return subprocess.run(
        [sys.executable, "-c", "import afunix; print(afunix.BACKEND)"],
        env=env, capture_output=True, text=True, timeout=60,
    )


def test_import_with_backend_stdlib() -> None:
    proc = _backend_in_child("stdlib")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "stdlib"


def test_import_with_backend_unset_and_c() -> None:
    unset = _backend_in_child(None)
    forced = _backend_in_child("c")
    assert unset.returncode == 0, unset.stderr
    if afunix.supports("c_core"):
        assert unset.stdout.strip() == "c"
        assert forced.returncode == 0, forced.stderr
        assert forced.stdout.strip() == "c"
    else:
        assert not REQUIRE_C
        assert unset.stdout.strip() == "stdlib"
        assert forced.returncode != 0
        assert "AFUNIX_BACKEND=c but the C core cannot be used" in forced.stderr


def test_import_with_invalid_backend_value() -> None:
    proc = _backend_in_child("turbo")
    assert proc.returncode != 0
    assert "AFUNIX_BACKEND='turbo' is not valid" in proc.stderr


def test_stale_core_is_refused() -> None:
    try:
        cb = _backend.load("c")
    except ImportError as exc:
        if REQUIRE_C:
            raise
        pytest.skip("C core not built: %s" % exc)
    ffi, lib = cb.checked_core(afunix.__version__)
    assert ffi.string(lib.afunix_version()).decode() == afunix.__version__
    with pytest.raises(ImportError, match="stale: built for %s, package is 0.0.0-old"
                       % afunix.__version__.replace(".", r"\.")):
        cb.checked_core("0.0.0-old")


def test_child_backend_is_the_requested_one(backend: str) -> None:
    proc = run_python("import afunix; print(afunix.BACKEND)", backend)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == backend
