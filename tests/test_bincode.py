"""hintens.bincode: known answers written by hand from the bincode 1.x format (both modes),
round trips, and every malformed input the issue names."""

from __future__ import annotations

import enum
import math
import tracemalloc
from dataclasses import dataclass, field
from typing import Optional, Union

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hintens import bincode as b
from hintens.bincode import _plans, _struct, _types


@dataclass
class Unit:                      # struct Unit;
    pass


@dataclass
class Meters:                    # struct Meters(u32);
    value: b.u32


@dataclass
class Pair:                      # struct Pair(u8, u8);
    first: b.u8
    second: b.u8


@dataclass
class Move:                      # Message::Move { x: i32, y: i32 }
    x: b.i32
    y: b.i32


@dataclass
class Write:                     # Message::Write(String)
    text: str


@dataclass
class Quit:                      # Message::Quit
    pass


Message = Union[Quit, Move, Write]


class Color(enum.Enum):          # enum Color { Red, Green, Blue }
    RED = "r"
    GREEN = "g"
    BLUE = "b"


@dataclass
class Record:                    # the benchmark's struct
    id: b.u64
    score: b.f64
    name: str
    tags: list[b.u32]


@dataclass
class Everything:
    flag: bool
    small: b.i8
    count: b.u16
    name: str
    blob: bytes
    maybe: Optional[b.i64]
    color: Color
    message: Message
    pairs: dict[str, Pair]
    fixed: tuple[b.u8, b.u8, b.u8]
    unit: type(None) = None
    nums: list[b.f32] = field(default_factory=list)


@dataclass
class Node:                      # struct Node { value: i32, next: Option<Box<Node>> }
    value: b.i32
    next: Optional[Node]


H = bytes.fromhex


@pytest.fixture(autouse=True, params=["kernels", "python"])
def implementation(request, monkeypatch):
    """Every test runs with the compiled kernels (where built) and with the Python plans
    alone, each from an empty plan cache."""
    if request.param == "kernels" and _struct._kernels is None:
        pytest.skip("the bincode kernels are not built")
    if request.param == "python":
        monkeypatch.setattr(_struct, "_kernels", None)
    monkeypatch.setattr(_plans, "_cache", {})
    monkeypatch.setattr(_struct, "_direct", {})
    return request.param

FIXINT = [
    (255, b.u8, "ff"), (0x1234, b.u16, "3412"), (1, b.u32, "01000000"),
    (0x0102030405060708, b.u64, "0807060504030201"), (-1, b.i8, "ff"), (-2, b.i16, "feff"),
    (-1, b.i32, "ffffffff"), (-2, b.i64, "feffffffffffffff"),
    (1.0, b.f32, "0000803f"), (1.0, b.f64, "000000000000f03f"),
    (True, bool, "01"), (False, bool, "00"),
    ("hi", str, "0200000000000000" "6869"), ("", str, "0000000000000000"),
    (b"\x00\x01", bytes, "0200000000000000" "0001"), (None, type(None), ""),
    ([1, 2], list[b.u16], "0200000000000000" "0100" "0200"),
    ([], list[str], "0000000000000000"),
    ((1, 2), tuple[b.u8, b.u16], "01" "0200"), ((1, 2, 3), tuple[b.u8, b.u8, b.u8], "010203"),
    ({1: True, 2: False}, dict[b.u8, bool], "0200000000000000" "0101" "0200"),
    (None, Optional[b.u32], "00"), (5, Optional[b.u32], "01" "05000000"),
    (Unit(), Unit, ""), (Meters(7), Meters, "07000000"), (Pair(1, 2), Pair, "0102"),
    (Color.GREEN, Color, "01000000"),
    (Quit(), Message, "00000000"), (Move(1, 2), Message, "01000000" "01000000" "02000000"),
    (Write("a"), Message, "02000000" "0100000000000000" "61"),
    (Record(1, 0.5, "ab", [7]), Record,
     "0100000000000000" "000000000000e03f" "0200000000000000" "6162"
     "0100000000000000" "07000000"),
    (Node(1, Node(2, None)), Node, "01000000" "01" "02000000" "00"),
]

