// Package rawhook gives the module's own test programs a way to put raw bytes on a client's
// connection (for example a frame with a wrong CRC) and wait for the answer to a request id.
// It is internal so that it stays out of the public API.
package rawhook

import "time"

// WriteRawAndWait is set by package ipc: it writes frame as it is on client's connection,
// registers rid as a pending request, and waits for its answer (payload or error).
var WriteRawAndWait func(client any, rid uint64, frame []byte, timeout time.Duration) ([]byte, error)
