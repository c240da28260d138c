package ipc

// Hostile peers on raw sockets: each sends the worst value of something it controls, then
// the test checks the server still serves and that descriptors are back near the baseline.

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// hostileServer starts an echo server whose connections wait as they do toward a peer in
// another process (outside the netpoller), unless opts say otherwise.
func hostileServer(t *testing.T, opts ...Option) (*Server, string, int) {
	t.Helper()
	s, path := startServer(t, echoHandler, append([]Option{WithBlockingReads(true)}, opts...)...)
	stillServes(t, path) // warm up: goroutines, buffers
	return s, path, openFDs()
}

func TestHostileBadCRCIsRecoverable(t *testing.T) {
	_, path, base := hostileServer(t)
	p := rawDial(t, path)
	f := EncodeFrame(TypeRequest, 0, 77, []byte("bad"))
	f[15] ^= 0x01
	p.write(f)
	p.expectError(77, CodeChecksum)
	p.write(EncodeFrame(TypeRequest, 0, 78, []byte("good")))
	p.expectEcho(78, []byte("good"))
	p.nc.Close()
	stillServes(t, path)
	fdsBackNear(t, base)
}

func TestHostileOversizedLength(t *testing.T) {
	s, path, base := hostileServer(t)
	p := rawDial(t, path)
	h := Header{Version: version10, Type: TypeRequest, Length: 0xFFFFFFFF, RequestID: 9}
	p.write(h.Encode())
	p.expectError(9, CodeTooLarge)
	p.expectEOF()
	stillServes(t, path)
	fdsBackNear(t, base)
	if s.pending.Load() != 0 {
		t.Fatalf("%d bytes of the receive budget still taken", s.pending.Load())
	}
}

func TestHostileBadMagicAfterTwoBytes(t *testing.T) {
	_, path, base := hostileServer(t)
	p := rawDial(t, path)
	p.write([]byte("GE")) // an HTTP client, say: refused after two bytes
	p.expectError(0, CodeBadHeader)
	p.expectEOF()
	stillServes(t, path)
	fdsBackNear(t, base)
}

func TestHostileUnknownTypeAndMajorVersion(t *testing.T) {
	_, path, base := hostileServer(t)
	for _, h := range []Header{{Version: 0x0200, Type: TypeRequest}, {Version: version10, Type: 99, RequestID: 5}} {
		p := rawDial(t, path)
		p.write(h.Encode())
		p.expectError(h.RequestID, CodeBadHeader)
		p.expectEOF()
	}
	stillServes(t, path)
	fdsBackNear(t, base)
}

func TestHostileReservedFlagsSkipped(t *testing.T) {
	_, path, base := hostileServer(t)
	p := rawDial(t, path)
	payload := pattern(100 << 10) // skipped unread, then the stream resynchronises
	h := Header{Version: version10, Type: TypeRequest, Flags: 0x0100, Length: uint32(len(payload)),
		Checksum: CRC16(payload), RequestID: 3}
	p.write(append(h.Encode(), payload...))
	p.expectError(3, CodeUnsupportedFlags)
	p.write(EncodeFrame(TypeRequest, FlagCompressed, 4, []byte("zz"))) // never negotiated
	p.expectError(4, CodeUnsupportedFlags)
	p.write(EncodeFrame(TypeRequest, 0, 5, []byte("ok")))
	p.expectEcho(5, []byte("ok"))
	p.nc.Close()
	fdsBackNear(t, base)
}

func TestHostileGarbageHellos(t *testing.T) {
	_, path, base := hostileServer(t)
	p := rawDial(t, path)
	many := []byte("HELO")
	many = binary.LittleEndian.AppendUint64(many, 1<<40) // a count no payload can hold
	for _, junk := range [][]byte{
		[]byte("HELO"), many, pattern(4000), append([]byte("HELO"), pattern(5000)...),
		EncodeHello(Hello{Features: 0, MaxPayload: 0}),       // the first one understood
		EncodeHello(Hello{Features: 0, MaxPayload: 1 << 20}), // later hellos change nothing
	} {
		p.write(EncodeFrame(TypeEvent, 0, 0, junk))
	}
	// the last one was a hello with a limit of 0 for Requests: the server must keep to it
	p.write(EncodeFrame(TypeRequest, 0, 6, []byte("hi")))
	f, _, ok := p.nextNonControl()
	if !ok || f.Type != TypeError {
		t.Fatalf("want an Error (the answer is over our announced limit of 0), got %+v", f)
	}
	if code, _, _ := DecodeErrorPayload(f.Payload); code != CodeTooLarge {
		t.Fatalf("answer over our limit: code %d", code)
	}
	p.nc.Close()
	stillServes(t, path)
	fdsBackNear(t, base)
}