VARINT = [
    (250, b.u16, "fa"), (251, b.u16, "fb" "fb00"), (65535, b.u32, "fb" "ffff"),
    (65536, b.u32, "fc" "00000100"), (1 << 32, b.u64, "fd" "0000000001000000"),
    (0, b.i32, "00"), (-1, b.i32, "01"), (1, b.i32, "02"), (-126, b.i32, "fb" "fb00"),
    (-(1 << 63), b.i64, "fd" "ffffffffffffffff"), ((1 << 63) - 1, b.i64, "fd" "feffffffffffffff"),
    (255, b.u8, "ff"), (-1, b.i8, "ff"), (1.0, b.f32, "0000803f"), (True, bool, "01"),
    ("hi", str, "02" "6869"), (b"\x00", bytes, "01" "00"),
    ([1, 300], list[b.u32], "02" "01" "fb2c01"),
    ({"a": -1}, dict[str, b.i16], "01" "0161" "01"),
    (5, Optional[b.u32], "01" "05"), (None, Optional[b.u32], "00"),
    (Color.BLUE, Color, "02"), (Move(1, 2), Message, "01" "02" "04"),
    (Write("a"), Message, "02" "01" "61"), ([1.5], list[b.f64], "01" "000000000000f83f"),
    (Record(300, 0.5, "", []), Record, "fb2c01" "000000000000e03f" "00" "00"),
]


@pytest.mark.parametrize("value, T, expected", FIXINT, ids=[repr(c[2]) for c in FIXINT])
def test_fixint_known_answers(value, T, expected):
    assert b.encode(value, T) == H(expected)
    assert b.decode(H(expected), T) == value


@pytest.mark.parametrize("value, T, expected", VARINT, ids=[repr(c[2]) for c in VARINT])
def test_varint_known_answers(value, T, expected):
    assert b.encode(value, T, varint=True) == H(expected)
    assert b.decode(H(expected), T, varint=True) == value


def test_decoding_takes_any_buffer():
    data = b.encode(Record(1, 2.0, "x", [1, 2]), Record)
    assert b.decode(bytearray(data), Record) == b.decode(memoryview(data), Record)


def test_numpy_arrays_encode_as_vecs_in_one_copy():
    np = pytest.importorskip("numpy")
    values = np.arange(1000, dtype=np.float64) / 7
    assert b.encode(values, list[b.f64]) == b.encode(values.tolist(), list[b.f64])
    ints = np.arange(-5, 5, dtype=np.int64)
    assert b.encode(ints, list[b.i64], varint=True) == \
        b.encode(ints.tolist(), list[b.i64], varint=True)
    # Another item type is converted value by value, and checked.
    assert b.encode(np.array([1.5], dtype=np.float32), list[b.f64]) == \
        b.encode([1.5], list[b.f64])
    with pytest.raises(b.EncodeError):
        b.encode(np.array([300], dtype=np.int64), list[b.u8])


# Malformed input ------------------------------------------------------------------------------

@pytest.mark.parametrize("varint", [False, True])
@pytest.mark.parametrize("data, T, message", [
    ("010000", b.u32, "truncated"),
    ("0500000000000000" "6869", str, "remain"),
    ("05", str, None),
    ("0100", b.u8, "trailing"),
    ("01000000" "00", Meters, "trailing"),
    ("0200000000000000" "fffe", str, "UTF-8"),
    ("02", bool, "0 or 1"),
    ("02" "00000000", Optional[b.u32], "0 or 1"),
    ("03000000", Color, "variant index 3"),
    ("05000000", Message, "variant index 5"),
    ("", Pair, "truncated"),
    ("01", Move, None),
])
def test_malformed_input_is_a_clear_error(data, T, message, varint):
    raw = H(data)
    if varint and data.startswith(("05000000", "03000000")):
        raw = H(data[:2])   # the variant index as a varint
    if varint and data.startswith("0200000000000000"):
        raw = H("02" + data[16:])
    if varint and data.startswith("0500000000000000"):
        raw = H("05" + data[16:])
    if varint and T is b.u32:
        raw = H("fc0100")   # a u32 varint cut short
    with pytest.raises(b.DecodeError) as caught:
        b.decode(raw, T, varint=varint)
    assert isinstance(caught.value, ValueError)
    if message is not None:
        assert message in str(caught.value)


