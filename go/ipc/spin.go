package ipc

import (
	"os"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// The spin before a client's read of an answer: the same rules as the Python and Rust
// clients (hintens/transport/_ring.h, hx_spin_recvmsg). While a request waits for its answer
// and no frame is half read, the reader tries the socket with MSG_DONTWAIT, yielding the CPU
// between tries, for up to spinMax before it parks: an answer from a server on another CPU
// then costs no wake-up. The budget is full while answers come within spinMax of the wait's
// start, halves after each wait that lasted longer, and once spent is tried again in full
// every 8th wait (then every 16th, up to every 1,024th, while the tries do not pay). At most
// one goroutine per CPU beyond the first spins in a process (none on a one-CPU machine), none
// while this process and its peer are pinned to one same CPU, and none toward a server in
// this same process. Not wire-visible.
const (
	spinMax       = 100 * time.Microsecond
	spinProbeMin  = 8
	spinProbeMax  = 1024
	spinUnknown   = -1
	spinNotBeside = 0
	spinBeside    = 1
)

var (
	spinners       atomic.Int32
	maxSpinnersVal = sync.OnceValue(func() int32 {
		// the machine's online CPUs ("0" alone: one), whatever our affinity mask says
		if online, err := os.ReadFile("/sys/devices/system/cpu/online"); err == nil &&
			strings.TrimSpace(string(online)) == "0" {
			return 0
		}
		var set unix.CPUSet
		ours := 1
		if unix.SchedGetaffinity(0, &set) == nil {
			ours = set.Count()
		}
		return int32(max(ours-1, 1))
	})
)

// spinState is one connection's budget and counters. Only the goroutine that holds the read
// role uses the budget; the counters are read by Stats.
type spinState struct {
	budget     time.Duration
	probeEvery int
	unspun     int
	beside     int // spinUnknown, spinNotBeside or spinBeside
	spins, won atomic.Uint64
	// the wait in progress
	waitStart time.Time
	tried     bool // this read's spin is over (won or not)
	spun      bool // it ran and did not win: the read that follows reports back (after)
}

func newSpinState() *spinState {
	return &spinState{budget: spinMax, probeEvery: spinProbeMin, beside: spinUnknown}
}

// peerBeside tells whether a spin on fd may see the peer move: the peer (SO_PEERCRED) is
// another process, and we may use two CPUs or more, or it may use a CPU we may not, or it
// cannot be looked at. A server in this process is not: the runtime hands its answer to the
// waiting goroutine without an OS wake-up, and a spin would only push the server's goroutine
// onto another thread (a 64 B round trip measured 10 us without, 22 us with).
func peerBeside(fd int) bool {
	var ours, theirs unix.CPUSet
	cred, err := unix.GetsockoptUcred(fd, unix.SOL_SOCKET, unix.SO_PEERCRED)
	if err == nil && int(cred.Pid) == os.Getpid() {
		return false
	}
	if unix.SchedGetaffinity(0, &ours) != nil || ours.Count() >= 2 {
		return true
	}
	if err != nil || cred.Pid <= 0 || unix.SchedGetaffinity(int(cred.Pid), &theirs) != nil {
		return true
	}
	for cpu := 0; cpu < len(theirs)*64; cpu++ {
		if theirs.IsSet(cpu) && !ours.IsSet(cpu) {
			return true
		}
	}
	return false
}

// begin returns the budget of the wait about to start (0: park at once), with a spinner's
// slot taken when it is not 0 (end gives it back).
func (s *spinState) begin(fd int) (time.Duration, bool) {
	if maxSpinnersVal() == 0 {
		return 0, false
	}
	if s.beside == spinUnknown {
		s.beside = spinNotBeside
		if peerBeside(fd) {
			s.beside = spinBeside
		}
	}
	if s.beside == spinNotBeside {
		return 0, false
	}
	budget, probing := s.budget, false
	if budget == 0 {
		s.unspun++
		if s.unspun < s.probeEvery {
			return 0, false
		}
		s.unspun, budget, probing = 0, spinMax, true
	}
	if spinners.Add(1) > maxSpinnersVal() {
		spinners.Add(-1)
		return 0, false // others spin: a probe refused so is not counted
	}
	s.spins.Add(1)
	return budget, probing
}

// end gives back a slot begin took: won, bytes came (the budget is full again); otherwise a
// probe that ran out makes the next one wait twice as long.
func (s *spinState) end(won, ranOutProbing bool) {
	spinners.Add(-1)
	if won {
		s.won.Add(1)
		s.budget, s.probeEvery = spinMax, spinProbeMin
	} else if ranOutProbing && s.probeEvery < spinProbeMax {
		s.probeEvery *= 2
	}
}

// after reports the read that followed a spin that did not win (bytes came, or the read
// deadline passed): spinning would have paid if the bytes came within spinMax.
func (s *spinState) after() {
	if time.Since(s.waitStart) <= spinMax {
		s.budget, s.probeEvery = spinMax, spinProbeMin
	} else {
		s.budget /= 2
	}
}

// spinRecvmsg is the body of a netpoller read that spins first (readFn's spinning twin):
// the first call of a wait spins (spinTry), later calls (after the netpoller woke us) read
// as recvmsg does.
func (c *conn) spinRecvmsg(fd uintptr) bool {
	if !c.spin.tried && c.spinTry(fd) {
		return true
	}
	return c.recvmsg(fd)
}

// spinBlockingRecvmsg is blockingRecvmsg that spins first.
func (c *conn) spinBlockingRecvmsg(fd uintptr) bool {
	return c.spinTry(fd) || c.blockingRecvmsg(fd)
}

// spinTry is a wait's spin on fd, which need not be in non-blocking mode: it tries recvmsg
// with MSG_DONTWAIT, yielding between tries, for up to the budget. It returns true when the
// read is over (bytes, the end of the stream or an error, in c.rn, c.roobn and c.rerr), and
// false when it did not spin or ran out (spun is then set: the read that follows reports
// back through after).
func (c *conn) spinTry(fd uintptr) bool {
	s := c.spin
	s.tried = true
	s.waitStart = time.Now()
	budget, probing := s.begin(int(fd))
	if budget == 0 {
		s.spun = true
		return false
	}
	// With GOMAXPROCS 1 the P's other goroutines must run while we spin: Gosched lets them.
	// With more Ps they run on the others, and Gosched would only hurt: it puts us on the
	// global queue and wakes an idle P's thread to look for work, which takes us over on
	// another thread (a 64 B round trip to a Go server on the other CPU measured 3.4-5
	// context switches and 19.5-22.4 us with it, 0.03-0.25 and 13.0-14.9 us without).
	gosched := runtime.GOMAXPROCS(0) == 1
	for {
		switch c.recvmsgOnce(fd, unix.MSG_DONTWAIT) {
		case 0:
			s.end(true, false)
			return true
		case unix.EAGAIN, unix.EINTR:
		default:
			s.end(false, false)
			return true
		}
		// the goroutines of this P first (with GOMAXPROCS 1), then the threads of this CPU
		if gosched {
			runtime.Gosched()
		}
		unix.RawSyscall(unix.SYS_SCHED_YIELD, 0, 0, 0)
		if time.Since(s.waitStart) >= budget {
			s.end(false, probing)
			s.spun = true
			return false
		}
	}
}
