package ipc

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math/bits"
	"sync"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Shared memory (section 9): the 32-byte descriptor, our own segments (sealed memfds we
// write and lend to the peer), the peer's segments we map read-only, and the checks a
// receiver makes before it maps anything. All state of one connection lives in shmState,
// guarded by its mutex.

const (
	descriptorSize = 32

	DescNewSegment  uint32 = 1 << 0
	DescPeerSegment uint32 = 1 << 1

	minSegmentBytes = 1 << 20
)

// Descriptor is the payload of an SHM frame.
type Descriptor struct {
	SegmentID uint32
	Flags     uint32
	Size      uint64
	Offset    uint64
	Length    uint64
}

// Encode returns the 32-byte little-endian descriptor.
func (d Descriptor) Encode() []byte {
	out := make([]byte, descriptorSize)
	binary.LittleEndian.PutUint32(out, d.SegmentID)
	binary.LittleEndian.PutUint32(out[4:], d.Flags)
	binary.LittleEndian.PutUint64(out[8:], d.Size)
	binary.LittleEndian.PutUint64(out[16:], d.Offset)
	binary.LittleEndian.PutUint64(out[24:], d.Length)
	return out
}

// DecodeDescriptor reads a descriptor; ok is false unless it passes section 9's first check
// (exactly 32 bytes, no unknown flag bits, not both flag bits, segment id not 0).
func DecodeDescriptor(p []byte) (d Descriptor, ok bool) {
	if len(p) != descriptorSize {
		return d, false
	}
	d = Descriptor{binary.LittleEndian.Uint32(p), binary.LittleEndian.Uint32(p[4:]),
		binary.LittleEndian.Uint64(p[8:]), binary.LittleEndian.Uint64(p[16:]),
		binary.LittleEndian.Uint64(p[24:])}
	valid := d.Flags&^(DescNewSegment|DescPeerSegment) == 0 &&
		d.Flags != DescNewSegment|DescPeerSegment && d.SegmentID != 0
	return d, valid
}

// ownSeg is a segment we created and write; the peer maps it.
type ownSeg struct {
	id         uint32
	fd         int
	mem        []byte
	size       uint64
	holds      int  // frames sent naming it that the peer has not handed back
	views      int  // echoes of it (PEER_SEGMENT) lent to our application
	introduced bool // the peer was sent its descriptor and has not rejected it
	retired    bool
}

func (s *ownSeg) free() bool { return s.holds == 0 && s.views == 0 && !s.retired }

// peerSeg is a segment of the peer's that we map read-only.
type peerSeg struct {
	id      uint32
	mem     []byte
	size    uint64
	views   int
	retired bool // the peer retired it (HRET) or the connection ended
}

// shmTotals bounds what all of a server's connections map from their peers.
type shmTotals struct {
	mu                sync.Mutex
	bytes, segs       uint64
	maxBytes, maxSegs uint64
}

func (t *shmTotals) take(size uint64) bool {
	if t == nil {
		return true
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.segs+1 > t.maxSegs || size > t.maxBytes-t.bytes {
		return false
	}
	t.bytes += size
	t.segs++
	return true
}

func (t *shmTotals) give(size uint64) {
	if t == nil {
		return
	}
	t.mu.Lock()
	t.bytes -= size
	t.segs--
	t.mu.Unlock()
}

type shmState struct {
	mu sync.Mutex

	localFeatures uint32
	recvBytesCap  uint64 // our hello key 6
	recvSegsCap   uint32 // our hello key 7
	totals        *shmTotals
	peer          *Hello // the peer's hello, once understood

	mapped      map[uint32]*peerSeg
	mappedBytes uint64

	own      map[uint32]*ownSeg
	ownBytes uint64
	nextID   uint32
	poolCap  uint64 // our own bound on what we lend (shm_pool_bytes)
	changed  chan struct{}
	closed   bool
}

func newShmState(features uint32, recvBytes uint64, recvSegs uint32, poolBytes uint64, totals *shmTotals) *shmState {
	return &shmState{localFeatures: features, recvBytesCap: recvBytes, recvSegsCap: recvSegs,
		totals: totals, mapped: map[uint32]*peerSeg{}, own: map[uint32]*ownSeg{},
		poolCap: poolBytes, changed: make(chan struct{})}
}

// negotiated: both hellos announced SHM. Caller holds mu.
func (s *shmState) negotiatedLocked() bool {
	return s.localFeatures&FeatureSHM != 0 && s.peer != nil && s.peer.Features&FeatureSHM != 0
}

func (s *shmState) notifyLocked() {
	close(s.changed)
	s.changed = make(chan struct{})
}

// lease is a payload lent from shared memory: a view of a peer segment (released with an
// HREL to the peer) or an echo of one of our own segments.
type lease struct {
	st   *shmState
	peer *peerSeg
	own  *ownSeg
	data []byte
	once sync.Once
}

// shmDecision is what a receiver does with one SHM frame.
type shmDecision struct {
	lease    *lease
	code     uint32 // 0 for a lend
	msg      string
	handBack string // "HREL", "HREJ" or ""
	id       uint32
}

// receive applies section 9's checks to an SHM frame (flags has FlagSHM) and maps a new
// segment when they pass. fd is the descriptor that came with the frame, or -1; receive
// always consumes it (maps and closes it, or closes it). The hand-back it reports must be
// sent by the caller.
func (s *shmState) receive(typ uint32, flags uint16, rid uint64, payload []byte, fd int) (dec shmDecision) {
	s.mu.Lock()
	defer s.mu.Unlock()
	defer func() {
		if fd >= 0 {
			unix.Close(fd)
		}
	}()
	d, valid := DecodeDescriptor(payload)
	refuse := func(code uint32, msg string) shmDecision {
		out := shmDecision{code: code, msg: msg}
		if len(payload) == descriptorSize && d.SegmentID != 0 && d.Flags&DescPeerSegment == 0 {
			out.id = d.SegmentID
			if _, ok := s.mapped[d.SegmentID]; ok {
				out.handBack = "HREL"
			} else {
				out.handBack = "HREJ"
			}
		}
		return out
	}
	switch {
	case typ == TypeError:
		return refuse(CodeUnsupportedFlags, "an Error frame never carries SHM")
	case flags&FlagCompressed != 0:
		return refuse(CodeUnsupportedFlags, "COMPRESSED never goes with SHM")
	case typ == TypeEvent && rid == 0:
		return refuse(CodeUnsupportedFlags, "a control Event never carries SHM")
	case !s.negotiatedLocked():
		return refuse(CodeShmError, "shared memory was not negotiated on this connection")
	case !valid:
		return refuse(CodeShmError, "invalid shared-memory descriptor")
	}
	regionOK := d.Offset <= d.Size && d.Length <= d.Size-d.Offset
	switch {
	case d.Flags&DescPeerSegment != 0:
		o, ok := s.own[d.SegmentID]
		if !ok || o.holds == 0 || o.retired {
			return refuse(CodeShmError, fmt.Sprintf("segment %d is not one of ours lent out", d.SegmentID))
		}
		if d.Size != o.size || !regionOK {
			return refuse(CodeShmError, "echo region out of bounds")
		}
		o.views++
		return shmDecision{lease: &lease{st: s, own: o, data: o.mem[d.Offset : d.Offset+d.Length : d.Offset+d.Length]}}
	case d.Flags&DescNewSegment != 0:
		if fd < 0 {
			return refuse(CodeShmError, "NEW_SEGMENT without a file descriptor")
		}
		if _, ok := s.mapped[d.SegmentID]; ok {
			return refuse(CodeShmError, fmt.Sprintf("segment %d is already mapped", d.SegmentID))
		}
		if d.Size == 0 {
			return refuse(CodeShmError, "segment size 0")
		}
		if !regionOK {
			return refuse(CodeShmError, "region out of the segment")
		}
		if err := checkSegmentFD(fd, d.Size); err != nil {
			return refuse(CodeShmError, err.Error())
		}
		if uint64(len(s.mapped))+1 > uint64(s.recvSegsCap) || d.Size > s.recvBytesCap-s.mappedBytes {
			return refuse(CodeShmError, fmt.Sprintf("segment of %d bytes over this connection's bounds", d.Size))
		}
		if d.Size > uint64(maxInt) || !s.totals.take(d.Size) {
			return refuse(CodeShmError, "segment over the bound across connections")
		}
		mem, err := unix.Mmap(fd, 0, int(d.Size), unix.PROT_READ, unix.MAP_SHARED)
		if err != nil {
			s.totals.give(d.Size)
			return refuse(CodeShmError, "mmap: "+err.Error())
		}
		p := &peerSeg{id: d.SegmentID, mem: mem, size: d.Size}
		s.mapped[d.SegmentID] = p
		s.mappedBytes += d.Size
		p.views++
		return shmDecision{lease: &lease{st: s, peer: p, data: mem[d.Offset : d.Offset+d.Length : d.Offset+d.Length]}}
	default:
		p, ok := s.mapped[d.SegmentID]
		if !ok {
			return refuse(CodeShmError, fmt.Sprintf("unknown segment %d", d.SegmentID))
		}
		if p.size != d.Size || !regionOK {
			return refuse(CodeShmError, "region out of the segment")
		}
		p.views++
		return shmDecision{lease: &lease{st: s, peer: p, data: p.mem[d.Offset : d.Offset+d.Length : d.Offset+d.Length]}}
	}
}

const maxInt = int(^uint(0) >> 1)

// checkSegmentFD: a regular file, sealed against shrinking, at least size bytes.
func checkSegmentFD(fd int, size uint64) error {
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return fmt.Errorf("fstat: %w", err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG {
		return errors.New("the descriptor is not a regular file")
	}
	seals, err := unix.FcntlInt(uintptr(fd), unix.F_GET_SEALS, 0)
	if err != nil || seals&unix.F_SEAL_SHRINK == 0 {
		return errors.New("the memfd is not sealed against shrinking (F_SEAL_SHRINK)")
	}
	if st.Size < 0 || uint64(st.Size) < size {
		return fmt.Errorf("the memfd holds %d bytes, less than the segment size %d", st.Size, size)
	}
	return nil
}

// release lets go of a lent payload. For a peer segment it returns the id to hand back
// with HREL (0 if none is due: the connection is gone).
func (l *lease) release() (hrel uint32) {
	l.once.Do(func() {
		s := l.st
		s.mu.Lock()
		defer s.mu.Unlock()
		if p := l.peer; p != nil {
			p.views--
			if p.retired {
				if p.views == 0 {
					unix.Munmap(p.mem)
				}
			} else if !s.closed {
				hrel = p.id
			}
		} else if o := l.own; o != nil {
			o.views--
			if o.retired && o.views == 0 && o.holds == 0 {
				o.unmap()
			}
			s.notifyLocked()
		}
		l.data = nil
	})
	return hrel
}

func (o *ownSeg) unmap() {
	if o.mem != nil {
		unix.Munmap(o.mem)
		o.mem = nil
	}
	if o.fd >= 0 {
		unix.Close(o.fd)
		o.fd = -1
	}
}

// handBack applies an HREL or HREJ from the peer to our segments.
func (s *shmState) handBack(magic string, ids []uint32) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, id := range ids {
		o, ok := s.own[id]
		if !ok || o.holds == 0 {
			continue // a stray or repeated hand-back changes nothing
		}
		o.holds--
		if magic == "HREJ" {
			o.introduced = false
		}
	}
	s.notifyLocked()
}

// retire applies an HRET: the peer's segments are gone; unmap them once nothing reads them.
func (s *shmState) retire(ids []uint32) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, id := range ids {
		p, ok := s.mapped[id]
		if !ok {
			continue
		}
		s.dropMappedLocked(p)
	}
}

func (s *shmState) dropMappedLocked(p *peerSeg) {
	delete(s.mapped, p.id)
	s.mappedBytes -= p.size
	s.totals.give(p.size)
	p.retired = true
	if p.views == 0 {
		unix.Munmap(p.mem)
	}
}

// closeAll ends shared memory on a closed connection: the peer's segments are unmapped and
// ours closed, except what is still lent to the application (unmapped on release).
func (s *shmState) closeAll() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return
	}
	s.closed = true
	for _, p := range s.mapped {
		s.dropMappedLocked(p)
	}
	for id, o := range s.own {
		o.retired = true
		o.holds = 0
		if o.views == 0 {
			o.unmap()
		}
		delete(s.own, id)
	}
	s.notifyLocked()
}

