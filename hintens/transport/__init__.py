"""Transports (internal; not a public API): Unix-socket plumbing (paths, credentials,
timeouts), the flusher thread, and the wiring of a core Channel to a protocol Endpoint."""
