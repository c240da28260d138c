"""The selector, and agreement of the two cores' public surfaces."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys

import pytest

import hintens
from hintens import _constants
from hintens import _python_core as _core_py

from .conftest import NO_EXTENSIONS


@pytest.mark.skipif(NO_EXTENSIONS, reason="HINTENS_NO_EXTENSIONS is set")
def test_compiled_core_loaded_in_a_normal_build():
    assert hintens.implementation == "cython"
    from hintens import _cython_core as _core
    assert hintens.wire.FrameDecoder is _core.FrameDecoder
    assert hintens.wire.crc16 is _core.crc16


def test_no_extensions_env_selects_the_python_twin():
    env = dict(os.environ, HINTENS_NO_EXTENSIONS="1")
    out = subprocess.run(
        [sys.executable, "-c",
         "import hintens; print(hintens.implementation, hintens.wire.FrameDecoder.__module__)"],
        env=env, capture_output=True, text=True, check=True).stdout.split()
    assert out == ["python", "hintens.wire._wire_py"]


def test_twins_export_the_same_names(cython_core):
    assert sorted(cython_core.__all__) == sorted(_core_py.__all__)
    for name in _core_py.__all__:
        assert hasattr(cython_core, name), name


@pytest.mark.skipif(NO_EXTENSIONS, reason="HINTENS_NO_EXTENSIONS is set")
@pytest.mark.parametrize("layer", ["wire._wire", "transport._channel"])
def test_each_layer_has_a_twin_with_the_same_names(layer):
    import importlib

    compiled = importlib.import_module(f"hintens.{layer}")
    twin = importlib.import_module(f"hintens.{layer}_py")
    assert compiled.__file__.endswith(".so")
    assert sorted(compiled.__all__) == sorted(twin.__all__)
    for name in twin.__all__:
        assert hasattr(compiled, name), name


def test_the_core_namespaces_are_the_two_layers():
    from hintens.transport import _channel_py
    from hintens.wire import _wire_py

    assert sorted(_core_py.__all__) == sorted(_wire_py.__all__ + _channel_py.__all__)
    assert _core_py.Channel is _channel_py.Channel
    assert _core_py.FrameDecoder is _wire_py.FrameDecoder


@pytest.mark.parametrize("name", ["crc16", "encode_frame", "encode_header",
                                  "pack_header_into", "unpack_header"])
def test_twins_share_signatures(cython_core, name):
    py_params = inspect.signature(getattr(_core_py, name)).parameters
    c_params = inspect.signature(getattr(cython_core, name)).parameters
    assert list(c_params) == list(py_params)
    assert [p.default for p in c_params.values()] == [p.default for p in py_params.values()]


def test_constants_match_the_wire_contract():
    assert _constants.HEADER_SIZE == 24
    assert _constants.MAGIC == 0x4850
    assert _constants.VERSION == 0x0100
    assert int(hintens.wire.Flags.SHM) == 1 and int(hintens.wire.Flags.COMPRESSED) == 2
    assert [int(t) for t in hintens.wire.MessageType] == [1, 2, 3, 4]
    assert [int(c) for c in hintens.ErrorCode] == list(range(1, 9))


def test_public_names_are_exported():
    for name in hintens.__all__:
        assert hasattr(hintens, name), name
    for name in hintens.wire.__all__:
        assert hasattr(hintens.wire, name), name
    # The application API at the top, the wire format under hintens.wire.
    assert not set(hintens.__all__) & {"encode_frame", "FrameDecoder", "crc16", "Flags"}


def test_wire_names_at_the_top_level_still_work_with_a_warning():
    with pytest.warns(DeprecationWarning, match="hintens.wire.encode_frame"):
        assert hintens.encode_frame is hintens.wire.encode_frame
    with pytest.raises(AttributeError):
        hintens.no_such_name


def test_the_wheel_ships_every_package():
    # pyproject.toml lists the packages by hand: a new sub-package left out of it would be
    # missing from the wheel while every test of the source tree still passed.
    import pathlib
    import tomllib

    root = pathlib.Path(hintens.__file__).parent
    listed = set(tomllib.loads((root.parent / "pyproject.toml").read_text())
                 ["tool"]["setuptools"]["packages"])
    found = {".".join(path.parent.relative_to(root.parent).parts)
             for path in root.rglob("__init__.py")}
    assert listed == found
