package ipc

import "testing"

// crcBitwise is section 3's bit-at-a-time reference.
func crcBitwise(data []byte) uint16 {
	crc := uint16(0xffff)
	for _, b := range data {
		crc ^= uint16(b) << 8
		for j := 0; j < 8; j++ {
			if crc&0x8000 != 0 {
				crc = crc<<1 ^ 0x1021
			} else {
				crc <<= 1
			}
		}
	}
	return crc
}

func TestCRCAgainstTheBitwiseReference(t *testing.T) {
	if got := CRC16([]byte("123456789")); got != 0x29b1 {
		t.Fatalf("%04x", got)
	}
	if got := CRC16(nil); got != 0xffff {
		t.Fatalf("%04x", got)
	}
	buf := make([]byte, 20000)
	for i := range buf {
		buf[i] = byte(i*7 + 3 + i>>8)
	}
	var lengths []int
	for n := 0; n < 300; n++ {
		lengths = append(lengths, n)
	}
	// around the four-lane blocks (4 x crcLane bytes) and their joins
	for _, n := range []int{4*crcLane - 1, 4 * crcLane, 4*crcLane + 1, 8*crcLane + 13, 12*crcLane + 7, len(buf)} {
		lengths = append(lengths, n)
	}
	for _, n := range lengths {
		for _, off := range []int{0, 1, 5} { // unaligned starts too
			if off+n > len(buf) {
				continue
			}
			if got, want := CRC16(buf[off:off+n]), crcBitwise(buf[off:off+n]); got != want {
				t.Fatalf("length %d at %d: got %04x want %04x", n, off, got, want)
			}
		}
	}
}
