# The writer: the socket's sending end, the base of the Outbox and of the Channel; included by
# _channel.pyx (one compiled module). One thread at a time holds the send lock and writes,
# whatever was queued first, then its own bytes; a descriptor queued with a frame rides
# alone on that frame's first byte. hintens/transport/_outbox_py.py is the pure-Python twin.


cdef class Writer:
    """A connected stream socket's sending end: the send lock, and the writing of the queue
    of frames waiting for it (which the ``Outbox`` fills)."""

    def __cinit__(self):
        self._fd = -1
        self._queue = NULL
        self._spare = NULL
        self._fd_at = NULL
        self._fd_end = NULL
        self._fd_fds = NULL
        self._fd_count = 0
        self._fd_cap = 0
        self.aborted = None
        self.stall_timeout = 0.0
        self.flush_interval = DEFAULT_FLUSH_INTERVAL_S
        self.max_queue = DEFAULT_MAX_QUEUE_BYTES
        self.on_queued = None
        # No Event yet: the first one leaves at once, whatever the machine's uptime (the
        # monotonic clock counts from boot, so 0.0 would hold it on a machine just booted).
        self._last_lazy = -INFINITY
        self._tls_lock = NULL
        self._send_lock = PyThread_allocate_lock()
        if self._send_lock == NULL:
            raise MemoryError()

    def __dealloc__(self):
        self._drop_fds()
        free(self._fd_at)
        free(self._fd_end)
        free(self._fd_fds)
        free(self._queue)
        free(self._spare)
        if self._send_lock != NULL:
            PyThread_free_lock(self._send_lock)
        if self._tls_lock != NULL:
            PyThread_free_lock(self._tls_lock)

    def close(self):
        """Close the socket. Waits for a send in progress to end, so no write can reach a
        descriptor number the kernel has handed out again. Idempotent."""
        self._lock_send()
        try:
            if self._fd >= 0:
                self._fd = -1
                self.dropped += <uint64_t>self._queued
                self._queued = 0
                self._drop_fds()
                if self.ring is not None:
                    hx_ring_shut(&self.ring.r)
                    # The mapping goes once no waiter holds it (each holds the Ring while it
                    # waits): a closed channel kept alive keeps no shared memory.
                    self.ring = None
                self._sock.close()
        finally:
            PyThread_release_lock(self._send_lock)

    cdef int _lock_send(self) except -1:
        if not PyThread_acquire_lock(self._send_lock, NOWAIT_LOCK):
            with nogil:
                PyThread_acquire_lock(self._send_lock, WAIT_LOCK)
        return 0

    cdef int _tls_call_begin(self) except -1:
        # Takes the TLS lock for one OpenSSL call; the caller releases it right after.
        # Signals that came meanwhile are handled first: ssl looks at them only after its
        # OpenSSL call, and a handler's exception raised there would lose what the call did
        # (the bytes a write sent, a read took), which breaks the stream (_tls_failed).
        PyErr_CheckSignals()
        if not PyThread_acquire_lock(self._tls_lock, NOWAIT_LOCK):
            with nogil:
                PyThread_acquire_lock(self._tls_lock, WAIT_LOCK)
        if self._fd < 0:
            PyThread_release_lock(self._tls_lock)
            raise OSError(EBADF, "the channel is closed")
        return 0

    cdef int _tls_failed(self) except -1:
        # An OpenSSL call raised something other than "wait" or "the stream ended": TLS broke,
        # the connection did, or a signal handler's exception came after the call had sent or
        # taken bytes. Which bytes is unknown, so the stream cannot go on: shut it for good.
        self._break()
        return 0

    cdef int _tls_wait(self, short events, int option, long long *deadline) except -1:
        # Waits, without the GIL, until the descriptor has ``events``, within the socket's
        # kernel timeout ``option`` counted from this call's first wait (*deadline: -2 before
        # it, then the deadline in ns, -1 for none). 1 when it has them, 0 when time is up.
        cdef pollfd watched
        cdef timespec ts
        cdef long long left
        cdef int ms, found
        if deadline[0] == -2:
            deadline[0] = hx_socket_deadline(self._fd, option)
        while True:
            if self._fd < 0:
                raise OSError(EBADF, "the channel is closed")
            ms = -1
            if deadline[0] >= 0:
                clock_gettime(CLOCK_MONOTONIC, &ts)
                left = deadline[0] - (<long long>ts.tv_sec * 1000000000LL + ts.tv_nsec)
                if left <= 0:
                    return 0
                ms = <int>min((left + 999999) // 1000000, 1 << 30)
            watched.fd = self._fd
            watched.events = events
            watched.revents = 0
            with nogil:
                found = poll(&watched, 1, ms)
            if found > 0:
                return 1
            if found < 0:
                if errno != EINTR:
                    _raise_errno()
                PyErr_CheckSignals()

    cdef ssize_t _tls_write(self, iovec *iov, Py_ssize_t count, int flags) except -2:
        # As sendmsg, over TLS: the bytes OpenSSL took, which is all it was given (up to
        # _TLS_WRITE_BYTES of iov[0], or small buffers joined into one record), or -1 with
        # errno EAGAIN when MSG_DONTWAIT or the send timeout stopped it. A write that had to
        # wait is retried with the same bytes, as OpenSSL requires; so is a later one (the
        # queue keeps what was not taken in front, and a frame's bytes are only ever given
        # from their start, never fewer of them).
        cdef unsigned char joined[16384]
        cdef size_t n = 0, take
        cdef Py_ssize_t i
        cdef long long deadline = -2
        cdef short events = 0
        cdef object view
        if count > 1 and iov[0].iov_len < <size_t>_TLS_RECORD_BYTES:
            for i in range(count):
                take = min(iov[i].iov_len, <size_t>_TLS_RECORD_BYTES - n)
                memcpy(joined + n, iov[i].iov_base, take)
                n += take
                if n == <size_t>_TLS_RECORD_BYTES:
                    break
            view = PyMemoryView_FromMemory(<char *>joined, <Py_ssize_t>n, PyBUF_READ)
        else:
            view = PyMemoryView_FromMemory(<char *>iov[0].iov_base,
                                           min(<Py_ssize_t>iov[0].iov_len, _TLS_WRITE_BYTES),
                                           PyBUF_READ)
        while True:
            self._tls_call_begin()
            try:
                return self._tls.write(view)
            except _SSL_WANT_WRITE:
                events = POLLOUT
            except _SSL_WANT_READ:
                events = POLLIN
            except _SSL_ENDED as error:
                self._tls_failed()
                raise BrokenPipeError(EPIPE, f"the peer closed the TLS stream: {error}")
            except BaseException:
                self._tls_failed()
                raise
            finally:
                PyThread_release_lock(self._tls_lock)
            if flags & MSG_DONTWAIT or not self._tls_wait(events, SO_SNDTIMEO, &deadline):
                errno_set(EAGAIN)
                return -1

    cdef int _send_iov(self, iovec *iov, Py_ssize_t count, object fds,
                       bint quick=False) except -1:
        # Everything, in order; the caller holds the send lock and keeps the memory alive.
        # Descriptors ride with the first sendmsg, so they arrive with the first byte.
        cdef Py_ssize_t nfds = len(fds) if fds else 0
        cdef size_t written = 0
        if nfds > _FDS_PER_READ:
            raise ValueError(f"at most {_FDS_PER_READ} descriptors per send")
        if self.broken:
            raise OSError(EPIPE, "the channel broke in the middle of a frame")
        try:
            self._write_all(iov, 0, count, fds, nfds, &written, quick)
            self.written += written
        except BaseException:
            self.written += written
            if written:
                # Part of a frame is on the wire and the rest never will be: nothing sent on
                # this stream from now on could be framed right. Shut it (readers see EOF);
                # the descriptor itself stays until close(), so no number is reused under them.
                self.broken = True
                self._shut()
            raise
        return 0

    cdef int _write_all(self, iovec *iov, Py_ssize_t first, Py_ssize_t count, object fds,
                        Py_ssize_t nfds, size_t *written, bint quick) except -1:
        # quick: a small write, tried first without letting the GIL go (see _drain).
        cdef msghdr message
        cdef ssize_t sent
        cdef Py_ssize_t batch, k
        cdef hx_fd_control control
        cdef cmsghdr *header
        cdef int *slots
        cdef int saved
        while first < count:
            batch = min(count - first, <Py_ssize_t>_MAX_IOV)
            memset_msghdr(&message)
            message.msg_iov = iov + first
            message.msg_iovlen = <size_t>batch
            if nfds:
                message.msg_control = &control
                message.msg_controllen = CMSG_SPACE(nfds * sizeof(int))
                header = CMSG_FIRSTHDR(&message)
                header.cmsg_level = SOL_SOCKET
                header.cmsg_type = SCM_RIGHTS
                header.cmsg_len = CMSG_LEN(nfds * sizeof(int))
                slots = <int *>CMSG_DATA(header)
                for k in range(nfds):
                    slots[k] = fds[k]
            if self._tls is not None:
                if nfds:
                    raise OSError(EINVAL, "descriptors cannot travel over TLS")
                sent = self._tls_write(iov + first, batch, 0)
                if sent < 0:
                    # The send timeout: OpenSSL may hold part of a record of these bytes, and
                    # the caller will not offer them again (it fails the frame).
                    saved = errno
                    self._tls_failed()
                    errno_set(saved)
            elif self._ring_tx:
                sent = self._ring_write(iov + first, batch, fds if nfds else None,
                                        MSG_DONTWAIT if quick else 0)
                if quick:
                    quick = False
                    if sent < 0 and errno == EAGAIN:
                        continue   # the ring is full: wait for room without the GIL
            elif quick:
                quick = False
                sent = sendmsg(self._fd, &message, MSG_NOSIGNAL | MSG_DONTWAIT)
                if sent < 0 and errno == EAGAIN:
                    continue   # the socket is full: wait for room without the GIL
            else:
                with nogil:
                    sent = sendmsg(self._fd, &message, MSG_NOSIGNAL)
            if sent < 0:
                if errno == EINTR:
                    PyErr_CheckSignals()
                    continue
                _raise_errno()
            nfds = 0
            written[0] += <size_t>sent
            while sent > 0 and first < count:
                if <size_t>sent >= iov[first].iov_len:
                    sent -= iov[first].iov_len
                    first += 1
                else:
                    iov[first].iov_base = <char *>iov[first].iov_base + sent
                    iov[first].iov_len -= sent
                    sent = 0
            while first < count and iov[first].iov_len == 0:
                first += 1
            if first < count:
                # A partial write: a signal may have cut it short (a send returns what it sent
                # then, not EINTR). Its handler runs now, not when the rest's wait ends (with
                # no send timeout, a peer that never reads would keep Ctrl-C from acting).
                PyErr_CheckSignals()
        return 0

    def send(self, buffers, fds=()):
        """Write a list of buffers, in order, as one stream of bytes, after everything queued.

        Args:
            buffers: bytes-like objects.
            fds: up to 16 descriptors to pass (SCM_RIGHTS) with the first byte. They stay
                open here; the receiver gets its own copies.

        Returns:
            The stream offset just past these bytes (compare with ``written``).

        Raises:
            BlockingIOError: the send timeout expired (part may have been written).
            OSError: the connection broke.
            ValueError: more than 16 descriptors.
        """
        return self._send(buffers, fds)

    cdef uint64_t _send(self, object buffers, object fds=None) except? 0:
        # A few buffers (the usual case) describe themselves on the stack; more need the heap.
        cdef Py_buffer stack_views[8]
        cdef iovec stack_iov[8]
        cdef Py_ssize_t count = len(buffers), i, acquired = 0
        cdef Py_buffer *views = stack_views
        cdef iovec *iov = stack_iov
        cdef uint64_t total = 0, end = 0
        if count > 8:
            views = <Py_buffer *>malloc(count * sizeof(Py_buffer))
            iov = <iovec *>malloc(count * sizeof(iovec))
            if views == NULL or iov == NULL:
                free(views)
                free(iov)
                raise MemoryError()
        try:
            for i in range(count):
                PyObject_GetBuffer(buffers[i], &views[i], PyBUF_SIMPLE)
                acquired += 1
                iov[i].iov_base = views[i].buf
                iov[i].iov_len = <size_t>views[i].len
                total += <uint64_t>views[i].len
            self._lock_send()
            try:
                if self._fd < 0:
                    raise OSError(EBADF, "the channel is closed")
                if self._queued:
                    self._drain(0)   # what was queued before us leaves first
                self.submitted += total
                end = self.submitted
                try:
                    self._send_iov(iov, count, fds, total <= NOGIL_THRESHOLD_BYTES)
                except BaseException:
                    if not self.broken:   # none of it left (a part would have broken it)
                        if self.submitted == end:
                            self.submitted -= total   # nothing came after: never submitted
                        else:
                            # Frames queued meanwhile were placed after ours: their stream
                            # offsets (their descriptors' places) would be wrong.
                            self._break()
                    raise
                if self._queued:
                    self._drain_quietly()   # queued while we wrote
            finally:
                PyThread_release_lock(self._send_lock)
        finally:
            for i in range(acquired):
                PyBuffer_Release(&views[i])
            if views != stack_views:
                free(views)
                free(iov)
        return end

    # The outbox ------------------------------------------------------------------------------
    # Small frames are packed into _queue with the GIL held, so appending needs no lock of its
    # own. Whoever holds the send lock writes: it detaches the queue, sends it without the GIL
    # (other threads keep appending to the spare buffer meanwhile) and loops until the queue is
    # empty. It checks that and releases the lock without letting the GIL go in between, so a
    # thread that queued a frame and found the lock taken can leave: the holder will write it.

    cdef int _schedule(self) except -1:
        self._scheduled = True
        try:
            self.on_queued(self)
        except BaseException:
            self._scheduled = False   # or no later Event would ever ask again
            raise
        return 0

    cdef int _drain(self, int flags) except -1:
        # The caller holds the send lock. Returns 1 if MSG_DONTWAIT stopped it with bytes left.
        # Invariant: self.written is the stream offset of buf[done] (the queue always follows
        # the bytes already written), which places the queued descriptors within buf.
        cdef unsigned char *buf
        cdef Py_ssize_t n, done, cap, chunk, ahead
        cdef ssize_t sent = 0
        cdef int error = 0, fd
        cdef bint quick
        cdef iovec vector
        while self._queued:
            if self._fd < 0:
                raise OSError(EBADF, "the channel is closed")
            buf, n, cap = self._queue, self._queued, self._queue_cap
            self._queue, self._queue_cap, self._queued = self._spare, self._spare_cap, 0
            self._spare, self._spare_cap = NULL, 0   # detached: ours until the loop ends
            done = 0
            # A small write is tried first with the GIL held and MSG_DONTWAIT: copying a few
            # KiB into the socket buffer takes microseconds, while letting the GIL go invites
            # another thread in and makes this one wait for it back (a context switch or two).
            quick = n <= NOGIL_THRESHOLD_BYTES
            while done < n:
                fd = -1
                chunk = n - done
                if self._fd_count:
                    ahead = <Py_ssize_t>(<long long>self._fd_at[0] - <long long>self.written)
                    if ahead < 0 or (ahead == 0 and self._fd_end[0] <= self.written):
                        # Offsets out of step (cannot happen while they are kept right): stop
                        # rather than write from outside the buffer or without the descriptor.
                        self._requeue(buf, cap, done, n)
                        self._break()
                        raise OSError(EPIPE, "the outbox lost track of a descriptor's frame")
                    if ahead == 0:   # a descriptor's frame starts here: it goes alone with it
                        fd = self._fd_fds[0]
                        chunk = min(chunk, <Py_ssize_t>(self._fd_end[0] - self.written))
                    elif ahead < chunk:
                        chunk = ahead   # up to that frame, without the descriptor
                if self._tls is not None:
                    vector.iov_base = buf + done
                    vector.iov_len = <size_t>chunk
                    try:
                        if fd >= 0:
                            raise OSError(EINVAL, "descriptors cannot travel over TLS")
                        sent = self._tls_write(&vector, 1, flags)
                    except BaseException:
                        self._requeue(buf, cap, done, n)
                        raise
                    if sent < 0:
                        error = errno
                elif self._ring_tx:
                    vector.iov_base = buf + done
                    vector.iov_len = <size_t>chunk
                    sent = self._ring_write(&vector, 1, (fd,) if fd >= 0 else None,
                                            flags | (MSG_DONTWAIT if quick else 0))
                    if sent < 0:
                        error = errno
                    if quick:
                        quick = False
                        if sent < 0 and error == EAGAIN and not flags & MSG_DONTWAIT:
                            continue   # full: wait for room without the GIL
                elif quick:
                    quick = False
                    sent = _send_with_fd(self._fd, buf + done, <size_t>chunk, fd,
                                         flags | MSG_NOSIGNAL | MSG_DONTWAIT)
                    if sent < 0:
                        error = errno
                        if error == EAGAIN and not flags & MSG_DONTWAIT:
                            continue   # full: wait for room without the GIL
                else:
                    with nogil:
                        sent = _send_with_fd(self._fd, buf + done, <size_t>chunk, fd,
                                             flags | MSG_NOSIGNAL)
                        if sent < 0:
                            error = errno
                if sent < 0:
                    if error == EINTR:
                        try:
                            PyErr_CheckSignals()
                        except BaseException:
                            self._requeue(buf, cap, done, n)
                            raise
                        continue
                    break
                if fd >= 0 and sent > 0:   # it left with the frame's first byte
                    close_fd(fd)
                    self._fd_count -= 1
                    memmove(self._fd_at, self._fd_at + 1, self._fd_count * sizeof(uint64_t))
                    memmove(self._fd_end, self._fd_end + 1, self._fd_count * sizeof(uint64_t))
                    memmove(self._fd_fds, self._fd_fds + 1, self._fd_count * sizeof(int))
                done += sent
                self.written += <uint64_t>sent
            if done < n:
                self._requeue(buf, cap, done, n)   # in front of what came meanwhile
                if error == EAGAIN and flags & MSG_DONTWAIT:
                    return 1
                # OSError picks the subclass: EAGAIN (a kernel timeout) is BlockingIOError.
                raise OSError(error, strerror(error).decode())
            if self._spare == NULL and cap <= _KEEP_SPARE_BYTES:
                self._spare, self._spare_cap = buf, cap
            else:
                free(buf)   # a burst's big buffer is not kept for good
        return 0

    cdef int _break(self) except -1:
        # The stream can no longer be framed right: shut it for good (readers see its end);
        # the descriptor itself stays until close(), so no number is reused under anyone.
        self.broken = True
        self._shut()
        return 0

    cdef void _shut(self) noexcept:
        # Both directions, now: the socket's (shutdown wakes its readers and writers) and the
        # ring's (its waiters here leave, and the peer's see the end).
        if self._fd >= 0:
            shutdown(self._fd, SHUT_RDWR)
        if self.ring is not None:
            hx_ring_shut(&self.ring.r)

    cdef int _queue_fd(self, int fd, uint64_t at, uint64_t end) except -1:
        # A duplicate of fd, to ride on the first byte of the frame at [at, end).
        cdef Py_ssize_t cap
        cdef void *grown
        cdef int copy
        if self._fd_count == self._fd_cap:
            cap = max(4, 2 * self._fd_cap)
            grown = realloc(self._fd_at, cap * sizeof(uint64_t))
            if grown == NULL:
                raise MemoryError()
            self._fd_at = <uint64_t *>grown
            grown = realloc(self._fd_end, cap * sizeof(uint64_t))
            if grown == NULL:
                raise MemoryError()
            self._fd_end = <uint64_t *>grown
            grown = realloc(self._fd_fds, cap * sizeof(int))
            if grown == NULL:
                raise MemoryError()
            self._fd_fds = <int *>grown
            self._fd_cap = cap
        copy = fcntl(fd, F_DUPFD_CLOEXEC, 0)
        if copy < 0:
            _raise_errno()
        self._fd_at[self._fd_count] = at
        self._fd_end[self._fd_count] = end
        self._fd_fds[self._fd_count] = copy
        self._fd_count += 1
        return 0

    cdef void _drop_fds(self) noexcept:
        cdef Py_ssize_t k
        for k in range(self._fd_count):
            close_fd(self._fd_fds[k])
        self._fd_count = 0

    cdef int _drain_quietly(self) except -1:
        # After the holder's own bytes left: frames others queued meanwhile. A failure here is
        # theirs to see (the next write raises it again); the bytes stay queued, in order.
        try:
            self._drain(0)
        except OSError:
            if self._queued and not self._scheduled and self.on_queued is not None:
                self._schedule()
        return 0

    cdef int _requeue(self, unsigned char *buf, Py_ssize_t cap, Py_ssize_t start,
                      Py_ssize_t end) except -1:
        # buf[start:end] did not leave: it goes back in front of what was queued meanwhile.
        cdef Py_ssize_t tail = end - start, total = end - start + self._queued
        cdef unsigned char *grown
        if total > cap:
            grown = <unsigned char *>realloc(buf, <size_t>total)
            if grown == NULL:
                free(buf)
                self.broken = True
                self._shut()
                raise MemoryError()
            buf, cap = grown, total
        memmove(buf, buf + start, <size_t>tail)
        if self._queued:
            memcpy(buf + tail, self._queue, <size_t>self._queued)
        free(self._spare)
        self._spare, self._spare_cap = self._queue, self._queue_cap
        self._queue, self._queue_cap, self._queued = buf, cap, total
        return 0

    # The ring ---------------------------------------------------------------------------------
    # Once switch_tx ran, what the socket took goes into the ring instead, with the same
    # semantics as a stream socket's send: some bytes taken (a partial write), or an errno.

    def switch_tx(self, Ring ring, bytes frame, int fd=-1):
        """Write ``frame`` (the sender's switch frame) on the socket, after everything queued,
        with ``fd`` passed on its first byte when not -1; then send everything after it
        through ``ring`` (PROTOCOL.md section 9b). Holds the send lock throughout, so no
        other write can come between.

        Raises:
            As ``send``; ValueError if the channel already writes to a ring.
        """
        cdef iovec vector
        if self._ring_tx:
            raise ValueError("this channel already writes to a ring")
        self._lock_send()
        try:
            if self._fd < 0:
                raise OSError(EBADF, "the channel is closed")
            if self._queued:
                self._drain(0)
            vector.iov_base = <void *>PyBytes_AS_STRING(frame)
            vector.iov_len = <size_t>len(frame)
            self.submitted += <uint64_t>len(frame)
            self._send_iov(&vector, 1, (fd,) if fd >= 0 else None)
            self.ring = ring
            self._ring_tx = True
            if self._queued:
                # Queued while we wrote (a thread that found the lock taken left its frame to
                # us): it goes after the switch frame, into the ring.
                self._drain_quietly()
        finally:
            PyThread_release_lock(self._send_lock)

    cdef ssize_t _ring_write(self, iovec *iov, Py_ssize_t count, object fds,
                             int flags) except -2:
        # As sendmsg: bytes taken into the ring (at least one), or -1 with errno: EAGAIN (full,
        # with MSG_DONTWAIT or past the socket's send timeout), EPIPE (the peer closed or is
        # gone), EPROTO (the peer's index is out of range), EBADF (closed here), EINTR.
        # Descriptors leave first, one carrier each on the socket, once room for at least the
        # frame's first byte is sure: a carrier never goes without its frame.
        cdef Ring ring = self.ring
        cdef int64_t room
        cdef int state, fd
        cdef size_t total = 0, put
        cdef Py_ssize_t i
        cdef ssize_t sent
        cdef int k
        cdef unsigned char carrier[8]
        if ring is None:
            errno_set(EBADF)
            return -1
        for i in range(count):
            total += iov[i].iov_len
        while True:
            if ring.r.shut:
                errno_set(EBADF)
                return -1
            if hx_ring_peer_closed(&ring.r) or hx_ring_peer_ended_quietly(&ring.r):
                errno_set(EPIPE)
                return -1
            room = hx_ring_writable(&ring.r)
            if room < 0:
                errno_set(EPROTO)
                return -1
            if room > 0:
                break
            if flags & MSG_DONTWAIT:
                # An event loop writes us: it learns of room from a wake record on the socket.
                if self.ring_socket_wakes and hx_ring_arm_tx_socket(&ring.r) != 0:
                    continue
                errno_set(EAGAIN)
                return -1
            with nogil:   # the socket's send timeout, looked up if it comes to a sleep
                state = hx_ring_wait_writable(&ring.r, -1, SO_SNDTIMEO)
            if state == HX_WAIT_TIMEOUT:
                errno_set(EAGAIN)
                return -1
            if state < 0:
                errno_set(EINTR)
                return -1
            if state == HX_WAIT_CORRUPT:
                errno_set(EPROTO)
                return -1
            if state == HX_WAIT_ENDED:
                errno_set(EPIPE)
                return -1
        if fds:
            for i, fd in enumerate(fds):
                for k in range(8):
                    carrier[k] = <unsigned char>((ring.r.tx_tail >> (8 * k)) & 0xFF)
                with nogil:
                    sent = _send_with_fd(self._fd, carrier, 8, fd, MSG_NOSIGNAL)
                while sent < 0 and errno == EINTR:
                    with nogil:
                        sent = _send_with_fd(self._fd, carrier, 8, fd, MSG_NOSIGNAL)
                if sent != 8:
                    if i or sent > 0:
                        self._break()   # a carrier left, or part of one: out of step for good
                    if sent >= 0:
                        errno_set(EPIPE)
                    return -1
                hx_ring_count_carrier(&ring.r)
        if total > <size_t>room:
            total = <size_t>room
        if total >= NOGIL_THRESHOLD_BYTES:
            with nogil:
                put = hx_ring_put(&ring.r, iov, <int>count, total)
        else:
            put = hx_ring_put(&ring.r, iov, <int>count, total)
        return <ssize_t>put

    def settled_written(self):
        """``written`` once no write is in progress (waits for one to end): whether a frame
        left can then be told exactly, for example after the connection failed."""
        self._lock_send()
        try:
            return self.written
        finally:
            PyThread_release_lock(self._send_lock)

    def abort(self, reason):
        """Cut the stream in both directions now, from any thread, without waiting for a
        writer: readers see its end, writers an error. ``aborted`` keeps the first reason.
        The descriptor itself stays open until ``close``."""
        if self.aborted is None:
            self.aborted = reason
        self.broken = True
        self._shut()   # close() clears _fd before closing it, both with the GIL held

    @property
    def closed(self):
        """True once close() ran."""
        return self._fd < 0

    def fileno(self):
        """The socket's descriptor, or -1 once closed."""
        return self._fd