func TestHostileBogusDescriptors(t *testing.T) {
	_, path, base := hostileServer(t)
	p := rawDial(t, path)
	p.write(EncodeFrame(TypeRequest, FlagSHM, 1, Descriptor{SegmentID: 1, Size: 4096, Length: 1}.Encode()))
	p.expectError(1, CodeShmError) // before any hello: not negotiated
	p.write(shmHello())
	cases := []struct {
		desc     []byte
		handBack string
	}{
		{[]byte("short"), ""},
		{Descriptor{SegmentID: 0, Size: 4096, Length: 1}.Encode(), ""},
		{Descriptor{SegmentID: 9, Flags: 0x10, Size: 4096, Length: 1}.Encode(), "HREJ"},
		{Descriptor{SegmentID: 9, Size: 4096, Length: 1}.Encode(), "HREJ"},                        // unknown id
		{Descriptor{SegmentID: 9, Flags: DescNewSegment, Size: 4096, Length: 1}.Encode(), "HREJ"}, // no fd
		{Descriptor{SegmentID: 9, Flags: DescPeerSegment, Size: 4096, Length: 1}.Encode(), ""},    // not ours
		{Descriptor{SegmentID: 9, Flags: DescNewSegment | DescPeerSegment, Size: 1}.Encode(), ""},
	}
	for i, c := range cases {
		rid := uint64(100 + i)
		p.write(EncodeFrame(TypeRequest, FlagSHM, rid, c.desc))
		// the hand-back is sent before the Error
		controls := p.expectError(rid, CodeShmError)
		var got string
		for _, f := range controls {
			if m, ids, ok := ParseControl(f.Payload); ok && len(ids) == 1 && ids[0] == 9 {
				got = m
			}
		}
		if got != c.handBack {
			t.Fatalf("case %d: handed back %q, want %q", i, got, c.handBack)
		}
	}
	p.write(EncodeFrame(TypeRequest, 0, 7, []byte("ok")))
	p.expectEcho(7, []byte("ok"))
	p.nc.Close()
	stillServes(t, path)
	fdsBackNear(t, base)
}

// refusedSegment sends a NEW_SEGMENT Request with fd, and expects SHM_ERROR and an HREJ.
func refusedSegment(t *testing.T, p *rawPeer, rid uint64, d Descriptor, fd int) {
	t.Helper()
	p.writeFD(EncodeFrame(TypeRequest, FlagSHM, rid, d.Encode()), fd)
	unix.Close(fd)
	controls := p.expectError(rid, CodeShmError)
	if len(controls) == 0 || !bytes.Equal(controls[len(controls)-1].Payload, EncodeControl("HREJ", []uint32{d.SegmentID})) {
		t.Fatalf("request %d: no HREJ for segment %d before the Error", rid, d.SegmentID)
	}
}

