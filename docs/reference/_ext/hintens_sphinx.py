"""Sphinx helpers of the hintens reference.

* ``.. hintens-cli::``: the ``--help`` of the ``hintens`` command and of each subcommand, taken
  from the parser itself (``hintens._cli.build_parser``), so that the page cannot drift from
  the command line.
* Attribute and property docstrings are kept as written. napoleon reads the first line of one
  as ``type: text``, but hintens annotates its types, and its attribute comments are prose
  whose first colon is no type ("The codec (None: raw bytes)").
* A class whose ``__new__`` only passes its arguments on (``hintens.Client``'s picks the
  class by ``codec``) is shown with its ``__init__``'s signature, as one calls it; autodoc
  would take the catch-all ``__new__(*args, **options)``. A ``typing.Protocol`` (``Codec``)
  is shown without one.
* A constant's docstring is its own, or none: not its type's (``int``'s, ``str``'s).
"""

from __future__ import annotations

import argparse
import inspect
import os
from typing import Any

from docutils import nodes
from docutils.parsers.rst import Directive
from docutils.statemachine import StringList

# argparse wraps help to the terminal's width; a fixed width keeps the page the same everywhere.
HELP_COLUMNS = "88"


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


class HintensCli(Directive):
    has_content = False

    def run(self) -> list[nodes.Node]:
        saved = os.environ.get("COLUMNS")
        os.environ["COLUMNS"] = HELP_COLUMNS
        try:
            import hintens._cli as cli

            parser = cli.build_parser()
            # The module docstring's paragraphs after its title line: how failures look, the
            # exit codes. The command-line module keeps them next to the code that does it.
            intro = nodes.container()
            body = (cli.__doc__ or "").split("\n\n", 1)[1:]
            self.state.nested_parse(StringList("".join(body).splitlines(), "hintens._cli"),
                                    self.content_offset, intro)
            result: list[nodes.Node] = [*intro.children, self._help(parser)]
            for name, sub in _subcommands(parser).items():
                section = nodes.section(ids=[f"hintens-{name}"], names=[f"hintens {name}"])
                section += nodes.title(text=f"hintens {name}")
                section += self._help(sub)
                result.append(section)
        finally:
            if saved is None:
                del os.environ["COLUMNS"]
            else:
                os.environ["COLUMNS"] = saved
        return result

    @staticmethod
    def _help(parser: argparse.ArgumentParser) -> nodes.literal_block:
        text = parser.format_help()
        return nodes.literal_block(text, text, language="text")


# napoleon handles autodoc-process-docstring at the default priority, 500: take a copy of an
# attribute's lines just before, and put it back just after.
PROSE_KINDS = frozenset({"attribute", "property", "data"})
_prose: dict[str, list[str]] = {}


def _keep_prose(app: Any, what: str, name: str, obj: Any, options: Any,
                lines: list[str]) -> None:
    if what in PROSE_KINDS:
        _prose[name] = list(lines)


def _restore_prose(app: Any, what: str, name: str, obj: Any, options: Any,
                   lines: list[str]) -> None:
    if what in PROSE_KINDS and name in _prose:
        lines[:] = _prose.pop(name)


def _init_signature(app: Any, what: str, name: str, obj: Any, options: Any,
                    signature: str | None, return_annotation: str | None
                    ) -> tuple[str, str | None] | None:
    if what != "class":
        return None
    if getattr(obj, "_is_protocol", False):   # a typing.Protocol: described, not called
        return "", None
    new = getattr(obj, "__new__", None)
    if not inspect.isfunction(new) or not any(
            p.kind is p.VAR_POSITIONAL for p in inspect.signature(new).parameters.values()):
        return None
    from sphinx.util.inspect import signature as sphinx_signature, stringify_signature

    init = sphinx_signature(obj.__init__, bound_method=True,
                            type_aliases=app.config.autodoc_type_aliases)
    return stringify_signature(init, show_return_annotation=False), return_annotation


def _no_type_docstring(app: Any, what: str, name: str, obj: Any, options: Any,
                       lines: list[str]) -> None:
    # A constant (an int, a str, a RetryPolicy) has no docstring of its own: autodoc would
    # show its type's. The page's directive says what it is.
    if what == "data" and not isinstance(obj, type) and \
            getattr(obj, "__doc__", None) == getattr(type(obj), "__doc__", None):
        lines.clear()


def setup(app: Any) -> dict[str, Any]:
    app.add_directive("hintens-cli", HintensCli)
    app.connect("autodoc-process-docstring", _keep_prose, priority=499)
    app.connect("autodoc-process-docstring", _restore_prose, priority=501)
    app.connect("autodoc-process-signature", _init_signature)
    app.connect("autodoc-process-docstring", _no_type_docstring, priority=400)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
