package ipc

import (
	"context"
	"errors"
	"fmt"
	"log"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// Handler answers one Request. req is valid only until the handler returns (it may be a
// view of the client's shared memory): copy what you keep. Returning a slice of req is fine
// (an echo of a shared-memory request goes back without a copy). A returned *RemoteError
// answers with its code and message; any other error answers HANDLER_ERROR with err.Error().
type Handler func(ctx context.Context, req []byte) ([]byte, error)

// EventHandler receives the Events clients send. payload is valid only during the call.
// ConnFromContext(ctx) names the connection.
type EventHandler func(ctx context.Context, payload []byte)

// Server serves hintens clients on a Unix socket.
type Server struct {
	path    string
	handler Handler
	cfg     config

	onEvent atomic.Pointer[EventHandler]

	mu       sync.Mutex
	ln       *net.UnixListener
	ident    [4]uint64 // fileIdentity of our socket file
	conns    map[*Conn]struct{}
	shutdown bool
	wg       sync.WaitGroup

	totals  *shmTotals
	pending atomic.Int64
}

// Conn is one client's connection, as a server sees it.
type Conn struct {
	s      *Server
	c      *conn
	ctx    context.Context
	cancel context.CancelFunc
	queue  chan request
	done   chan struct{}
	// inflight counts queued Requests not yet answered. While it is 0 the reading goroutine
	// answers a Request itself (no hand-off between goroutines); otherwise it queues it, so
	// that answers keep arrival order.
	inflight atomic.Int32
}

type request struct {
	rid      uint64
	payload  []byte // the request, or the answer when answered is set
	l        *lease
	answered bool // the handler ran; the answer waits for a shared-memory segment
}

type connKey struct{}

// ConnFromContext returns the connection a handler's Request (or Event) came on.
func ConnFromContext(ctx context.Context) *Conn {
	c, _ := ctx.Value(connKey{}).(*Conn)
	return c
}

// NewServer returns a server for the socket path that answers Requests with handler.
// Nothing listens until Listen or Serve.
func NewServer(path string, handler Handler, opts ...Option) *Server {
	cfg := defaultConfig()
	for _, o := range opts {
		o(&cfg)
	}
	return &Server{path: path, handler: handler, cfg: cfg, conns: map[*Conn]struct{}{},
		totals: &shmTotals{maxBytes: cfg.shmTotalBytes, maxSegs: cfg.shmTotalSegments}}
}

// OnEvent sets the function called for each Event a client sends, in arrival order, on that
// connection's reading goroutine. Without one, Events are dropped after their CRC check.
func (s *Server) OnEvent(fn EventHandler) {
	if fn == nil {
		s.onEvent.Store(nil)
		return
	}
	s.onEvent.Store(&fn)
}

// Listen binds the socket with mode 0600 (WithSocketMode), set before the socket listens.
// A stale socket file nobody listens on is replaced; a live one, or a path that is not a
// socket, is an error.
func (s *Server) Listen() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.ln != nil {
		return nil
	}
	if s.shutdown {
		return ErrServerClosed
	}
	if fi, err := os.Lstat(s.path); err == nil {
		if fi.Mode()&os.ModeSocket == 0 {
			return fmt.Errorf("hintens: %s exists and is not a socket", s.path)
		}
		if c, err := net.Dial("unix", s.path); err == nil {
			c.Close()
			return fmt.Errorf("hintens: %s: a server is already listening", s.path)
		}
		os.Remove(s.path)
	}
	ln, ident, err := listenUnix(s.path, s.cfg.socketMode)
	if err != nil {
		return err
	}
	s.ident = ident
	s.ln = ln
	return nil
}

// listenUnix binds path, sets its mode, and only then listens, so that no connect succeeds
// while the file still has the umask's mode (as the Python server does). It returns the
// file's identity, so that Shutdown removes only our own socket file.
func listenUnix(path string, mode uint32) (*net.UnixListener, [4]uint64, error) {
	var ident [4]uint64
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, ident, fmt.Errorf("hintens: socket: %w", err)
	}
	fail := func(what string, err error, bound bool) (*net.UnixListener, [4]uint64, error) {
		unix.Close(fd)
		if bound {
			removeSocketFile(path, ident)
		}
		return nil, ident, fmt.Errorf("hintens: %s %s: %w", what, path, err)
	}
	if err := unix.Bind(fd, &unix.SockaddrUnix{Name: path}); err != nil {
		return fail("bind", err, false)
	}
	var st unix.Stat_t
	if err := unix.Lstat(path, &st); err != nil {
		return fail("stat", err, false)
	}
	ident = fileIdentity(&st)
	if err := unix.Chmod(path, mode); err != nil {
		return fail("chmod", err, true)
	}
	if err := unix.Lstat(path, &st); err != nil { // the chmod changed its ctime
		return fail("stat", err, true)
	}
	ident = fileIdentity(&st)
	if err := unix.Listen(fd, unix.SOMAXCONN); err != nil {
		return fail("listen", err, true)
	}
	f := os.NewFile(uintptr(fd), path)
	l, err := net.FileListener(f)
	f.Close()
	if err != nil {
		removeSocketFile(path, ident)
		return nil, ident, fmt.Errorf("hintens: listen %s: %w", path, err)
	}
	return l.(*net.UnixListener), ident, nil
}