@pytest.mark.parametrize("T", [bytes, str, list[b.u8], list[Pair], list[str],
                               dict[b.u32, b.u32], list[type(None)], list[Unit]])
def test_a_huge_length_prefix_allocates_nothing(T):
    huge = (1 << 40).to_bytes(8, "little") + b"\x00" * 4       # 1 TB, in 12 bytes
    tracemalloc.start()
    try:
        with pytest.raises(b.DecodeError, match="remain"):
            b.decode(huge, T)
        with pytest.raises(b.DecodeError, match="remain"):
            b.decode(bytes([253]) + (1 << 40).to_bytes(8, "little"), T, varint=True)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


@pytest.mark.parametrize("data, T", [
    ("fc" "70110100", b.u16),         # 70000 does not fit a u16
    ("fd" "0000000001000000", b.u32),
    ("fc" "00000100", b.i16),         # zigzag 65536 is 32768: out of i16
    ("fe", b.u64),                    # u128 tag
    ("ff", b.u32),                    # no such tag
    ("fd" "0000000001000000", Color),  # variant index over u32
])
def test_varint_out_of_range_or_bad_tags(data, T):
    with pytest.raises(b.DecodeError):
        b.decode(H(data), T, varint=True)


@pytest.mark.parametrize("value, T", [
    (256, b.u8), (-1, b.u8), (-129, b.i8), (1 << 64, b.u64), (-1, b.u64), (1 << 31, b.i32),
    ("7", b.u32), (1.5, b.u32), (True, b.u32), (1, bool), (b"x", str), (5, bytes),
    ("x", list[b.u8]), ([1, 2], tuple[b.u8, b.u8, b.u8]), (Pair(1, 2), Meters),
    ("GREEN", Color), (Pair(1, 2), Message), (3, type(None)), ({1}, dict[b.u8, b.u8]),
    ([1, 256], list[b.u8]), ([True], list[b.u32]), (1e40, b.f32), ("x", b.f64),
    (Pair(1, 300), Pair), (Everything(True, 1, 2, "n", b"", None, Color.RED, Quit(), {},
                                      (1, 2, 3), None, [1e40]), Everything),
    (Move(1, "2"), Message),
])
def test_values_that_do_not_fit_are_encode_errors(value, T):
    for varint in (False, True):
        with pytest.raises(b.EncodeError) as caught:
            b.encode(value, T, varint=varint)
        assert isinstance(caught.value, ValueError)


@pytest.mark.parametrize("T", [int, float, tuple[b.u8, ...], list, object, Union[Pair, int],
                               Optional[Union[Move, Write]]])
def test_types_bincode_cannot_describe(T):
    with pytest.raises(TypeError):
        b.encode(None, T)


# Round trips ----------------------------------------------------------------------------------

def strategy(T):
    """Values of a bincode type."""
    spec = _types._number_spec(T)
    if spec is not None:
        if spec.integer:
            return st.integers(spec.low, spec.high)
        return st.floats(allow_nan=False, width=8 * spec.size)
    if T is bool:
        return st.booleans()
    if T is str:
        return st.text(max_size=20)
    if T is bytes:
        return st.binary(max_size=20)
    if T is type(None):
        return st.none()
    if isinstance(T, type) and issubclass(T, enum.Enum):
        return st.sampled_from(list(T))
    origin = getattr(T, "__origin__", None)
    args = getattr(T, "__args__", ())
    if origin is list:
        return st.lists(strategy(args[0]), max_size=5)
    if origin is tuple:
        return st.tuples(*map(strategy, args))
    if origin is dict:
        return st.dictionaries(strategy(args[0]), strategy(args[1]), max_size=4)
    if origin is Union:
        members = [m for m in args if m is not type(None)]
        if len(members) < len(args):
            return st.none() | strategy(members[0])
        return st.one_of(*map(strategy, members))
    if T is Node:
        return st.builds(Node, strategy(b.i32), st.none())
    import dataclasses
    import typing
    hints = typing.get_type_hints(T, include_extras=True)
    return st.builds(T, *[strategy(hints[f.name]) for f in dataclasses.fields(T)])


