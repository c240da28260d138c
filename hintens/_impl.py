"""Picks the core: the Cython extension, or its pure-Python twin.

The twin is used when HINTENS_NO_EXTENSIONS is set to a non-empty value other than "0", on
interpreters other than CPython, or when the extension is not built. Type checkers always read
the twin. A normal build that silently fell back is caught by tests/test_implementation.py.
"""

from __future__ import annotations

import os
import platform
from typing import TYPE_CHECKING

NO_EXTENSIONS = (os.environ.get("HINTENS_NO_EXTENSIONS", "") not in ("", "0")
                 or platform.python_implementation() != "CPython")

if TYPE_CHECKING or NO_EXTENSIONS:
    from . import _core_py as core
    implementation = "python"
else:
    try:
        from . import _core as core  # type: ignore[no-redef]
        implementation = "cython"
    except ImportError as error:  # not built: a source checkout without build_ext, say
        import logging

        logging.getLogger("hintens").warning(
            "compiled core unavailable (%s); using the pure-Python core", error)
        from . import _core_py as core  # type: ignore[no-redef]
        implementation = "python"

__all__ = ["core", "implementation"]