func nextPow2(n uint64) uint64 {
	if n <= 1 {
		return 1
	}
	return 1 << (64 - bits.LeadingZeros64(n-1))
}

var errPoolTooSmall = errors.New("payload larger than the shared-memory pool allows")

// acquire finds or creates one of our segments to carry n bytes. It returns nil, wait when
// the caller must wait for a release (on wait) and try again, and the ids of free segments it
// retired to make room (the caller sends HRET for them before using the new segment).
func (s *shmState) acquire(n uint64) (seg *ownSeg, retired []uint32, wait <-chan struct{}, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil, nil, nil, ErrClosed
	}
	capBytes := s.poolCap
	capSegs := uint64(DefaultShmReceiveSegments)
	if s.peer != nil {
		capBytes = min(capBytes, s.peer.ShmReceiveBytes)
		capSegs = uint64(s.peer.ShmReceiveSegments)
	}
	if n == 0 {
		n = 1
	}
	if n > capBytes || capSegs == 0 {
		return nil, nil, nil, errPoolTooSmall
	}
	var best *ownSeg
	for _, o := range s.own {
		if o.free() && o.size >= n && (best == nil || o.size < best.size) {
			best = o
		}
	}
	if best != nil {
		return best, nil, nil, nil
	}
	size := max(nextPow2(n), minSegmentBytes)
	if size > capBytes {
		size = max(n, min(minSegmentBytes, capBytes))
	}
	fits := func() bool { return s.ownBytes+size <= capBytes && uint64(len(s.own))+1 <= capSegs }
	if !fits() {
		// retire free segments (too small for this payload) while that helps
		for id, o := range s.own {
			if fits() {
				break
			}
			if o.free() {
				o.retired = true
				o.unmap()
				delete(s.own, id)
				s.ownBytes -= o.size
				retired = append(retired, id)
			}
		}
		if !fits() {
			return nil, retired, s.changed, nil
		}
	}
	o, err := newOwnSeg(size)
	if err != nil {
		return nil, retired, nil, err
	}
	s.nextID++
	if s.nextID == 0 {
		s.nextID = 1
	}
	for s.own[s.nextID] != nil {
		s.nextID++
	}
	o.id = s.nextID
	s.own[o.id] = o
	s.ownBytes += size
	return o, retired, nil, nil
}

