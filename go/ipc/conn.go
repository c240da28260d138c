package ipc

import (
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// conn is one hintens connection, for a client or a server: one goroutine reads (readLoop),
// any goroutine writes whole frames under wmu. What to do with Requests, Responses and Events
// is left to the owner's callbacks, which run on the reading goroutine.
type conn struct {
	nc  sock // the *net.UnixConn, or a *blockingSock after leavePoller
	cfg *config
	dec *Decoder
	shm *shmState

	isServer bool

	helloDone chan struct{}
	helloOnce sync.Once
	helloBy   time.Time // until when a send may wait for the peer's hello (waitHello)

	wmu          sync.Mutex
	wbuf         []byte
	backlog      []outFrame // frames waiting for a slow peer, oldest first (under wmu)
	backlogBytes int
	draining     bool
	wDeadline    time.Time
	eventIDSeq   atomic.Uint64
	// the peer's hello, as send reads it without a lock: its inline limit (DefaultMaxPayload
	// until the hello came) and whether it offers shared memory
	peerMax atomic.Int64
	peerSHM atomic.Bool
	// trySend's one send(2), made through a closure made once (a closure per call would be
	// an allocation per frame): the bytes to send and what the call took, under wmu
	trySendFn  func(fd uintptr)
	trySendBuf []byte
	trySendN   int

	// reading state, owned by whichever goroutine reads (readOnce)
	fds []int // received descriptors not yet claimed, oldest first
	oob []byte
	// the read itself: recvmsg straight on the socket (no sockaddr, no allocation), through
	// a closure made once
	rawc          syscall.RawConn
	readFn        func(fd uintptr) bool
	rmsg          unix.Msghdr // kept here, so that a read allocates nothing
	riov          unix.Iovec
	rn, roobn     int
	rerr          error
	frameDeadline time.Time // when the frame in progress must be complete
	readDeadline  time.Time // what the socket's read deadline is set to
	// blocking: leavePoller ran (before any goroutine used the connection). The reader then
	// waits in recvmsg itself (the kernel wakes it, no netpoller), its deadlines through
	// SO_RCVTIMEO, whose current value is rcvTimeo (0: none); closeWith wakes it with
	// shutdown(2).
	blocking bool
	rcvTimeo time.Duration
	// spin, for a client (WithSpin): the next read, if it starts between frames, spins
	// before it parks when spinNext is set (readForAnswer sets it)
	spin     *spinState
	spinFn   func(fd uintptr) bool
	spinNext bool

	// needReader, if set, is called before a sender waits for something only a reader
	// sees (the peer's hello, a segment's release).
	needReader func()

	closed    chan struct{}
	closeOnce sync.Once
	closeErr  error

	onRequest  func(rid uint64, payload []byte, l *lease)
	onResponse func(rid uint64, payload []byte, l *lease, err error)
	onEvent    func(payload []byte, l *lease)
	onClose    func(err error)
	// onReadEnd, if set, is called instead of closeWith when reading ends (a server lets
	// its worker answer what was read first).
	onReadEnd func(err error)

	shmSent, shmReceived atomic.Uint64
}

func newConn(nc *net.UnixConn, cfg *config, isServer bool, totals *shmTotals) *conn {
	features := uint32(0)
	if cfg.shm {
		features = FeatureSHM
	}
	c := &conn{nc: nc, cfg: cfg, isServer: isServer, dec: NewDecoder(cfg.maxPayload),
		shm:       newShmState(features, cfg.shmReceiveBytes, cfg.shmReceiveSegments, cfg.shmPoolBytes, totals),
		helloDone: make(chan struct{}), helloBy: time.Now().Add(helloWait),
		closed: make(chan struct{})}
	c.oob = make([]byte, unix.CmsgSpace(4*maxWaitingFDs))
	c.rawc, _ = nc.SyscallConn() // fails only for a nil conn
	c.readFn = c.recvmsg
	c.trySendFn = c.trySendRaw
	c.peerMax.Store(DefaultMaxPayload)
	if !isServer && cfg.spin {
		c.spin = newSpinState()
		c.spinFn = c.spinRecvmsg
	}
	return c
}

// recvmsgOnce makes one recvmsg(2) into c.rmsg with flags (and MSG_CMSG_CLOEXEC): what it
// read goes to c.rn and c.roobn, an error to c.rerr, except EINTR and EAGAIN, which it only
// returns, for the caller to decide. unix.Syscall (not RawSyscall): when the read waits in
// the kernel, the runtime hands this thread's P to other goroutines.
func (c *conn) recvmsgOnce(fd uintptr, flags int) unix.Errno {
	c.rmsg.SetControllen(len(c.oob))
	n, _, errno := unix.Syscall(unix.SYS_RECVMSG, fd, uintptr(unsafe.Pointer(&c.rmsg)), uintptr(unix.MSG_CMSG_CLOEXEC|flags))
	switch errno {
	case 0:
		c.rn, c.roobn, c.rerr = int(n), int(c.rmsg.Controllen), nil
	case unix.EINTR, unix.EAGAIN:
	default:
		c.rn, c.roobn, c.rerr = 0, 0, errno
	}
	return errno
}

// recvmsg is the body of one raw read: false (wait for the socket) when nothing is there.
func (c *conn) recvmsg(fd uintptr) bool {
	for {
		switch c.recvmsgOnce(fd, 0) {
		case unix.EINTR:
			continue
		case unix.EAGAIN:
			return false
		}
		return true
	}
}

// leavePoller takes the connection out of the runtime's netpoller (see blockingSock): its
// socket becomes a descriptor in blocking mode that no epoll set holds, read and written
// through a blockingSock. The reader waits in recvmsg itself and the kernel wakes it, with
// its deadlines through SO_RCVTIMEO; writes wait for room in ppoll(2), up to the write
// deadline. closeWith shuts the socket down first, which wakes them. Call it before
// any goroutine uses the connection. On an error the connection is left in the netpoller.
func (c *conn) leavePoller() error {
	uc, ok := c.nc.(*net.UnixConn)
	if !ok {
		return nil
	}
	nfd := -1
	var derr error
	if err := c.rawc.Control(func(fd uintptr) {
		nfd, derr = unix.FcntlInt(fd, unix.F_DUPFD_CLOEXEC, 0)
	}); err != nil {
		return err
	}
	if derr != nil {
		return derr
	}
	bs, err := newBlockingSock(nfd)
	if err != nil {
		unix.SetNonblock(nfd, true) // the open file the netpoller's descriptor shares
		unix.Close(nfd)
		return err
	}
	// closing the net.UnixConn takes the socket out of the netpoller's epoll set; our
	// descriptor keeps the socket itself open
	uc.Close()
	c.nc, c.rawc, c.blocking = bs, bs.rc, true
	c.readFn = c.blockingRecvmsg
	if c.spin != nil {
		c.spinFn = c.spinBlockingRecvmsg
	}
	return nil
}

// setRecvTimeout makes SO_RCVTIMEO on fd fit deadline (zero: none), and returns false when
// the deadline has already passed. SO_RCVTIMEO counts from each read's start, so it must
// not exceed what is left. To spare a setsockopt per read it is set to half of what is
// left, then kept while it is within what is left and at least a quarter of it: a read it
// ends early is only read again (readOnce's callers read again after errReadTimeout until
// their own deadline), about log2(timeout / 2 ms) times for a deadline that passes.
func (c *conn) setRecvTimeout(fd int, deadline time.Time) bool {
	var want time.Duration
	if !deadline.IsZero() {
		left := time.Until(deadline)
		if left <= 0 {
			return false
		}
		if c.rcvTimeo != 0 && c.rcvTimeo <= left && c.rcvTimeo >= left/4 {
			return true
		}
		want = left / 2
		if left < 2*time.Millisecond {
			want = left
		}
	} else if c.rcvTimeo == 0 {
		return true
	}
	var tv unix.Timeval
	if want > 0 {
		tv = unix.NsecToTimeval(want.Nanoseconds() + int64(time.Microsecond-1)) // never 0 (= forever)
	}
	if unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv) != nil {
		return false
	}
	c.rcvTimeo = want
	return true
}

