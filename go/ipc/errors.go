package ipc

import (
	"encoding/binary"
	"errors"
	"fmt"
	"strings"
	"unicode/utf8"
)

// Wire error codes (PROTOCOL.md section 7). Codes 9-999 are reserved; 1000 and up belong to
// applications.
const (
	CodeChecksum         uint32 = 1
	CodeBadHeader        uint32 = 2
	CodeTooLarge         uint32 = 3
	CodeUnsupportedFlags uint32 = 4
	CodeHandlerError     uint32 = 5
	CodeTimeout          uint32 = 6
	CodeShmError         uint32 = 7
	CodeUnavailable      uint32 = 8
	// CodeApplicationMin is the first code free for applications.
	CodeApplicationMin uint32 = 1000
)

// maxErrorMessageBytes bounds an Error frame's message (section 7).
const maxErrorMessageBytes = 4096

// Sentinel errors, one per wire code, for errors.Is. A *RemoteError or a *ProtocolError with
// that code matches its sentinel.
var (
	ErrChecksum         = errors.New("hintens: checksum mismatch")
	ErrBadHeader        = errors.New("hintens: bad header")
	ErrTooLarge         = errors.New("hintens: payload too large")
	ErrUnsupportedFlags = errors.New("hintens: unsupported flags")
	ErrHandler          = errors.New("hintens: handler error")
	ErrTimeout          = errors.New("hintens: timeout")
	ErrShm              = errors.New("hintens: shared memory error")
	ErrUnavailable      = errors.New("hintens: unavailable")

	// ErrClosed: the connection is closed (by Close, or because the peer went away).
	ErrClosed = errors.New("hintens: connection closed")
	// ErrUntrustedServer: the process listening on the socket runs as another user.
	ErrUntrustedServer = errors.New("hintens: untrusted server")
	// ErrServerClosed is returned by Server.Serve after Shutdown.
	ErrServerClosed = errors.New("hintens: server closed")
)

func sentinelFor(code uint32) error {
	switch code {
	case CodeChecksum:
		return ErrChecksum
	case CodeBadHeader:
		return ErrBadHeader
	case CodeTooLarge:
		return ErrTooLarge
	case CodeUnsupportedFlags:
		return ErrUnsupportedFlags
	case CodeHandlerError:
		return ErrHandler
	case CodeTimeout:
		return ErrTimeout
	case CodeShmError:
		return ErrShm
	case CodeUnavailable:
		return ErrUnavailable
	}
	return nil
}

func codeName(code uint32) string {
	switch code {
	case 0:
		return "GENERIC"
	case CodeChecksum:
		return "CHECKSUM"
	case CodeBadHeader:
		return "BAD_HEADER"
	case CodeTooLarge:
		return "TOO_LARGE"
	case CodeUnsupportedFlags:
		return "UNSUPPORTED_FLAGS"
	case CodeHandlerError:
		return "HANDLER_ERROR"
	case CodeTimeout:
		return "TIMEOUT"
	case CodeShmError:
		return "SHM_ERROR"
	case CodeUnavailable:
		return "UNAVAILABLE"
	}
	if code >= CodeApplicationMin {
		return "APPLICATION"
	}
	return "RESERVED"
}

// RemoteError is an Error frame received from the peer, or one to send: a server handler
// that returns a *RemoteError answers with its Code and Message (use codes >= 1000 for the
// application's own errors). Code 0 means the peer's Error payload was malformed.
type RemoteError struct {
	Code    uint32
	Message string
}

func (e *RemoteError) Error() string {
	return fmt.Sprintf("hintens: remote error %d (%s): %s", e.Code, codeName(e.Code), e.Message)
}

// Is makes errors.Is(err, ErrChecksum) and the like true for the matching code.
func (e *RemoteError) Is(target error) bool {
	s := sentinelFor(e.Code)
	return s != nil && s == target
}

// ProtocolError is a violation detected locally: a frame we received (or a request we could
// not send) broke a rule of the protocol. Fatal means frame boundaries can no longer be trusted.
type ProtocolError struct {
	Code      uint32
	Fatal     bool
	RequestID uint64 // the offending frame's request id, when HasID
	HasID     bool
	Type      uint32 // the offending frame's message type, 0 when unread
	Message   string
}

func (e *ProtocolError) Error() string {
	return fmt.Sprintf("hintens: %s: %s", codeName(e.Code), e.Message)
}

// Is matches the sentinel of the error's code.
func (e *ProtocolError) Is(target error) bool {
	s := sentinelFor(e.Code)
	return s != nil && s == target
}

// truncateUTF8 cuts s to at most n bytes on a character boundary.
func truncateUTF8(s string, n int) string {
	if len(s) <= n {
		return s
	}
	cut := n
	for cut > 0 && !utf8.RuneStart(s[cut]) {
		cut--
	}
	return s[:cut]
}

// EncodeErrorPayload is the bincode of (code u32, message String), the message cut to 4096
// bytes on a UTF-8 boundary (section 7).
func EncodeErrorPayload(code uint32, message string) []byte {
	message = truncateUTF8(message, maxErrorMessageBytes)
	out := make([]byte, 12+len(message))
	binary.LittleEndian.PutUint32(out, code)
	binary.LittleEndian.PutUint64(out[4:], uint64(len(message)))
	copy(out[12:], message)
	return out
}

// DecodeErrorPayload reads an Error frame's payload. ok is false for a malformed one (the
// requester then reports code 0). Invalid UTF-8 is replaced, not refused.
func DecodeErrorPayload(p []byte) (code uint32, message string, ok bool) {
	if len(p) < 12 {
		return 0, "", false
	}
	n := binary.LittleEndian.Uint64(p[4:])
	if n != uint64(len(p)-12) {
		return 0, "", false
	}
	code = binary.LittleEndian.Uint32(p)
	message = string(p[12:])
	if !utf8.ValidString(message) {
		message = strings.ToValidUTF8(message, "\uFFFD")
	}
	return code, message, true
}

func remoteErrorFromPayload(p []byte) *RemoteError {
	code, msg, ok := DecodeErrorPayload(p)
	if !ok {
		return &RemoteError{Code: 0, Message: "malformed Error payload"}
	}
	return &RemoteError{Code: code, Message: msg}
}
