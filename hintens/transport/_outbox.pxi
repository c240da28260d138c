# The outbox: the queue of a Channel's outgoing frames, over its Writer; included by
# _channel.pyx (one compiled module). Small frames are packed back to back and leave together:
# a request at once, Events after up to flush_interval (or with the next request), frames
# offered without waiting for the socket. hintens/transport/_outbox_py.py is the twin.


cdef class Outbox(Writer):
    """A connected stream socket's outgoing queue, over its ``Writer``. ``Channel`` is an
    Outbox with a receive side."""

    cdef int _reserve(self, Py_ssize_t extra) except -1:
        cdef Py_ssize_t want = self._queued + extra, cap
        cdef unsigned char *grown
        if want <= self._queue_cap:
            return 0
        cap = max(want, max(2 * self._queue_cap, _BATCH_BYTES + 4096))
        grown = <unsigned char *>realloc(self._queue, <size_t>cap)
        if grown == NULL:
            raise MemoryError()
        self._queue = grown
        self._queue_cap = cap
        return 0

    cdef uint64_t _post(self, uint32_t msg_type, object payload, uint64_t request_id) except? 0:
        cdef _Input ref
        cdef hx_header h
        cdef unsigned char *dst
        cdef Py_ssize_t size
        if self._fd < 0:
            raise OSError(EBADF, "the channel is closed")
        if self.broken:
            raise OSError(EPIPE, "the channel broke in the middle of a frame")
        # A buffer export (not the bytearray shortcut): the backpressure write below lets the
        # GIL go, and the export keeps the payload from being resized meanwhile.
        _acquire(payload, &ref, False)
        try:
            _check_frame_args(msg_type, 0, ref.len)
            size = HEADER_SIZE + ref.len
            if self._queued and self._queued + size > self.max_queue:
                # Full: this thread writes it out itself, waiting its turn (backpressure).
                self._lock_send()
                try:
                    self._drain(0)
                finally:
                    PyThread_release_lock(self._send_lock)
            self._reserve(size)
            # From here to the end, the GIL is held throughout (no _crc/_copy, which let it go
            # for large payloads): dst points into a queue another thread may realloc or detach.
            dst = self._queue + self._queued
            _fill_header(&h, msg_type, 0, <size_t>ref.len,
                         crc16_kernel(0xFFFF, ref.buf, <size_t>ref.len), request_id)
            hx_pack_header(dst, &h)
            memcpy(dst + HEADER_SIZE, ref.buf, <size_t>ref.len)
        finally:
            _release(&ref)
        self._queued += size
        self.submitted += <uint64_t>size
        return self.submitted

    cdef int _after_post(self, bint urgent) except -1:
        # Write now: a request (never kept waiting), a full batch, or an Event that follows
        # the one before by flush_interval or more (nothing to batch it with). Otherwise leave
        # it for the flush deadline.
        cdef double now
        cdef bint quiet = False
        if not urgent:
            now = _now()
            quiet = now - self._last_lazy >= self.flush_interval
            self._last_lazy = now
        if urgent or (not self._corked and (quiet or self._queued >= _BATCH_BYTES)):
            if PyThread_acquire_lock(self._send_lock, NOWAIT_LOCK):
                try:
                    self._drain(0)
                finally:
                    PyThread_release_lock(self._send_lock)
            # else the thread holding the lock writes our frame before it lets go
        elif not self._scheduled and self.on_queued is not None:
            self._schedule()
        return 0

    cdef int _after_offer(self) except -1:
        # As _after_post for an Event, but never waiting for the socket: what it will not take
        # now is left to the flusher (or to the thread that holds the send lock).
        cdef double now = _now()
        cdef bint quiet = now - self._last_lazy >= self.flush_interval
        cdef int left = 0
        self._last_lazy = now
        if not self._corked and (quiet or self._queued >= _BATCH_BYTES):
            if not PyThread_acquire_lock(self._send_lock, NOWAIT_LOCK):
                return 0   # the holder writes our frames before it lets go
            try:
                left = self._drain(MSG_DONTWAIT)
            finally:
                PyThread_release_lock(self._send_lock)
            if not left:
                return 0
        if not self._scheduled and self.on_queued is not None:
            self._schedule()
        return 0

    def post(self, msg_type, payload, request_id, urgent=True):
        """Queue one frame, packed straight into the outbox, behind everything submitted.

        Args:
            msg_type: a ``MessageType``.
            payload: a C-contiguous buffer (meant for small ones: it is copied once).
            request_id: u64.
            urgent: write now if no other thread is writing (else that thread writes it
                before it stops). Not urgent, it may wait up to ``flush_interval`` for company.

        Returns:
            The stream offset just past this frame (compare with ``written``).

        Raises:
            As ``send``, and ValueError or OverflowError as ``encode_frame``. An OSError raised
            once the frame was queued carries its offset as ``stream_end``.
        """
        cdef uint64_t end = self._post(_index(msg_type), payload, _index(request_id))
        try:
            self._after_post(urgent)
        except OSError as error:
            error.stream_end = end   # queued, but the write failed: was it ours that failed?
            raise
        return end

    def post_many(self, msg_type, payloads, request_ids):
        """Queue one frame per payload, with the matching request id, and write them all now
        (urgent), in as few writes as the queue bound allows.

        Returns:
            The stream offset just past the last frame.

        Raises:
            As ``post``. ValueError: the two sequences differ in length.
        """
        cdef uint32_t type_ = _index(msg_type)
        cdef uint64_t end = self.submitted
        if len(payloads) != len(request_ids):
            raise ValueError("one request id per payload")
        for payload, request_id in zip(payloads, request_ids):
            end = self._post(type_, payload, _index(request_id))
        try:
            self._after_post(True)
        except OSError as error:
            error.stream_end = end
            raise
        return end

    def event(self, payload):
        """Queue an Event (request id from the channel's own count) without urgency."""
        self._event_id += 1
        self._post(3, payload, self._event_id)
        self._after_post(False)

    def event_small(self, payload, Py_ssize_t small_max):
        """``Client.send_event``'s common case in one call: a bytes shorter than
        ``small_max`` is queued as ``event`` queues it, and counted in ``small_events``.

        Returns:
            True if it was queued; False, with nothing done, for anything else.

        Raises:
            As ``event``.
        """
        if type(payload) is not bytes or len(<bytes>payload) >= small_max:
            return False
        self._event_id += 1
        self._post(3, payload, self._event_id)
        self.small_events += 1
        self._after_post(False)
        return True

    def flush(self):
        """Write everything queued, waiting for another writer to finish first.

        Raises:
            As ``send``; what could not be written stays queued.
        """
        self._lock_send()
        try:
            self._drain(0)
        finally:
            PyThread_release_lock(self._send_lock)

    def flush_due(self, bint mark=True):
        """For the deadline flusher: write the queue without blocking, unless another thread
        is writing (it will) or the channel is corked.

        Args:
            mark: with bytes left, note that the flusher has them (no new ``on_queued`` call
                until it flushes again). False when nobody will: the next Event asks anew.

        Returns:
            True when bytes are left that the socket would not take yet: call again later.
            A connection error shuts the stream (its readers see the end), as nobody is
            there to raise it to.
        """
        cdef int left = 0
        self._scheduled = False
        if not self._queued or self._corked or self._fd < 0:
            return False
        if not PyThread_acquire_lock(self._send_lock, NOWAIT_LOCK):
            return False
        try:
            left = self._drain(MSG_DONTWAIT)
        except OSError:
            self.broken = True
            shutdown(self._fd, SHUT_RDWR)
        finally:
            PyThread_release_lock(self._send_lock)
        if left and mark:
            self._scheduled = True
        return bool(left)

    def cork(self):
        """Hold Events in the queue (until ``uncork``, a request, or a full queue)."""
        self._corked += 1

    def uncork(self):
        """Undo one ``cork``. The caller flushes when it wants the batch out."""
        if self._corked:
            self._corked -= 1

    @property
    def queued(self):
        """Bytes waiting in the outbox."""
        return self._queued

    def offer(self, writes, Py_ssize_t limit, bint write=True):
        """Queue frames without waiting for the socket, all of them or none: a server pushes
        Events this way, so that one slow reader never holds up the writer.

        Args:
            writes: ``[(buffers, fds), ...]``, each write one frame (or several), with at most
                one descriptor, which rides on the write's first byte in a sendmsg of its own.
            limit: queue no more than this many bytes in all; an empty queue takes any.
            write: False: only queue them, and ask for them to be written soon
                (``on_queued(channel, True)``): this thread never touches the socket. For
                control Events, which any thread may give up (the last view of a payload
                dropped, the garbage collector).

        Returns:
            True when queued (written now if the socket takes them, else by the flusher, or by
            the thread writing now); False when they would take the queue over ``limit``:
            nothing was queued.

        Raises:
            OSError: the channel is closed or broken, or the socket failed.
        """
        cdef Py_ssize_t total = 0, count = 0, acquired = 0, k
        cdef uint64_t at
        cdef _Input *refs
        if self._fd < 0:
            raise OSError(EBADF, "the channel is closed")
        if self.broken:
            raise OSError(EPIPE, "the channel broke in the middle of a frame")
        for buffers, fds in writes:
            if len(fds) > 1:
                raise ValueError("at most one descriptor per write")
            if len(fds) and not any(len(memoryview(buffer)) for buffer in buffers):
                raise ValueError("a descriptor needs at least one byte to ride on")
            count += len(buffers)
        refs = <_Input *>malloc(max(1, count) * sizeof(_Input))
        if refs == NULL:
            raise MemoryError()
        try:
            for buffers, fds in writes:
                for buffer in buffers:
                    _acquire(buffer, &refs[acquired], False)
                    acquired += 1
                    total += refs[acquired - 1].len
            if self._queued and self._queued + total > limit:
                return False
            # The GIL is held from here to the end: the queue may be realloc'ed or detached by
            # another thread as soon as we let go.
            self._reserve(total)
            k = 0
            for buffers, fds in writes:
                at = self.submitted
                for buffer in buffers:
                    memcpy(self._queue + self._queued, refs[k].buf, <size_t>refs[k].len)
                    self._queued += refs[k].len
                    self.submitted += <uint64_t>refs[k].len
                    k += 1
                if len(fds):
                    self._queue_fd(fds[0], at, self.submitted)
        finally:
            for k in range(acquired):
                _release(&refs[k])
            free(refs)
        if write:
            self._after_offer()
        elif self.on_queued is not None:
            self._scheduled = True
            self.on_queued(self, True)
        return True