// blockingRecvmsg is the body of a read outside the netpoller (readFn after leavePoller):
// it waits in recvmsg, up to c.readDeadline, and always ends the read (a deadline that
// passed is c.rerr EAGAIN, a net.Error whose Timeout() is true).
func (c *conn) blockingRecvmsg(fd uintptr) bool {
	for {
		if !c.setRecvTimeout(int(fd), c.readDeadline) {
			c.rn, c.roobn, c.rerr = 0, 0, unix.EAGAIN
			return true
		}
		switch c.recvmsgOnce(fd, 0) {
		case unix.EINTR:
			continue // a signal: SO_RCVTIMEO started over, so look at the deadline again
		case unix.EAGAIN:
			c.rn, c.roobn, c.rerr = 0, 0, unix.EAGAIN // SO_RCVTIMEO ran out
		}
		return true
	}
}

// readMsg reads into space (and the control buffer c.oob), waiting for the socket up to its
// read deadline.
func (c *conn) readMsg(space []byte) (n, oobn int, err error) {
	c.riov.Base = &space[0] // Space is never empty
	c.riov.SetLen(len(space))
	c.rmsg.Iov = &c.riov
	c.rmsg.SetIovlen(1)
	c.rmsg.Control = &c.oob[0]
	c.rn, c.roobn, c.rerr = 0, 0, nil
	fn, spinning := c.readFn, c.spinNext && c.spin != nil && c.dec.Idle()
	c.spinNext = false
	if spinning {
		c.spin.tried, c.spin.spun = false, false
		fn = c.spinFn
	}
	err = c.rawc.Read(fn)
	c.riov.Base = nil // keep no reference to the buffer
	if spinning && c.spin.spun && (c.rerr == nil || c.rerr == unix.EAGAIN) &&
		(err == nil || errors.Is(err, os.ErrDeadlineExceeded)) {
		c.spin.after()
	}
	if err != nil {
		return 0, 0, err
	}
	return c.rn, c.roobn, c.rerr
}

