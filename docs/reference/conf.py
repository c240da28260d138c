"""Sphinx configuration of the hintens API reference (``make docs``).

The pages document the public API only: the names ``hintens``, ``hintens.aio``,
``hintens.bincode`` and ``hintens.wire`` export, rendered by autodoc from the docstrings
(Google style, read by napoleon). The build runs with warnings as errors and nitpicky
cross-references, so a docstring that renders badly or names a type the reference does not
document fails it. There is no intersphinx: the build must work without the network, so names
from the standard library are left unlinked (``nitpick_ignore_regex`` below).
"""

from __future__ import annotations

import os
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, ROOT)   # the checkout's hintens, even without an editable install
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "_ext"))

import hintens  # noqa: E402

project = "hintens"
copyright = "hintens authors, MIT licence"
release = hintens.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "myst_parser",
    "hintens_sphinx",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]
templates_path: list[str] = []

html_theme = "alabaster"
html_title = f"hintens {release}"
html_static_path: list[str] = []

# Google-style docstrings (Args/Returns/Raises), as the code base writes them.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_class_signature = "mixed"
autodoc_preserve_defaults = True
autodoc_inherit_docstrings = True

# PROTOCOL.md's headings become anchors, so that its own links between sections work.
myst_heading_anchors = 3

nitpicky = True
# The standard library and typing's helpers: documented at docs.python.org, not linked here.
nitpick_ignore_regex = [
    (r"py:(class|obj|exc|func|data)",
     r"(ssl|socket|asyncio|collections\.abc|os|pathlib|logging|enum|types|typing|"
     r"concurrent\.futures|numpy|array)\..*"),
]
# Private type aliases and type variables in signatures, each explained where it is used.
nitpick_ignore = [
    ("py:class", "CodecSpec"),          # codec=: a Codec, its name, or None
    ("py:class", "Addresses"),          # a server's path=: one address or a list
    ("py:class", "Handler"),            # a server's handler=: payload in, reply out
    # FrameDecoder.budget, as the pure-Python twin annotates it (HINTENS_NO_EXTENSIONS=1)
    ("py:class", "hintens.wire._wire_py.MemoryBudget"),
]
nitpick_ignore_regex += [(r"py:class", r"(hintens\.[\w.]+\.)?_[A-Z]\w*")]   # TypeVars: _R, _T
