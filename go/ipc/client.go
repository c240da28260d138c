package ipc

import (
	"context"
	"errors"
	"fmt"
	"log"
	"net"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"github.com/dotandev/hintens-go/internal/rawhook"
	"golang.org/x/sys/unix"
)

// Client is one connection to a hintens server. It is safe for concurrent use: any number
// of requests may be in flight at once, matched to their answers by request id.
type Client struct {
	c      *conn
	cfg    config
	nextID atomic.Uint64

	mu      sync.Mutex
	pending map[uint64]chan result

	onEvent atomic.Pointer[func([]byte)]

	// The read role: one goroutine at a time reads the connection. A request waiting alone
	// for its answer takes the role and reads the answer itself, with no hand-off between
	// goroutines; otherwise the background reader (readLoop) holds it, delivering answers to
	// their waiters. The background reader also reads while the connection is idle, so that
	// Events, releases and the end of the connection are seen.
	rmu       sync.Mutex
	roleHeld  bool
	bgWake    chan struct{}
	idleTimer *time.Timer
	// the idle timer is armed at most once at a time; lastRelease (UnixNano) moves its
	// deadline without touching the timer on every request
	idleArmed   atomic.Bool
	lastRelease atomic.Int64
	delivered   atomic.Uint64
}

// idleReadDelay: how long the connection may go without a reader after a request returned,
// before the background reader takes over (Events wait about this long meanwhile).
//
// busyRecheck: when the idle timer finds that requests came and went since it was armed, it
// looks again only this much later. A 1 ms timer kept firing through back-to-back requests
// cost 6-9 us of client CPU per 64 B round trip (pinned to one CPU), and resetting it on
// every request as much; at 20 ms it costs no more than no timer at all. So an Event that
// arrives while nothing is in flight waits for a reader about idleReadDelay after an
// isolated request, and at most about busyRecheck after a busy stretch.
const (
	idleReadDelay = time.Millisecond
	busyRecheck   = 20 * time.Millisecond
)

type result struct {
	payload []byte
	l       *lease
	err     error
}

// Payload is an answer that may be lent from shared memory (see Client.Request).
type Payload struct {
	data []byte
	l    *lease
	c    *conn
}

// Bytes returns the payload. If Shared is true it is a read-only view of the sender's shared
// memory: valid until Release, and writing to it faults.
func (p *Payload) Bytes() []byte { return p.data }

// Shared reports whether the payload is a view of shared memory.
func (p *Payload) Shared() bool { return p.l != nil }

// Release hands the shared-memory segment back to the peer. The slice from Bytes must not be
// used afterwards. Release is idempotent, and a no-op for an inline payload.
func (p *Payload) Release() {
	if p.l != nil {
		p.c.releaseLease(p.l)
		p.l = nil
	}
	p.data = nil
}

// NewClient connects to the hintens server listening on the Unix socket path.
//
// Before it sends anything it checks that the server runs as our own uid, root, or a uid
// given with WithAllowedUIDs (ErrUntrustedServer otherwise). Then it sends its hello.
func NewClient(path string, opts ...Option) (*Client, error) {
	cfg := defaultConfig()
	for _, o := range opts {
		o(&cfg)
	}
	nc, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("hintens: connect %s: %w", path, err)
	}
	cred, err := peerCred(nc)
	if err != nil {
		nc.Close()
		return nil, fmt.Errorf("hintens: reading the server's credentials: %w", err)
	}
	uid := cred.Uid
	if uid != uint32(os.Getuid()) && uid != 0 && !containsUID(cfg.allowedUIDs, uid) {
		nc.Close()
		return nil, fmt.Errorf("%w: %s belongs to a process of uid %d", ErrUntrustedServer, path, uid)
	}
	cl := &Client{cfg: cfg, pending: map[uint64]chan result{}, bgWake: make(chan struct{}, 1)}
	cl.idleTimer = time.AfterFunc(time.Hour, cl.idleCheck)
	cl.idleTimer.Stop()
	cl.c = newConn(nc, &cl.cfg, false, nil)
	if cfg.blockingReads > 0 || cfg.blockingReads == 0 && runtime.GOMAXPROCS(0) > 1 && int(cred.Pid) != os.Getpid() {
		if err := cl.c.leavePoller(); err != nil {
			log.Printf("hintens: blocking reads unavailable, the connection waits in the netpoller: %v", err)
		}
	}
	cl.c.onRequest = func(rid uint64, _ []byte, l *lease) {
		cl.c.releaseLease(l)
		cl.c.sendError(rid, CodeUnavailable, "a hintens client serves no requests")
	}
	cl.c.onResponse = cl.deliver
	cl.c.onEvent = cl.event
	cl.c.onClose = cl.failAll
	cl.c.needReader = cl.wakeReader
	if err := cl.c.writeFrame(TypeEvent, 0, 0, cl.c.localHello()); err != nil {
		cl.c.closeWith(err)
		return nil, err
	}
	go cl.readLoop()
	cl.wakeReader()
	return cl, nil
}

