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
pub fn crc16_update(mut crc: u16, data: &[u8]) -> u16 {
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
    }
}
