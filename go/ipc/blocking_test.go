package ipc

import (
	"context"
	"testing"
	"time"
)

// Both ways a server's connection may wait for its requests: a blocking recvmsg of its own
// (the default) and the runtime's netpoller.
var readModes = []struct {
	name string
	on   bool
}{{"blocking", true}, {"netpoller", false}}

// A frame that trickles in a byte at a time, each byte well within the frame timeout, is
// still cut when the frame timeout runs out: the blocking read's SO_RCVTIMEO is what is left
// of the frame's deadline, not a fresh timeout per read.
func TestHostileTricklingFrameIsCut(t *testing.T) {
	for _, m := range readModes {
		t.Run(m.name, func(t *testing.T) {
			_, path, base := hostileServer(t, WithFrameTimeout(300*time.Millisecond), WithBlockingReads(m.on))
			p := rawDial(t, path)
			frame := EncodeFrame(TypeRequest, 0, 1, pattern(200))
			start := time.Now()
			cut := false
			for i := 0; i < len(frame)-1; i++ {
				if _, err := p.nc.Write(frame[i : i+1]); err != nil {
					cut = true
					break
				}
				time.Sleep(40 * time.Millisecond)
				if time.Since(start) > 3*time.Second {
					break
				}
			}
			if !cut {
				p.expectEOF()
			}
			if el := time.Since(start); el > 2*time.Second {
				t.Fatalf("a trickling frame was cut only after %v (frame timeout 300 ms)", el)
			}
			stillServes(t, path)
			fdsBackNear(t, base)
		})
	}
}

// Conn.Close and Shutdown wake a connection whose reader waits for a request that never
// comes: the client sees the end at once, Shutdown does not wait for its deadline, and the
// descriptors (the reader's own included) come back.
func TestCloseAndShutdownWakeAnIdleReader(t *testing.T) {
	for _, m := range readModes {
		t.Run(m.name, func(t *testing.T) {
			var got *Conn
			seen := make(chan *Conn, 1)
			s, path := startServer(t, func(ctx context.Context, req []byte) ([]byte, error) {
				select {
				case seen <- ConnFromContext(ctx):
				default:
				}
				return req, nil
			}, WithBlockingReads(m.on))
			stillServes(t, path)
			<-seen // that was stillServes's connection
			base := openFDs()
			p := rawDial(t, path)
			p.write(EncodeFrame(TypeRequest, 0, 1, []byte("hi")))
			p.expectEcho(1, []byte("hi"))
			got = <-seen
			time.Sleep(50 * time.Millisecond) // the reader is back waiting
			start := time.Now()
			got.Close()
			p.expectEOF()
			if el := time.Since(start); el > time.Second {
				t.Fatalf("Conn.Close took %v to reach the client", el)
			}
			p.nc.Close()
			fdsBackNear(t, base)

			idle := rawDial(t, path) // an idle connection, then a shutdown
			idle.write(EncodeFrame(TypeRequest, 0, 2, []byte("x")))
			idle.expectEcho(2, []byte("x"))
			time.Sleep(50 * time.Millisecond)
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			start = time.Now()
			if err := s.Shutdown(ctx); err != nil {
				t.Fatalf("Shutdown: %v", err)
			}
			if el := time.Since(start); el > time.Second {
				t.Fatalf("Shutdown waited %v for an idle connection", el)
			}
			idle.expectEOF()
		})
	}
}

// The hostile cases that touch the reading path, through the netpoller too.
func TestHostileNetpollerReads(t *testing.T) {
	_, path, base := hostileServer(t, WithBlockingReads(false), WithFrameTimeout(200*time.Millisecond))
	p := rawDial(t, path)
	bad := EncodeFrame(TypeRequest, 0, 9, []byte("bad"))
	bad[len(bad)-1] ^= 0xff // corrupt the payload: its CRC no longer matches
	p.write(bad)
	p.expectError(9, CodeChecksum)
	p.write(EncodeFrame(TypeRequest, 0, 10, []byte("ok")))
	p.expectEcho(10, []byte("ok"))
	p.write(EncodeFrame(TypeRequest, 0, 11, pattern(100))[:50])
	p.expectEOF()
	stillServes(t, path)
	fdsBackNear(t, base)
}