func TestHostileMemfds(t *testing.T) {
	_, path, base := hostileServer(t)
	p := rawDial(t, path)
	p.write(shmHello())
	seals := unix.F_SEAL_SHRINK | unix.F_SEAL_GROW | unix.F_SEAL_SEAL
	// unsealed: the owner could truncate it under the mapping (SIGBUS)
	refusedSegment(t, p, 1, Descriptor{SegmentID: 1, Flags: DescNewSegment, Size: 4096, Length: 10},
		sealedMemfd(t, 4096, pattern(10), 0))
	// smaller than the segment size it claims
	refusedSegment(t, p, 2, Descriptor{SegmentID: 2, Flags: DescNewSegment, Size: 1 << 20, Length: 10},
		sealedMemfd(t, 4096, pattern(10), seals))
	// a sparse 1 TiB memfd: over the 1 GiB per-connection bound, so never mapped
	refusedSegment(t, p, 3, Descriptor{SegmentID: 3, Flags: DescNewSegment, Size: 1 << 40, Length: 10},
		sealedMemfd(t, 1<<40, pattern(10), seals))
	// a pipe is no regular file
	var pipe [2]int
	unix.Pipe2(pipe[:], unix.O_CLOEXEC)
	unix.Close(pipe[1])
	refusedSegment(t, p, 4, Descriptor{SegmentID: 4, Flags: DescNewSegment, Size: 4096, Length: 10}, pipe[0])
	// region past the end of a good segment
	refusedSegment(t, p, 5, Descriptor{SegmentID: 5, Flags: DescNewSegment, Size: 4096, Offset: 4090, Length: 10},
		sealedMemfd(t, 4096, pattern(10), seals))
	// extra descriptors on a plain frame are closed
	extra := []int{sealedMemfd(t, 4096, nil, 0), sealedMemfd(t, 4096, nil, 0), sealedMemfd(t, 4096, nil, 0)}
	p.writeFD(EncodeFrame(TypeRequest, 0, 6, []byte("plain")), extra...)
	for _, fd := range extra {
		unix.Close(fd)
	}
	p.expectEcho(6, []byte("plain"))
	// and a good one still works, echoed back into the same segment (PEER_SEGMENT)
	data := pattern(70000)
	p.writeFD(EncodeFrame(TypeRequest, FlagSHM, 7, Descriptor{SegmentID: 8, Flags: DescNewSegment,
		Size: 1 << 17, Length: uint64(len(data))}.Encode()), sealedMemfd(t, 1<<17, data, seals))
	f, _, ok := p.nextNonControl()
	if !ok || f.Type != TypeResponse || f.Flags != FlagSHM {
		t.Fatalf("want an SHM echo, got %+v", f)
	}
	d, valid := DecodeDescriptor(f.Payload)
	if !valid || d.Flags != DescPeerSegment || d.SegmentID != 8 || d.Length != uint64(len(data)) {
		t.Fatalf("echo descriptor %+v", d)
	}
	hrel, ok := p.next() // the HREL for segment 8 follows the echo
	if m, ids, _ := ParseControl(hrel.Payload); !ok || m != "HREL" || len(ids) != 1 || ids[0] != 8 {
		t.Fatalf("want HREL 8 after the echo, got %q", hrel.Payload)
	}
	p.nc.Close()
	stillServes(t, path)
	fdsBackNear(t, base)
	eventually(t, "the server unmaps the dead peer's segment", func() bool { return memfdMaps() == 0 })
}

func TestHostileTooManyDescriptors(t *testing.T) {
	_, path, base := hostileServer(t)
	p := rawDial(t, path)
	fds := make([]int, 200)
	for i := range fds {
		fds[i] = sealedMemfd(t, 4096, nil, 0)
	}
	for i := 0; i < len(fds); i += 50 {
		p.writeFD(EncodeFrame(TypeEvent, 0, 1, []byte("e")), fds[i:i+50]...)
	}
	for _, fd := range fds {
		unix.Close(fd)
	}
	p.write(EncodeFrame(TypeRequest, 0, 2, []byte("ok")))
	p.expectEcho(2, []byte("ok"))
	fdsBackNear(t, base+1) // the raw connection itself is still open
	p.nc.Close()
	fdsBackNear(t, base)
}

// One message carrying more descriptors than the control buffer holds (MSG_CTRUNC): the
// kernel drops what does not fit, we close what arrived, and the connection still serves.
func TestHostileDescriptorsOverflowControlBuffer(t *testing.T) {
	_, path, base := hostileServer(t)
	p := rawDial(t, path)
	fds := make([]int, 250) // SCM_MAX_FD is 253
	for i := range fds {
		fds[i] = sealedMemfd(t, 4096, nil, 0)
	}
	p.writeFD(EncodeFrame(TypeEvent, 0, 1, []byte("e")), fds...)
	for _, fd := range fds {
		unix.Close(fd)
	}
	p.write(EncodeFrame(TypeRequest, 0, 2, []byte("ok")))
	p.expectEcho(2, []byte("ok"))
	fdsBackNear(t, base+1) // the raw connection itself is still open
	p.nc.Close()
	fdsBackNear(t, base)
}

