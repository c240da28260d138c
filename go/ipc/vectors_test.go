package ipc

// The vectors of tests/vectors/*.json (the files the Python suite checks too): every vector of
// every file except ring.json, of which only what applies to a port without the ring is checked
// (TestVectorsRing): the hello's RING bit, and the switches as control Events.

import (
	"bytes"
	"encoding/hex"
	"encoding/json"
	"errors"
	"net"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

const vectorDir = "../../tests/vectors"

func loadVectors(t *testing.T, name string, into any) {
	t.Helper()
	raw, err := os.ReadFile(filepath.Join(vectorDir, name))
	if err != nil {
		t.Fatalf("reading %s: %v", name, err)
	}
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.UseNumber()
	if err := dec.Decode(into); err != nil {
		t.Fatalf("parsing %s: %v", name, err)
	}
}

func unhex(t *testing.T, s string) []byte {
	t.Helper()
	b, err := hex.DecodeString(s)
	if err != nil {
		t.Fatalf("bad hex %q: %v", s, err)
	}
	return b
}

func TestVectorsCRC16(t *testing.T) {
	var v struct {
		Vectors []struct {
			Name, Input string
			CRC         uint16
		}
		Patterns []struct {
			Name                  string
			Length, Mul, Add, Mod int
			CRC                   uint16
		}
	}
	loadVectors(t, "crc16.json", &v)
	if len(v.Vectors) < 256 || len(v.Patterns) == 0 {
		t.Fatalf("too few vectors: %d, %d", len(v.Vectors), len(v.Patterns))
	}
	for _, c := range v.Vectors {
		if got := CRC16(unhex(t, c.Input)); got != c.CRC {
			t.Errorf("%s: got %04x, want %04x", c.Name, got, c.CRC)
		}
	}
	for _, c := range v.Patterns {
		b := make([]byte, c.Length)
		for i := range b {
			b[i] = byte((c.Mul*i + c.Add) % c.Mod)
		}
		if got := CRC16(b); got != c.CRC {
			t.Errorf("%s: got %04x, want %04x", c.Name, got, c.CRC)
		}
	}
}

func TestVectorsHeaders(t *testing.T) {
	var v struct {
		Headers []struct {
			Name      string
			Version   uint16
			Type      uint32
			Flags     uint16
			Length    uint32
			Checksum  uint16
			RequestID uint64 `json:"request_id"`
			Hex       string
		}
	}
	loadVectors(t, "headers.json", &v)
	for _, c := range v.Headers {
		want := Header{c.Version, c.Type, c.Flags, c.Length, c.Checksum, c.RequestID}
		if got := hex.EncodeToString(want.Encode()); got != c.Hex {
			t.Errorf("%s: encoded %s, want %s", c.Name, got, c.Hex)
		}
		got, ok := DecodeHeader(unhex(t, c.Hex))
		if !ok || got != want {
			t.Errorf("%s: decoded %+v, want %+v", c.Name, got, want)
		}
	}
}

type frameVec struct {
	Name      string
	Type      uint32
	Flags     uint16
	Version   uint16
	RequestID uint64 `json:"request_id"`
	Payload   string
	Frame     string
}

func frameObj(f Frame) frameVec {
	return frameVec{Type: f.Type, Flags: f.Flags, Version: f.Version, RequestID: f.RequestID,
		Payload: hex.EncodeToString(f.Payload)}
}

func sameFrames(a, b []frameVec) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		x, y := a[i], b[i]
		x.Name, y.Name, x.Frame, y.Frame = "", "", "", ""
		if x != y {
			return false
		}
	}
	return true
}

// decodeAll feeds stream to a decoder in chunks of chunk bytes (0: whole), returning the
// frames before the first error, the error, the number of bytes fed when it was reported,
// and the frames after it (for a recoverable error).
func decodeAll(stream []byte, maxPayload uint32, chunk int) (before []frameVec, perr *ProtocolError, at int, after []frameVec) {
	d := NewDecoder(maxPayload)
	fed := 0
	if chunk == 0 {
		chunk = len(stream)
	}
	drain := func() bool {
		for {
			f, ok, e := d.Next()
			if e != nil {
				if perr == nil {
					perr, at = e, fed
				}
				if e.Fatal {
					return false
				}
				continue
			}
			if !ok {
				return true
			}
			if perr == nil {
				before = append(before, frameObj(f))
			} else {
				after = append(after, frameObj(f))
			}
		}
	}
	for fed < len(stream) {
		n := min(chunk, len(stream)-fed)
		for n > 0 {
			sp := d.Space()
			k := copy(sp, stream[fed:fed+n])
			d.Commit(k)
			fed += k
			n -= k
			if !drain() {
				return
			}
		}
	}
	drain()
	return
}

