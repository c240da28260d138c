package ipc

import (
	"encoding/binary"
	"fmt"
)

// Frame layout (section 2): a 24-byte big-endian header, then the payload.
const (
	HeaderSize = 24
	magic      = 0x4850
	version10  = 0x0100

	TypeRequest  uint32 = 1
	TypeResponse uint32 = 2
	TypeEvent    uint32 = 3
	TypeError    uint32 = 4

	FlagSHM        uint16 = 0x0001
	FlagCompressed uint16 = 0x0002
	flagsKnown            = FlagSHM | FlagCompressed

	// DefaultMaxPayload is the default inline payload limit (section 6, check 4).
	DefaultMaxPayload = 64 << 20
	// controlMinLimit: Errors and control Events are always accepted up to this size.
	controlMinLimit = 4108
)

// Frame is one decoded frame. Payload may alias the decoder's buffer until the next call to
// the decoder (see Decoder.Next).
type Frame struct {
	Type      uint32
	Flags     uint16
	Version   uint16
	Checksum  uint16
	RequestID uint64
	Payload   []byte
}

// Header is a frame header's fields (the magic is implied).
type Header struct {
	Version   uint16
	Type      uint32
	Flags     uint16
	Length    uint32
	Checksum  uint16
	RequestID uint64
}

// Encode returns the 24-byte big-endian header.
func (h Header) Encode() []byte {
	b := make([]byte, HeaderSize)
	binary.BigEndian.PutUint16(b[0:], magic)
	binary.BigEndian.PutUint16(b[2:], h.Version)
	binary.BigEndian.PutUint32(b[4:], h.Type)
	binary.BigEndian.PutUint16(b[8:], h.Flags)
	binary.BigEndian.PutUint32(b[10:], h.Length)
	binary.BigEndian.PutUint16(b[14:], h.Checksum)
	binary.BigEndian.PutUint64(b[16:], h.RequestID)
	return b
}

// DecodeHeader reads a header's fields without validating them; ok is false when b is not
// 24 bytes starting with the magic.
func DecodeHeader(b []byte) (h Header, ok bool) {
	if len(b) != HeaderSize || binary.BigEndian.Uint16(b) != magic {
		return h, false
	}
	return Header{binary.BigEndian.Uint16(b[2:]), binary.BigEndian.Uint32(b[4:]),
		binary.BigEndian.Uint16(b[8:]), binary.BigEndian.Uint32(b[10:]),
		binary.BigEndian.Uint16(b[14:]), binary.BigEndian.Uint64(b[16:])}, true
}

// putHeader writes a header for a payload into h (24 bytes).
func putHeader(h []byte, typ uint32, flags uint16, rid uint64, payload []byte) {
	binary.BigEndian.PutUint16(h[0:], magic)
	binary.BigEndian.PutUint16(h[2:], version10)
	binary.BigEndian.PutUint32(h[4:], typ)
	binary.BigEndian.PutUint16(h[8:], flags)
	binary.BigEndian.PutUint32(h[10:], uint32(len(payload)))
	binary.BigEndian.PutUint16(h[14:], CRC16(payload))
	binary.BigEndian.PutUint64(h[16:], rid)
}

// EncodeFrame returns header and payload as one byte slice, version 1.0.
func EncodeFrame(typ uint32, flags uint16, rid uint64, payload []byte) []byte {
	out := make([]byte, HeaderSize+len(payload))
	putHeader(out, typ, flags, rid, payload)
	copy(out[HeaderSize:], payload)
	return out
}

// Decoder turns a byte stream into frames following section 6, without I/O. Feed it either
// with Feed, or by reading into Space and calling Commit (no copy); then call Next until it
// reports nothing more. After a fatal error it decodes nothing more.
type Decoder struct {
	maxPayload uint32
	// reserve, if set, is asked before a payload larger than the buffer is allocated; false
	// refuses the frame with UNAVAILABLE (recoverable: its payload is skipped).
	reserve func(n int) bool
	// release gives back what reserve granted, once that frame is complete or abandoned.
	release func(n int)

	buf  []byte
	r, w int

	big     []byte // payload of a frame too large for buf, filled in place
	bigHave int
	bigHdr  Frame

	skip  uint64 // payload bytes still to skip after a recoverable header error
	fatal bool
}

const decoderBufSize = 256 << 10

// NewDecoder returns a decoder whose inline payload limit is maxPayload.
func NewDecoder(maxPayload uint32) *Decoder {
	return &Decoder{maxPayload: maxPayload, buf: make([]byte, decoderBufSize)}
}

// Space returns where the next bytes read from the stream should go; never empty.
func (d *Decoder) Space() []byte {
	if d.big != nil {
		return d.big[d.bigHave:]
	}
	if d.r == d.w {
		d.r, d.w = 0, 0
	} else if d.w == len(d.buf) || (d.r > 0 && len(d.buf)-d.w < HeaderSize) {
		d.w = copy(d.buf, d.buf[d.r:d.w])
		d.r = 0
	}
	return d.buf[d.w:]
}

// Commit records that n bytes were written into the slice Space returned.
func (d *Decoder) Commit(n int) {
	if d.big != nil {
		d.bigHave += n
	} else {
		d.w += n
	}
}