func (c *conn) localHello() []byte {
	h := Hello{Features: c.shm.localFeatures, MaxPayload: c.cfg.maxPayload,
		ShmReceiveBytes: c.cfg.shmReceiveBytes, ShmReceiveSegments: c.cfg.shmReceiveSegments}
	return EncodeHello(h)
}

// closeWith ends the connection once: pending work fails with err.
func (c *conn) closeWith(err error) {
	c.closeOnce.Do(func() {
		c.closeErr = err
		close(c.closed)
		if c.blocking {
			// wake a blocked read and blocked writes (nc.Close would wait for those)
			c.rawc.Control(func(fd uintptr) { unix.Shutdown(int(fd), unix.SHUT_RDWR) })
		}
		c.nc.Close()
		c.helloOnce.Do(func() { close(c.helloDone) })
		c.shm.closeAll()
		if c.onClose != nil {
			c.onClose(err)
		}
	})
}

func (c *conn) err() error {
	select {
	case <-c.closed:
		return c.closeErr
	default:
		return nil
	}
}

// ---- writing ----

// writeFrame writes one whole frame, waiting for the socket if need be (up to the send
// timeout, after which the peer is cut). Small frames leave in one write.
func (c *conn) writeFrame(typ uint32, flags uint16, rid uint64, payload []byte) error {
	return c.write(typ, flags, rid, payload, -1, false)
}

// writeFrameFD writes one frame with a descriptor attached to its first byte (section 9).
func (c *conn) writeFrameFD(typ uint32, flags uint16, rid uint64, payload []byte, fd int) error {
	return c.write(typ, flags, rid, payload, fd, false)
}

// outFrame is a frame (or the rest of one) waiting in the send backlog.
type outFrame struct {
	b  []byte
	fd int // sent with the first byte of b, or -1
}

