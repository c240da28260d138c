"""The public surface as users and the API reference see it: every exported class and function
names a public module (``help()``, tracebacks, pickles and Sphinx cross-references show that
path, and it leads back to the object), carries a docstring, and has its entry in the reference
(docs/reference)."""

from __future__ import annotations

import importlib
import inspect
import pathlib
import pickle
import pydoc
import re
from types import ModuleType
from typing import Any, Iterator

import pytest

import hintens
import hintens.aio
import hintens.bincode

#: The namespaces the reference documents; an exported object's __module__ is one of them.
PUBLIC_NAMESPACES = ("hintens", "hintens.aio", "hintens.bincode", "hintens.wire")
REFERENCE = pathlib.Path(__file__).resolve().parent.parent / "docs" / "reference"
PRIVATE_PATH = re.compile(r"\bhintens(?:\.\w+)*\._\w+")


def _exports(*modules: ModuleType) -> Iterator[tuple[str, Any]]:
    for module in modules:
        for name in module.__all__:
            yield f"{module.__name__}.{name}", getattr(module, name)


EXPORTS = list(_exports(hintens, hintens.aio, hintens.bincode))
# Classes and functions: what has a __module__ and a docstring of its own.
DEFINED = [(name, obj) for name, obj in EXPORTS
           if inspect.isclass(obj) or inspect.isfunction(obj)]


def test_the_exports_include_classes_and_functions() -> None:
    names = {name for name, _ in DEFINED}
    assert {"hintens.Client", "hintens.aio.Client", "hintens.remote_error",
            "hintens.bincode.encode"} <= names


@pytest.mark.parametrize(("name", "obj"), DEFINED, ids=[name for name, _ in DEFINED])
def test_module_is_a_public_namespace_that_leads_back(name: str, obj: Any) -> None:
    assert obj.__module__ in PUBLIC_NAMESPACES, f"{name}.__module__ is {obj.__module__}"
    namespace = importlib.import_module(obj.__module__)
    assert getattr(namespace, obj.__qualname__) is obj, \
        f"{obj.__module__}.{obj.__qualname__} is not {name}"


@pytest.mark.parametrize(("name", "obj"), DEFINED, ids=[name for name, _ in DEFINED])
def test_has_a_docstring_of_its_own(name: str, obj: Any) -> None:
    doc = vars(obj).get("__doc__") if inspect.isclass(obj) else obj.__doc__
    assert doc and doc.strip(), f"{name} has no docstring"


@pytest.mark.parametrize(("name", "obj"), DEFINED, ids=[name for name, _ in DEFINED])
def test_help_names_the_public_module(name: str, obj: Any) -> None:
    first = pydoc.render_doc(obj, renderer=pydoc.plaintext).splitlines()[0]
    assert first.endswith(f" in module {obj.__module__}"), first


@pytest.mark.parametrize("cls", [hintens.Client, hintens.ClientPool, hintens.aio.Client,
                                 hintens.aio.ClientPool, hintens.RetryPolicy])
def test_help_mentions_no_private_module(cls: type) -> None:
    text = pydoc.render_doc(cls, renderer=pydoc.plaintext)
    assert PRIVATE_PATH.findall(text) == []
    assert "_py.py" not in text and ".pyx" not in text


def test_exceptions_pickle_by_their_public_name() -> None:
    # protocol 0 spells the class out, module and name
    remote = pickle.dumps(hintens.remote_error(int(hintens.ErrorCode.HANDLER_ERROR), "boom", 7),
                          protocol=0)
    assert b"hintens\nHandlerError\n" in remote
    for error in (hintens.Timeout("late"), hintens.UntrustedServerError("uid 1001")):
        data = pickle.dumps(error, protocol=0)
        assert f"hintens\n{type(error).__name__}\n".encode() in data
        copy = pickle.loads(data)
        assert type(copy) is type(error) and str(copy) == str(error)


def test_values_pickle_by_their_public_name() -> None:
    for value in (hintens.ErrorCode.TIMEOUT, hintens.wire.MessageType.EVENT,
                  hintens.PeerCredentials(1, 2, 3), hintens.RetryPolicy(max_attempts=2)):
        copy = pickle.loads(pickle.dumps(value))
        assert type(copy) is type(value)
    assert pickle.loads(pickle.dumps(hintens.ErrorCode.TIMEOUT)) is hintens.ErrorCode.TIMEOUT


def _documented() -> set[str]:
    """Full names of what the reference's pages document, directive by directive."""
    names: set[str] = set()
    for page in sorted(REFERENCE.glob("*.rst")):
        module = "hintens"
        for line in page.read_text().splitlines():
            current = re.match(r"\.\. (?:current)?module:: +([\w.]+)", line)
            entry = re.match(
                r"\.\. (?:auto)?(?:class|exception|function|data|module):: +([\w.]+)", line)
            if current:
                module = current[1]
            if entry:
                target = entry[1]
                names.add(target if target.split(".")[0] == "hintens" else
                          f"{module}.{target}")
    return names


@pytest.mark.parametrize(("name", "obj"), list(_exports(hintens, hintens.aio)),
                         ids=[name for name, _ in _exports(hintens, hintens.aio)])
def test_the_reference_documents_it(name: str, obj: Any) -> None:
    documented = _documented()
    canonical = {f"{obj.__module__}.{obj.__qualname__}"} \
        if inspect.isclass(obj) or inspect.isfunction(obj) else set()
    if isinstance(obj, ModuleType):
        canonical = {obj.__name__}
    if isinstance(obj, hintens.RetryPolicy):   # hintens.aio.NO_RETRY is hintens.NO_RETRY
        canonical = {f"hintens.{key}" for key, value in vars(hintens).items() if value is obj}
    assert ({name} | canonical) & documented, f"{name} is on no page of docs/reference"
