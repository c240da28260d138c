package ipc

// CRC-16/IBM-3740 (polynomial 0x1021, init 0xFFFF, no reflection, no final XOR), computed
// slicing-by-8: eight 256-entry tables let the loop fold eight input bytes per step.

var crcTables = func() (t [8][256]uint16) {
	for i := 0; i < 256; i++ {
		crc := uint16(i) << 8
		for j := 0; j < 8; j++ {
			if crc&0x8000 != 0 {
				crc = crc<<1 ^ 0x1021
			} else {
				crc <<= 1
			}
		}
		t[0][i] = crc
	}
	for i := 0; i < 256; i++ {
		for k := 1; k < 8; k++ {
			prev := t[k-1][i]
			t[k][i] = prev<<8 ^ t[0][prev>>8]
		}
	}
	return t
}()

// CRC16 returns the CRC-16/IBM-3740 of data: the checksum field of a frame carrying data.
func CRC16(data []byte) uint16 {
	return crc16Update(0xFFFF, data)
}

func crc16Update(crc uint16, data []byte) uint16 {
	t := &crcTables
	for len(data) >= 8 {
		a := uint16(data[0])<<8 | uint16(data[1])
		a ^= crc
		crc = t[7][a>>8] ^ t[6][a&0xff] ^ t[5][data[2]] ^ t[4][data[3]] ^
			t[3][data[4]] ^ t[2][data[5]] ^ t[1][data[6]] ^ t[0][data[7]]
		data = data[8:]
	}
	for _, b := range data {
		crc = crc<<8 ^ t[0][byte(crc>>8)^b]
	}
	return crc
}