func TestHostilePeerDiesMidFrame(t *testing.T) {
	s, path, base := hostileServer(t)
	// a large frame's header and part of its payload: the server reserves its length
	p := rawDial(t, path)
	payload := pattern(8 << 20)
	p.write(append(Header{Version: version10, Type: TypeRequest, Length: uint32(len(payload)),
		Checksum: CRC16(payload), RequestID: 1}.Encode(), payload[:1<<20]...))
	eventually(t, "the receive budget is taken", func() bool { return s.pending.Load() > 0 })
	p.nc.Close()
	eventually(t, "the receive budget comes back", func() bool { return s.pending.Load() == 0 })
	// half a header
	p = rawDial(t, path)
	p.write(EncodeFrame(TypeRequest, 0, 1, []byte("x"))[:10])
	p.nc.Close()
	stillServes(t, path)
	fdsBackNear(t, base)
}

func TestHostileReceiveBudget(t *testing.T) {
	s, path, base := hostileServer(t, WithMaxPendingBytes(1<<20))
	p := rawDial(t, path)
	h := Header{Version: version10, Type: TypeRequest, Length: 2 << 20, RequestID: 4}
	p.write(h.Encode()) // over the budget: refused, its payload skipped as it comes
	p.expectError(4, CodeUnavailable)
	p.write(make([]byte, 2<<20))
	p.write(EncodeFrame(TypeRequest, 0, 5, []byte("ok")))
	p.expectEcho(5, []byte("ok"))
	p.nc.Close()
	fdsBackNear(t, base)
	if s.pending.Load() != 0 {
		t.Fatalf("budget still taken: %d", s.pending.Load())
	}
}

func TestHostileSlowFrameIsCut(t *testing.T) {
	_, path, base := hostileServer(t, WithFrameTimeout(200*time.Millisecond))
	p := rawDial(t, path)
	p.write(EncodeFrame(TypeRequest, 0, 1, pattern(100))[:50])
	start := time.Now()
	p.expectEOF()
	if time.Since(start) > 3*time.Second {
		t.Fatalf("cut after %v", time.Since(start))
	}
	stillServes(t, path)
	fdsBackNear(t, base)
}

// A raw server that dies in the middle of an answer: the client fails promptly, and keeps
// no mapping.
func TestClientServerDiesMidFrame(t *testing.T) {
	path := t.TempDir() + "/raw.sock"
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		nc, err := ln.AcceptUnix()
		if err != nil {
			return
		}
		nc.Write(shmHello())
		buf := make([]byte, 4096)
		nc.Read(buf) // hello and the request
		// a Request to the client (it must refuse it), then half a Response, then death
		nc.Write(EncodeFrame(TypeRequest, 0, 5, []byte("serve me")))
		nc.Write(EncodeFrame(TypeResponse, 0, 1, pattern(1000))[:300])
		time.Sleep(50 * time.Millisecond)
		nc.Close()
	}()
	c := dial(t, path)
	start := time.Now()
	_, err = c.Send([]byte("x"))
	if !errors.Is(err, ErrClosed) || time.Since(start) > 2*time.Second {
		t.Fatalf("got %v after %v", err, time.Since(start))
	}
	c.Close()
	if n := memfdMaps(); n != 0 {
		t.Fatalf("%d memfd mappings left", n)
	}
}

