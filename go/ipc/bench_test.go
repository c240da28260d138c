package ipc

import (
	"context"
	"io"
	"net"
	"path/filepath"
	"testing"
)

// Benchmarks (go test -bench . -run ^$): client and server in one process.

func BenchmarkRoundTrip64(b *testing.B) {
	path := filepath.Join(b.TempDir(), "b.sock")
	s := NewServer(path, echoHandler)
	if err := s.Listen(); err != nil {
		b.Fatal(err)
	}
	go s.Serve()
	defer s.Shutdown(context.Background())
	c, err := NewClient(path)
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	p := pattern(64)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if _, err := c.Send(p); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkRawFloor64(b *testing.B) {
	path := filepath.Join(b.TempDir(), "f.sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		buf := make([]byte, 68)
		for {
			if _, err := io.ReadFull(c, buf); err != nil {
				return
			}
			c.Write(buf)
		}
	}()
	c, err := net.Dial("unix", path)
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	buf := make([]byte, 68)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		c.Write(buf)
		io.ReadFull(c, buf)
	}
}

func BenchmarkCRC16_64K(b *testing.B) {
	p := pattern(64 << 10)
	b.SetBytes(int64(len(p)))
	for i := 0; i < b.N; i++ {
		CRC16(p)
	}
}
