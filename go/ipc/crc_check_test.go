package ipc

import "testing"

func TestCRCQuick(t *testing.T) {
	if got := CRC16([]byte("123456789")); got != 0x29b1 {
		t.Fatalf("%04x", got)
	}
	if got := CRC16(nil); got != 0xffff {
		t.Fatalf("%04x", got)
	}
	buf := make([]byte, 1000)
	for i := range buf {
		buf[i] = byte(i*7 + 3)
	}
	for n := 0; n < len(buf); n++ {
		crc := uint16(0xffff)
		for _, b := range buf[:n] {
			crc ^= uint16(b) << 8
			for j := 0; j < 8; j++ {
				if crc&0x8000 != 0 {
					crc = crc<<1 ^ 0x1021
				} else {
					crc <<= 1
				}
			}
		}
		if got := CRC16(buf[:n]); got != crc {
			t.Fatalf("n=%d got %04x want %04x", n, got, crc)
		}
	}
}
