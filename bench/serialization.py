"""Serialization speed: hintens.bincode against pickle (protocol 5) and msgpack, in one run.

    python bench/serialization.py [--repeat 7]

1. A struct ``{id: u64, score: f64, name: String (16 chars), tags: Vec<u32> (32)}``: bincode
   encodes and decodes the dataclass; pickle the same dataclass; msgpack the same data as a
   dict (what msgpack users send). Target: bincode's decode no slower than msgpack's.
2. A 1M-element float64 numpy array: bincode as Vec<f64> (encode: one memcpy; decode: a list
   of floats, as the type says), and as ``bincode.ndarray(f64)`` (the same bytes, decoded as
   a numpy view of the input); pickle 5 of the array, in band; msgpack of the list of floats
   and of the raw bytes.

Each figure is the best of several timing rounds (timeit), in microseconds per call, the
candidates taking turns round by round.
"""

from __future__ import annotations

import argparse
import pickle
import timeit
from dataclasses import dataclass

import msgpack
import numpy as np

from hintens import bincode


@dataclass
class Record:
    id: bincode.u64
    score: bincode.f64
    name: str
    tags: list[bincode.u32]


def interleaved(candidates: dict, number: int, repeat: int) -> dict:
    """Best time per call (microseconds) of each candidate, the candidates taking turns
    round by round, so that the machine's drift hits all of them alike."""
    times: dict = {name: [] for name in candidates}
    for _ in range(repeat):
        for name, function in candidates.items():
            times[name].append(timeit.timeit(function, number=number) / number * 1e6)
    return {name: min(values) for name, values in times.items()}


def table(encoders: dict, decoders: dict, number: int, repeat: int) -> dict:
    enc = interleaved(encoders, number, repeat)
    dec = interleaved(decoders, number, repeat)
    return {name: (enc[name], dec[name]) for name in encoders}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    repeat = args.repeat

    record = Record(123456789, 0.75, "abcdefghijklmnop", list(range(1000, 1032)))
    as_dict = {"id": record.id, "score": record.score, "name": record.name,
               "tags": record.tags}
    encoded = bincode.encode(record, Record)
    pickled = pickle.dumps(record, protocol=5)
    packed = msgpack.packb(as_dict)
    assert bincode.decode(encoded, Record) == record
    print(f"kernels: {'compiled' if bincode._struct._kernels is not None else 'pure Python'}")
    print(f"\nstruct ({len(encoded)} B bincode, {len(pickled)} B pickle, {len(packed)} B "
          f"msgpack), microseconds per call, best of {5 * repeat} interleaved rounds")
    rows = table({"bincode": lambda: bincode.encode(record, Record),
                  "pickle 5": lambda: pickle.dumps(record, protocol=5),
                  "msgpack (dict)": lambda: msgpack.packb(as_dict)},
                 {"bincode": lambda: bincode.decode(encoded, Record),
                  "pickle 5": lambda: pickle.loads(pickled),
                  "msgpack (dict)": lambda: msgpack.unpackb(packed)}, 5000, 5 * repeat)
    for name, (enc, dec) in rows.items():
        print(f"  {name:<16} encode {enc:7.3f}   decode {dec:7.3f}")
    ours = rows["bincode"]
    for name in ("pickle 5", "msgpack (dict)"):
        print(f"  bincode / {name:<15} encode {ours[0] / rows[name][0]:5.2f}x   "
              f"decode {ours[1] / rows[name][1]:5.2f}x")
    print(f"  target: bincode decode / msgpack decode <= 1.00: "
          f"{ours[1] / rows['msgpack (dict)'][1]:.2f}")

    array = np.random.default_rng(1).random(1_000_000)
    as_list = array.tolist()
    vec = list[bincode.f64]
    nd = bincode.ndarray(bincode.f64)   # the same Vec<f64> bytes, decoded as a numpy view
    encoded_array = bincode.encode(array, vec)
    pickled_array = pickle.dumps(array, protocol=5)
    packed_list = msgpack.packb(as_list)
    packed_bytes = msgpack.packb(array.tobytes())
    print(f"\n1M float64 array (8 MB), microseconds per call, best of {repeat}")
    rows = table({"bincode Vec<f64>": lambda: bincode.encode(array, vec),
                  "bincode ndarray": lambda: bincode.encode(array, nd),
                  "pickle 5": lambda: pickle.dumps(array, protocol=5),
                  "msgpack list": lambda: msgpack.packb(as_list),
                  "msgpack bytes": lambda: msgpack.packb(array.tobytes())},
                 {"bincode Vec<f64>": lambda: bincode.decode(encoded_array, vec),
                  "bincode ndarray": lambda: bincode.decode(encoded_array, nd),
                  "pickle 5": lambda: pickle.loads(pickled_array),
                  "msgpack list": lambda: msgpack.unpackb(packed_list),
                  "msgpack bytes": lambda: np.frombuffer(msgpack.unpackb(packed_bytes))},
                 3, repeat)
    for name, (enc, dec) in rows.items():
        print(f"  {name:<16} encode {enc:10.1f}   decode {dec:10.1f}")
    for ours_name in ("bincode Vec<f64>", "bincode ndarray"):
        ours = rows[ours_name]
        for name in ("pickle 5", "msgpack list", "msgpack bytes"):
            print(f"  {ours_name} / {name:<15} encode {ours[0] / rows[name][0]:6.2f}x   "
                  f"decode {ours[1] / rows[name][1]:8.3f}x")


if __name__ == "__main__":
    main()