// fileIdentity tells our socket file from a successor's: (st_dev, st_ino) alone is not
// enough, as tmpfs hands a freed inode number out again at once; the ctime (ns) is added.
func fileIdentity(st *unix.Stat_t) [4]uint64 {
	return [4]uint64{st.Dev, st.Ino, uint64(st.Ctim.Sec), uint64(st.Ctim.Nsec)}
}

// removeSocketFile unlinks path if it is still the file we bound, not a successor's.
func removeSocketFile(path string, ident [4]uint64) {
	var st unix.Stat_t
	if unix.Lstat(path, &st) == nil && fileIdentity(&st) == ident {
		os.Remove(path)
	}
}

// Serve accepts and serves connections until Shutdown, then returns ErrServerClosed.
func (s *Server) Serve() error {
	if err := s.Listen(); err != nil {
		return err
	}
	s.mu.Lock()
	ln := s.ln
	s.mu.Unlock()
	for {
		nc, err := ln.AcceptUnix()
		if err != nil {
			s.mu.Lock()
			down := s.shutdown
			s.mu.Unlock()
			if down {
				return ErrServerClosed
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			log.Printf("hintens: accept: %v", err)
			time.Sleep(10 * time.Millisecond) // e.g. EMFILE: let descriptors come back
			continue
		}
		s.accept(nc)
	}
}

func (s *Server) refuseConn(nc *net.UnixConn, msg string) {
	nc.SetWriteDeadline(time.Now().Add(time.Second))
	nc.Write(EncodeFrame(TypeError, 0, 0, EncodeErrorPayload(CodeUnavailable, msg)))
	nc.Close()
}

func (s *Server) accept(nc *net.UnixConn) {
	cred, err := peerCred(nc)
	if err != nil {
		s.refuseConn(nc, "cannot read the peer's credentials")
		return
	}
	uid := cred.Uid
	if uid != uint32(os.Getuid()) && !containsUID(s.cfg.allowedUIDs, uid) && !containsUID(s.cfg.allowedGIDs, cred.Gid) {
		log.Printf("hintens: refused a client of uid %d", uid)
		s.refuseConn(nc, fmt.Sprintf("uid %d may not connect", uid))
		return
	}
	s.mu.Lock()
	if s.shutdown {
		s.mu.Unlock()
		s.refuseConn(nc, "the server is shutting down")
		return
	}
	if len(s.conns) >= s.cfg.maxConnections {
		s.mu.Unlock()
		log.Printf("hintens: refused a connection: %d connections already", s.cfg.maxConnections)
		s.refuseConn(nc, "too many connections")
		return
	}
	sc := &Conn{s: s, queue: make(chan request, 1024), done: make(chan struct{})}
	sc.c = newConn(nc, &s.cfg, true, s.totals)
	if s.cfg.blockingReads > 0 || s.cfg.blockingReads == 0 && int(cred.Pid) != os.Getpid() {
		if err := sc.c.leavePoller(); err != nil {
			log.Printf("hintens: blocking reads unavailable, the connection waits in the netpoller: %v", err)
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	sc.ctx, sc.cancel = context.WithValue(ctx, connKey{}, sc), cancel
	s.conns[sc] = struct{}{}
	s.wg.Add(1)
	s.mu.Unlock()

	c := sc.c
	c.dec.reserve = func(n int) bool {
		if s.pending.Add(int64(n)) > s.cfg.maxPendingBytes {
			s.pending.Add(-int64(n))
			return false
		}
		return true
	}
	c.dec.release = func(n int) { s.pending.Add(-int64(n)) }
	c.onRequest = func(rid uint64, payload []byte, l *lease) {
		if sc.inflight.Load() == 0 {
			sc.answer(rid, payload, l, failIfNoSegment)
			return
		}
		if l == nil && aliasesBuffer(len(payload)) {
			payload = append([]byte(nil), payload...)
		}
		sc.inflight.Add(1)
		sc.queue <- request{rid: rid, payload: payload, l: l}
	}
	c.onResponse = func(_ uint64, _ []byte, l *lease, _ error) { c.releaseLease(l) } // we send no Requests
	c.onEvent = func(payload []byte, l *lease) {
		if fn := s.onEvent.Load(); fn != nil {
			(*fn)(sc.ctx, payload)
		}
		c.releaseLease(l)
	}
	c.onReadEnd = func(error) { close(sc.queue) }
	c.onClose = func(error) { cancel() }
	if err := c.writeFrame(TypeEvent, 0, 0, c.localHello()); err != nil {
		c.closeWith(err)
	}
	go c.readLoop()
	go sc.work()
}

// work answers the connection's Requests in arrival order.
func (sc *Conn) work() {
	s, c := sc.s, sc.c
	defer func() {
		for r := range sc.queue { // after a close: hand back what is left
			c.releaseLease(r.l)
		}
		c.closeWith(fmt.Errorf("%w: connection ended", ErrClosed))
		s.mu.Lock()
		delete(s.conns, sc)
		s.mu.Unlock()
		close(sc.done)
		s.wg.Done()
	}()
	for r := range sc.queue {
		switch {
		case c.err() != nil:
			c.releaseLease(r.l)
		case r.answered:
			sc.respond(r.rid, r.payload, r.l, waitForSegment)
		default:
			sc.answer(r.rid, r.payload, r.l, waitForSegment)
		}
		sc.inflight.Add(-1)
	}
}

// answer runs the handler for one Request and sends its answer. With failIfNoSegment (on the
// reading goroutine, which must not wait: the releases it waits for arrive there), an answer
// that needs a segment when none is free goes to the worker, which waits.
func (sc *Conn) answer(rid uint64, payload []byte, l *lease, mode sendMode) {
	c := sc.c
	resp, err := sc.call(payload)
	if err != nil {
		var re *RemoteError
		if errors.As(err, &re) {
			c.sendError(rid, re.Code, re.Message)
		} else {
			c.sendError(rid, CodeHandlerError, err.Error())
		}
		c.releaseLease(l)
		return
	}
	sc.respond(rid, resp, l, mode)
}

func (sc *Conn) respond(rid uint64, resp []byte, l *lease, mode sendMode) {
	c := sc.c
	serr := c.send(TypeResponse, rid, resp, l, time.Time{}, sc.s.cfg.sendTimeout, mode)
	if serr == errWouldWait {
		sc.inflight.Add(1)
		sc.queue <- request{rid: rid, payload: append([]byte(nil), resp...), l: l, answered: true}
		return
	}
	if serr != nil && c.err() == nil {
		code := CodeUnavailable
		var pe *ProtocolError
		if errors.As(serr, &pe) && pe.Code == CodeTooLarge {
			code = CodeTooLarge
		}
		c.sendError(rid, code, serr.Error())
	}
	c.releaseLease(l) // after the answer: an echo's HREL follows the echo (section 9)
}

func (sc *Conn) call(req []byte) (resp []byte, err error) {
	defer func() {
		if p := recover(); p != nil {
			err = fmt.Errorf("handler panicked: %v", p)
		}
	}()
	return sc.s.handler(sc.ctx, req)
}

// SendEvent sends an Event to this client. It never waits for shared memory: when every
// segment is lent out, the Event goes inline if the client's limit allows, else it fails.
// A client that leaves our bytes unread for the send timeout is cut.
func (sc *Conn) SendEvent(payload []byte) error {
	return sc.c.send(TypeEvent, sc.c.eventIDSeq.Add(1), payload, nil, time.Time{}, 0, inlineIfNoSegment)
}

// Close cuts this connection.
func (sc *Conn) Close() error {
	sc.c.closeWith(fmt.Errorf("%w: closed by the server", ErrClosed))
	return nil
}

// Broadcast sends an Event to every connected client, and returns how many it reached. Each
// connection is written by its own goroutine, so a client that reads slowly delays only
// Broadcast's return (up to the send timeout, after which it is cut), not the others.
func (s *Server) Broadcast(payload []byte) int {
	s.mu.Lock()
	conns := make([]*Conn, 0, len(s.conns))
	for sc := range s.conns {
		conns = append(conns, sc)
	}
	s.mu.Unlock()
	var reached atomic.Int64
	var wg sync.WaitGroup
	for _, sc := range conns {
		wg.Add(1)
		go func(sc *Conn) {
			defer wg.Done()
			if sc.SendEvent(payload) == nil {
				reached.Add(1)
			}
		}(sc)
	}
	wg.Wait()
	return int(reached.Load())
}

// Shutdown stops accepting, removes the socket file, answers the Requests clients already
// sent, then closes each connection. Connections still busy when ctx ends are cut.
func (s *Server) Shutdown(ctx context.Context) error {
	s.mu.Lock()
	if !s.shutdown {
		s.shutdown = true
		if s.ln != nil {
			s.ln.Close()
			removeSocketFile(s.path, s.ident)
		}
	}
	conns := make([]*Conn, 0, len(s.conns))
	for sc := range s.conns {
		conns = append(conns, sc)
	}
	s.mu.Unlock()
	for _, sc := range conns {
		sc.c.nc.CloseRead() // what the client already sent is still read, then EOF
	}
	done := make(chan struct{})
	go func() { s.wg.Wait(); close(done) }()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		for _, sc := range conns {
			sc.Close()
		}
		<-done
		return ctx.Err()
	}
}

// Addr returns the socket path.
func (s *Server) Addr() string { return s.path }