func TestVectorsFrames(t *testing.T) {
	var v struct {
		Frames  []frameVec
		Streams []struct {
			Name, Stream string
			Frames       []frameVec
		}
	}
	loadVectors(t, "frames.json", &v)
	for _, c := range v.Frames {
		p := unhex(t, c.Payload)
		h := Header{c.Version, c.Type, c.Flags, uint32(len(p)), CRC16(p), c.RequestID}
		if got := hex.EncodeToString(append(h.Encode(), p...)); got != c.Frame {
			t.Errorf("%s: encoded %s", c.Name, got)
		}
		if c.Version == version10 {
			if got := hex.EncodeToString(EncodeFrame(c.Type, c.Flags, c.RequestID, p)); got != c.Frame {
				t.Errorf("%s: EncodeFrame gave %s", c.Name, got)
			}
		}
		for _, chunk := range []int{0, 1, 7} {
			got, perr, _, _ := decodeAll(unhex(t, c.Frame), DefaultMaxPayload, chunk)
			if perr != nil || !sameFrames(got, []frameVec{c}) {
				t.Errorf("%s (chunk %d): decoded %+v, %v", c.Name, chunk, got, perr)
			}
		}
	}
	for _, c := range v.Streams {
		for _, chunk := range []int{0, 1, 5, 24} {
			got, perr, _, _ := decodeAll(unhex(t, c.Stream), DefaultMaxPayload, chunk)
			if perr != nil || !sameFrames(got, c.Frames) {
				t.Errorf("%s (chunk %d): decoded %+v, %v", c.Name, chunk, got, perr)
			}
		}
	}
}

func TestVectorsMalformed(t *testing.T) {
	var v struct {
		Cases []struct {
			Name         string
			MaxPayload   uint32 `json:"max_payload"`
			Stream       string
			FramesBefore []frameVec `json:"frames_before"`
			Error        *struct {
				Name      string
				Code      uint32
				Fatal     bool
				RequestID *uint64 `json:"request_id"`
			}
			ErrorAt     *int       `json:"error_at"`
			FramesAfter []frameVec `json:"frames_after"`
		}
	}
	loadVectors(t, "malformed.json", &v)
	if len(v.Cases) == 0 {
		t.Fatal("no cases")
	}
	for _, c := range v.Cases {
		for _, chunk := range []int{1, 0} {
			before, perr, at, after := decodeAll(unhex(t, c.Stream), c.MaxPayload, chunk)
			if !sameFrames(before, c.FramesBefore) {
				t.Errorf("%s: frames before %+v, want %+v", c.Name, before, c.FramesBefore)
			}
			if c.Error == nil {
				if perr != nil {
					t.Errorf("%s: unexpected %v", c.Name, perr)
				}
				continue
			}
			if perr == nil {
				t.Errorf("%s (chunk %d): no error, want %s", c.Name, chunk, c.Error.Name)
				continue
			}
			if perr.Code != c.Error.Code || perr.Fatal != c.Error.Fatal || codeName(perr.Code) != c.Error.Name {
				t.Errorf("%s: got %v (fatal %v), want %s", c.Name, perr, perr.Fatal, c.Error.Name)
			}
			if (c.Error.RequestID == nil) == perr.HasID || (perr.HasID && perr.RequestID != *c.Error.RequestID) {
				t.Errorf("%s: request id %v/%d, want %v", c.Name, perr.HasID, perr.RequestID, c.Error.RequestID)
			}
			if chunk == 1 && at != *c.ErrorAt {
				t.Errorf("%s: error at byte %d, want %d", c.Name, at, *c.ErrorAt)
			}
			if !c.Error.Fatal && !sameFrames(after, c.FramesAfter) {
				t.Errorf("%s: frames after %+v, want %+v", c.Name, after, c.FramesAfter)
			}
		}
	}
}

