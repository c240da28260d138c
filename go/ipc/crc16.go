package ipc

// CRC-16/IBM-3740 (polynomial 0x1021, init 0xFFFF, no reflection, no final XOR), computed
// slicing-by-8 (eight 256-entry tables fold eight input bytes per step) over four lanes at
// once: each step of a lane depends on the one before, so four independent lanes keep the
// CPU busy. The CRC is linear, so the lanes are joined by "shifting" a lane's register over
// the length of a lane of zero bytes (two 256-entry tables) and XORing the next one in.

const crcLane = 1024 // bytes per lane; a block is four lanes

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

// crcShift[0][b] and crcShift[1][b]: the register after crcLane zero bytes, starting from
// b<<8 and from b.
var crcShift = func() (s [2][256]uint16) {
	zeros := make([]byte, crcLane)
	for b := 0; b < 256; b++ {
		s[0][b] = crc16Bytewise(uint16(b)<<8, zeros)
		s[1][b] = crc16Bytewise(uint16(b), zeros)
	}
	return s
}()

// CRC16 returns the CRC-16/IBM-3740 of data: the checksum field of a frame carrying data.
func CRC16(data []byte) uint16 {
	return crc16Update(0xFFFF, data)
}

func crc16Bytewise(crc uint16, data []byte) uint16 {
	t := &crcTables[0]
	for _, b := range data {
		crc = crc<<8 ^ t[byte(crc>>8)^b]
	}
	return crc
}

func crc16Step8(crc uint16, p []byte) uint16 {
	t := &crcTables
	_ = p[7]
	a := (uint16(p[0])<<8 | uint16(p[1])) ^ crc
	return t[7][byte(a>>8)] ^ t[6][byte(a)] ^ t[5][p[2]] ^ t[4][p[3]] ^
		t[3][p[4]] ^ t[2][p[5]] ^ t[1][p[6]] ^ t[0][p[7]]
}

func crcShiftLane(x uint16) uint16 {
	return crcShift[0][byte(x>>8)] ^ crcShift[1][byte(x)]
}

func crc16Update(crc uint16, data []byte) uint16 {
	for len(data) >= 4*crcLane {
		l0, l1, l2, l3 := data[:crcLane], data[crcLane:2*crcLane], data[2*crcLane:3*crcLane], data[3*crcLane:4*crcLane]
		c0, c1, c2, c3 := crc, uint16(0), uint16(0), uint16(0)
		for i := 0; i+8 <= crcLane; i += 8 {
			c0 = crc16Step8(c0, l0[i:])
			c1 = crc16Step8(c1, l1[i:])
			c2 = crc16Step8(c2, l2[i:])
			c3 = crc16Step8(c3, l3[i:])
		}
		crc = crcShiftLane(crcShiftLane(crcShiftLane(c0)^c1)^c2) ^ c3
		data = data[4*crcLane:]
	}
	for len(data) >= 8 {
		crc = crc16Step8(crc, data)
		data = data[8:]
	}
	return crc16Bytewise(crc, data)
}
