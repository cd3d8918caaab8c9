"""afunix._kernel: the kernel numbers afunix supplies where the interpreter lacks them."""
from __future__ import annotations

import fcntl
import importlib.util
import mmap
import os
import socket
import sys
from types import ModuleType

import pytest

import afunix
from afunix import _kernel

NAMES = [
    ("MSG_NOSIGNAL", socket), ("MSG_CMSG_CLOEXEC", socket), ("SCM_CREDENTIALS", socket),
    ("SO_PEERCRED", socket), ("SO_PASSCRED", socket), ("O_PATH", os),
    ("F_ADD_SEALS", fcntl), ("F_GET_SEALS", fcntl), ("F_SEAL_SEAL", fcntl),
    ("F_SEAL_SHRINK", fcntl), ("F_SEAL_GROW", fcntl), ("MFD_CLOEXEC", os),
    ("MFD_ALLOW_SEALING", os), ("MAP_POPULATE", mmap),
]
LINUX = sys.platform.startswith("linux")


def fresh_kernel_module() -> ModuleType:
    """A new copy of afunix._kernel, evaluated now (the imported one stays as it is)."""
    spec = importlib.util.spec_from_file_location("afunix_kernel_copy", _kernel.__file__)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_supplied_numbers_are_the_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the names gone, as on PyPy 3.9, the numbers afunix supplies are the interpreter's."""
    own = {name: int(getattr(module, name)) for name, module in NAMES if hasattr(module, name)}
    if not own:
        pytest.skip("this interpreter has none of these names to compare with")
    for name, module in NAMES:
        monkeypatch.delattr(module, name, raising=False)
    supplied = fresh_kernel_module()
    assert {name: getattr(supplied, name) for name in own} == own


@pytest.mark.skipif(not LINUX, reason="Linux numbers")
def test_linux_has_every_number() -> None:
    assert _kernel.MSG_NOSIGNAL and _kernel.MSG_CMSG_CLOEXEC
    assert _kernel.SCM_CREDENTIALS is not None
    assert afunix.supports("cmsg_cloexec") and afunix.supports("passcred")
    assert afunix.supports("peercred")
    assert _kernel.F_ADD_SEALS is not None and _kernel.F_GET_SEALS is not None
    assert _kernel.MFD_ALLOW_SEALING and _kernel.MAP_POPULATE