func TestVectorsHellos(t *testing.T) {
	var v struct {
		Hellos []struct {
			Name               string
			Payload            string
			Understood         bool
			Minor              *uint8
			Features           *uint32
			MaxPayload         *uint32 `json:"max_payload"`
			ShmReceiveBytes    *uint64 `json:"shm_receive_bytes"`
			ShmReceiveSegments *uint32 `json:"shm_receive_segments"`
			Entries            [][2]json.RawMessage
			Encode             *struct {
				Minor              uint8
				Features           uint32
				MaxPayload         uint32               `json:"max_payload"`
				ShmReceiveBytes    uint64               `json:"shm_receive_bytes"`
				ShmReceiveSegments uint32               `json:"shm_receive_segments"`
				ExtraEntries       [][2]json.RawMessage `json:"extra_entries"`
			}
		}
	}
	loadVectors(t, "hellos.json", &v)
	entries := func(raw [][2]json.RawMessage) []HelloEntry {
		var out []HelloEntry
		for _, e := range raw {
			k, _ := strconv.Atoi(string(e[0]))
			var h string
			json.Unmarshal(e[1], &h)
			out = append(out, HelloEntry{uint16(k), unhex(t, h)})
		}
		return out
	}
	for _, c := range v.Hellos {
		h, got, ok := ParseHello(unhex(t, c.Payload))
		if ok != c.Understood {
			t.Errorf("%s: understood %v, want %v", c.Name, ok, c.Understood)
			continue
		}
		if !ok {
			continue
		}
		if h.Minor != *c.Minor || h.Features != *c.Features || h.MaxPayload != *c.MaxPayload ||
			h.ShmReceiveBytes != *c.ShmReceiveBytes || h.ShmReceiveSegments != *c.ShmReceiveSegments {
			t.Errorf("%s: read %+v", c.Name, h)
		}
		want := entries(c.Entries)
		if len(got) != len(want) {
			t.Errorf("%s: %d entries, want %d", c.Name, len(got), len(want))
		} else {
			for i := range got {
				if got[i].Key != want[i].Key || !bytes.Equal(got[i].Value, want[i].Value) {
					t.Errorf("%s: entry %d: %+v, want %+v", c.Name, i, got[i], want[i])
				}
			}
		}
		if e := c.Encode; e != nil {
			out := EncodeHello(Hello{Minor: e.Minor, Features: e.Features, MaxPayload: e.MaxPayload,
				ShmReceiveBytes: e.ShmReceiveBytes, ShmReceiveSegments: e.ShmReceiveSegments},
				entries(e.ExtraEntries)...)
			if hex.EncodeToString(out) != c.Payload {
				t.Errorf("%s: encoded %x", c.Name, out)
			}
		}
	}
}

func TestVectorsControl(t *testing.T) {
	var v struct {
		Controls []struct {
			Name, Payload string
			Ignored       bool
			Magic         *string
			IDs           []uint32
		}
	}
	loadVectors(t, "control.json", &v)
	for _, c := range v.Controls {
		p := unhex(t, c.Payload)
		magic, ids, ok := ParseControl(p)
		if ok == c.Ignored {
			t.Errorf("%s: understood %v", c.Name, ok)
			continue
		}
		if !ok {
			continue
		}
		if magic != *c.Magic || len(ids) != len(c.IDs) {
			t.Errorf("%s: %s %v", c.Name, magic, ids)
			continue
		}
		for i := range ids {
			if ids[i] != c.IDs[i] {
				t.Errorf("%s: ids %v, want %v", c.Name, ids, c.IDs)
				break
			}
		}
		if !bytes.Equal(EncodeControl(magic, ids), p) {
			t.Errorf("%s: encoding differs", c.Name)
		}
	}
}