// write sends one frame. With noWait (Events a server pushes: section 10 says they never
// wait for the client), what the socket does not take at once goes to the connection's
// backlog, written by a goroutine of its own; a backlog over sendQueueBytes cuts the peer.
// While the backlog holds anything, every frame joins it, so frames keep their order.
func (c *conn) write(typ uint32, flags uint16, rid uint64, payload []byte, fd int, noWait bool) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if err := c.err(); err != nil {
		return err
	}
	if len(c.backlog) > 0 {
		return c.enqueueLocked(outFrame{EncodeFrame(typ, flags, rid, payload), fd})
	}
	if noWait {
		frame := EncodeFrame(typ, flags, rid, payload)
		n, err := c.tryWriteLocked(frame, fd)
		if err != nil {
			c.closeWith(fmt.Errorf("%w: write: %v", ErrClosed, err))
			return c.closeErr
		}
		if n == len(frame) {
			return nil
		}
		if n > 0 {
			fd = -1 // it went with the first bytes
		}
		return c.enqueueLocked(outFrame{frame[n:], fd})
	}
	var err error
	switch {
	case fd >= 0:
		c.armWriteDeadline()
		frame := EncodeFrame(typ, flags, rid, payload)
		var n int
		n, _, err = c.nc.WriteMsgUnix(frame, unix.UnixRights(fd), nil)
		if err == nil && n < len(frame) {
			_, err = c.nc.Write(frame[n:])
		}
	case len(payload) <= 64<<10:
		n := HeaderSize + len(payload)
		if cap(c.wbuf) < n {
			c.wbuf = make([]byte, n, max(n, 4096))
		}
		b := c.wbuf[:n]
		putHeader(b, typ, flags, rid, payload)
		copy(b[HeaderSize:], payload)
		if sent := c.trySend(b); sent < len(b) {
			c.armWriteDeadline()
			_, err = c.nc.Write(b[sent:])
		}
	default:
		c.armWriteDeadline()
		var h [HeaderSize]byte
		putHeader(h[:], typ, flags, rid, payload)
		bufs := net.Buffers{h[:], payload}
		_, err = bufs.WriteTo(c.nc)
	}
	if err != nil {
		c.closeWith(fmt.Errorf("%w: write: %v", ErrClosed, err))
		return c.closeErr
	}
	return nil
}

// trySend makes one non-blocking send(2) of b straight on the socket and returns how many
// bytes it took (0 when the socket was full or the send failed: the caller's nc.Write then
// writes what is left, waits for room under the write deadline, and reports errors). A send
// with MSG_DONTWAIT never blocks, so it is a raw system call: on the 64 B round trip, nc.Write
// cost the runtime's syscall entry and exit, the descriptor's locks and a clock read more.
// The caller holds wmu.
func (c *conn) trySend(b []byte) int {
	c.trySendBuf, c.trySendN = b, 0
	c.rawc.Control(c.trySendFn)
	c.trySendBuf = nil // keep no reference to the buffer
	return c.trySendN
}

// trySendRaw is trySend's system call (trySendFn), on the descriptor Control lends.
func (c *conn) trySendRaw(fd uintptr) {
	b := c.trySendBuf
	n, _, errno := unix.RawSyscall6(unix.SYS_SENDTO, fd, uintptr(unsafe.Pointer(&b[0])), uintptr(len(b)),
		unix.MSG_DONTWAIT|unix.MSG_NOSIGNAL, 0, 0)
	if errno == 0 {
		c.trySendN = int(n)
	}
}

// tryWriteLocked makes one non-blocking attempt to write b (with fd, if not -1).
func (c *conn) tryWriteLocked(b []byte, fd int) (int, error) {
	raw, err := c.nc.SyscallConn()
	if err != nil {
		return 0, err
	}
	var n int
	var werr error
	var oob []byte
	if fd >= 0 {
		oob = unix.UnixRights(fd)
	}
	if err := raw.Write(func(s uintptr) bool {
		n, werr = unix.SendmsgN(int(s), b, oob, nil, unix.MSG_DONTWAIT|unix.MSG_NOSIGNAL)
		return true
	}); err != nil {
		return 0, err
	}
	if werr == unix.EAGAIN || werr == unix.EINTR {
		return 0, nil
	}
	return max(n, 0), werr
}

