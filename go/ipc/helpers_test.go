package ipc

import (
	"bytes"
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func pattern(n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte((i*31 + 7) % 251)
	}
	return b
}

func echoHandler(_ context.Context, req []byte) ([]byte, error) { return req, nil }

// startServer runs a server on a fresh socket until the test ends.
func startServer(t *testing.T, h Handler, opts ...Option) (*Server, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "s.sock")
	s := NewServer(path, h, opts...)
	if err := s.Listen(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- s.Serve() }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		s.Shutdown(ctx)
		if err := <-done; !errors.Is(err, ErrServerClosed) {
			t.Errorf("Serve returned %v", err)
		}
	})
	return s, path
}

func dial(t *testing.T, path string, opts ...Option) *Client {
	t.Helper()
	c, err := NewClient(path, opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func openFDs() int {
	ents, _ := os.ReadDir("/proc/self/fd")
	return len(ents)
}

func memfdMaps() int {
	b, _ := os.ReadFile("/proc/self/maps")
	return bytes.Count(b, []byte("/memfd:"))
}

// eventually polls cond for up to 5 s.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting: %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// fdsBackNear waits until the process has at most base+slack descriptors open.
func fdsBackNear(t *testing.T, base int) {
	t.Helper()
	eventually(t, "descriptors back to baseline", func() bool { return openFDs() <= base+2 })
}

// stillServes checks a fresh client gets an echo.
func stillServes(t *testing.T, path string) {
	t.Helper()
	c, err := NewClient(path)
	if err != nil {
		t.Fatalf("the server no longer accepts: %v", err)
	}
	defer c.Close()
	got, err := c.Send([]byte("still there?"))
	if err != nil || string(got) != "still there?" {
		t.Fatalf("the server no longer answers: %q, %v", got, err)
	}
}

// rawPeer is a hostile or minimal peer speaking bytes on a Unix socket.
type rawPeer struct {
	t   *testing.T
	nc  *net.UnixConn
	dec *Decoder
	q   []Frame
}

func rawDial(t *testing.T, path string) *rawPeer {
	t.Helper()
	nc, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nc.Close() })
	return &rawPeer{t: t, nc: nc, dec: NewDecoder(DefaultMaxPayload)}
}

func (p *rawPeer) write(b []byte) {
	p.t.Helper()
	if _, err := p.nc.Write(b); err != nil {
		p.t.Fatalf("raw write: %v", err)
	}
}

func (p *rawPeer) writeFD(b []byte, fds ...int) {
	p.t.Helper()
	if _, _, err := p.nc.WriteMsgUnix(b, unix.UnixRights(fds...), nil); err != nil {
		p.t.Fatalf("raw sendmsg: %v", err)
	}
}

// next returns the next frame, or ok false at EOF (or after 5 s).
func (p *rawPeer) next() (Frame, bool) {
	p.t.Helper()
	p.nc.SetReadDeadline(time.Now().Add(5 * time.Second))
	for {
		if len(p.q) > 0 {
			f := p.q[0]
			p.q = p.q[1:]
			return f, true
		}
		for {
			f, ok, perr := p.dec.Next()
			if perr != nil {
				p.t.Fatalf("raw peer got a bad stream: %v", perr)
			}
			if !ok {
				break
			}
			f.Payload = append([]byte(nil), f.Payload...)
			p.q = append(p.q, f)
		}
		if len(p.q) > 0 {
			continue
		}
		n, err := p.nc.Read(p.dec.Space())
		if n > 0 {
			p.dec.Commit(n)
		}
		if err != nil && n == 0 {
			return Frame{}, false
		}
	}
}

// nextNonControl skips control Events (hello, HREL...) and returns the next other frame.
func (p *rawPeer) nextNonControl() (Frame, []Frame, bool) {
	var controls []Frame
	for {
		f, ok := p.next()
		if !ok {
			return f, controls, false
		}
		if f.Type == TypeEvent && f.RequestID == 0 {
			controls = append(controls, f)
			continue
		}
		return f, controls, true
	}
}

// expectEOF reads until the server closes the connection.
func (p *rawPeer) expectEOF() {
	p.t.Helper()
	for {
		if _, ok := p.next(); !ok {
			return
		}
	}
}

func (p *rawPeer) expectError(rid uint64, code uint32) []Frame {
	p.t.Helper()
	f, controls, ok := p.nextNonControl()
	if !ok {
		p.t.Fatalf("connection closed, want Error %d", code)
	}
	if f.Type != TypeError || f.RequestID != rid {
		p.t.Fatalf("got type %d id %d, want Error for %d", f.Type, f.RequestID, rid)
	}
	got, msg, _ := DecodeErrorPayload(f.Payload)
	if got != code {
		p.t.Fatalf("got Error %d (%s), want %d", got, msg, code)
	}
	return controls
}

func (p *rawPeer) expectEcho(rid uint64, payload []byte) {
	p.t.Helper()
	f, _, ok := p.nextNonControl()
	if !ok || f.Type != TypeResponse || f.RequestID != rid || !bytes.Equal(f.Payload, payload) {
		p.t.Fatalf("want the echo of request %d, got ok=%v %+v", rid, ok, f)
	}
}

// shmHello: a raw peer's hello announcing shared memory.
func shmHello() []byte {
	return EncodeFrame(TypeEvent, 0, 0, EncodeHello(Hello{Features: FeatureSHM, MaxPayload: DefaultMaxPayload,
		ShmReceiveBytes: DefaultShmReceiveBytes, ShmReceiveSegments: DefaultShmReceiveSegments}))
}

// sealedMemfd makes a memfd of size bytes holding data, with the given seals.
func sealedMemfd(t *testing.T, size int64, data []byte, seals int) int {
	t.Helper()
	fd, err := unix.MemfdCreate("test", unix.MFD_CLOEXEC|unix.MFD_ALLOW_SEALING)
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.Ftruncate(fd, size); err != nil {
		t.Fatal(err)
	}
	if len(data) > 0 {
		unix.Pwrite(fd, data, 0)
	}
	if seals != 0 {
		if _, err := unix.FcntlInt(uintptr(fd), unix.F_ADD_SEALS, seals); err != nil {
			t.Fatal(err)
		}
	}
	return fd
}