// Feed copies as much of data as the decoder can take before Next is called, and returns
// how many bytes that was. Call Next until it reports nothing more, then Feed the rest.
func (d *Decoder) Feed(data []byte) int {
	n := copy(d.Space(), data)
	d.Commit(n)
	return n
}

// Idle reports whether no frame is partly received.
func (d *Decoder) Idle() bool {
	return d.big == nil && d.skip == 0 && d.r == d.w
}

// Next returns the next complete frame (ok true), or a protocol error, or ok false when more
// bytes are needed. A returned payload that aliases the internal buffer stays valid until
// Space or Feed is called again; a payload longer than the buffer is a fresh allocation the
// caller may keep.
func (d *Decoder) Next() (f Frame, ok bool, err *ProtocolError) {
	if d.fatal {
		return f, false, nil
	}
	if d.skip > 0 {
		n := uint64(d.w - d.r)
		if n > d.skip {
			n = d.skip
		}
		d.r += int(n)
		d.skip -= n
		if d.skip > 0 {
			return f, false, nil
		}
	}
	if d.big != nil {
		if d.bigHave < len(d.big) {
			return f, false, nil
		}
		f = d.bigHdr
		f.Payload = d.big
		d.big, d.bigHave = nil, 0
		if d.release != nil {
			d.release(len(f.Payload))
		}
		if CRC16(f.Payload) != f.Checksum {
			return Frame{}, false, crcError(f)
		}
		return f, true, nil
	}
	avail := d.buf[d.r:d.w]
	if len(avail) >= 2 && binary.BigEndian.Uint16(avail) != magic {
		d.fatal = true
		return f, false, &ProtocolError{Code: CodeBadHeader, Fatal: true,
			Message: fmt.Sprintf("bad magic 0x%04x", binary.BigEndian.Uint16(avail))}
	}
	if len(avail) >= 3 && avail[2] != 1 {
		d.fatal = true
		return f, false, &ProtocolError{Code: CodeBadHeader, Fatal: true,
			Message: fmt.Sprintf("unsupported major version %d", avail[2])}
	}
	if len(avail) < HeaderSize {
		return f, false, nil
	}
	f.Version = binary.BigEndian.Uint16(avail[2:])
	f.Type = binary.BigEndian.Uint32(avail[4:])
	f.Flags = binary.BigEndian.Uint16(avail[8:])
	length := binary.BigEndian.Uint32(avail[10:])
	f.Checksum = binary.BigEndian.Uint16(avail[14:])
	f.RequestID = binary.BigEndian.Uint64(avail[16:])
	if f.Type < TypeRequest || f.Type > TypeError {
		d.fatal = true
		return f, false, &ProtocolError{Code: CodeBadHeader, Fatal: true, RequestID: f.RequestID,
			HasID: true, Message: fmt.Sprintf("unknown message type %d", f.Type)}
	}
	limit := d.maxPayload
	if (f.Type == TypeError || (f.Type == TypeEvent && f.RequestID == 0)) && limit < controlMinLimit {
		limit = controlMinLimit
	}
	if length > limit {
		d.fatal = true
		return f, false, &ProtocolError{Code: CodeTooLarge, Fatal: true, RequestID: f.RequestID,
			HasID: true, Type: f.Type, Message: fmt.Sprintf("payload of %d bytes over the limit of %d", length, limit)}
	}
	if f.Flags&^flagsKnown != 0 {
		d.r += HeaderSize
		d.skip = uint64(length)
		d.consumeSkip()
		return f, false, &ProtocolError{Code: CodeUnsupportedFlags, RequestID: f.RequestID, HasID: true,
			Type: f.Type, Message: fmt.Sprintf("reserved flag bits 0x%04x", f.Flags&^flagsKnown)}
	}
	total := HeaderSize + int(length)
	if len(avail) >= total {
		f.Payload = avail[HeaderSize:total:total]
		d.r += total
		if CRC16(f.Payload) != f.Checksum {
			return Frame{}, false, crcError(f)
		}
		return f, true, nil
	}
	if total <= len(d.buf) {
		return f, false, nil // Space compacts when needed
	}
	if d.reserve != nil && !d.reserve(int(length)) {
		d.r += HeaderSize
		d.skip = uint64(length)
		d.consumeSkip()
		return f, false, &ProtocolError{Code: CodeUnavailable, RequestID: f.RequestID, HasID: true,
			Type: f.Type, Message: "receive budget exhausted, try again later"}
	}
	d.big = make([]byte, length)
	d.bigHave = copy(d.big, avail[HeaderSize:])
	d.bigHdr = f
	d.r, d.w = 0, 0
	return Frame{}, false, nil
}

// Abandon drops a partly received large payload (the stream ended), returning its reservation.
func (d *Decoder) Abandon() {
	if d.big != nil && d.release != nil {
		d.release(len(d.big))
	}
	d.big = nil
	d.fatal = true
}

func (d *Decoder) consumeSkip() {
	n := uint64(d.w - d.r)
	if n > d.skip {
		n = d.skip
	}
	d.r += int(n)
	d.skip -= n
}

func crcError(f Frame) *ProtocolError {
	return &ProtocolError{Code: CodeChecksum, RequestID: f.RequestID, HasID: true, Type: f.Type,
		Message: fmt.Sprintf("payload CRC 0x%04x, header says 0x%04x", CRC16(f.Payload), f.Checksum)}
}
