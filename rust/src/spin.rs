//! The spin before a blocking client's read of a reply: the same rules as the Python client's
//! (`hintens/transport/_ring.h`, `hx_spin_recvmsg`). While a request waits for its answer and
//! no frame is half read, the reader tries the socket with `MSG_DONTWAIT`, yielding the CPU
//! between tries, for up to [`SPIN_MAX`] before it blocks: an answer from a server on another
//! CPU then costs no wake-up of this thread. The budget is full while answers come within
//! [`SPIN_MAX`] of the wait's start, halves after each wait that lasted longer, and once spent
//! is tried again in full every 8th wait (then every 16th, up to every 1,024th, while the
//! tries do not pay). At most one thread per CPU beyond the first spins in a process (none on
//! a one-CPU machine), and none while this process and its peer are pinned to one same CPU
//! (each try would only hand the CPU over). Not wire-visible.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicI8, AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The longest a wait spins.
pub(crate) const SPIN_MAX: Duration = Duration::from_micros(100);
const PROBE_MIN: u32 = 8;
const PROBE_MAX: u32 = 1024;

/// Threads of this process spinning right now.
static SPINNERS: AtomicUsize = AtomicUsize::new(0);

/// One spinning thread per CPU this process may use, less one for whoever it waits for, and
/// at least one when the machine has another CPU (a process pinned to one CPU may wait for a
/// peer pinned to another); none on a one-CPU machine.
fn max_spinners() -> usize {
    static MAX: OnceLock<usize> = OnceLock::new();
    *MAX.get_or_init(|| {
        // SAFETY: sysconf has no preconditions; sched_getaffinity writes into `set`.
        unsafe {
            if libc::sysconf(libc::_SC_NPROCESSORS_ONLN) <= 1 {
                return 0;
            }
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            let ours = if libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set) == 0 {
                libc::CPU_COUNT(&set) as usize
            } else {
                1
            };
            ours.saturating_sub(1).max(1)
        }
    })
}

/// Whether a spin on `fd` may see the peer move: we may use two CPUs or more, or the peer
/// (SO_PEERCRED) may use a CPU we may not, or it cannot be looked at.
fn peer_beside(fd: RawFd) -> bool {
    // SAFETY: the sets and the ucred are plain data the calls write into.
    unsafe {
        let mut ours: libc::cpu_set_t = std::mem::zeroed();
        let size = std::mem::size_of::<libc::cpu_set_t>();
        if libc::sched_getaffinity(0, size, &mut ours) != 0 || libc::CPU_COUNT(&ours) >= 2 {
            return true;
        }
        let mut peer: libc::ucred = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
        let mut theirs: libc::cpu_set_t = std::mem::zeroed();
        if libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            &mut peer as *mut libc::ucred as *mut libc::c_void,
            &mut len,
        ) != 0
            || peer.pid <= 0
            || libc::sched_getaffinity(peer.pid, size, &mut theirs) != 0
        {
            return true;
        }
        (0..libc::CPU_SETSIZE as usize)
            .any(|cpu| libc::CPU_ISSET(cpu, &theirs) && !libc::CPU_ISSET(cpu, &ours))
    }
}

/// One connection's spin budget and counters. Only the thread that reads (the leader) uses
/// it at a time; the atomics make it shareable, not contended.
pub(crate) struct Spin {
    enabled: bool,
    /// -1: not looked yet; 0: the peer shares our one CPU; 1: it may run beside us.
    beside: AtomicI8,
    budget_ns: AtomicU64,
    probe_every: AtomicU32,
    unspun: AtomicU32,
    spins: AtomicU64,
    won: AtomicU64,
}

/// A spin [`Spin::begin`] allowed: hand it to [`Spin::end`].
pub(crate) struct Spinning {
    pub(crate) budget: Duration,
    probing: bool,
}

impl Spin {
    pub(crate) fn new(enabled: bool) -> Spin {
        Spin {
            enabled,
            beside: AtomicI8::new(-1),
            budget_ns: AtomicU64::new(SPIN_MAX.as_nanos() as u64),
            probe_every: AtomicU32::new(PROBE_MIN),
            unspun: AtomicU32::new(0),
            spins: AtomicU64::new(0),
            won: AtomicU64::new(0),
        }
    }

    /// Whether a wait on `fd` may ever spin: spinning is on, this machine has another CPU,
    /// and the peer is not pinned to our one CPU. When not, a wait reads at once and keeps
    /// no time (no budget to keep).
    pub(crate) fn possible(&self, fd: RawFd) -> bool {
        if !self.enabled || max_spinners() == 0 {
            return false;
        }
        if self.beside.load(Relaxed) < 0 {
            self.beside.store(peer_beside(fd) as i8, Relaxed);
        }
        self.beside.load(Relaxed) != 0
    }

    /// The spin the wait about to start may make (None: block at once), with a spinner's
    /// slot taken.
    pub(crate) fn begin(&self, fd: RawFd) -> Option<Spinning> {
        if !self.possible(fd) {
            return None;
        }
        let mut budget = self.budget_ns.load(Relaxed);
        let mut probing = false;
        if budget == 0 {
            let unspun = self.unspun.load(Relaxed) + 1;
            if unspun >= self.probe_every.load(Relaxed) {
                self.unspun.store(0, Relaxed);
                budget = SPIN_MAX.as_nanos() as u64;
                probing = true;
            } else {
                self.unspun.store(unspun, Relaxed);
                return None;
            }
        }
        if SPINNERS.fetch_add(1, Relaxed) >= max_spinners() {
            SPINNERS.fetch_sub(1, Relaxed);
            return None; // others spin: a probe refused so is not counted
        }
        self.spins.fetch_add(1, Relaxed);
        Some(Spinning {
            budget: Duration::from_nanos(budget),
            probing,
        })
    }

    /// Ends a spin `begin` allowed: `won`, bytes came (the budget is full again); otherwise
    /// `ran_out` (no error either) makes a probe's next try wait twice as long.
    pub(crate) fn end(&self, spinning: Spinning, won: bool, ran_out: bool) {
        SPINNERS.fetch_sub(1, Relaxed);
        if won {
            self.won.fetch_add(1, Relaxed);
            self.full();
        } else if ran_out && spinning.probing {
            let every = self.probe_every.load(Relaxed);
            if every < PROBE_MAX {
                self.probe_every.store(every * 2, Relaxed);
            }
        }
    }

    /// After the blocking read that followed a wait that did not end in a won spin (it
    /// returned bytes, or the receive timeout expired): spinning would have paid if the bytes
    /// came within [`SPIN_MAX`] of `started`.
    pub(crate) fn after(&self, started: Instant) {
        if !self.enabled {
            return;
        }
        if started.elapsed() <= SPIN_MAX {
            self.full();
        } else {
            let b = self.budget_ns.load(Relaxed);
            self.budget_ns.store(b / 2, Relaxed);
        }
    }

    fn full(&self) {
        self.budget_ns.store(SPIN_MAX.as_nanos() as u64, Relaxed);
        self.probe_every.store(PROBE_MIN, Relaxed);
    }

    /// (waits that spun, those that bytes ended, the next wait's budget in nanoseconds).
    pub(crate) fn counts(&self) -> (u64, u64, u64) {
        (
            self.spins.load(Relaxed),
            self.won.load(Relaxed),
            self.budget_ns.load(Relaxed),
        )
    }
}