ROUND_TRIP_TYPES = [b.u8, b.u16, b.u32, b.u64, b.i8, b.i16, b.i32, b.i64, b.f32, b.f64, bool,
                    str, bytes, list[b.i64], tuple[b.u8, str, b.f64], dict[str, b.u16],
                    Optional[b.i32], Color, Message, Record, Everything, list[Everything]]


@pytest.mark.parametrize("varint", [False, True])
@pytest.mark.parametrize("T", ROUND_TRIP_TYPES, ids=repr)
def test_round_trips(T, varint):
    @given(strategy(T))
    def check(value):
        data = b.encode(value, T, varint=varint)
        back = b.decode(data, T, varint=varint)
        assert back == value or (isinstance(value, float) and math.isnan(value))
        assert b.encode(back, T, varint=varint) == data
    check()


def test_plans_are_compiled_once():
    b.encode(Record(1, 2.0, "x", []), Record)
    plan = _plans._cache[(Record, False)]
    b.decode(b.encode(Record(1, 2.0, "x", []), Record), Record)
    assert _plans._cache[(Record, False)] is plan


@dataclass
class Flat:
    a: b.u8
    b_: b.i16
    c: b.u32
    d: b.i64
    e: b.f32
    f: bool
    g: bytes
    h: list[b.i8]
    i: list[b.f64]
    j: list[b.u64]
    inner: Meters


@pytest.mark.parametrize("varint", [False, True])
def test_a_flat_struct_matches_its_parts(varint, implementation):
    value = Flat(255, -300, 70000, -(1 << 40), 0.5, True, b"\x00\xff", [-1, 2], [1.25],
                 [1 << 63], Meters(3))
    parts = [b.encode(getattr(value, name), T, varint=varint) for name, T in [
        ("a", b.u8), ("b_", b.i16), ("c", b.u32), ("d", b.i64), ("e", b.f32), ("f", bool),
        ("g", bytes), ("h", list[b.i8]), ("i", list[b.f64]), ("j", list[b.u64]),
        ("inner", Meters)]]
    data = b.encode(value, Flat, varint=varint)
    assert data == b"".join(parts)
    assert b.decode(data, Flat, varint=varint) == value
    assert (_struct._direct.get((Flat, varint)) is not None) == (implementation == "kernels")


@dataclass(frozen=True)
class Frozen:
    x: b.u16
    label: str


@dataclass
class Checked:
    x: b.u16

    def __post_init__(self):
        if self.x == 13:
            raise ValueError("unlucky")


def test_frozen_and_post_init_dataclasses():
    assert b.decode(b.encode(Frozen(7, "q"), Frozen), Frozen) == Frozen(7, "q")
    with pytest.raises(ValueError, match="unlucky"):
        b.decode(b.encode(13, b.u16), Checked)     # __post_init__ runs on decode


@pytest.mark.parametrize("varint", [False, True])
def test_ndarray_is_a_vec_that_decodes_to_numpy(varint):
    np = pytest.importorskip("numpy")
    values = np.arange(100, dtype=np.float64) / 3
    T = b.ndarray(b.f64)
    data = b.encode(values, T, varint=varint)
    assert data == b.encode(values.tolist(), list[b.f64], varint=varint)
    back = b.decode(data, T, varint=varint)
    assert isinstance(back, np.ndarray) and np.array_equal(back, values)
    assert not back.flags.owndata and not back.flags.writeable     # a view of the input
    ints = b.decode(b.encode([-1, 300], list[b.i32], varint=varint), b.ndarray(b.i32),
                    varint=varint)
    assert ints.tolist() == [-1, 300] and ints.dtype == np.int32
    with pytest.raises(b.DecodeError, match="remain"):
        b.decode((1 << 40).to_bytes(8, "little"), T)
    with pytest.raises(TypeError):
        b.ndarray(str)


@pytest.mark.parametrize("data", ["text", 12, None])
def test_decoding_something_that_is_not_bytes(data):
    for T in (Record, b.u32, list[str]):
        with pytest.raises(b.DecodeError, match="bytes-like"):
            b.decode(data, T)


# Found in review -------------------------------------------------------------------------------

@dataclass
class KeywordOnly:
    a: b.u8
    b_: b.u16 = field(kw_only=True, default=0)
    c: str = field(init=False, default="x")


@dataclass(init=False)
class OwnInit:
    a: b.u8

    def __init__(self, a):
        self.a = a
        self.seen = True