func TestVectorsErrors(t *testing.T) {
	var v struct {
		Valid []struct {
			Name, Message, Payload string
			Code                   uint32
		}
		HintensTruncation []struct {
			Name, Message, Payload string
			SentMessage            string `json:"sent_message"`
			Code                   uint32
		} `json:"hintens_truncation"`
		InvalidUTF8 []struct {
			Name, Payload string
			Code          uint32
			MessagePrefix string `json:"message_prefix"`
		} `json:"invalid_utf8"`
		Malformed []struct {
			Name, Payload string
			ReportedCode  uint32 `json:"reported_code"`
		}
	}
	loadVectors(t, "errors.json", &v)
	for _, c := range v.Valid {
		if got := hex.EncodeToString(EncodeErrorPayload(c.Code, c.Message)); got != c.Payload {
			t.Errorf("%s: encoded %s", c.Name, got)
		}
		code, msg, ok := DecodeErrorPayload(unhex(t, c.Payload))
		if !ok || code != c.Code || msg != c.Message {
			t.Errorf("%s: decoded %d %q %v", c.Name, code, msg, ok)
		}
	}
	for _, c := range v.HintensTruncation {
		if got := hex.EncodeToString(EncodeErrorPayload(c.Code, c.Message)); got != c.Payload {
			t.Errorf("%s: encoded %.80s...", c.Name, got)
		}
		code, msg, ok := DecodeErrorPayload(unhex(t, c.Payload))
		if !ok || code != c.Code || msg != c.SentMessage {
			t.Errorf("%s: decoded %d, %d bytes, %v", c.Name, code, len(msg), ok)
		}
	}
	for _, c := range v.InvalidUTF8 {
		code, msg, ok := DecodeErrorPayload(unhex(t, c.Payload))
		if !ok || code != c.Code || !strings.HasPrefix(msg, c.MessagePrefix) || !strings.ContainsRune(msg, '\uFFFD') {
			t.Errorf("%s: decoded %d %q %v", c.Name, code, msg, ok)
		}
	}
	for _, c := range v.Malformed {
		if _, _, ok := DecodeErrorPayload(unhex(t, c.Payload)); ok {
			t.Errorf("%s: accepted", c.Name)
		}
		if re := remoteErrorFromPayload(unhex(t, c.Payload)); re.Code != c.ReportedCode {
			t.Errorf("%s: reported code %d", c.Name, re.Code)
		}
	}
}

type descFields struct {
	SegmentID uint32 `json:"segment_id"`
	Flags     uint32
	Size      uint64
	Offset    uint64
	Length    uint64
}

func TestVectorsDescriptors(t *testing.T) {
	var v struct {
		Descriptors []struct {
			Name  string
			Valid bool
			Hex   string
			descFields
		}
	}
	loadVectors(t, "descriptors.json", &v)
	for _, c := range v.Descriptors {
		d, ok := DecodeDescriptor(unhex(t, c.Hex))
		if ok != c.Valid {
			t.Errorf("%s: valid %v", c.Name, ok)
			continue
		}
		if !ok {
			continue
		}
		want := Descriptor{c.SegmentID, c.Flags, c.Size, c.Offset, c.Length}
		if d != want || hex.EncodeToString(want.Encode()) != c.Hex {
			t.Errorf("%s: %+v", c.Name, d)
		}
	}
}

func patternMem(size uint64) []byte {
	b := make([]byte, size)
	for i := range b {
		b[i] = byte(i % 251)
	}
	return b
}

func fdIsOpen(fd int) bool {
	_, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0)
	return err == nil
}

// makeFD creates the descriptor a decision vector's frame came with.
func makeFD(t *testing.T, kind string, size *uint64, seals []string) int {
	t.Helper()
	switch kind {
	case "pipe":
		var p [2]int
		if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
			t.Fatal(err)
		}
		unix.Close(p[1])
		return p[0]
	case "file":
		f, err := os.CreateTemp(t.TempDir(), "seg")
		if err != nil {
			t.Fatal(err)
		}
		f.Truncate(int64(*size))
		fd, err := unix.Dup(int(f.Fd()))
		if err != nil {
			t.Fatal(err)
		}
		f.Close()
		return fd
	}
	fd, err := unix.MemfdCreate("vector", unix.MFD_CLOEXEC|unix.MFD_ALLOW_SEALING)
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.Ftruncate(fd, int64(*size)); err != nil {
		t.Fatal(err)
	}
	unix.Pwrite(fd, patternMem(min(*size, 64<<10)), 0)
	flags := 0
	for _, s := range seals {
		flags |= map[string]int{"SHRINK": unix.F_SEAL_SHRINK, "GROW": unix.F_SEAL_GROW, "SEAL": unix.F_SEAL_SEAL}[s]
	}
	if flags != 0 {
		if _, err := unix.FcntlInt(uintptr(fd), unix.F_ADD_SEALS, flags); err != nil {
			t.Fatal(err)
		}
	}
	return fd
}

