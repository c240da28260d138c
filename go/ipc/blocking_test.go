package ipc

import (
	"bytes"
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"
)

// Both ways a connection may wait: in a blocking recvmsg outside the runtime's netpoller
// (the default of servers, and of clients when GOMAXPROCS is 2 or more) and in the
// netpoller.
var readModes = []struct {
	name string
	on   bool
}{{"blocking", true}, {"netpoller", false}}

// connEchoServer starts an echo server that hands the Conn of each request it answers to
// the channel it returns, while the channel has room (n).
func connEchoServer(t *testing.T, n int, opts ...Option) (*Server, string, <-chan *Conn) {
	t.Helper()
	conns := make(chan *Conn, n)
	s, path := startServer(t, func(ctx context.Context, req []byte) ([]byte, error) {
		select {
		case conns <- ConnFromContext(ctx):
		default:
		}
		return req, nil
	}, opts...)
	return s, path, conns
}

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
			s, path, seen := connEchoServer(t, 1, WithBlockingReads(m.on))
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

// epollHolds tells whether any epoll set of this process (the runtime's netpoller among
// them) holds the socket behind descriptor fd, under any descriptor number (from
// /proc/self/fdinfo, matching the sockets' inodes).
func epollHolds(t *testing.T, fd int) bool {
	t.Helper()
	want, err := os.Readlink("/proc/self/fd/" + strconv.Itoa(fd))
	if err != nil || !strings.HasPrefix(want, "socket:") {
		t.Fatalf("descriptor %d: %q, %v", fd, want, err)
	}
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		if link, err := os.Readlink("/proc/self/fd/" + e.Name()); err != nil || link != "anon_inode:[eventpoll]" {
			continue
		}
		info, err := os.ReadFile("/proc/self/fdinfo/" + e.Name())
		if err != nil {
			continue
		}
		for _, line := range strings.Split(string(info), "\n") {
			f := strings.Fields(line)
			if len(f) < 2 || f[0] != "tfd:" {
				continue
			}
			if link, err := os.Readlink("/proc/self/fd/" + f[1]); err == nil && link == want {
				return true
			}
		}
	}
	return false
}

func connFD(c *conn) int {
	fd := -1
	c.rawc.Control(func(s uintptr) { fd = int(s) })
	return fd
}

// With blocking reads a connection's socket leaves the runtime's netpoller altogether: no
// epoll set holds it (it would wake the polling thread for every byte either way, whoever
// waits), on the server and on a client, which reads blocking by default when GOMAXPROCS is
// 2 or more. Through the netpoller, the epoll set holds it. Either way requests, big ones
// through shared memory included, are answered, and the descriptors come back.
func TestBlockingConnectionsLeaveTheNetpoller(t *testing.T) {
	for _, m := range readModes {
		t.Run(m.name, func(t *testing.T) {
			_, path, conns := connEchoServer(t, 4, WithBlockingReads(m.on))
			base := openFDs()
			cl, err := NewClient(path, WithBlockingReads(m.on))
			if err != nil {
				t.Fatal(err)
			}
			var sc *Conn
			for _, n := range []int{1, 64 << 10, 4 << 20} {
				got, err := cl.Send(pattern(n))
				if err != nil || !bytes.Equal(got, pattern(n)) {
					t.Fatalf("%d B: %d B back, %v", n, len(got), err)
				}
				if sc == nil {
					sc = <-conns
				}
				if held := epollHolds(t, connFD(sc.c)); held == m.on {
					t.Fatalf("blocking reads %v: an epoll set holds the server's socket: %v", m.on, held)
				}
				if held := epollHolds(t, connFD(cl.c)); held == m.on {
					t.Fatalf("blocking reads %v: an epoll set holds the client's socket: %v", m.on, held)
				}
			}
			cl.Close()
			fdsBackNear(t, base)
		})
	}
}

// By default a server's connections and (when GOMAXPROCS is 2 or more) a client's leave the
// netpoller, except toward a peer in the same process: the runtime hands that one's answer
// to the waiting goroutine without an OS wake-up (an in-process 64 B round trip measured
// 10.5 us in the netpoller, 24 us outside it).
func TestDefaultWaysToWait(t *testing.T) {
	cl := dial(t, spinServer(t)) // a server in a process of its own
	if _, err := cl.Send([]byte("x")); err != nil {
		t.Fatal(err)
	}
	if held, want := epollHolds(t, connFD(cl.c)), runtime.GOMAXPROCS(0) == 1; held != want {
		t.Fatalf("GOMAXPROCS %d, a server in another process: an epoll set holds the client's socket: %v",
			runtime.GOMAXPROCS(0), held)
	}
	_, path, conns := connEchoServer(t, 1)
	local := dial(t, path)
	if _, err := local.Send([]byte("x")); err != nil {
		t.Fatal(err)
	}
	if !epollHolds(t, connFD(local.c)) || !epollHolds(t, connFD((<-conns).c)) {
		t.Fatal("a client and a server in one process left the netpoller")
	}
}

