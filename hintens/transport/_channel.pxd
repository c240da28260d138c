# The contract of the compiled socket transport (hintens/transport/_channel.pyx): the socket
# calls it makes and the layout of its classes. Field comments say what each slot holds;
# hintens/transport/_channel_py.py is the pure-Python twin. The frame types come from the wire
# kernels' contract, hintens/wire/_wire.pxd.

from cpython.pythread cimport PyThread_type_lock
from libc.stdint cimport int64_t, uint32_t, uint64_t

from ..wire._wire cimport FrameDecoder


cdef extern from "sys/uio.h" nogil:
    struct iovec:
        void *iov_base
        size_t iov_len


cdef extern from "sys/socket.h" nogil:
    struct msghdr:
        void *msg_name
        unsigned int msg_namelen
        iovec *msg_iov
        size_t msg_iovlen
        void *msg_control
        size_t msg_controllen
        int msg_flags
    struct cmsghdr:
        size_t cmsg_len
        int cmsg_level
        int cmsg_type
    ssize_t recvmsg(int fd, msghdr *message, int flags)
    int shutdown(int fd, int how)
    const int SHUT_RDWR
    const int SHUT_RD
    ssize_t sendmsg(int fd, const msghdr *message, int flags)
    cmsghdr *CMSG_FIRSTHDR(msghdr *message)
    cmsghdr *CMSG_NXTHDR(msghdr *message, cmsghdr *header)
    unsigned char *CMSG_DATA(cmsghdr *header)
    size_t CMSG_SPACE(size_t length)
    size_t CMSG_LEN(size_t length)
    const int SOL_SOCKET
    const int SCM_RIGHTS
    const int MSG_NOSIGNAL
    const int MSG_CMSG_CLOEXEC
    const int MSG_CTRUNC


cdef extern from "_ring.h" nogil:
    ctypedef struct hx_ring:
        uint64_t capacity
        uint64_t tx_tail
        uint64_t rx_head
        int shut
        long long rx_spin_ns
        unsigned rx_probe_every
        int spin_ok
        uint64_t futex_waits
        uint64_t futex_wakes
        uint64_t spins_won
        uint64_t socket_wakes
        uint64_t socket_waits
    int hx_ring_peer_may_run_beside(int sock)
    const unsigned int HX_RING_HEADER_BYTES
    const unsigned int HX_RING_MIN_CAPACITY
    const unsigned int HX_RING_MAX_CAPACITY
    const long long HX_RING_LIVENESS_NS
    const long long HX_RING_SPIN_MAX_NS
    const unsigned int HX_RING_VERSION
    int hx_ring_max_spinners
    enum:
        HX_WAIT_READY
        HX_WAIT_TIMEOUT
        HX_WAIT_ENDED
        HX_WAIT_SHUT
        HX_WAIT_CORRUPT
        HX_WAIT_SOCKET
    long long hx_ring_now_ns()
    long long hx_socket_deadline(int sock, int option)
    void hx_ring_attach(hx_ring *r, unsigned char *base, uint64_t capacity, int creator,
                        int sock)
    int64_t hx_ring_readable(hx_ring *r)
    int64_t hx_ring_writable(hx_ring *r)
    int hx_ring_peer_closed(hx_ring *r)
    int hx_ring_rx_ended(hx_ring *r)
    uint64_t hx_ring_carriers(hx_ring *r)
    size_t hx_ring_take(hx_ring *r, const iovec *iov, int iovcnt, size_t n)
    size_t hx_ring_put(hx_ring *r, const iovec *iov, int iovcnt, size_t room)
    void hx_ring_count_carrier(hx_ring *r)
    void hx_ring_close_tx(hx_ring *r)
    void hx_ring_shut(hx_ring *r)
    void hx_ring_stop_reading(hx_ring *r)
    int hx_ring_peer_ended_quietly(hx_ring *r)
    int64_t hx_ring_arm_rx_socket(hx_ring *r)
    int64_t hx_ring_arm_tx_socket(hx_ring *r)
    int hx_ring_wait_readable(hx_ring *r, long long deadline_ns, int timeout_option,
                              int may_spin)
    int hx_ring_wait_writable(hx_ring *r, long long deadline_ns, int timeout_option)
    ctypedef struct hx_spin:
        long long spin_ns
        uint64_t spins
        uint64_t spins_won
    const ssize_t HX_SPIN_NOTHING
    void hx_spin_init(hx_spin *s)
    ssize_t hx_spin_recvmsg(hx_spin *s, int fd, msghdr *m, int flags, long long *start)
    int hx_spin_poll(hx_spin *s, int fd, long long *start)
    void hx_spin_after(hx_spin *s, long long start)