// enqueueLocked adds to the backlog (caller holds wmu) and starts its writer.
func (c *conn) enqueueLocked(f outFrame) error {
	if c.backlogBytes+len(f.b) > c.cfg.sendQueueBytes {
		c.closeWith(fmt.Errorf("%w: the peer left %d bytes unread (slow consumer: cut)",
			ErrClosed, c.backlogBytes+len(f.b)))
		return c.closeErr
	}
	c.backlog = append(c.backlog, f)
	c.backlogBytes += len(f.b)
	if !c.draining {
		c.draining = true
		go c.drain()
	}
	return nil
}

// drain writes the backlog in order. A frame stays in the backlog until it is written, so
// nobody writes directly meanwhile. A peer that takes nothing for the send timeout is cut.
func (c *conn) drain() {
	for {
		c.wmu.Lock()
		if len(c.backlog) == 0 || c.err() != nil {
			c.backlog, c.backlogBytes, c.draining = nil, 0, false
			c.wmu.Unlock()
			return
		}
		f := c.backlog[0]
		c.armWriteDeadline()
		c.wmu.Unlock()
		var err error
		if f.fd >= 0 {
			var n int
			n, _, err = c.nc.WriteMsgUnix(f.b, unix.UnixRights(f.fd), nil)
			if err == nil && n < len(f.b) {
				_, err = c.nc.Write(f.b[n:])
			}
		} else {
			_, err = c.nc.Write(f.b)
		}
		c.wmu.Lock()
		c.backlog = c.backlog[1:]
		c.backlogBytes -= len(f.b)
		c.wmu.Unlock()
		if err != nil {
			c.closeWith(fmt.Errorf("%w: write: %v", ErrClosed, err))
		}
	}
}

// armWriteDeadline keeps a write deadline between half and all of sendTimeout ahead,
// touching the timer only when half of it has run down (caller holds wmu).
func (c *conn) armWriteDeadline() {
	if c.cfg.sendTimeout <= 0 {
		return
	}
	now := time.Now()
	if c.wDeadline.Sub(now) < c.cfg.sendTimeout/2 {
		c.wDeadline = now.Add(c.cfg.sendTimeout)
		c.nc.SetWriteDeadline(c.wDeadline)
	}
}

func (c *conn) sendControl(magic string, ids ...uint32) {
	for len(ids) > 0 {
		n := min(len(ids), maxControlIDs)
		_ = c.writeFrame(TypeEvent, 0, 0, EncodeControl(magic, ids[:n]))
		ids = ids[n:]
	}
}

func (c *conn) sendError(rid uint64, code uint32, msg string) {
	_ = c.writeFrame(TypeError, 0, rid, EncodeErrorPayload(code, msg))
}

// releaseLease lets go of a lent payload and hands the segment back to the peer.
func (c *conn) releaseLease(l *lease) {
	if l == nil {
		return
	}
	if id := l.release(); id != 0 {
		c.sendControl("HREL", id)
	}
}

// peerLimits: the peer's inline limit and whether shared memory was negotiated.
func (c *conn) peerLimits() (maxPayload int, shm bool) {
	return int(c.peerMax.Load()), c.shm.localFeatures&FeatureSHM != 0 && c.peerSHM.Load()
}

// waitHello waits (until helloWait after the connection began, or deadline) for the peer's
// hello, before a payload that shared memory might carry or the peer's limit might refuse
// (section 8). Past that, the peer is taken to send none, and no send waits again.
func (c *conn) waitHello(deadline time.Time) {
	select {
	case <-c.helloDone:
		return
	default:
	}
	if c.needReader != nil {
		c.needReader()
	}
	wait := time.Until(c.helloBy)
	if !deadline.IsZero() {
		wait = min(wait, time.Until(deadline))
	}
	if wait <= 0 {
		return
	}
	t := time.NewTimer(wait)
	defer t.Stop()
	select {
	case <-c.helloDone:
	case <-t.C:
	}
}