func newOwnSeg(size uint64) (*ownSeg, error) {
	fd, err := unix.MemfdCreate("hintens", unix.MFD_CLOEXEC|unix.MFD_ALLOW_SEALING)
	if err != nil {
		return nil, fmt.Errorf("memfd_create: %w", err)
	}
	if err := unix.Ftruncate(fd, int64(size)); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("ftruncate: %w", err)
	}
	if _, err := unix.FcntlInt(uintptr(fd), unix.F_ADD_SEALS,
		unix.F_SEAL_SHRINK|unix.F_SEAL_GROW|unix.F_SEAL_SEAL); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("sealing the memfd: %w", err)
	}
	mem, err := unix.Mmap(fd, 0, int(size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("mmap: %w", err)
	}
	return &ownSeg{fd: fd, mem: mem, size: size}, nil
}

// lend marks seg as carrying one more frame, and returns its descriptor and, for its first
// use (or after a reject), the file descriptor to pass with it.
func (s *shmState) lend(o *ownSeg, n uint64) (Descriptor, int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	d := Descriptor{SegmentID: o.id, Size: o.size, Length: n}
	fd := -1
	if !o.introduced {
		d.Flags = DescNewSegment
		fd = o.fd
		o.introduced = true
	}
	o.holds++
	return d, fd
}

// echoDescriptor: when data lies inside the peer segment that lease l lends us, the
// PEER_SEGMENT descriptor that points back at it, so an echo costs no copy.
func (l *lease) echoDescriptor(data []byte) (Descriptor, bool) {
	if l == nil || l.peer == nil || len(data) == 0 {
		return Descriptor{}, false
	}
	p := l.peer
	base := uintptr(unsafe.Pointer(unsafe.SliceData(p.mem)))
	ptr := uintptr(unsafe.Pointer(unsafe.SliceData(data)))
	if ptr < base || ptr-base > uintptr(len(p.mem)) || uintptr(len(data)) > uintptr(len(p.mem))-(ptr-base) {
		return Descriptor{}, false
	}
	return Descriptor{SegmentID: p.id, Flags: DescPeerSegment, Size: p.size,
		Offset: uint64(ptr - base), Length: uint64(len(data))}, true
}
