# The shared-memory ring (docs/PROTOCOL.md section 9b): the mapping of a connection's ring and
# the socket-side half of it, the descriptor carriers. Included by _channel.pyx (one compiled
# module); the C kernels that move bytes and wait are in _ring.h. The Channel reads from the
# ring and the Writer writes into it once they have switched (Channel.switch_rx/switch_tx).
# The pure-Python core has no ring: hintens offers one only over the compiled core.

cdef extern from "sched.h" nogil:
    ctypedef struct cpu_set_t:
        pass
    int sched_getaffinity(int pid, size_t size, cpu_set_t *mask)
    int CPU_COUNT(cpu_set_t *mask)

cdef extern from "sys/socket.h" nogil:
    const int SO_RCVTIMEO
    const int SO_SNDTIMEO

cdef extern from "errno.h":
    const int EPROTO

from libc.stdint cimport int64_t


cdef int _count_cpus() noexcept:
    cdef cpu_set_t cpus
    if sched_getaffinity(0, sizeof(cpu_set_t), &cpus) != 0:
        return 1
    return CPU_COUNT(&cpus)

cdef extern from "unistd.h" nogil:
    long sysconf(int name)
    const int _SC_NPROCESSORS_ONLN

# One spinning thread per CPU this process may use, less one for whoever it waits for, and
# at least one when the machine has another CPU: a process pinned to one CPU may wait for a
# peer pinned to another. Each ring also looks, when it is mapped, whether its peer may run
# beside us (hx_ring_peer_may_run_beside): two processes pinned to the same one CPU never
# spin. None on a single-CPU machine, where spinning only keeps the peer from running.
hx_ring_max_spinners = max(1, _count_cpus() - 1) if sysconf(_SC_NPROCESSORS_ONLN) > 1 else 0

#: The ring's layout constants (PROTOCOL.md section 9b), for the Python layers and tests.
RING_HEADER_BYTES = HX_RING_HEADER_BYTES
RING_MIN_CAPACITY = HX_RING_MIN_CAPACITY
RING_MAX_CAPACITY = HX_RING_MAX_CAPACITY
RING_LIVENESS_S = HX_RING_LIVENESS_NS / 1e9
#: The longest a ring reader spins before it sleeps (not wire-visible: PROTOCOL.md 9b).
RING_SPIN_MAX_S = HX_RING_SPIN_MAX_NS / 1e9
RING_LAYOUT_VERSION = HX_RING_VERSION
#: Bytes of one descriptor carrier on the socket (a u64 ring offset).
RING_CARRIER_BYTES = 8


@cython.final
cdef class Ring:
    """A connection's shared-memory ring, mapped: two byte rings (one per direction) in one
    sealed memfd. The creator (the server) produces on direction 0.

    Args:
        fd: the memfd, already checked (hintens/transport/ring.py). It is not kept: the
            mapping stays valid without it.
        capacity: bytes per direction, a power of two.
        sock: the connection's socket (its descriptor): carriers and the peer's end.
        creator: we created it, and lay out its header.

    Raises:
        ValueError: a capacity out of range.
        OSError: the mapping failed.
    """

    def __cinit__(self, int fd, uint64_t capacity, sock, bint creator):
        cdef void *address
        cdef size_t size
        self._map = NULL
        if capacity < HX_RING_MIN_CAPACITY or capacity > HX_RING_MAX_CAPACITY \
                or capacity & (capacity - 1):
            raise ValueError(f"a ring's capacity must be a power of two from "
                             f"{HX_RING_MIN_CAPACITY} to {HX_RING_MAX_CAPACITY}, not {capacity}")
        size = HX_RING_HEADER_BYTES + 2 * <size_t>capacity
        # The creator chose the size (its own setting), and populates the whole mapping now:
        # each page the ring's first lap touched would otherwise cost a page fault (an
        # allocation) in a round trip, 2 to 3% of the round trips of a new connection here.
        # The peer's pages are then in the memfd already: its first touches are minor
        # faults. The peer does not populate: a hostile creator's hole-ridden memfd would
        # have it allocate memory it never reads.
        with nogil:
            address = mmap(NULL, size, PROT_READ | PROT_WRITE,
                           MAP_SHARED | (MAP_POPULATE if creator else 0), fd, 0)
        if address == MAP_FAILED:
            _raise_errno()
        self._map = <unsigned char *>address
        self._map_size = size
        self.creator = creator
        self._ahead = []
        hx_ring_attach(&self.r, self._map, capacity, creator, sock.fileno())
        self.r.spin_ok = hx_ring_peer_may_run_beside(sock.fileno())

    def __dealloc__(self):
        if self._ahead:
            for _, fd in self._ahead:
                close_fd(fd)
        if self._map != NULL:
            munmap(self._map, self._map_size)

    @property
    def capacity(self):
        """Bytes per direction."""
        return self.r.capacity

    def stats(self):
        """Counters of this ring's waits: ``futex_waits`` (sleeps on a futex word, each a
        system call), ``futex_wakes`` (wake-ups we issued to a sleeping peer), ``spins_won``
        (waits a spin ended, without a system call), ``socket_wakes`` (wake records we sent
        to a peer that waits on the socket), ``socket_waits`` (sleeps of an idle reader on
        the socket), the stream offsets ``written`` and ``read``, and the reader's adaptive
        spin: ``spin_budget_ns`` (how long its next wait spins; 0: it sleeps at once),
        ``probe_every`` (with no budget, every how many waits it spins once to see whether
        spinning pays again) and ``may_spin`` (0: the peer may use only the one CPU we may
        use, so the reader never spins)."""
        return {"futex_waits": self.r.futex_waits, "futex_wakes": self.r.futex_wakes,
                "spins_won": self.r.spins_won, "socket_wakes": self.r.socket_wakes,
                "socket_waits": self.r.socket_waits,
                "written": self.r.tx_tail,
                "read": self.r.rx_head,
                "spin_budget_ns": self.r.rx_spin_ns,
                "probe_every": self.r.rx_probe_every,
                "may_spin": self.r.spin_ok}

    def header(self):
        """The first 16 bytes of the mapping: magic, layout version, capacity."""
        return <bytes>self._map[:16]

    def close_tx(self):
        """We write no more: the peer reads what is left, then sees the end."""
        hx_ring_close_tx(&self.r)

    def shut(self):
        """Closed here: our waiters leave at once, and the peer sees the end."""
        hx_ring_shut(&self.r)

    def _shared(self):
        # The whole mapping, writable: for tests that play a hostile peer in-process.
        return PyMemoryView_FromObject(_RingView(self))


@cython.final
cdef class _RingView:
    # Exports a Ring's mapping (tests only; the Ring stays alive while it is exported).
    cdef Ring _ring

    def __cinit__(self, Ring ring):
        self._ring = ring

    def __getbuffer__(self, Py_buffer *view, int flags):
        PyBuffer_FillInfo(view, self, self._ring._map, <Py_ssize_t>self._ring._map_size, 0,
                          flags)

    def __releasebuffer__(self, Py_buffer *view):
        pass
