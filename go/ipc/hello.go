package ipc

import (
	"encoding/binary"
)

// The capability hello (section 8) and the control Events HREL, HREJ, HRET (section 8a),
// and the one thing this port knows of the ring's switch, HRNG (sections 8a, 9b).

const (
	FeatureSHM         uint32 = 1 << 0
	FeatureCompression uint32 = 1 << 1
	// FeatureRing is the shared-memory ring (section 9b). This port does not implement the
	// ring, so its hello never announces it and RING is never negotiated on its connections.
	FeatureRing uint32 = 1 << 2

	helloKeyMinor       = 1
	helloKeyFeatures    = 2
	helloKeyMaxPayload  = 3
	helloKeySession     = 4
	helloKeyInstance    = 5
	helloKeyShmBytes    = 6
	helloKeyShmSegments = 7

	maxHelloEntries = 64
	maxHelloBytes   = 4096
	maxControlIDs   = 1024

	// DefaultShmReceiveBytes and DefaultShmReceiveSegments bound what a peer may make us map
	// on one connection (hello keys 6 and 7).
	DefaultShmReceiveBytes    = 1 << 30
	DefaultShmReceiveSegments = 64
)

// Hello is what a peer announced, with the table's defaults for absent keys.
type Hello struct {
	Minor              uint8
	Features           uint32
	MaxPayload         uint32
	ShmReceiveBytes    uint64
	ShmReceiveSegments uint32
	Session            []byte // key 4, or nil
	Instance           []byte // key 5, or nil
}

// HelloEntry is one (key, value) entry of a hello payload.
type HelloEntry struct {
	Key   uint16
	Value []byte
}

func defaultHello() Hello {
	return Hello{MaxPayload: DefaultMaxPayload, ShmReceiveBytes: DefaultShmReceiveBytes,
		ShmReceiveSegments: DefaultShmReceiveSegments}
}

// EncodeHello writes the hello hintens sends: keys 1, 2, 3, then 6 and 7 only with SHM, plus
// extra entries (e.g. a session id), all in increasing key order.
func EncodeHello(h Hello, extra ...HelloEntry) []byte {
	entries := []HelloEntry{
		{helloKeyMinor, []byte{h.Minor}},
		{helloKeyFeatures, binary.LittleEndian.AppendUint32(nil, h.Features)},
		{helloKeyMaxPayload, binary.LittleEndian.AppendUint32(nil, h.MaxPayload)},
	}
	if h.Features&FeatureSHM != 0 {
		entries = append(entries,
			HelloEntry{helloKeyShmBytes, binary.LittleEndian.AppendUint64(nil, h.ShmReceiveBytes)},
			HelloEntry{helloKeyShmSegments, binary.LittleEndian.AppendUint32(nil, h.ShmReceiveSegments)})
	}
	for _, e := range extra {
		i := len(entries)
		for i > 0 && entries[i-1].Key > e.Key {
			i--
		}
		entries = append(entries, HelloEntry{})
		copy(entries[i+1:], entries[i:])
		entries[i] = e
	}
	out := append([]byte("HELO"), binary.LittleEndian.AppendUint64(nil, uint64(len(entries)))...)
	for _, e := range entries {
		out = binary.LittleEndian.AppendUint16(out, e.Key)
		out = binary.LittleEndian.AppendUint64(out, uint64(len(e.Value)))
		out = append(out, e.Value...)
	}
	return out
}

// ParseHello reads a hello payload. ok is false for anything that is not a hello the
// receiver understands (section 8, "Not a hello"); then it must be ignored.
func ParseHello(p []byte) (h Hello, entries []HelloEntry, ok bool) {
	if len(p) > maxHelloBytes || len(p) < 12 || string(p[:4]) != "HELO" {
		return h, nil, false
	}
	count := binary.LittleEndian.Uint64(p[4:])
	if count > maxHelloEntries {
		return h, nil, false
	}
	rest := p[12:]
	seen := map[uint16]bool{}
	for i := uint64(0); i < count; i++ {
		if len(rest) < 10 {
			return h, nil, false
		}
		key := binary.LittleEndian.Uint16(rest)
		n := binary.LittleEndian.Uint64(rest[2:])
		rest = rest[10:]
		if n > uint64(len(rest)) || seen[key] {
			return h, nil, false
		}
		seen[key] = true
		entries = append(entries, HelloEntry{key, rest[:n:n]})
		rest = rest[n:]
	}
	if len(rest) != 0 {
		return h, nil, false
	}
	h = defaultHello()
	for _, e := range entries {
		v := e.Value
		switch e.Key {
		case helloKeyMinor:
			if len(v) == 1 {
				h.Minor = v[0]
			}
		case helloKeyFeatures:
			if len(v) == 4 {
				h.Features = binary.LittleEndian.Uint32(v)
			}
		case helloKeyMaxPayload:
			if len(v) == 4 {
				h.MaxPayload = binary.LittleEndian.Uint32(v)
			}
		case helloKeySession:
			if len(v) == 16 {
				h.Session = append([]byte(nil), v...)
			}
		case helloKeyInstance:
			if len(v) == 16 {
				h.Instance = append([]byte(nil), v...)
			}
		case helloKeyShmBytes:
			if len(v) == 8 {
				h.ShmReceiveBytes = binary.LittleEndian.Uint64(v)
			}
		case helloKeyShmSegments:
			if len(v) == 4 {
				h.ShmReceiveSegments = binary.LittleEndian.Uint32(v)
			}
		}
	}
	return h, entries, true
}

// EncodeControl writes an HREL, HREJ or HRET payload (at most 1024 ids: callers split).
func EncodeControl(magic string, ids []uint32) []byte {
	out := make([]byte, 8, 8+4*len(ids))
	copy(out, magic)
	binary.LittleEndian.PutUint32(out[4:], uint32(len(ids)))
	for _, id := range ids {
		out = binary.LittleEndian.AppendUint32(out, id)
	}
	return out
}

// isRingSwitch reports whether a control Event's payload is an HRNG, the ring's switch
// (section 9b), of any shape: the magic alone decides. RING is never negotiated on this
// port's connections, so every HRNG it receives is a fatal violation (section 8a): its sender's
// next bytes would not come on the socket.
func isRingSwitch(p []byte) bool {
	return len(p) >= 4 && string(p[:4]) == "HRNG"
}

// ParseControl reads an HREL, HREJ or HRET payload; ok false means it must be ignored.
func ParseControl(p []byte) (magic string, ids []uint32, ok bool) {
	if len(p) < 8 {
		return "", nil, false
	}
	magic = string(p[:4])
	if magic != "HREL" && magic != "HREJ" && magic != "HRET" {
		return "", nil, false
	}
	n := binary.LittleEndian.Uint32(p[4:])
	if n > maxControlIDs || uint64(len(p)) != 8+4*uint64(n) {
		return "", nil, false
	}
	ids = make([]uint32, n)
	for i := range ids {
		ids[i] = binary.LittleEndian.Uint32(p[8+4*i:])
	}
	return magic, ids, true
}