cdef class Ring:
    # A connection's shared-memory ring, both directions (hintens/transport/_ring.pxi).
    cdef hx_ring r                        # the C state (_ring.h): indices, mapping, counters
    cdef unsigned char *_map              # the mapping, or NULL
    cdef size_t _map_size                 # its length
    cdef readonly bint creator            # we created it (we produce on direction 0)
    cdef readonly uint64_t carriers_received  # descriptor carriers read off the socket
    cdef list _ahead                      # [(ring offset, fd)]: carriers whose frame has not
                                          # begun in what we read yet, oldest first
    cdef uint64_t _last_carrier           # the ring offset the newest carrier named


cdef class Writer:
    # The sending end (hintens/transport/_writer.pxi), and the state of the queue the Outbox
    # fills: written by whichever thread holds the send lock. The queue is only touched with
    # the GIL held; the writer sends a detached buffer without it.
    cdef int _fd                          # the socket's descriptor (the socket stays the caller's)
    cdef object _sock                     # keeps the socket object, and so the fd, alive
    cdef PyThread_type_lock _send_lock    # one writer at a time, taken without the GIL
    cdef readonly bint broken             # a send stopped mid-frame: the stream is shut for good
    cdef unsigned char *_queue            # frames submitted and not yet written, in order
    cdef Py_ssize_t _queued               # bytes in _queue
    cdef Py_ssize_t _queue_cap            # its allocation
    cdef unsigned char *_spare            # the other buffer, swapped in by the writer
    cdef Py_ssize_t _spare_cap            # its allocation
    cdef readonly uint64_t submitted      # bytes ever submitted: the stream offset of the newest
    cdef readonly uint64_t written        # bytes the kernel has taken
    cdef readonly uint64_t dropped        # queued bytes that close() threw away unsent
    cdef public double flush_interval     # seconds an Event may wait in the queue
    cdef public Py_ssize_t max_queue      # queued bytes past which a submitter writes itself
    cdef public object on_queued          # called with the channel when a deadline flush is due
    cdef int _corked                      # cork() depth: Events wait for uncork or a full queue
    cdef bint _scheduled                  # on_queued was called and flush_due() has not run
    cdef double _last_lazy                # CLOCK_MONOTONIC seconds of the newest non-urgent post
    cdef uint64_t _event_id               # the request id of the newest Event posted
    cdef readonly uint64_t small_events   # Events queued by event_small
    # Descriptors queued with frames of the outbox (offer), in stream order: each rides on the
    # first byte of its frame, in a sendmsg that carries that frame alone. The outbox owns
    # these (duplicates) until they are sent or dropped.
    cdef uint64_t *_fd_at                 # stream offset of each one's frame
    cdef uint64_t *_fd_end                # stream offset just past that frame
    cdef int *_fd_fds                     # the descriptors
    cdef Py_ssize_t _fd_count             # how many are queued
    cdef Py_ssize_t _fd_cap               # room in the three arrays
    cdef readonly object aborted          # why abort() cut the stream, or None
    cdef public double stall_timeout      # seconds queued bytes may wait on a full socket
                                          # before the flusher aborts the channel (0: never)
    cdef readonly Ring ring               # the shared-memory ring, once one was set up, or None
    cdef bint _ring_tx                    # our frames go into the ring (switch_tx)
    cdef public bint ring_socket_wakes    # an event loop drives us: over a ring, a read or
                                          # write that would wait arms a wake record on the
                                          # socket instead (PROTOCOL.md 9b)
    # TLS (a TlsStream's socket): the stream's OpenSSL object (ssl's _SSLSocket), which every
    # read and write goes through instead of the descriptor; None over a plain socket.
    cdef object _tls
    cdef PyThread_type_lock _tls_lock     # one OpenSSL call at a time (taken without the GIL)

    cdef uint64_t _send(self, object buffers, object fds=*) except? 0
    cdef int _schedule(self) except -1
    cdef int _drain(self, int flags) except -1
    cdef int _break(self) except -1
    cdef int _queue_fd(self, int fd, uint64_t at, uint64_t end) except -1
    cdef void _drop_fds(self) noexcept
    cdef int _drain_quietly(self) except -1
    cdef int _requeue(self, unsigned char *buf, Py_ssize_t cap, Py_ssize_t start,
                      Py_ssize_t end) except -1
    cdef int _lock_send(self) except -1
    cdef int _send_iov(self, iovec *iov, Py_ssize_t count, object fds,
                       bint quick=*) except -1
    cdef int _write_all(self, iovec *iov, Py_ssize_t first, Py_ssize_t count, object fds,
                        Py_ssize_t nfds, size_t *written, bint quick) except -1
    cdef ssize_t _ring_write(self, iovec *iov, Py_ssize_t count, object fds, int flags) except -2
    cdef ssize_t _tls_write(self, iovec *iov, Py_ssize_t count, int flags) except -2
    cdef int _tls_call_begin(self) except -1
    cdef int _tls_failed(self) except -1
    cdef int _tls_wait(self, short events, int option, long long *deadline) except -1
    cdef void _shut(self) noexcept