func TestClientRefusesRequests(t *testing.T) {
	path := t.TempDir() + "/raw.sock"
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	got := make(chan Frame, 1)
	go func() {
		nc, err := ln.AcceptUnix()
		if err != nil {
			return
		}
		defer nc.Close()
		p := &rawPeer{t: t, nc: nc, dec: NewDecoder(DefaultMaxPayload)}
		nc.Write(EncodeFrame(TypeRequest, 0, 5, []byte("serve me")))
		f, _, _ := p.nextNonControl()
		got <- f
	}()
	dial(t, path)
	select {
	case f := <-got:
		if code, _, _ := DecodeErrorPayload(f.Payload); f.Type != TypeError || f.RequestID != 5 || code != CodeUnavailable {
			t.Fatalf("the client answered %+v", f)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("no answer")
	}
}

// A Response (or an Event) through shared memory that nothing waits for: the server hands
// the segment back and keeps no mapping once the peer is gone.
func TestHostileUnsolicitedShmFrames(t *testing.T) {
	_, path, base := hostileServer(t)
	p := rawDial(t, path)
	p.write(shmHello())
	seals := unix.F_SEAL_SHRINK | unix.F_SEAL_GROW | unix.F_SEAL_SEAL
	for i, typ := range []uint32{TypeResponse, TypeEvent} {
		id := uint32(20 + i)
		p.writeFD(EncodeFrame(typ, FlagSHM, 99, Descriptor{SegmentID: id, Flags: DescNewSegment,
			Size: 1 << 16, Length: 100}.Encode()), sealedMemfd(t, 1<<16, pattern(100), seals))
		for {
			f, ok := p.next()
			if !ok {
				t.Fatal("closed")
			}
			if m, ids, ok := ParseControl(f.Payload); ok && m == "HREL" && len(ids) == 1 && ids[0] == id {
				break
			}
		}
	}
	p.write(EncodeFrame(TypeRequest, 0, 1, []byte("ok")))
	p.expectEcho(1, []byte("ok"))
	p.nc.Close()
	fdsBackNear(t, base)
	eventually(t, "no memfd mapping left", func() bool { return memfdMaps() == 0 })
}

// A client that reads nothing: Events pushed to it never make the server wait; once more
// than the send queue bound waits for it, it is cut, and the other clients are served.
func TestHostileClientThatNeverReads(t *testing.T) {
	s, path, base := hostileServer(t, WithSendQueueBytes(1<<20))
	good := dial(t, path)
	var got atomic.Int64
	good.OnEvent(func(p []byte) { got.Add(1) })
	p := rawDial(t, path) // sends no hello, reads nothing
	p.write(EncodeFrame(TypeRequest, 0, 1, []byte("hi")))
	eventually(t, "both connected", func() bool {
		s.mu.Lock()
		defer s.mu.Unlock()
		return len(s.conns) == 2
	})
	ev := pattern(60 << 10)
	var inBroadcast time.Duration
	for i := 0; i < 100; i++ { // 6 MB: far over what the socket and the 1 MiB backlog hold
		start := time.Now()
		s.Broadcast(ev)
		inBroadcast += time.Since(start)
		// the good client keeps up (a client that lags by the bound is cut too: that is the rule)
		eventually(t, "the good client reads the Event", func() bool { return got.Load() == int64(i+1) })
	}
	if inBroadcast > 3*time.Second {
		t.Fatalf("Broadcast waited for a client that does not read: %v", inBroadcast)
	}
	eventually(t, "the silent client is cut", func() bool {
		s.mu.Lock()
		defer s.mu.Unlock()
		return len(s.conns) == 1
	})
	eventually(t, "the good client got every Event", func() bool { return got.Load() == 100 })
	if ans, err := good.Send([]byte("ok")); err != nil || string(ans) != "ok" {
		t.Fatalf("the good client: %q %v", ans, err)
	}
	p.nc.Close()
	fdsBackNear(t, base+1) // the good client's connection (both ends) remains
}

// ringSwitch is a valid HRNG payload (section 9b): layout version 2, a ring of 256 KiB.
func ringSwitch() []byte {
	p := binary.LittleEndian.AppendUint32([]byte("HRNG"), 2)
	return binary.LittleEndian.AppendUint64(p, 262144)
}

// An HRNG on a connection that did not negotiate RING (this port never announces it) is a
// fatal violation (section 8a): its sender's next bytes would be in a ring, not on the
// socket. The server answers BAD_HEADER with request id 0, reads nothing after it (the
// Request behind it is not answered), closes, and serves new connections; a peer whose own
// hello announces RING changes nothing. An HRNG with a flag is no control Event anybody
// understands: ignored as before, as are magics that are not HRNG.
func TestHostileRingSwitchIsFatal(t *testing.T) {
	ringHello := EncodeFrame(TypeEvent, 0, 0, EncodeHello(Hello{Features: FeatureSHM | FeatureRing,
		MaxPayload: DefaultMaxPayload, ShmReceiveBytes: DefaultShmReceiveBytes,
		ShmReceiveSegments: DefaultShmReceiveSegments}))
	for _, blocking := range []bool{false, true} {
		_, path, base := hostileServer(t, WithBlockingReads(blocking))
		for _, hello := range [][]byte{nil, shmHello(), ringHello} {
			p := rawDial(t, path)
			p.write(hello)
			p.write(EncodeFrame(TypeRequest, 0, 1, []byte("before")))
			p.expectEcho(1, []byte("before"))
			stream := EncodeFrame(TypeEvent, 0, 0, ringSwitch())
			stream = append(stream, EncodeFrame(TypeRequest, 0, 2, []byte("after"))...)
			p.write(stream)
			f, _, ok := p.nextNonControl()
			code, msg, _ := DecodeErrorPayload(f.Payload)
			if !ok || f.Type != TypeError || f.RequestID != 0 || code != CodeBadHeader ||
				!strings.Contains(msg, "did not negotiate the ring") {
				t.Fatalf("blocking %v: want BAD_HEADER for request 0, got ok=%v %+v (%d %q)", blocking, ok, f, code, msg)
			}
			if f, _, ok := p.nextNonControl(); ok {
				t.Fatalf("blocking %v: the server went on after the HRNG: %+v", blocking, f)
			}
			p.nc.Close()
		}
		p := rawDial(t, path)
		for _, flags := range []uint16{FlagCompressed, FlagSHM} {
			p.write(EncodeFrame(TypeEvent, flags, 0, ringSwitch()))
		}
		for _, other := range []string{"HRNX", "HRN", "HREL"} {
			p.write(EncodeFrame(TypeEvent, 0, 0, append([]byte(other), ringSwitch()[4:]...)))
		}
		p.write(EncodeFrame(TypeRequest, 0, 3, []byte("ok")))
		p.expectEcho(3, []byte("ok"))
		p.nc.Close()
		stillServes(t, path)
		fdsBackNear(t, base)
	}
}

// The client side of the same rule: a server that sends an HRNG (RING was not negotiated)
// fails the request waiting for an answer, or the next one, with ErrClosed at once, and the
// client closes the connection without answering.
func TestClientRingSwitchIsFatal(t *testing.T) {
	for _, pending := range []bool{true, false} {
		path := t.TempDir() + "/raw.sock"
		ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		sent := make(chan struct{})
		closed := make(chan error, 1)
		go func() {
			nc, err := ln.AcceptUnix()
			if err != nil {
				closed <- err
				return
			}
			defer nc.Close()
			nc.Write(shmHello())
			if pending {
				p := &rawPeer{t: t, nc: nc, dec: NewDecoder(DefaultMaxPayload)}
				p.nextNonControl() // the client's Request: never answered
			}
			nc.Write(EncodeFrame(TypeEvent, 0, 0, ringSwitch()))
			close(sent)
			// the client answers nothing and closes; the connection stays open on this side
			nc.SetReadDeadline(time.Now().Add(5 * time.Second))
			buf := make([]byte, 4096)
			for {
				if _, err := nc.Read(buf); err != nil {
					closed <- err
					return
				}
			}
		}()
		c := dial(t, path)
		if !pending {
			<-sent
		}
		start := time.Now()
		_, err = c.Send([]byte("x"))
		if !errors.Is(err, ErrClosed) || time.Since(start) > 2*time.Second {
			t.Fatalf("pending %v: got %v after %v, want ErrClosed at once", pending, err, time.Since(start))
		}
		if pending && !strings.Contains(err.Error(), "did not negotiate the ring") {
			t.Fatalf("the request failed with %v, want the HRNG named", err)
		}
		if err := <-closed; !errors.Is(err, io.EOF) {
			t.Fatalf("pending %v: the raw server read %v, want the client's close", pending, err)
		}
		if _, err := c.Send([]byte("y")); !errors.Is(err, ErrClosed) {
			t.Fatalf("pending %v: a later request got %v", pending, err)
		}
	}
}