// sendMode says what send does when shared memory should carry a payload but every segment
// the pool may hold is lent out.
type sendMode int

const (
	waitForSegment    sendMode = iota // wait for a release until the deadline
	inlineIfNoSegment                 // send inline if the peer's limit allows, and never wait for the socket (pushed Events)
	failIfNoSegment                   // return errWouldWait (the caller waits elsewhere)
)

var errWouldWait = errors.New("hintens: every shared-memory segment is lent out")

// send sends a Request, Response or Event, inline or through shared memory (sections 8b and
// 9). echo, if set, is the lease of the Request being answered: data inside it goes back as a
// PEER_SEGMENT echo. What waits (for the peer's hello, for a segment) waits until deadline,
// or, when deadline is zero and timeout is not, until timeout after send began to wait: an
// inline send then reads no clock.
func (c *conn) send(typ uint32, rid uint64, data []byte, echo *lease, deadline time.Time, timeout time.Duration, mode sendMode) error {
	if echo == nil && len(data) < c.cfg.shmThreshold && len(data) <= int(c.peerMax.Load()) {
		return c.write(typ, 0, rid, data, -1, mode == inlineIfNoSegment) // inline whatever was negotiated
	}
	if deadline.IsZero() && timeout > 0 {
		deadline = time.Now().Add(timeout)
	}
	if len(data) >= c.cfg.shmThreshold {
		c.waitHello(deadline)
	}
	peerMax, negotiated := c.peerLimits()
	if negotiated && echo != nil {
		if d, ok := echo.echoDescriptor(data); ok {
			c.shmSent.Add(1)
			return c.writeFrame(typ, FlagSHM, rid, d.Encode())
		}
	}
	if negotiated && (len(data) >= c.cfg.shmThreshold || len(data) > peerMax) {
		for {
			seg, retired, waitCh, err := c.shm.acquire(uint64(len(data)))
			if len(retired) > 0 {
				c.sendControl("HRET", retired...)
			}
			if errors.Is(err, errPoolTooSmall) {
				break // inline, if the peer's limit allows
			}
			if err != nil {
				return err
			}
			if seg != nil {
				copy(seg.mem, data)
				d, fd := c.shm.lend(seg, uint64(len(data)))
				c.shmSent.Add(1)
				return c.write(typ, FlagSHM, rid, d.Encode(), fd, mode == inlineIfNoSegment)
			}
			if mode == failIfNoSegment {
				return errWouldWait
			}
			if mode == inlineIfNoSegment {
				break
			}
			if c.needReader != nil {
				c.needReader()
			}
			var timeout <-chan time.Time
			if !deadline.IsZero() {
				t := time.NewTimer(time.Until(deadline))
				defer t.Stop()
				timeout = t.C
			}
			select {
			case <-waitCh:
			case <-timeout:
				return &ProtocolError{Code: CodeTimeout, Message: "no shared-memory segment came free in time"}
			case <-c.closed:
				return c.closeErr
			}
		}
	}
	if len(data) > peerMax {
		return &ProtocolError{Code: CodeTooLarge, Message: fmt.Sprintf(
			"payload of %d bytes over the peer's limit of %d, and shared memory cannot carry it", len(data), peerMax)}
	}
	return c.write(typ, 0, rid, data, -1, mode == inlineIfNoSegment)
}

// ---- reading ----

// errReadTimeout: readOnce's own deadline passed (no frame overran its frame timeout).
var errReadTimeout = errors.New("hintens: read deadline")

// readLoop reads until the connection ends (the server's reading goroutine).
func (c *conn) readLoop() {
	for {
		err := c.readOnce(time.Time{})
		if err == errReadTimeout {
			continue
		}
		if err != nil {
			c.endReading(err)
			return
		}
	}
}

// endReading ends reading for good: partial frames and waiting descriptors are dropped.
func (c *conn) endReading(err error) {
	c.dec.Abandon()
	for _, fd := range c.fds {
		unix.Close(fd)
	}
	c.fds = nil
	if c.onReadEnd != nil {
		c.onReadEnd(err)
	} else {
		c.closeWith(err)
	}
}

