//! CRC-16/IBM-3740 (CRC-16/CCITT-FALSE), PROTOCOL.md section 3.
//!
//! Slicing-by-8: eight 256-entry tables built at compile time let the loop consume eight bytes
//! per step with independent lookups, instead of one byte (and one dependent lookup) at a time.

const POLY: u16 = 0x1021;

const fn build_tables() -> [[u16; 256]; 8] {
    let mut t = [[0u16; 256]; 8];
    let mut i = 0;
    while i < 256 {
        let mut crc = (i as u16) << 8;
        let mut b = 0;
        while b < 8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ POLY
            } else {
                crc << 1
            };
            b += 1;
        }
        t[0][i] = crc;
        i += 1;
    }
    let mut k = 1;
    while k < 8 {
        let mut i = 0;
        while i < 256 {
            let prev = t[k - 1][i];
            t[k][i] = (prev << 8) ^ t[0][(prev >> 8) as usize];
            i += 1;
        }
        k += 1;
    }
    t
}

static TABLES: [[u16; 256]; 8] = build_tables();

/// The checksum of no bytes.
pub const CRC16_EMPTY: u16 = 0xFFFF;

/// CRC-16/IBM-3740 of `data`.
pub fn crc16(data: &[u8]) -> u16 {
    crc16_update(CRC16_EMPTY, data)
}

/// Continues a CRC over more bytes (start with [`CRC16_EMPTY`]).
pub fn crc16_update(crc: u16, data: &[u8]) -> u16 {
    #[cfg(target_arch = "x86_64")]
    {
        if data.len() >= 16 && clmul::available() {
            // SAFETY: the CPU has PCLMULQDQ (checked just above).
            return unsafe { clmul::update(crc, data) };
        }
    }
    crc16_update_tables(crc, data)
}

/// Carry-less multiplication (PCLMULQDQ). The register is folded into the top of the next
/// big-endian 64-bit word. A 64-byte block's eight words w0..w7 are multiplied by
/// K[i] = x^(64 (7 - i) + 16) mod P independently (no chain from one product to the next),
/// the products XORed into S (under 80 bits), and S reduced once (Barrett: A = S >> 16,
/// q = A ^ hi64(A * MU), crc = lo16(S) ^ lo16(q * 0x1021), MU being floor(x^80 / P) less its
/// x^64 term). Words after the last whole block go one at a time (S = w * x^16).
#[cfg(target_arch = "x86_64")]
mod clmul {
    use std::arch::x86_64::{
        __m128i, _mm_clmulepi64_si128, _mm_cvtsi128_si64, _mm_cvtsi64_si128, _mm_extract_epi64,
        _mm_setzero_si128, _mm_xor_si128,
    };
    use std::sync::atomic::{AtomicU8, Ordering};

    const MU: u64 = 0x1130_3471_a041_b343;
    const K: [u64; 8] = [0x9fe5, 0xbd64, 0xb8e0, 0x8ddc, 0x45b4, 0x10e2, 0xeb23, 0x1021];

    static HAVE: AtomicU8 = AtomicU8::new(0); // 0 unknown, 1 no, 2 yes

    #[inline]
    pub(super) fn available() -> bool {
        match HAVE.load(Ordering::Relaxed) {
            2 => true,
            1 => false,
            _ => {
                let yes = std::arch::is_x86_feature_detected!("pclmulqdq")
                    && std::arch::is_x86_feature_detected!("sse4.1");
                HAVE.store(if yes { 2 } else { 1 }, Ordering::Relaxed);
                yes
            }
        }
    }

    #[inline]
    #[target_feature(enable = "pclmulqdq,sse2,sse4.1")]
    fn mul(a: u64, b: u64) -> __m128i {
        _mm_clmulepi64_si128::<0x00>(_mm_cvtsi64_si128(a as i64), _mm_cvtsi64_si128(b as i64))
    }

    /// # Safety
    /// The CPU must have PCLMULQDQ and SSE4.1.
    #[target_feature(enable = "pclmulqdq,sse2,sse4.1")]
    pub(super) unsafe fn update(mut crc: u16, data: &[u8]) -> u16 {
        let mut blocks = data.chunks_exact(64);
        for b in &mut blocks {
            let mut acc = _mm_setzero_si128();
            for (i, c) in b.chunks_exact(8).enumerate() {
                let mut w = u64::from_be_bytes(c.try_into().expect("eight bytes"));
                if i == 0 {
                    w ^= (crc as u64) << 48;
                }
                acc = _mm_xor_si128(acc, mul(w, K[i]));
            }
            let lo = _mm_cvtsi128_si64(acc) as u64;
            let hi = _mm_extract_epi64::<1>(acc) as u64;
            let a = (lo >> 16) | (hi << 48);
            let q = a ^ (_mm_extract_epi64::<1>(mul(a, MU)) as u64);
            crc = (lo as u16) ^ (_mm_cvtsi128_si64(mul(q, 0x1021)) as u16);
        }
        let mut chunks = blocks.remainder().chunks_exact(8);
        for c in &mut chunks {
            let w = u64::from_be_bytes(c.try_into().expect("eight bytes"));
            let a = w ^ ((crc as u64) << 48);
            let q = a ^ (_mm_extract_epi64::<1>(mul(a, MU)) as u64);
            crc = _mm_cvtsi128_si64(mul(q, 0x1021)) as u16;
        }
        super::crc16_update_tables(crc, chunks.remainder())
    }
}

/// [`crc16_update`] with the slicing-by-8 tables only (any CPU).
pub fn crc16_update_tables(mut crc: u16, data: &[u8]) -> u16 {
    let t = &TABLES;
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        let hi = crc ^ u16::from_be_bytes([c[0], c[1]]);
        crc = t[7][(hi >> 8) as usize]
            ^ t[6][(hi & 0xFF) as usize]
            ^ t[5][c[2] as usize]
            ^ t[4][c[3] as usize]
            ^ t[3][c[4] as usize]
            ^ t[2][c[5] as usize]
            ^ t[1][c[6] as usize]
            ^ t[0][c[7] as usize];
    }
    for &b in chunks.remainder() {
        crc = (crc << 8) ^ t[0][((crc >> 8) as u8 ^ b) as usize];
    }
    crc
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bitwise(data: &[u8]) -> u16 {
        let mut crc: u16 = 0xFFFF;
        for &b in data {
            crc ^= (b as u16) << 8;
            for _ in 0..8 {
                crc = if crc & 0x8000 != 0 {
                    (crc << 1) ^ POLY
                } else {
                    crc << 1
                };
            }
        }
        crc
    }

    #[test]
    fn check_value_and_empty() {
        assert_eq!(crc16(b"123456789"), 0x29B1);
        assert_eq!(crc16(b""), 0xFFFF);
    }

    #[test]
    fn matches_bitwise_reference_at_every_length_and_split() {
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 131 + 17) as u8).collect();
        for n in 0..data.len() {
            assert_eq!(crc16(&data[..n]), bitwise(&data[..n]), "length {n}");
        }
        let whole = crc16(&data);
        for split in [0, 1, 7, 8, 9, 500, 999, 1000] {
            assert_eq!(crc16_update(crc16(&data[..split]), &data[split..]), whole);
        }
        for n in 0..data.len() {
            assert_eq!(
                crc16_update_tables(0xFFFF, &data[..n]),
                bitwise(&data[..n]),
                "tables, length {n}"
            );
        }
    }
}
