"""The sans-IO protocol layer (internal; not a public API): the connection rules of
``Endpoint`` (hello, negotiation, limits, lending and hand-back), shared-memory segments and
the sender's pool, and the server's exactly-once replay windows. No sockets, no threads."""