func TestVectorsDecisions(t *testing.T) {
	var v struct {
		Decisions []struct {
			Name     string
			Receiver struct {
				Features           uint32
				ShmReceiveBytes    uint64 `json:"shm_receive_bytes"`
				ShmReceiveSegments uint32 `json:"shm_receive_segments"`
				Mapped, Lent       map[string]uint64
				OwnNotLent         map[string]uint64 `json:"own_not_lent"`
			}
			PeerHello *string `json:"peer_hello"`
			Frame     struct {
				Type      uint32
				Flags     uint16
				RequestID uint64 `json:"request_id"`
				Payload   string
			}
			FD *struct {
				Kind  string
				Size  *uint64
				Seals []string
			}
			Expect struct {
				Outcome         string
				Code            *uint32
				Payload         *string
				HandBack        *string           `json:"hand_back"`
				HandBackPayload *string           `json:"hand_back_payload"`
				MappedAfter     map[string]uint64 `json:"mapped_after"`
			}
		}
	}
	loadVectors(t, "descriptors.json", &v)
	if len(v.Decisions) == 0 {
		t.Fatal("no decisions")
	}
	for _, c := range v.Decisions {
		r := c.Receiver
		st := newShmState(r.Features, r.ShmReceiveBytes, r.ShmReceiveSegments, DefaultShmPoolBytes, nil)
		if c.PeerHello != nil {
			if h, _, ok := ParseHello(unhex(t, *c.PeerHello)); ok {
				st.peer = &h
			}
		}
		fake := map[uint32]bool{}
		for k, size := range r.Mapped {
			id, _ := strconv.Atoi(k)
			st.mapped[uint32(id)] = &peerSeg{id: uint32(id), mem: patternMem(size), size: size}
			st.mappedBytes += size
			fake[uint32(id)] = true
		}
		for k, size := range r.Lent {
			id, _ := strconv.Atoi(k)
			st.own[uint32(id)] = &ownSeg{id: uint32(id), fd: -1, mem: patternMem(size), size: size, holds: 1, introduced: true}
		}
		for k, size := range r.OwnNotLent {
			id, _ := strconv.Atoi(k)
			st.own[uint32(id)] = &ownSeg{id: uint32(id), fd: -1, mem: patternMem(size), size: size, introduced: true}
		}
		fd := -1
		if c.FD != nil {
			fd = makeFD(t, c.FD.Kind, c.FD.Size, c.FD.Seals)
		}
		dec := st.receive(c.Frame.Type, c.Frame.Flags, c.Frame.RequestID, unhex(t, c.Frame.Payload), fd)
		if fd >= 0 && fdIsOpen(fd) {
			t.Errorf("%s: the frame's descriptor was left open", c.Name)
			unix.Close(fd)
		}
		e := c.Expect
		handBack, handBackID := dec.handBack, dec.id
		if e.Outcome == "lend" {
			if dec.lease == nil {
				t.Errorf("%s: refused (%d %s), want a lend", c.Name, dec.code, dec.msg)
				continue
			}
			if hex.EncodeToString(dec.lease.data) != *e.Payload {
				t.Errorf("%s: lent %d bytes that differ", c.Name, len(dec.lease.data))
			}
			handBack = ""
			if id := dec.lease.release(); id != 0 {
				handBack, handBackID = "HREL", id
			}
		} else {
			if dec.lease != nil {
				t.Errorf("%s: lent, want %s", c.Name, e.Outcome)
				continue
			}
			if dec.code != *e.Code || codeName(dec.code) != e.Outcome {
				t.Errorf("%s: code %d (%s), want %s", c.Name, dec.code, dec.msg, e.Outcome)
			}
		}
		if e.HandBack == nil {
			if handBack != "" {
				t.Errorf("%s: handed back %s %d, want nothing", c.Name, handBack, handBackID)
			}
		} else if handBack != *e.HandBack ||
			hex.EncodeToString(EncodeControl(handBack, []uint32{handBackID})) != *e.HandBackPayload {
			t.Errorf("%s: handed back %q %d, want %s", c.Name, handBack, handBackID, *e.HandBack)
		}
		var got, want []string
		for id, p := range st.mapped {
			got = append(got, strconv.Itoa(int(id))+":"+strconv.FormatUint(p.size, 10))
		}
		for k, size := range e.MappedAfter {
			want = append(want, k+":"+strconv.FormatUint(size, 10))
		}
		sort.Strings(got)
		sort.Strings(want)
		if strings.Join(got, ",") != strings.Join(want, ",") {
			t.Errorf("%s: mapped after %v, want %v", c.Name, got, want)
		}
		for id, p := range st.mapped {
			if !fake[id] {
				unix.Munmap(p.mem)
			}
		}
	}
}

