"""Transports (internal; not a public API): the socket Channel with its outbox, and the
shared-memory Mapping and SharedRegion (compiled in ``_channel.pyx``, which cimports the wire
kernels' ``_wire.pxd``; pure-Python twin ``_channel_py.py``), Unix-socket plumbing (paths,
credentials, timeouts), the flusher thread, and the wiring of a Channel to a protocol
Endpoint."""
