"""Picks the core: the Cython extensions, or their pure-Python twins.

The core is two layers, each an extension with a twin: the wire kernels (hintens/wire/_wire)
and the socket transport (hintens/transport/_channel). ``core`` is one namespace over both,
hintens._cython_core or hintens._python_core, so that library code says ``core.X`` whatever
layer X lives in. The twins are used when HINTENS_NO_EXTENSIONS is set to a non-empty value
other than "0", on interpreters other than CPython, or when an extension is not built. Type
checkers always read the twins. A normal build that silently fell back is caught by
tests/test_implementation.py.
"""

from __future__ import annotations

import os
import platform
from typing import TYPE_CHECKING

NO_EXTENSIONS = (os.environ.get("HINTENS_NO_EXTENSIONS", "") not in ("", "0")
                 or platform.python_implementation() != "CPython")

if TYPE_CHECKING or NO_EXTENSIONS:
    from . import _python_core as core
    implementation = "python"
else:
    try:
        from . import _cython_core as core  # type: ignore[no-redef]
        implementation = "cython"
    except ImportError as error:  # not built: a source checkout without build_ext, say
        import logging

        logging.getLogger("hintens").warning(
            "compiled core unavailable (%s); using the pure-Python core", error)
        from . import _python_core as core  # type: ignore[no-redef]
        implementation = "python"

__all__ = ["core", "implementation"]