// A server that takes none of a request's bytes is cut after the send timeout, whether the
// client's writes wait in the kernel (ppoll up to the write deadline) or in the
// netpoller; the client keeps no descriptor.
func TestClientCutsAServerThatReadsNothing(t *testing.T) {
	for _, m := range readModes {
		t.Run(m.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "deaf.sock")
			ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
			if err != nil {
				t.Fatal(err)
			}
			defer ln.Close()
			accepted := make(chan *net.UnixConn, 1)
			go func() {
				c, err := ln.AcceptUnix()
				if err != nil {
					return
				}
				// a hello with no shared memory and a 64 MiB limit, then never a read
				c.Write(EncodeFrame(TypeEvent, 0, 0, EncodeHello(Hello{MaxPayload: 64 << 20})))
				accepted <- c
			}()
			base := openFDs()
			cl, err := NewClient(path, WithBlockingReads(m.on), WithSendTimeout(300*time.Millisecond),
				WithTimeout(10*time.Second))
			if err != nil {
				t.Fatal(err)
			}
			peer := <-accepted
			defer peer.Close()
			start := time.Now()
			_, err = cl.Send(make([]byte, 32<<20)) // far more than the socket holds
			el := time.Since(start)
			if !errors.Is(err, ErrClosed) {
				t.Fatalf("want ErrClosed (the server was cut), got %v", err)
			}
			if el < 250*time.Millisecond || el > 3*time.Second {
				t.Fatalf("cut after %v (send timeout 300 ms)", el)
			}
			cl.Close()
			fdsBackNear(t, base+1) // the peer's end is still open
		})
	}
}

// trickleRead takes up to 128 KiB from nc every 150 ms until the peer cuts the connection or
// limit passes; it returns when the cut came (or limit).
func trickleRead(nc *net.UnixConn, limit time.Duration) time.Duration {
	buf := make([]byte, 128<<10)
	start := time.Now()
	for time.Since(start) < limit {
		time.Sleep(150 * time.Millisecond)
		nc.SetReadDeadline(time.Now().Add(20 * time.Millisecond))
		n, err := nc.Read(buf)
		var ne net.Error
		if n == 0 && err != nil && !(errors.As(err, &ne) && ne.Timeout()) {
			break
		}
	}
	return time.Since(start)
}

// A peer that takes a little of a big frame now and then, never enough to finish it within
// the send timeout, is cut at the send timeout, by a server and by a client, waiting in the
// kernel or in the netpoller. (A blocking sendmsg under SO_SNDTIMEO was not cut: its timeout
// starts over for each buffer the kernel allocates.)
func TestATricklingReaderIsCutAtTheSendTimeout(t *testing.T) {
	for _, m := range readModes {
		t.Run("server/"+m.name, func(t *testing.T) {
			_, path, base := hostileServer(t, WithSendTimeout(300*time.Millisecond), WithBlockingReads(m.on))
			p := rawDial(t, path)
			p.write(EncodeFrame(TypeEvent, 0, 0, EncodeHello(Hello{MaxPayload: 64 << 20}))) // no shared memory
			p.write(EncodeFrame(TypeRequest, 0, 1, make([]byte, 16<<20)))                   // an inline echo
			if el := trickleRead(p.nc, 5*time.Second); el > 2*time.Second {
				t.Fatalf("a client trickling its answer's reads was cut after %v (send timeout 300 ms)", el)
			}
			p.nc.Close()
			stillServes(t, path)
			fdsBackNear(t, base)
		})
		t.Run("client/"+m.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "trickle.sock")
			ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
			if err != nil {
				t.Fatal(err)
			}
			defer ln.Close()
			took := make(chan time.Duration, 1)
			go func() {
				c, err := ln.AcceptUnix()
				if err != nil {
					return
				}
				defer c.Close()
				c.Write(EncodeFrame(TypeEvent, 0, 0, EncodeHello(Hello{MaxPayload: 64 << 20})))
				took <- trickleRead(c, 5*time.Second)
			}()
			base := openFDs()
			cl, err := NewClient(path, WithBlockingReads(m.on), WithSendTimeout(300*time.Millisecond),
				WithTimeout(10*time.Second))
			if err != nil {
				t.Fatal(err)
			}
			start := time.Now()
			_, err = cl.Send(make([]byte, 32<<20))
			if el := time.Since(start); !errors.Is(err, ErrClosed) || el > 2*time.Second {
				t.Fatalf("a server trickling its reads: %v after %v (send timeout 300 ms)", err, el)
			}
			cl.Close()
			<-took
			fdsBackNear(t, base)
		})
	}
}

// A client's request timeout holds whether it waits in the kernel (SO_RCVTIMEO, half of what
// is left of the deadline at a time) or in the netpoller, request after request.
func TestRequestTimeoutWaitingEitherWay(t *testing.T) {
	_, path := startServer(t, func(ctx context.Context, req []byte) ([]byte, error) {
		time.Sleep(1500 * time.Millisecond)
		return req, nil
	})
	for _, m := range readModes {
		t.Run(m.name, func(t *testing.T) {
			c := dial(t, path, WithBlockingReads(m.on), WithTimeout(300*time.Millisecond))
			for i := 0; i < 2; i++ {
				start := time.Now()
				_, err := c.Send([]byte("x"))
				if el := time.Since(start); !errors.Is(err, ErrTimeout) || el < 300*time.Millisecond || el > 750*time.Millisecond {
					t.Fatalf("request %d, timeout 300 ms: %v after %v", i, err, el)
				}
			}
		})
	}
}
