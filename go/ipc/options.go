package ipc

import "time"

// Defaults (PROTOCOL.md sections 6, 8, 9 and 10).
const (
	DefaultTimeout         = 10 * time.Second
	DefaultShmThreshold    = 64 << 10
	DefaultShmPoolBytes    = 1 << 30
	DefaultFrameTimeout    = 10 * time.Second
	DefaultSendTimeout     = 10 * time.Second
	DefaultMaxConnections  = 1024
	DefaultMaxPendingBytes = 256 << 20
	DefaultShutdownTimeout = 5 * time.Second
	DefaultSendQueueBytes  = 16 << 20
	minSendQueueBytes      = 128 << 10
	helloWait              = time.Second
	maxWaitingFDs          = 64
)

type config struct {
	timeout            time.Duration
	shm                bool
	shmThreshold       int
	shmPoolBytes       uint64
	maxPayload         uint32
	shmReceiveBytes    uint64
	shmReceiveSegments uint32
	shmTotalBytes      uint64
	shmTotalSegments   uint64
	frameTimeout       time.Duration
	sendTimeout        time.Duration
	maxConnections     int
	maxPendingBytes    int64
	sendQueueBytes     int
	allowedUIDs        []uint32
	allowedGIDs        []uint32
	socketMode         uint32
	blockingReads      int // 0: toward another process (a client: when GOMAXPROCS > 1); 1: on; -1: off
	spin               bool
}

func defaultConfig() config {
	return config{
		timeout:            DefaultTimeout,
		shm:                true,
		shmThreshold:       DefaultShmThreshold,
		shmPoolBytes:       DefaultShmPoolBytes,
		maxPayload:         DefaultMaxPayload,
		shmReceiveBytes:    DefaultShmReceiveBytes,
		shmReceiveSegments: DefaultShmReceiveSegments,
		shmTotalBytes:      4 << 30,
		shmTotalSegments:   4096,
		frameTimeout:       DefaultFrameTimeout,
		sendTimeout:        DefaultSendTimeout,
		maxConnections:     DefaultMaxConnections,
		maxPendingBytes:    DefaultMaxPendingBytes,
		sendQueueBytes:     DefaultSendQueueBytes,
		socketMode:         0o600,
		spin:               true,
	}
}

// Option configures a Client or a Server. Options that make no sense for one of them are
// ignored by it.
type Option func(*config)

// WithTimeout sets how long a request may take (Client, default 10 s), and how long a
// server's send may wait for a free shared-memory segment.
func WithTimeout(d time.Duration) Option { return func(c *config) { c.timeout = d } }

// WithSharedMemory turns shared memory on (the default) or off. Off, the hello does not
// announce it and every payload travels inline.
func WithSharedMemory(on bool) Option { return func(c *config) { c.shm = on } }

// WithShmThreshold sets the payload size from which shared memory carries a payload
// (default 64 KiB).
func WithShmThreshold(n int) Option { return func(c *config) { c.shmThreshold = n } }

// WithShmPoolBytes bounds the bytes of our own segments lent to one peer (default 1 GiB).
func WithShmPoolBytes(n uint64) Option { return func(c *config) { c.shmPoolBytes = n } }

// WithMaxPayload sets the largest inline payload accepted (hello key 3, default 64 MiB).
func WithMaxPayload(n uint32) Option { return func(c *config) { c.maxPayload = n } }

// WithShmReceiveLimits bounds what one peer may make us map (hello keys 6 and 7; defaults
// 1 GiB and 64 segments).
func WithShmReceiveLimits(bytes uint64, segments uint32) Option {
	return func(c *config) { c.shmReceiveBytes, c.shmReceiveSegments = bytes, segments }
}

// WithFrameTimeout: a frame must arrive whole within this time of its first byte (10 s).
func WithFrameTimeout(d time.Duration) Option { return func(c *config) { c.frameTimeout = d } }

// WithSendTimeout: a peer that leaves our bytes unread this long is cut (10 s).
func WithSendTimeout(d time.Duration) Option { return func(c *config) { c.sendTimeout = d } }

// WithMaxConnections bounds a server's connections (default 1024).
func WithMaxConnections(n int) Option { return func(c *config) { c.maxConnections = n } }

// WithMaxPendingBytes bounds the bytes a server buffers for unfinished large frames across
// all its connections (default 256 MiB).
func WithMaxPendingBytes(n int64) Option { return func(c *config) { c.maxPendingBytes = n } }

// WithAllowedUIDs: a server also accepts clients of these uids; a client also trusts a
// server of these uids (besides its own uid, and root for a client).
func WithAllowedUIDs(uids ...uint32) Option {
	return func(c *config) { c.allowedUIDs = append(c.allowedUIDs, uids...) }
}

// WithSocketMode sets the server socket file's mode (default 0600).
func WithSocketMode(mode uint32) Option { return func(c *config) { c.socketMode = mode } }

// WithSendQueueBytes bounds the Events a server holds for one client that does not read
// (default 16 MiB, at least 128 KiB); past it, that client is cut.
func WithSendQueueBytes(n int) Option {
	return func(c *config) { c.sendQueueBytes = max(n, minSendQueueBytes) }
}

// WithAllowedGIDs: a server also accepts clients whose (primary) gid is listed.
func WithAllowedGIDs(gids ...uint32) Option {
	return func(c *config) { c.allowedGIDs = append(c.allowedGIDs, gids...) }
}

// WithSpin chooses whether a client, while a request waits for its answer, tries the socket
// again (yielding the CPU between tries) for up to 100 us before its goroutine parks, so that
// an answer from a server on another CPU costs no wake-up. On by default. The budget adapts
// as the Python and Rust clients' does: full while answers come within 100 us, halved after
// each wait that lasted longer (a slow server soon costs no spinning), tried again every 8th
// wait, then every 16th, up to every 1,024th. At most one goroutine per CPU beyond the first
// spins in a process, none on a one-CPU machine, and none while client and server are pinned
// to one same CPU. Servers ignore it.
func WithSpin(on bool) Option { return func(c *config) { c.spin = on } }

// WithBlockingReads chooses how a connection waits. On, its socket leaves the runtime's
// netpoller: the descriptor is put in blocking mode and registered with no epoll set, the
// reading goroutine waits in recvmsg itself and the kernel wakes it directly, and writes
// wait in the kernel (deadlines through SO_RCVTIMEO and ppoll). The cost is one OS
// thread per waiting connection (WithMaxConnections bounds a server's; the runtime allows
// 10,000 threads). Off, the connection waits in the netpoller and an idle one costs no
// thread, but the netpoller's thread is woken for every byte that arrives and every byte the
// peer takes, whoever waits for them. Without this option a server reads blocking, and a
// client does when GOMAXPROCS is 2 or more, unless the peer is this same process (the
// netpoller hands that one's bytes over without an OS wake-up: an in-process round trip
// measured 10.5 us there, 24 us outside it). A 64 B round trip between two Go processes on
// two CPUs measured 1.5x the raw netpoller floor through the netpoller (the client's spin
// and the server each woke a thread nobody needed), 1.0x outside it. With GOMAXPROCS 1 a
// client stays in the netpoller: a read blocked in the kernel holds the only P until the
// runtime's monitor takes it back (up to 10 ms in a process that was idle), and the rest of
// the program would wait that long.
func WithBlockingReads(on bool) Option {
	return func(c *config) {
		c.blockingReads = -1
		if on {
			c.blockingReads = 1
		}
	}
}