def test_dataclasses_without_a_positional_init():
    value = KeywordOnly(1, b_=2)
    value.c = "set"
    assert b.decode(b.encode(value, KeywordOnly), KeywordOnly) == value
    back = b.decode(b.encode(OwnInit(5), OwnInit), OwnInit)
    assert back.a == 5 and back.seen   # its own __init__ ran


def test_a_vec_that_shrinks_while_it_is_encoded():
    items = []

    class Shrinking:
        def __index__(self):
            items.clear()   # an element's conversion empties the list
            return 1

    items.extend([Shrinking()] + [1] * 1000)
    data = b.encode(Meters(1), Meters)   # warm the caches
    data = b.encode(items, list[b.u32])
    assert data[:8] == (1001).to_bytes(8, "little") and len(data) == 8 + 4 * 1001


def test_many_threads_meet_a_new_type_at_once():
    import dataclasses
    import sys
    import threading
    import typing

    errors = []
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for _ in range(20):
            widths = [b.u8, b.u16, b.u32, b.u64]
            big = dataclasses.make_dataclass(
                "Big", [(f"f{i}", typing.Optional[list[widths[i % 4]]]) for i in range(30)])
            value = big(*([None] * 30))
            barrier = threading.Barrier(6)

            def use():
                barrier.wait()
                try:
                    assert b.decode(b.encode(value, big), big) == value
                except Exception as error:   # collected: the test fails on any
                    errors.append(error)

            threads = [threading.Thread(target=use) for _ in range(6)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
    finally:
        sys.setswitchinterval(before)
    assert not errors, errors[:3]


def test_elements_that_take_no_bytes_round_trip_but_cannot_amplify():
    assert b.decode(b.encode([Unit(), Unit()], list[Unit]), list[Unit]) == [Unit(), Unit()]
    assert b.decode(b.encode([None] * 5, list[type(None)]), list[type(None)]) == [None] * 5
    inner = (1 << 20).to_bytes(8, "little")
    hostile = (3000).to_bytes(8, "little") + inner * 3000   # 3000 lists of a million units
    with pytest.raises(b.DecodeError, match="take no bytes"):
        b.decode(hostile, list[list[type(None)]])


def test_deep_nesting_is_a_clear_error():
    data = b"\x01" + b"\x01\x00\x00\x00\x01" * 5000 + b"\x00"
    with pytest.raises(b.DecodeError):
        b.decode(data, Optional[Node])
    chain = None
    for n in range(5000):
        chain = Node(n, chain)
    with pytest.raises(b.EncodeError, match="deeply"):
        b.encode(chain, Node)


def test_floats_like_struct_packs_them():
    assert b.encode(3.4028235e38, b.f32) == b.encode(3.4028234663852886e38, b.f32)   # f32::MAX
    assert b.encode(Flat(0, 0, 0, 0, 3.4028235e38, False, b"", [], [], [], Meters(0)), Flat)
    for big in (1e39, 10 ** 400):
        with pytest.raises(b.EncodeError):
            b.encode(big, b.f32)
    with pytest.raises(b.EncodeError):
        b.encode(10 ** 400, b.f64)

    class Index:
        def __index__(self):
            return 2

    assert b.encode(Index(), b.f64) == b.encode(2.0, b.f64)


def test_an_encode_error_runs_user_code_once():
    calls = []

    class Counted:
        def __index__(self):
            calls.append(1)
            return 1 << 40

    with pytest.raises(b.EncodeError):
        b.encode(Meters(Counted()), Meters)
    assert len(calls) == 1


def test_odd_values_are_encode_errors():
    np = pytest.importorskip("numpy")
    with pytest.raises(b.EncodeError):
        b.encode("\ud800", str)
    with pytest.raises(b.EncodeError):
        b.encode(Write("\ud800"), Message)
    with pytest.raises(b.EncodeError):
        b.encode(np.float64(1.0).reshape(()) if hasattr(np.float64(1.0), "reshape")
                 else np.array(1.0), list[b.f64])
    with pytest.raises(b.EncodeError):
        b.encode(np.arange(3, dtype=">f8"), list[b.f64])
    with pytest.raises(TypeError):
        b.encode({}, dict[list[b.u8], b.u8])
