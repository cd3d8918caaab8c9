"""The backend contract, selection by AFUNIX_BACKEND, and the stale-core guard."""
from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import pytest

import afunix
from afunix import _backend, _contract
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
        contract = inspect.signature(getattr(_contract.Backend, name))
        params = list(contract.parameters.values())[1:]
        assert c_funcs[name] == contract.replace(parameters=params), name
    # and the capability flags the contract declares, as bools, in both
    flags = [name for name in _contract.Backend.__annotations__ if name.startswith("HAS_")]
    assert flags
    for module in (c, stdlib):
        assert {name for name in vars(module) if name.startswith("HAS_")} == set(flags)
        assert all(type(getattr(module, name)) is bool for name in flags)


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


@pytest.fixture(scope="session")
def built_without_compiler(tmp_path_factory: pytest.TempPathFactory) -> str:
    """afunix installed from a copy of this checkout with a C compiler that always fails."""
    import os
    import shutil
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    if not (root / "setup.py").exists():
        pytest.skip("needs the source checkout")
    src = tmp_path_factory.mktemp("src")
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(root / name, src / name)
    for folder in ("csrc", "src"):
        shutil.copytree(root / folder, src / folder,
                        ignore=shutil.ignore_patterns("*.so", "*.o", "__pycache__", "_afunix_core.c"))
    target = tmp_path_factory.mktemp("site")
    env = dict(os.environ, CC="/bin/false")
    env.pop("AFUNIX_REQUIRE_C", None)
    env.pop("AFUNIX_REQUIRE_REFERENCE", None)  # (CI's: the benchmark's loops fail to build too)
    # A plain `pip install` in a terminal, as a person runs it: pip shows a
    # successful build's own output only with -v, so the message must reach
    # the terminal by itself.
    status, out = run_in_terminal(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-cache-dir",
         "--target", str(target), str(src)], env)
    assert status == 0, out[-3000:]
    said = " ".join(out.split())
    assert "afunix: the C core was NOT built (CompileError" in said
    assert "afunix will run on its stdlib backend" in said
    assert "install a C compiler and the Python headers" in said
    assert "pip install --force-reinstall --no-deps --no-cache-dir afunix" in said
    return str(target)


def run_in_terminal(argv: "list[str]", env: "dict[str, str]") -> "tuple[int, str]":
    """Run argv with a new pseudo-terminal as its controlling terminal; (exit status, output)."""
    import os
    import pty

    pid, master = pty.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.execve(argv[0], argv, env)
        finally:
            os._exit(127)
    out = bytearray()
    try:
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
    finally:
        os.close(master)
        _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), out.decode(errors="replace")


def test_install_without_a_compiler_runs_on_the_stdlib(backend: str, built_without_compiler: str) -> None:
    import os

    env = dict(os.environ, PYTHONPATH=built_without_compiler, AFUNIX_BACKEND=backend)
    code = "import afunix, socket; a, b = afunix.socketpair(); print(afunix.BACKEND)"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=60, cwd="/")
    if backend == "stdlib":
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == "stdlib"
    else:  # forcing the C core names the reason recorded at build time
        assert proc.returncode != 0
        assert "AFUNIX_BACKEND=c but the C core cannot be used" in proc.stderr
        assert "the build recorded: CompileError" in proc.stderr
    unset = dict(env)
    unset.pop("AFUNIX_BACKEND")
    info = subprocess.run([sys.executable, "-m", "afunix", "info"], env=unset,
                          capture_output=True, text=True, timeout=60, cwd="/")
    assert info.returncode == 0, info.stderr
    assert "backend: stdlib" in info.stdout and "CompileError" in info.stdout
    assert "to get it: install a C compiler" in info.stdout


def test_require_c_makes_a_failed_build_an_error(tmp_path: "Path") -> None:
    import os
    import shutil
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    if not (root / "setup.py").exists():
        pytest.skip("needs the source checkout")
    src = tmp_path / "src"
    shutil.copytree(root, src, ignore=shutil.ignore_patterns(
        ".git", "build", "*.so", "*.o", "__pycache__", "_afunix_core.c", ".hypothesis", "*.egg-info"))
    env = dict(os.environ, CC="/bin/false", AFUNIX_REQUIRE_C="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps",
         "--target", str(tmp_path / "site"), str(src)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode != 0
    # the compiler's failure, not some other one, stopped it
    assert "/bin/false" in proc.stdout + proc.stderr
    assert "the C core was NOT built" not in proc.stdout + proc.stderr


def test_bare_calls_move_one_message_per_call(backend: str) -> None:
    # The benchmark's overhead rows time these against afunix's own calls:
    # each call must move one message, or the timed loop stops reading and
    # its sender blocks on a full socket.
    import socket

    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    send, _, free_send = _backend.impl.bare_calls(a, 8)
    _, recv, free_recv = _backend.impl.bare_calls(b, 8)
    try:
        for i in range(3):
            send(b"%08d" % i)
        for _ in range(3):
            recv()
        b.setblocking(False)
        with pytest.raises(BlockingIOError):
            b.recv(8)  # all three were read
    finally:
        free_send()
        free_recv()
        a.close()
        b.close()