// readOnce makes one read (blocking until bytes, the end of the stream, or deadline; zero:
// none) and dispatches the frames it completes. Only one goroutine at a time may call it. It
// returns errReadTimeout when deadline passed, and any other error when the connection is
// over (then the caller calls endReading).
func (c *conn) readOnce(deadline time.Time) error {
	eff := deadline
	if !c.frameDeadline.IsZero() && (eff.IsZero() || c.frameDeadline.Before(eff)) {
		eff = c.frameDeadline
	}
	var n, oobn int
	var rerr error
	if !eff.Equal(c.readDeadline) {
		if !c.blocking {
			c.nc.SetReadDeadline(eff)
		}
		c.readDeadline = eff // outside the netpoller, blockingRecvmsg keeps SO_RCVTIMEO to it
	}
	n, oobn, rerr = c.readMsg(c.dec.Space())
	if oobn > 0 {
		c.takeFDs(c.oob[:oobn])
	}
	if n > 0 {
		c.dec.Commit(n)
		if !c.processFrames() {
			if err := c.err(); err != nil {
				return err
			}
			return fmt.Errorf("%w: protocol error", ErrClosed)
		}
		if c.dec.Idle() {
			for _, fd := range c.fds {
				unix.Close(fd) // unclaimed once no frame is in progress
			}
			c.fds = c.fds[:0]
			c.frameDeadline = time.Time{}
		} else if c.frameDeadline.IsZero() && c.cfg.frameTimeout > 0 {
			c.frameDeadline = time.Now().Add(c.cfg.frameTimeout)
		}
	}
	if rerr == nil && (n > 0 || oobn > 0) {
		return nil
	}
	if err := c.err(); err != nil && c.blocking {
		return err // closeWith's shutdown(2) woke the read
	}
	switch {
	case rerr == nil || errors.Is(rerr, io.EOF):
		return fmt.Errorf("%w: the peer closed the connection", ErrClosed)
	case errors.Is(rerr, unix.ECONNRESET):
		return fmt.Errorf("%w: connection reset by the peer", ErrClosed)
	case errors.Is(rerr, net.ErrClosed):
		if err := c.err(); err != nil {
			return err
		}
		return fmt.Errorf("%w: closed", ErrClosed)
	}
	var ne net.Error
	if errors.As(rerr, &ne) && ne.Timeout() {
		if !c.frameDeadline.IsZero() && !time.Now().Before(c.frameDeadline) {
			return fmt.Errorf("%w: a frame did not arrive whole within %v", ErrClosed, c.cfg.frameTimeout)
		}
		return errReadTimeout
	}
	return fmt.Errorf("%w: read: %v", ErrClosed, rerr)
}

func (c *conn) takeFDs(oob []byte) {
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return
	}
	for _, m := range msgs {
		fds, err := unix.ParseUnixRights(&m)
		if err != nil {
			continue
		}
		for _, fd := range fds {
			if len(c.fds) >= maxWaitingFDs {
				unix.Close(fd)
				continue
			}
			c.fds = append(c.fds, fd)
		}
	}
}

// processFrames decodes and dispatches what the buffer holds; false after a fatal error.
func (c *conn) processFrames() bool {
	for {
		f, ok, perr := c.dec.Next()
		if perr != nil {
			if perr.Fatal {
				c.fatal(perr)
				return false
			}
			c.refuse(perr.Type, perr.RequestID, perr)
			continue
		}
		if !ok {
			return true
		}
		if !c.dispatch(f) {
			return false
		}
	}
}

// fatal ends the connection for a fatal violation (section 6): a server answers it with one
// Error frame (request id 0 when the header was unreadable), a client closes without
// answering; what is pending fails with ErrClosed.
func (c *conn) fatal(perr *ProtocolError) {
	if c.isServer {
		rid := uint64(0)
		if perr.HasID {
			rid = perr.RequestID
		}
		c.sendError(rid, perr.Code, perr.Message)
	}
	c.closeWith(fmt.Errorf("%w: %v", ErrClosed, perr))
}

