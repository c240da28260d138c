"""bincode with a Rust-shaped struct: a dataclass that reads and writes the bytes Rust's
``bincode`` 1.x crate does for the struct in the comment above it, and a client and server
that exchange it.

Run it: ``python examples/bincode_struct.py``.
"""

import os
import tempfile
from dataclasses import dataclass

import hintens
from hintens import bincode

PATH = os.path.join(tempfile.mkdtemp(), "quotes.sock")


# #[derive(Serialize, Deserialize)]
# struct Quote { id: u64, price: f64, venue: String, sizes: Vec<u32> }
@dataclass
class Quote:
    id: bincode.u64
    price: bincode.f64
    venue: str
    sizes: list[bincode.u32]


data = bincode.encode(Quote(1, 9.5, "X", [100]), Quote)   # what Rust's bincode::serialize writes
print(len(data), "bytes:", data.hex())
print(bincode.decode(data, Quote))                         # Quote(id=1, price=9.5, ...)


def reprice(quote):
    """The handler gets a Quote and returns one: the codec does the bytes."""
    return Quote(quote.id, quote.price * 2, quote.venue, sorted(quote.sizes))


codec = hintens.BincodeCodec(Quote, Quote)
with hintens.Server(PATH, reprice, codec=codec):
    with hintens.Client(PATH, codec=codec) as client:
        print(client.request(Quote(2, 1.25, "Y", [3, 1, 2])))   # a Quote back
