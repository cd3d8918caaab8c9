"""Backend selection: the C core when it is built, else the stdlib fallback.

The backend is chosen once, at import:
  AFUNIX_BACKEND unset   -> "c" when the C core imports, else "stdlib"
  AFUNIX_BACKEND=c       -> "c", or ImportError saying why it cannot load
  AFUNIX_BACKEND=stdlib  -> "stdlib"

Both backend modules provide exactly the functions declared in
`_contract.Backend`, with the same signatures (tests/test_backend.py checks
it).  Topic modules call ``_backend.impl.<name>`` and read capability flags as
``_backend.impl.HAS_<name>``; nothing else touches a backend module directly.
"""
from __future__ import annotations

import importlib
import os
from typing import Optional, cast

from ._contract import Backend


FUNCTIONS = tuple(sorted(
    name for name in vars(Backend) if not name.startswith("_")
))

NAMES = ("c", "stdlib")

#: Why the C core could not be used, or None when it loaded.
c_core_error: Optional[str] = None


def load(name: str) -> Backend:
    """Import the backend module `name` ("c" or "stdlib"); ImportError if it cannot."""
    if name not in NAMES:
        raise ImportError(
            "afunix: unknown backend %r (AFUNIX_BACKEND must be 'c' or 'stdlib')" % name
        )
    module = importlib.import_module("afunix._cbackend" if name == "c" else "afunix._stdlib")
    return cast(Backend, module)


def _select() -> tuple[str, Backend]:
    global c_core_error
    wanted = os.environ.get("AFUNIX_BACKEND", "")
    if wanted == "stdlib":
        return "stdlib", load("stdlib")
    if wanted not in ("", "c"):
        raise ImportError(
            "afunix: AFUNIX_BACKEND=%r is not valid: use 'c', 'stdlib' or leave it unset"
            % wanted
        )
    try:
        return "c", load("c")
    except ImportError as exc:
        c_core_error = str(exc)
        if wanted == "c":
            raise ImportError(
                "afunix: AFUNIX_BACKEND=c but the C core cannot be used: %s" % exc
            ) from exc
        return "stdlib", load("stdlib")


name, impl = _select()


def use(backend: str) -> None:
    """Switch the active backend (for tests and benchmarks that compare both)."""
    global name, impl
    impl = load(backend)
    name = backend