// errRingNotNegotiated: an HRNG control Event on a connection that did not negotiate RING
// (every connection of this port), fatal for every peer (section 8a).
func errRingNotNegotiated() *ProtocolError {
	return &ProtocolError{Code: CodeBadHeader, Fatal: true, HasID: true, RequestID: 0, Type: TypeEvent,
		Message: "an HRNG on a connection that did not negotiate the ring"}
}

// aliasesBuffer: whether a decoded inline payload lives in the decoder's reused buffer.
func aliasesBuffer(n int) bool { return HeaderSize+n <= decoderBufSize }

// dispatch handles one decoded frame; false after a fatal violation (the connection is closed).
func (c *conn) dispatch(f Frame) bool {
	payload := f.Payload
	var l *lease
	if f.Flags&FlagSHM != 0 {
		fd := -1
		if len(payload) == descriptorSize && payload[4]&byte(DescNewSegment) != 0 && len(c.fds) > 0 {
			fd = c.fds[0]
			c.fds = c.fds[1:]
		}
		dec := c.shm.receive(f.Type, f.Flags, f.RequestID, payload, fd)
		if dec.handBack != "" {
			c.sendControl(dec.handBack, dec.id)
		}
		if dec.lease == nil {
			c.refuse(f.Type, f.RequestID, &ProtocolError{Code: dec.code, RequestID: f.RequestID,
				HasID: true, Type: f.Type, Message: dec.msg})
			return true
		}
		l = dec.lease
		payload = l.data
		c.shmReceived.Add(1)
	} else if f.Flags&FlagCompressed != 0 {
		c.refuse(f.Type, f.RequestID, &ProtocolError{Code: CodeUnsupportedFlags, RequestID: f.RequestID,
			HasID: true, Type: f.Type, Message: "COMPRESSED was not negotiated"})
		return true
	}
	switch f.Type {
	case TypeEvent:
		if f.RequestID == 0 {
			// (a control Event with SHM or COMPRESSED was refused above: it is no HRNG)
			if isRingSwitch(payload) {
				c.fatal(errRingNotNegotiated())
				return false
			}
			c.control(payload)
			return true
		}
		if c.onEvent != nil {
			c.onEvent(payload, l)
		} else {
			c.releaseLease(l)
		}
	case TypeRequest:
		c.onRequest(f.RequestID, payload, l)
	case TypeResponse:
		c.onResponse(f.RequestID, payload, l, nil)
	case TypeError:
		c.onResponse(f.RequestID, nil, nil, remoteErrorFromPayload(payload))
	}
	return true
}

// refuse handles a frame dropped for a recoverable violation (section 6).
func (c *conn) refuse(typ uint32, rid uint64, perr *ProtocolError) {
	switch typ {
	case TypeRequest:
		c.sendError(rid, perr.Code, perr.Message)
	case TypeResponse, TypeError:
		c.onResponse(rid, nil, nil, perr)
	default:
		if rid != 0 {
			log.Printf("hintens: dropped an Event: %v", perr)
		}
	}
}

// control handles a control Event other than HRNG (dispatch ends the connection on an HRNG):
// a hello, a release, reject or retire; any other magic is ignored (section 8a).
func (c *conn) control(p []byte) {
	if len(p) < 4 {
		return
	}
	switch string(p[:4]) {
	case "HELO":
		h, _, ok := ParseHello(p)
		if !ok {
			return
		}
		c.helloOnce.Do(func() {
			c.shm.mu.Lock()
			c.shm.peer = &h
			c.shm.mu.Unlock()
			c.peerMax.Store(int64(h.MaxPayload))
			c.peerSHM.Store(h.Features&FeatureSHM != 0)
			close(c.helloDone)
		})
	case "HREL", "HREJ":
		if magic, ids, ok := ParseControl(p); ok {
			c.shm.handBack(magic, ids)
		}
	case "HRET":
		if _, ids, ok := ParseControl(p); ok {
			c.shm.retire(ids)
		}
	}
}
