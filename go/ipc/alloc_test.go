package ipc

import (
	"runtime"
	"testing"

	"golang.org/x/sys/unix"
)

// TestTheServerAnswersSmallRequestsWithoutAllocating: reading a small Request, running the
// handler and writing its inline answer allocate nothing per request, in the netpoller and
// outside it (an allocation per frame was a closure in the send path; the garbage it made
// ran the collector on the server's one P under load). The client is raw system calls on
// preallocated buffers, so the process's allocation count is the server's.
func TestTheServerAnswersSmallRequestsWithoutAllocating(t *testing.T) {
	if raceEnabled {
		t.Skip("the race detector allocates on its own")
	}
	for _, m := range readModes {
		t.Run(m.name, func(t *testing.T) {
			_, path := startServer(t, echoHandler, WithBlockingReads(m.on))
			p := rawDial(t, path)
			if hello, ok := p.next(); !ok || hello.Type != TypeEvent {
				t.Fatalf("no hello: %+v", hello)
			}
			raw, err := p.nc.SyscallConn()
			if err != nil {
				t.Fatal(err)
			}
			var fd int
			raw.Control(func(f uintptr) { fd = int(f) })
			if err := unix.SetNonblock(fd, false); err != nil {
				t.Fatal(err)
			}
			payload := pattern(64)
			const rounds = 2000
			frames := make([][]byte, rounds+100)
			for i := range frames {
				frames[i] = EncodeFrame(TypeRequest, 0, uint64(i+1), payload)
			}
			reply := make([]byte, HeaderSize+len(payload))
			roundTrip := func(i int) {
				if _, err := unix.Write(fd, frames[i]); err != nil {
					t.Fatalf("write: %v", err)
				}
				for got := 0; got < len(reply); {
					n, err := unix.Read(fd, reply[got:])
					if err != nil || n == 0 {
						t.Fatalf("read: %d, %v", n, err)
					}
					got += n
				}
			}
			for i := 0; i < 100; i++ { // warm up: buffers sized, goroutines started
				roundTrip(i)
			}
			var before, after runtime.MemStats
			runtime.ReadMemStats(&before)
			for i := 100; i < rounds+100; i++ {
				roundTrip(i)
			}
			runtime.ReadMemStats(&after)
			dec := NewDecoder(DefaultMaxPayload)
			dec.Feed(reply)
			fr, ok, perr := dec.Next()
			if !ok || perr != nil || fr.Type != TypeResponse || fr.RequestID != rounds+100 || string(fr.Payload) != string(payload) {
				t.Fatalf("last answer: %+v %v %v", fr, ok, perr)
			}
			if n := after.Mallocs - before.Mallocs; n > rounds/20 {
				t.Fatalf("%d allocations for %d round trips", n, rounds)
			}
		})
	}
}
