#!/usr/bin/env python3
"""Derive every constant used by _crc16.h for CRC-16/IBM-3740 (P = 0x11021).

Polynomials over GF(2) are Python ints, bit i = coefficient of x^i.
Run:  python3 gen_consts.py            -> prints fold/Barrett constants
      python3 gen_consts.py --tables   -> prints the slice-by-16 tables
"""
import sys

P = 0x11021  # x^16 + x^12 + x^5 + 1


def xpow_mod(k, p=P):
    """x^k mod p (p of degree 16)."""
    r = 1
    for _ in range(k):
        r <<= 1
        if r & 0x10000:
            r ^= p
    return r


def pdiv(a, b):
    """Polynomial quotient floor(a / b)."""
    q = 0
    db = b.bit_length() - 1
    while a.bit_length() - 1 >= db:
        s = a.bit_length() - 1 - db
        q |= 1 << s
        a ^= b << s
    return q


def fold_pair(d):
    """Constants to move a 128-bit chunk H*x^64 + L forward by d bits:
    H*x^(d+64) + L*x^d == H*K_hi + L*K_lo (mod P)."""
    return xpow_mod(d + 64), xpow_mod(d)


if __name__ == "__main__":
    if "--tables" in sys.argv:
        # T[k][b] = b(x) * x^(8k+16) mod P: contribution of byte b that is
        # followed by k more bytes in a 16-byte slice.
        for k in range(16):
            row = []
            for b in range(256):
                v = b
                for _ in range(8 * k + 16):
                    v <<= 1
                    if v & 0x10000:
                        v ^= P
                row.append(v)
            print("    {")
            for i in range(0, 256, 12):
                print("        " + ", ".join("0x%04x" % x for x in row[i:i + 12]) + ",")
            print("    },")
        sys.exit(0)
    # hx__kfold[n]: fold distance d = 128*n bits (n 16-byte blocks)
    for n in range(1, 17):
        d = 128 * n
        hi, lo = fold_pair(d)
        print("kfold[%2d] d=%-4d {x^%-4d, x^%-4d} mod P = {0x%04x, 0x%04x}" % (n, d, d + 64, d, hi, lo))
    print("final: x^80 mod P = 0x%04x" % xpow_mod(80))
    mu = pdiv(1 << 80, P)
    print("Barrett mu = floor(x^80 / P) = 0x%x (HX__MU80 = 0x%016x without the x^64 term)" % (mu, mu ^ (1 << 64)))
