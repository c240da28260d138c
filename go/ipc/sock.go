package ipc

import (
	"net"
	"os"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// sock is what a connection writes through and closes: the *net.UnixConn while the
// connection waits in the runtime's netpoller, or a *blockingSock once it has left it
// (conn.leavePoller).
type sock interface {
	Write(b []byte) (int, error)
	WriteMsgUnix(b, oob []byte, addr *net.UnixAddr) (n, oobn int, err error)
	SetReadDeadline(t time.Time) error
	SetWriteDeadline(t time.Time) error
	SyscallConn() (syscall.RawConn, error)
	CloseRead() error
	Close() error
}

// blockingSock is a connection's socket outside the runtime's netpoller: the descriptor is
// in blocking mode and registered with no epoll set, so the kernel wakes only the thread
// that waits in a read or a write of it. A socket the netpoller holds wakes the runtime's
// polling thread for every byte that arrives and every byte the peer takes, whoever waits:
// with a client spinning for its answer and a server on the other CPU, those wakes of
// threads nobody needed made a 64 B round trip between two Go processes 1.3-1.5x the raw
// Go floor (bench/ports.py, unpinned). Reads and writes go through f's RawConn, which keeps
// the descriptor open under them: f.Close closes it when the last of them returns, and
// shutdown(2) in closeWith makes them return.
type blockingSock struct {
	f  *os.File
	rc syscall.RawConn
	// the write deadline (UnixNano; 0: none): a write waits for room in ppoll(2) up to it
	deadline atomic.Int64
}

func newBlockingSock(fd int) (*blockingSock, error) {
	if err := unix.SetNonblock(fd, false); err != nil {
		return nil, err
	}
	// a descriptor in blocking mode: os.NewFile leaves it out of the netpoller
	f := os.NewFile(uintptr(fd), "hintens-socket")
	rc, err := f.SyscallConn() // fails only for a nil *os.File
	if err != nil {
		return nil, err // fd stays open: the caller restores it and closes it
	}
	return &blockingSock{f: f, rc: rc}, nil
}

func (b *blockingSock) Write(p []byte) (int, error) {
	sent := 0
	for sent < len(p) {
		n, _, err := b.WriteMsgUnix(p[sent:], nil, nil)
		sent += n
		if err != nil {
			return sent, err
		}
	}
	return sent, nil
}

// WriteMsgUnix sends from p (which must not be empty) in one sendmsg, waiting for room up to
// the write deadline. It returns how much of p went (all of oob went with its first byte).
func (b *blockingSock) WriteMsgUnix(p, oob []byte, _ *net.UnixAddr) (n, oobn int, err error) {
	werr := b.rc.Write(func(fd uintptr) bool {
		for {
			n, err = unix.SendmsgN(int(fd), p, oob, nil, unix.MSG_NOSIGNAL|unix.MSG_DONTWAIT)
			if err != unix.EAGAIN && err != unix.EINTR {
				return true // some or all of p went, or the socket failed
			}
			// No room: wait for it in ppoll(2), up to the deadline itself. A blocking
			// sendmsg under SO_SNDTIMEO would not do: its timeout starts over for each
			// buffer the kernel allocates, so a peer that takes a little now and then
			// would keep one call going long past the deadline. (unix.Ppoll is
			// unix.Syscall: the runtime hands this thread's P to other goroutines while
			// the kernel holds us; shutdown(2) in closeWith wakes it.)
			var ts *unix.Timespec
			if d := b.deadline.Load(); d != 0 {
				left := time.Until(time.Unix(0, d))
				if left <= 0 {
					n, err = 0, os.ErrDeadlineExceeded
					return true
				}
				t := unix.NsecToTimespec(left.Nanoseconds())
				ts = &t
			}
			pfd := [1]unix.PollFd{{Fd: int32(fd), Events: unix.POLLOUT}}
			if _, perr := unix.Ppoll(pfd[:], ts, nil); perr != nil && perr != unix.EINTR {
				n, err = 0, perr
				return true
			}
		}
	})
	if werr != nil {
		return 0, 0, werr
	}
	if err != nil {
		return 0, 0, err
	}
	if n > 0 {
		oobn = len(oob)
	}
	return n, oobn, nil
}

// SetReadDeadline does nothing: the reader keeps SO_RCVTIMEO to its deadline itself
// (conn.blockingRecvmsg).
func (b *blockingSock) SetReadDeadline(time.Time) error { return nil }

func (b *blockingSock) SetWriteDeadline(t time.Time) error {
	d := int64(0)
	if !t.IsZero() {
		d = t.UnixNano()
	}
	b.deadline.Store(d)
	return nil
}

func (b *blockingSock) SyscallConn() (syscall.RawConn, error) { return b.rc, nil }

func (b *blockingSock) CloseRead() error {
	var err error
	if cerr := b.rc.Control(func(fd uintptr) { err = unix.Shutdown(int(fd), unix.SHUT_RD) }); cerr != nil {
		return cerr
	}
	return err
}

func (b *blockingSock) Close() error { return b.f.Close() }