cdef class Outbox(Writer):
    # The outgoing queue's API (hintens/transport/_outbox.pxi): post, offer, flush, cork.
    cdef int _reserve(self, Py_ssize_t extra) except -1
    cdef uint64_t _post(self, uint32_t msg_type, object payload, uint64_t request_id) except? 0
    cdef int _after_post(self, bint urgent) except -1
    cdef int _after_offer(self) except -1


cdef class Channel(Outbox):
    # The receive side (hintens/transport/_channel.pyx), over the Outbox.
    cdef readonly FrameDecoder decoder    # decodes what arrives
    cdef unsigned char *_buffer           # receive buffer, malloc'ed in __init__
    cdef Py_ssize_t _size                 # its size in bytes
    cdef public object pending            # frames receive_reply() did not consume, or None at EOF
    cdef readonly list fds                # descriptors received (SCM_RIGHTS), oldest first
    cdef readonly Py_ssize_t fds_dropped  # received beyond the cap (closed) or cut by MSG_CTRUNC
    cdef public Py_ssize_t max_fds        # descriptors that may wait unclaimed (0: none, at most 64)
    cdef bint _eager                      # reads found several frames: try the next one
                                          # with MSG_DONTWAIT first, keeping the GIL
    cdef bint _slow                       # the last serve() read needed more than the handler
    cdef public bint reply_spin           # receive_reply spins a moment before it blocks
    cdef bint _spin_next                  # the next blocking read may spin first
    cdef hx_spin _spin                    # its adaptive budget and counters (_ring.h)
    cdef bint _ring_rx                    # frames come from the ring (switch_rx)
    cdef bytes _tls_early                 # TLS: bytes the stream read ahead, served first
    cdef readonly uint64_t ring_wakes_taken  # wake records taken off the socket, ever
    cdef object _ring_error               # what ring_pending met, raised by the next read
    cdef readonly uint64_t responses_sent # Responses serve() answered itself (small or inline)
    cdef readonly uint64_t handler_calls  # handler runs timed (note_handler)
    cdef readonly double handler_seconds  # their total time
    cdef uint64_t _handler_buckets[8]     # their count by HANDLER_BUCKETS_S bound (+ the rest)

    cpdef note_handler(self, double seconds)

    cdef int _keep_fds(self, msghdr *message) except -1
    cdef list _receive(self, int flags)
    cdef Py_ssize_t _ring_read(self, iovec *vectors, int count, int flags) except -2
    cdef int _ring_records(self, bint counted) except -1
    cdef int _ring_corrupt(self) except -1
    cdef list _tls_receive(self, int flags, bint spin)
    cdef Py_ssize_t _tls_read(self, unsigned char *buf, Py_ssize_t size, int flags,
                              bint spin) except -1
    cdef list _serve_once(self, handler, on_error, reply_writes, Py_ssize_t small_max,
                          Py_ssize_t inline_max, on_event, context, failed)


cdef class Mapping:
    cdef unsigned char *_address          # start of the mapping, or NULL once unmapped
    cdef Py_ssize_t _size                 # its length in bytes
    cdef bint _writable                   # PROT_WRITE (refuses writable exports otherwise)
    cdef readonly Py_ssize_t exports      # buffer exports alive right now
    cdef list _charges                    # [(MemoryBudget, amount)], given back when unmapped
    cdef int _unmap(self) except -1


cdef class SharedRegion:
    cdef Py_buffer _source                # export of the mapping, held until release
    cdef bint _has_source                 # whether _source must be released
    cdef Py_ssize_t _offset               # window start within the mapping
    cdef Py_ssize_t _length               # window length
    cdef bint _readonly                   # refuse writable views
    cdef object _on_release               # called once when released, or None
    cdef bint _auto_release               # release when the last export goes
    cdef readonly Py_ssize_t exports      # views alive right now
    cdef readonly bint released           # give-back happened
