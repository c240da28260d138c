// Package ipc is the Go side of hintens: a client and a server that speak the hintens wire
// protocol (docs/PROTOCOL.md in the hintens repository) over a Unix domain socket, with
// payloads of 64 KiB or more carried through sealed memfds passed with SCM_RIGHTS.
//
// The layers, from the bottom: crc16.go (section 3), wire.go (the frame header and a decoder
// that does no I/O, section 6), errors.go (error frames and codes, section 7), hello.go
// (the capability hello and control Events, sections 8 and 8a), shm.go (segments,
// descriptors and the receive-side checks of section 9), conn.go (one connection: reading,
// writing, shared memory), then client.go and server.go.
//
// Ownership of received payloads: see the package README. In short, Client.Send returns
// bytes the caller owns; Client.Request returns a *Payload that may be a view of shared
// memory, valid until Payload.Release; a server handler's request slice is valid until the
// handler returns.
package ipc