func containsUID(list []uint32, uid uint32) bool {
	for _, u := range list {
		if u == uid {
			return true
		}
	}
	return false
}

func peerCred(nc *net.UnixConn) (*unix.Ucred, error) {
	raw, err := nc.SyscallConn()
	if err != nil {
		return nil, err
	}
	var cred *unix.Ucred
	var cerr error
	if err := raw.Control(func(fd uintptr) {
		cred, cerr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return nil, err
	}
	return cred, cerr
}

// Close closes the connection. Requests in flight fail with ErrClosed. Shared memory of the
// connection is unmapped, except payloads still lent (Payload not yet released), which are
// unmapped on Release.
func (cl *Client) Close() error {
	cl.c.closeWith(fmt.Errorf("%w: closed by the client", ErrClosed))
	cl.idleTimer.Stop()
	return nil
}

// Send sends payload as a Request and returns the answer, with the client's timeout
// (default 10 s). The returned slice belongs to the caller: an answer that came through
// shared memory is copied out and its segment released at once (use Request to avoid the
// copy). A failed request returns a *RemoteError (the server answered with an Error frame),
// a *ProtocolError, or an error matching ErrClosed or ErrTimeout.
func (cl *Client) Send(payload []byte) ([]byte, error) {
	return cl.SendContext(context.Background(), payload)
}

// SendContext is Send with a context: the request fails with ctx's error when ctx ends first.
func (cl *Client) SendContext(ctx context.Context, payload []byte) ([]byte, error) {
	r, err := cl.roundTrip(ctx, payload, nil)
	if err != nil {
		return nil, err
	}
	if r.l == nil {
		return r.payload, nil
	}
	out := make([]byte, len(r.payload))
	copy(out, r.payload)
	cl.c.releaseLease(r.l)
	return out, nil
}

// Request is SendContext without the copy: an answer that came through shared memory is
// returned as a view of the mapping, valid until Payload.Release. Release every Payload: the
// server cannot reuse a segment until it is released, and after 64 unreleased segments (or
// 1 GiB) its large answers wait, then fail.
func (cl *Client) Request(ctx context.Context, payload []byte) (*Payload, error) {
	r, err := cl.roundTrip(ctx, payload, nil)
	if err != nil {
		return nil, err
	}
	return &Payload{data: r.payload, l: r.l, c: cl.c}, nil
}

var chanPool = sync.Pool{New: func() any { return make(chan result, 1) }}

var timerPool sync.Pool

func (cl *Client) roundTrip(ctx context.Context, payload []byte, raw []byte) (result, error) {
	if err := cl.c.err(); err != nil {
		return result{}, err
	}
	// the client's timeout runs a timer; a context deadline that comes first ends the wait
	// through ctx.Done instead
	var deadline time.Time
	timeout := cl.cfg.timeout
	if timeout > 0 {
		deadline = time.Now().Add(timeout)
	}
	if d, ok := ctx.Deadline(); ok && (deadline.IsZero() || d.Before(deadline)) {
		deadline, timeout = d, 0
	}
	id := cl.nextID.Add(1)
	if raw != nil {
		id = rawID(raw)
	}
	ch := chanPool.Get().(chan result)
	cl.mu.Lock()
	cl.pending[id] = ch
	cl.mu.Unlock()
	if err := cl.c.err(); err != nil { // closed meanwhile: failAll may have run already
		if cl.forget(id) {
			chanPool.Put(ch)
		}
		return result{}, err
	}
	var err error
	if raw != nil {
		err = cl.c.writeRaw(raw)
	} else {
		err = cl.c.send(TypeRequest, id, payload, nil, deadline, 0, waitForSegment)
	}
	if err != nil {
		if cl.forget(id) {
			chanPool.Put(ch)
		}
		return result{}, err
	}
	if ctx.Done() == nil && cl.takeRole() {
		return cl.readForAnswer(id, ch, deadline, timeout)
	}
	var tc <-chan time.Time
	var t *time.Timer
	if timeout > 0 {
		if v := timerPool.Get(); v != nil {
			t = v.(*time.Timer)
			t.Reset(timeout)
		} else {
			t = time.NewTimer(timeout)
		}
		tc = t.C
	}
	select {
	case r := <-ch:
		if t != nil {
			t.Stop()
			timerPool.Put(t)
		}
		chanPool.Put(ch)
		if r.err != nil {
			return result{}, r.err
		}
		return r, nil
	case <-tc:
		timerPool.Put(t)
		cl.abandon(id, ch)
		return result{}, &ProtocolError{Code: CodeTimeout, RequestID: id, HasID: true,
			Message: fmt.Sprintf("no answer within %v", timeout)}
	case <-ctx.Done():
		if t != nil {
			t.Stop()
			timerPool.Put(t)
		}
		cl.abandon(id, ch)
		return result{}, ctx.Err()
	}
}

// readForAnswer reads the connection (holding the read role) until the answer to id is in ch.
func (cl *Client) readForAnswer(id uint64, ch chan result, deadline time.Time, timeout time.Duration) (result, error) {
	for {
		select {
		case r := <-ch:
			cl.releaseRole()
			chanPool.Put(ch)
			if r.err != nil {
				return result{}, r.err
			}
			return r, nil
		default:
		}
		cl.c.spinNext = true
		err := cl.c.readOnce(cl.coarseDeadline(deadline))
		if err == errReadTimeout && time.Now().Before(deadline) {
			continue // the coarse deadline came first
		}
		if err == errReadTimeout {
			cl.releaseRole()
			cl.abandon(id, ch)
			return result{}, &ProtocolError{Code: CodeTimeout, RequestID: id, HasID: true,
				Message: fmt.Sprintf("no answer within %v", timeout)}
		}
		if err != nil {
			cl.c.endReading(err) // closes the connection: every waiter, us included, fails
			r := <-ch
			chanPool.Put(ch)
			if r.err != nil {
				return result{}, r.err
			}
			return r, nil
		}
	}
}

// coarseDeadline keeps the socket's read deadline when it falls at most a second before d,
// so that back-to-back requests do not reset it each time (an early expiry is read again).
func (cl *Client) coarseDeadline(d time.Time) time.Time {
	if cur := cl.c.readDeadline; !d.IsZero() && !cur.IsZero() && !cur.After(d) && d.Sub(cur) < time.Second {
		return cur
	}
	return d
}

func (cl *Client) takeRole() bool {
	cl.rmu.Lock()
	defer cl.rmu.Unlock()
	if cl.roleHeld {
		return false
	}
	cl.roleHeld = true
	return true
}

// releaseRole gives up reading: to the background reader at once if requests still wait,
// else after idleReadDelay (a request that comes sooner reads for itself).
func (cl *Client) releaseRole() {
	cl.rmu.Lock()
	cl.roleHeld = false
	cl.rmu.Unlock()
	cl.mu.Lock()
	waiting := len(cl.pending)
	cl.mu.Unlock()
	if waiting > 0 {
		cl.wakeReader()
		return
	}
	cl.lastRelease.Store(time.Now().UnixNano())
	if cl.idleArmed.CompareAndSwap(false, true) {
		cl.idleTimer.Reset(idleReadDelay)
	}
}

// idleCheck runs when the idle timer fires: it wakes the background reader if no request
// returned for idleReadDelay, and otherwise (the client is busy) looks again busyRecheck
// later.
func (cl *Client) idleCheck() {
	since := time.Duration(time.Now().UnixNano() - cl.lastRelease.Load())
	if since < idleReadDelay {
		cl.idleTimer.Reset(busyRecheck)
		return
	}
	cl.idleArmed.Store(false)
	cl.wakeReader()
}

func (cl *Client) wakeReader() {
	select {
	case cl.bgWake <- struct{}{}:
	default:
	}
}

// readLoop is the background reader: woken when nobody reads, it reads until it has
// delivered an answer and no request waits any more.
func (cl *Client) readLoop() {
	for {
		select {
		case <-cl.bgWake:
		case <-cl.c.closed:
			return
		}
		if !cl.takeRole() {
			continue
		}
		start := cl.delivered.Load()
		for {
			err := cl.c.readOnce(time.Time{})
			if err == errReadTimeout {
				continue
			}
			if err != nil {
				cl.c.endReading(err)
				return
			}
			if cl.delivered.Load() != start {
				cl.mu.Lock()
				waiting := len(cl.pending)
				cl.mu.Unlock()
				if waiting == 0 {
					cl.releaseRole()
					break
				}
			}
		}
	}
}

// forget removes a pending request; false if its answer is already on its way.
func (cl *Client) forget(id uint64) bool {
	cl.mu.Lock()
	defer cl.mu.Unlock()
	if _, ok := cl.pending[id]; ok {
		delete(cl.pending, id)
		return true
	}
	return false
}

// abandon gives up on a request; an answer that raced in is released.
func (cl *Client) abandon(id uint64, ch chan result) {
	if cl.forget(id) {
		chanPool.Put(ch)
		return
	}
	r := <-ch
	cl.c.releaseLease(r.l)
	chanPool.Put(ch)
}

// deliver runs on the reading goroutine for each Response or Error.
func (cl *Client) deliver(rid uint64, payload []byte, l *lease, err error) {
	cl.mu.Lock()
	ch, ok := cl.pending[rid]
	if ok {
		delete(cl.pending, rid)
	}
	cl.mu.Unlock()
	if !ok {
		cl.c.releaseLease(l) // an answer nobody waits for any more
		return
	}
	if l == nil && aliasesBuffer(len(payload)) && payload != nil {
		payload = append([]byte(nil), payload...)
	}
	ch <- result{payload: payload, l: l, err: err}
	cl.delivered.Add(1)
}

func (cl *Client) failAll(err error) {
	cl.mu.Lock()
	pending := cl.pending
	cl.pending = map[uint64]chan result{}
	cl.mu.Unlock()
	for _, ch := range pending {
		ch <- result{err: err}
	}
}

// SendEvent sends payload as an Event: no answer, nothing waits for one.
func (cl *Client) SendEvent(payload []byte) error {
	deadline := time.Time{}
	if cl.cfg.timeout > 0 {
		deadline = time.Now().Add(cl.cfg.timeout)
	}
	return cl.c.send(TypeEvent, cl.c.eventIDSeq.Add(1), payload, nil, deadline, 0, waitForSegment)
}

// OnEvent sets the function called for each Event the server sends, in arrival order, on
// whichever goroutine reads the connection at that moment (a background one, or a Send
// waiting for its answer): keep it short, Events and answers wait meanwhile. Events that
// arrive before an answer have been delivered when that answer returns; while no request is
// in flight, an Event waits for a reader about a millisecond after an isolated request, at
// most about 20 ms after back-to-back ones. The
// payload is valid only during the call: copy what you keep. nil removes the handler.
func (cl *Client) OnEvent(fn func(payload []byte)) {
	if fn == nil {
		cl.onEvent.Store(nil)
		return
	}
	cl.onEvent.Store(&fn)
}

func (cl *Client) event(payload []byte, l *lease) {
	if fn := cl.onEvent.Load(); fn != nil {
		(*fn)(payload)
	}
	cl.c.releaseLease(l)
}

// Stats counts what went through shared memory on this connection.
type Stats struct {
	ShmSent     uint64 // frames we sent through shared memory
	ShmReceived uint64 // frames we received through shared memory
	Spins       uint64 // waits for an answer that spun before parking (WithSpin)
	SpinsWon    uint64 // those that the answer's bytes ended
}

// Stats returns the connection's counters.
func (cl *Client) Stats() Stats {
	st := Stats{ShmSent: cl.c.shmSent.Load(), ShmReceived: cl.c.shmReceived.Load()}
	if s := cl.c.spin; s != nil {
		st.Spins, st.SpinsWon = s.spins.Load(), s.won.Load()
	}
	return st
}

// PeerHello returns the server's hello, and false before it arrived.
func (cl *Client) PeerHello() (Hello, bool) {
	cl.c.shm.mu.Lock()
	defer cl.c.shm.mu.Unlock()
	if cl.c.shm.peer == nil {
		return Hello{}, false
	}
	return *cl.c.shm.peer, true
}

func rawID(frame []byte) uint64 {
	if len(frame) < HeaderSize {
		return 0
	}
	var id uint64
	for _, b := range frame[16:24] {
		id = id<<8 | uint64(b)
	}
	return id
}

func (c *conn) writeRaw(b []byte) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if err := c.err(); err != nil {
		return err
	}
	if len(c.backlog) > 0 {
		return c.enqueueLocked(outFrame{append([]byte(nil), b...), -1})
	}
	if _, err := c.nc.Write(b); err != nil {
		c.closeWith(fmt.Errorf("%w: write: %v", ErrClosed, err))
		return c.closeErr
	}
	return nil
}

func init() {
	rawhook.WriteRawAndWait = func(client any, rid uint64, frame []byte, timeout time.Duration) ([]byte, error) {
		cl, ok := client.(*Client)
		if !ok {
			return nil, errors.New("rawhook: not a *ipc.Client")
		}
		if rawID(frame) != rid {
			return nil, errors.New("rawhook: the frame's request id differs")
		}
		ctx, cancel := context.WithTimeout(context.Background(), timeout)
		defer cancel()
		r, err := cl.roundTrip(ctx, nil, frame)
		if err != nil {
			return nil, err
		}
		out := append([]byte(nil), r.payload...)
		cl.c.releaseLease(r.l)
		return out, nil
	}
}