// socketPair returns the two ends of a connected Unix stream socket.
func socketPair(t *testing.T) (*net.UnixConn, *net.UnixConn) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	var ends [2]*net.UnixConn
	for i, fd := range fds {
		f := os.NewFile(uintptr(fd), "socketpair")
		nc, err := net.FileConn(f) // a duplicate of fd
		f.Close()
		if err != nil {
			t.Fatal(err)
		}
		ends[i] = nc.(*net.UnixConn)
		t.Cleanup(func() { ends[i].Close() })
	}
	return ends[0], ends[1]
}

// ring.json (section 9b) describes the shared-memory ring, which this port does not
// implement. What applies to it is checked: layout.feature_bit is FeatureRing, the bit its
// hellos never set (as client or server, with or without shared memory), so RING is never
// negotiated; and every entry of switches (valid or not), sent as a control Event, is an HRNG
// to its control handling, fatal on a connection without RING (section 8a): the connection
// closes, and a server answers BAD_HEADER with request id 0. The rest (the memfd's layout,
// its header, carriers, records, sleep bits, and which switches a ring would accept) is not
// checked here: only a port that implements the ring can use it.
func TestVectorsRing(t *testing.T) {
	var v struct {
		Layout struct {
			FeatureBit *uint32 `json:"feature_bit"`
		}
		Switches []struct {
			Name, Payload string
			Valid         bool
		}
	}
	loadVectors(t, "ring.json", &v)
	if v.Layout.FeatureBit == nil || *v.Layout.FeatureBit != FeatureRing {
		t.Fatalf("layout.feature_bit is %v, this port's FeatureRing %d", v.Layout.FeatureBit, FeatureRing)
	}
	for _, isServer := range []bool{false, true} {
		for _, shm := range []bool{false, true} {
			cfg := defaultConfig()
			cfg.shm = shm
			a, _ := socketPair(t)
			h, _, ok := ParseHello(newConn(a, &cfg, isServer, nil).localHello())
			if !ok || h.Features&FeatureRing != 0 {
				t.Errorf("server %v, shm %v: our hello announces features %#x (understood %v)",
					isServer, shm, h.Features, ok)
			}
		}
	}
	if len(v.Switches) == 0 {
		t.Fatal("no switches")
	}
	valid := 0
	for _, c := range v.Switches {
		p := unhex(t, c.Payload)
		if c.Valid {
			valid++
		}
		if !isRingSwitch(p) {
			t.Errorf("%s: not recognised as an HRNG", c.Name)
			continue
		}
		for _, isServer := range []bool{false, true} {
			cfg := defaultConfig()
			ours, peer := socketPair(t)
			conn := newConn(ours, &cfg, isServer, nil)
			peer.Write(EncodeFrame(TypeEvent, 0, 0, p))
			err := conn.readOnce(time.Now().Add(5 * time.Second))
			if !errors.Is(err, ErrClosed) || conn.err() == nil {
				t.Errorf("%s (server %v): read gave %v, closed %v; want a fatal violation", c.Name, isServer, err, conn.err())
				continue
			}
			conn.endReading(err)
			rp := &rawPeer{t: t, nc: peer, dec: NewDecoder(DefaultMaxPayload)}
			f, ok := rp.next()
			if !isServer {
				if ok {
					t.Errorf("%s: the client answered %+v, want a close without answer", c.Name, f)
				}
				continue
			}
			code, msg, _ := DecodeErrorPayload(f.Payload)
			if !ok || f.Type != TypeError || f.RequestID != 0 || code != CodeBadHeader {
				t.Errorf("%s: the server answered %+v (%d %q), want BAD_HEADER for request 0", c.Name, f, code, msg)
			}
			if _, ok := rp.next(); ok {
				t.Errorf("%s: the server sent more after its Error", c.Name)
			}
		}
	}
	if valid == 0 || valid == len(v.Switches) {
		t.Errorf("%d valid switches of %d: want both kinds", valid, len(v.Switches))
	}
	// Control Events that are not HRNG are still ignored or handled as before.
	for _, p := range []string{"", "48524e", "48524e58020000000010000000000000", "4852454c00000000"} {
		if isRingSwitch(unhex(t, p)) {
			t.Errorf("%s: taken for an HRNG", p)
		}
	}
}
