//! One connection, for either role: the socket (with SCM_RIGHTS), the reader task that decodes
//! frames and applies section 6 and 9's rules, request matching, and the shared-memory pool.
//!
//! Writes happen under one async lock, from the caller's task (requests, responses) or from a
//! small writer task fed by a channel (control Events, error answers, releases from `Drop`):
//! the reader task never waits on a write, so two peers that both write can never deadlock.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::{mpsc, oneshot, Notify};

use crate::error::Error;
use crate::payload::{Payload, Release};
use crate::shm::{self, Decision, FdInfo, Lent, PeerMapping, ReceiverView, Segment};
use crate::spin::Spin;
use crate::wire::{
    self, code, Control, Descriptor, FrameDecoder, Hello, EVENT, FEATURE_SHM, FLAG_SHM, NEW_SEGMENT,
    PEER_SEGMENT, REQUEST, RESPONSE,
};

/// Settings shared by client and server connections.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Largest inline payload accepted (hello key 3).
    pub max_payload: u32,
    /// Offer shared memory (hello key 2, bit 0).
    pub shm: bool,
    /// Payloads of this many bytes or more travel through shared memory when negotiated.
    pub shm_threshold: usize,
    /// Most bytes of our segments lent to one peer at once.
    pub shm_pool_bytes: u64,
    /// Most bytes / segments of the peer's we map per connection (hello keys 6, 7).
    pub shm_receive_bytes: u64,
    pub shm_receive_segments: u32,
    /// How long a send waits for the peer's hello before a large payload (section 8).
    pub hello_wait: Duration,
    /// A peer that leaves our frames unread this long is cut (section 10, `send_timeout`).
    pub send_timeout: Duration,
    /// A frame must arrive whole within this time of its first byte (`frame_timeout`).
    pub frame_timeout: Duration,
    /// Bytes of unfinished large frames held at once (`max_pending_bytes`, section 6); a
    /// server shares one budget across its connections.
    pub max_pending_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_payload: wire::DEFAULT_MAX_PAYLOAD,
            shm: true,
            shm_threshold: 64 * 1024,
            shm_pool_bytes: 1 << 30,
            shm_receive_bytes: wire::DEFAULT_SHM_RECEIVE_BYTES,
            shm_receive_segments: wire::DEFAULT_SHM_RECEIVE_SEGMENTS,
            hello_wait: Duration::from_secs(1),
            send_timeout: Duration::from_secs(10),
            frame_timeout: Duration::from_secs(10),
            max_pending_bytes: 256 << 20,
        }
    }
}

/// Most descriptors waiting on one connection (section 10, "Passed descriptors").
const MAX_WAITING_FDS: usize = 64;
const MIN_SEGMENT: u64 = 1 << 20;

/// What the role (client or server) does with Requests and Events.
pub(crate) trait Dispatch: Send + Sync + 'static {
    /// A Request (the reader task must not block here).
    fn request(&self, conn: &Arc<Conn>, request_id: u64, payload: Payload);
    /// A plain Event.
    fn event(&self, conn: &Arc<Conn>, payload: Payload);
    /// The Error frame that answers a refused Request: it leaves in order with the replies
    /// (the default hands it to the writer, which the async server's replies also follow).
    fn answer(&self, conn: &Arc<Conn>, frame: Vec<u8>) {
        conn.queue(frame);
    }
    /// A drain (graceful shutdown) read everything the socket held: no more Requests are
    /// taken after this.
    fn drained(&self, _conn: &Arc<Conn>) {}
    /// The connection ended.
    fn closed(&self, _conn: &Arc<Conn>) {}
}

struct OwnSeg {
    seg: Arc<Segment>,
    /// Uses lent to the peer and not handed back yet.
    peer_holds: u32,
    /// Our own views of echoes (PEER_SEGMENT frames) still alive.
    local_views: u32,
    /// The peer maps it (NEW_SEGMENT sent and no HREJ since).
    introduced: bool,
}

/// Where a request's answer goes: a channel (async callers), or a slot in the table itself
/// that a blocking caller looks at (no allocation, no channel per request).
enum Pending {
    Chan(oneshot::Sender<Result<Payload, Error>>),
    Slot(Option<Result<Payload, Error>>),
}

/// The answer of a blocking request whose caller leads the connection's reading from before
/// its write until its answer ([`Conn::request_blocking`]'s fast path): [`Conn::process`]
/// puts a Response or Error for `rid` here, not in the pending table. `rid` 0 (never a
/// request id of ours) is no request.
pub(crate) struct Solo {
    rid: u64,
    answer: Option<Result<Payload, Error>>,
}

impl Solo {
    fn none() -> Solo {
        Solo { rid: 0, answer: None }
    }
}

/// Hashes a request id to itself. The ids in `pending` are ours (a counter), so there is no
/// flooding to defend against, and SipHash cost more than the rest of the lookup on the 64 B
/// round trip; an id the peer names in an answer is only looked up.
#[derive(Default, Clone, Copy)]
struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8) | b as u64;
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

type IdMap<V> = HashMap<u64, V, std::hash::BuildHasherDefault<IdHasher>>;

#[derive(Default)]
struct State {
    peer_hello: Option<Hello>,
    own: HashMap<u32, OwnSeg>,
    own_bytes: u64,
    next_segment_id: u32,
    mapped: HashMap<u32, Arc<PeerMapping>>,
    mapped_sizes: HashMap<u32, u64>,
    pending: IdMap<Pending>,
    closed: Option<String>,
}

/// How the socket is driven: by tokio (the async client and server), or by the calling
/// threads with blocking system calls (the blocking client and server).
enum Io {
    Async(AsyncFd<OwnedFd>),
    Sync(OwnedFd),
}

/// A blocking connection's reading state: whichever thread needs bytes (a caller waiting for
/// its answer, a reader thread, a server's connection thread) becomes the leader, reads and
/// processes frames on its own thread, and wakes the others (leader/follower).
struct ReadState {
    /// The decoder and the descriptors waiting, lent to the leader while it reads.
    /// Boxed so that handing it to the leader and back moves a pointer, not the structs.
    dec: Option<Box<(FrameDecoder, VecDeque<OwnedFd>)>>,
    frame_started: Option<Instant>,
    leader: bool,
    dead: bool,
    waiters: usize,
    drained: bool,
    /// The receive timeout currently set on the socket (SO_RCVTIMEO).
    rcvtimeo: Duration,
}

/// A leader's hold on the reading ([`Conn::take_lead`] to [`Conn::give_lead`]).
struct Lead {
    state: Box<(FrameDecoder, VecDeque<OwnedFd>)>,
    /// When the frame in progress began to arrive.
    started: Option<Instant>,
    /// This lead reads what the socket holds and reports the drain.
    drain: bool,
    /// The receive timeout to set before the next read.
    set_timeo: Option<Duration>,
    /// Why the connection is over, and whether to let the writer flush first.
    end: Option<(String, bool)>,
}

struct SyncRead {
    rs: Mutex<ReadState>,
    cv: Condvar,
    dispatch: Arc<dyn Dispatch>,
    drain_requested: AtomicBool,
    /// The spin before a blocking client's read of an answer (crate::spin).
    spin: Spin,
}

/// The longest a blocking read or write waits before it looks at its deadline again.
const TICK: Duration = Duration::from_millis(100);
/// How long a blocking send looks for the peer's hello once `hello_by` has passed (a read
/// of what the socket holds, section 8).
const HELLO_LOOK: Duration = Duration::from_millis(1);

pub(crate) struct Conn {
    me: Weak<Conn>,
    io: Io,
    sync: Option<SyncRead>,
    wlock: tokio::sync::Mutex<()>,
    swlock: Mutex<()>,
    pool_gen: AtomicU64,
    /// Frames handed to the writer, and frames it is done with (written or not), so that a
    /// blocking server writes a reply only after what was queued before it.
    ctl_queued: AtomicU64,
    ctl_done: AtomicU64,
    st: Mutex<State>,
    pub(crate) limits: Limits,
    /// Until when a send may wait for the peer's hello (`limits.hello_wait` after the
    /// connection began); past it the peer is taken to send none (section 8).
    hello_by: Instant,
    hello_arrived: Notify,
    pool_freed: Notify,
    closed_flag: AtomicBool,
    closed_notify: Notify,
    ctl_tx: mpsc::UnboundedSender<Vec<u8>>,
    next_request_id: AtomicU64,
    /// The peer's inline limit: its hello's, the default until the hello came.
    peer_limit: AtomicU32,
    pub(crate) shm_sent: AtomicU64,
    pub(crate) shm_received: AtomicU64,
    is_server: bool,
    budget: Arc<wire::PendingBudget>,
    drain: Notify,
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we own.
    unsafe {
        let fl = libc::fcntl(fd, libc::F_GETFL);
        if fl < 0 || libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The peer's uid (SO_PEERCRED).
pub(crate) fn peer_uid(fd: RawFd) -> io::Result<u32> {
    // SAFETY: getsockopt into a zeroed ucred of the right size.
    unsafe {
        let mut cred: libc::ucred = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
        if libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            &mut cred as *mut _ as *mut libc::c_void,
            &mut len,
        ) != 0
        {
            return Err(io::Error::last_os_error());
        }
        Ok(cred.uid)
    }
}

pub(crate) fn my_uid() -> u32 {
    // SAFETY: always succeeds.
    unsafe { libc::getuid() }
}

impl Conn {
    /// Wraps a connected Unix stream socket, sends our hello and starts the reader and writer
    /// tasks.
    pub(crate) fn start(
        fd: OwnedFd,
        limits: Limits,
        dispatch: Arc<dyn Dispatch>,
        is_server: bool,
        budget: Option<Arc<wire::PendingBudget>>,
    ) -> io::Result<Arc<Conn>> {
        let budget = budget.unwrap_or_else(|| wire::PendingBudget::new(limits.max_pending_bytes));
        set_nonblocking(fd.as_raw_fd())?;
        // SAFETY: the AsyncFd owns the descriptor, so it stays open while registered.
        let io = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE | Interest::WRITABLE)? };
        let (conn, ctl_rx) = Conn::new(Io::Async(io), None, limits, is_server, budget);
        // The hello goes first: the writer task writes it before anything else can.
        conn.queue(wire::encode_frame(EVENT, 0, 0, &conn.our_hello().encode()));
        tokio::spawn(Conn::writer(Arc::downgrade(&conn), ctl_rx));
        tokio::spawn(Conn::reader(conn.clone(), dispatch));
        Ok(conn)
    }

    /// Wraps a connected Unix stream socket for blocking use: no runtime, no reader task. The
    /// hello is written before this returns; frames are read by whichever thread waits
    /// (see [`Conn::wait_sync`]); control frames queued by the protocol logic (releases,
    /// refusals) are written by a small writer thread, so a reader never waits on a write.
    pub(crate) fn start_blocking(
        fd: OwnedFd,
        limits: Limits,
        dispatch: Arc<dyn Dispatch>,
        is_server: bool,
        budget: Option<Arc<wire::PendingBudget>>,
        spin: bool,
    ) -> io::Result<Arc<Conn>> {
        let budget = budget.unwrap_or_else(|| wire::PendingBudget::new(limits.max_pending_bytes));
        set_blocking(fd.as_raw_fd())?;
        set_timeo(fd.as_raw_fd(), libc::SO_RCVTIMEO, TICK)?;
        set_timeo(fd.as_raw_fd(), libc::SO_SNDTIMEO, TICK)?;
        let dec = FrameDecoder::new(limits.max_payload).with_budget(budget.clone());
        let sync = SyncRead {
            rs: Mutex::new(ReadState {
                dec: Some(Box::new((dec, VecDeque::new()))),
                frame_started: None,
                leader: false,
                dead: false,
                waiters: 0,
                drained: false,
                rcvtimeo: TICK,
            }),
            cv: Condvar::new(),
            dispatch,
            drain_requested: AtomicBool::new(false),
            spin: Spin::new(spin),
        };
        let (conn, mut ctl_rx) = Conn::new(Io::Sync(fd), Some(sync), limits, is_server, budget);
        let hello = wire::encode_frame(EVENT, 0, 0, &conn.our_hello().encode());
        conn.write_all_blocking(&[&hello], None, Instant::now() + conn.limits.send_timeout)
            .map_err(|e| io::Error::other(e.to_string()))?;
        let weak = Arc::downgrade(&conn);
        std::thread::Builder::new()
            .name("hintens-writer".into())
            .spawn(move || {
                while let Some(frame) = ctl_rx.blocking_recv() {
                    let Some(c) = weak.upgrade() else { return };
                    if frame.is_empty() {
                        c.ctl_done.fetch_add(1, Ordering::AcqRel);
                        c.shutdown();
                        return;
                    }
                    let deadline = Instant::now() + c.limits.send_timeout;
                    let res = c.write_all_blocking(&[&frame], None, deadline);
                    c.ctl_done.fetch_add(1, Ordering::AcqRel);
                    if let Err(e) = res {
                        if matches!(e, Error::Timeout(_)) {
                            c.cut("the peer left our frames unread past send_timeout");
                        }
                        // Nothing more can be written: count the rest as done.
                        c.ctl_done.store(u64::MAX / 2, Ordering::Release);
                        return;
                    }
                }
            })?;
        Ok(conn)
    }

    fn our_hello(&self) -> Hello {
        Hello {
            features: if self.limits.shm { FEATURE_SHM } else { 0 },
            max_payload: self.limits.max_payload,
            shm_receive_bytes: self.limits.shm_receive_bytes,
            shm_receive_segments: self.limits.shm_receive_segments,
            ..Default::default()
        }
    }

    fn new(
        io: Io,
        sync: Option<SyncRead>,
        limits: Limits,
        is_server: bool,
        budget: Arc<wire::PendingBudget>,
    ) -> (Arc<Conn>, mpsc::UnboundedReceiver<Vec<u8>>) {
        let (ctl_tx, ctl_rx) = mpsc::unbounded_channel();
        let conn = Arc::new_cyclic(|me| Conn {
            me: me.clone(),
            io,
            sync,
            wlock: tokio::sync::Mutex::new(()),
            swlock: Mutex::new(()),
            pool_gen: AtomicU64::new(0),
            ctl_queued: AtomicU64::new(0),
            ctl_done: AtomicU64::new(0),
            st: Mutex::new(State {
                next_segment_id: 1,
                ..Default::default()
            }),
            hello_by: Instant::now() + limits.hello_wait,
            limits,
            hello_arrived: Notify::new(),
            pool_freed: Notify::new(),
            closed_flag: AtomicBool::new(false),
            closed_notify: Notify::new(),
            ctl_tx,
            next_request_id: AtomicU64::new(1),
            peer_limit: AtomicU32::new(wire::DEFAULT_MAX_PAYLOAD),
            shm_sent: AtomicU64::new(0),
            shm_received: AtomicU64::new(0),
            is_server,
            budget,
            drain: Notify::new(),
        });
        (conn, ctl_rx)
    }

    pub(crate) fn raw_fd(&self) -> RawFd {
        match &self.io {
            Io::Async(a) => a.get_ref().as_raw_fd(),
            Io::Sync(fd) => fd.as_raw_fd(),
        }
    }

    pub(crate) fn is_blocking(&self) -> bool {
        self.sync.is_some()
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed_flag.load(Ordering::Acquire)
    }

    /// Waits until the connection has ended.
    pub(crate) async fn wait_closed(&self) {
        loop {
            let n = self.closed_notify.notified();
            if self.is_closed() {
                return;
            }
            n.await;
        }
    }

    /// Queues a whole frame for the writer task.
    pub(crate) fn queue(&self, frame: Vec<u8>) {
        self.ctl_queued.fetch_add(1, Ordering::AcqRel);
        if self.ctl_tx.send(frame).is_err() {
            self.ctl_done.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Blocking connections: waits until the writer thread is done with every frame queued so
    /// far (hand-backs and refusals queued while reading leave before the reply that follows
    /// them). Costs one atomic load when nothing is queued.
    pub(crate) fn wait_queue_flushed(&self, deadline: Instant) {
        let target = self.ctl_queued.load(Ordering::Acquire);
        let mut spins = 0u32;
        while self.ctl_done.load(Ordering::Acquire) < target && !self.is_closed() && Instant::now() < deadline
        {
            spins += 1;
            if spins < 100 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
    }

    async fn writer(conn: Weak<Conn>, mut rx: mpsc::UnboundedReceiver<Vec<u8>>) {
        while let Some(frame) = rx.recv().await {
            let Some(c) = conn.upgrade() else { return };
            if frame.is_empty() {
                // The reader ended the connection after queueing a last frame (a fatal error's
                // Error): it has been written, close now.
                c.shutdown();
                return;
            }
            let deadline = Instant::now() + c.limits.send_timeout;
            if let Err(e) = c.write_all(&[&frame], None, deadline).await {
                if matches!(e, Error::Timeout(_)) {
                    c.cut("the peer left our frames unread past send_timeout");
                }
                return;
            }
        }
    }

    /// Graceful shutdown: the reader reads what the socket holds now, hands those Requests on,
    /// then takes no more (they get UNAVAILABLE) while it keeps processing releases.
    pub(crate) fn start_drain(&self) {
        if let Some(sr) = &self.sync {
            sr.drain_requested.store(true, Ordering::Release);
            self.wake_sync();
            // A blocking server's connection thread may wait in recvmsg with no timeout
            // (`wait_sync_idle_at`): end our receiving side, which wakes it. What the client
            // sent before is still read (and answered); its later writes fail (EPIPE), as the
            // Go server's CloseRead does.
            // SAFETY: shutdown on our socket.
            unsafe {
                libc::shutdown(self.raw_fd(), libc::SHUT_RD);
            }
        }
        self.drain.notify_one();
    }

    /// Closes once the writer task wrote what was queued before.
    pub(crate) fn close_after_queued(&self) {
        if self.ctl_tx.send(Vec::new()).is_err() {
            self.shutdown();
        }
    }

    /// Shuts the socket down: the reader task sees the end and cleans up.
    pub(crate) fn shutdown(&self) {
        // SAFETY: shutdown on our socket.
        unsafe {
            libc::shutdown(self.raw_fd(), libc::SHUT_RDWR);
        }
    }

    fn closed_error(&self) -> Error {
        let st = self.st.lock().unwrap();
        Error::Closed(st.closed.clone().unwrap_or_else(|| "closed".into()))
    }

    // -- writing ------------------------------------------------------------------------------

    /// Writes `bufs` in order, all of them, under the write lock, by `deadline`; `fd` goes
    /// with the first byte (SCM_RIGHTS). Past the deadline with part of the bytes written, the
    /// stream has a torn frame: the connection is cut.
    pub(crate) async fn write_all(
        &self,
        bufs: &[&[u8]],
        fd: Option<RawFd>,
        deadline: Instant,
    ) -> Result<(), Error> {
        let aio = match &self.io {
            Io::Async(a) => a,
            Io::Sync(_) => return self.write_all_blocking(bufs, fd, deadline),
        };
        let timeout = deadline.saturating_duration_since(Instant::now());
        let Ok(_w) = tokio::time::timeout_at(deadline.into(), self.wlock.lock()).await else {
            return Err(Error::Timeout(timeout));
        };
        let mut idx = 0usize;
        let mut off = 0usize;
        let mut fd = fd;
        while idx < bufs.len() {
            let mut guard = match tokio::time::timeout_at(deadline.into(), aio.writable()).await {
                Ok(g) => g?,
                Err(_) => {
                    if idx > 0 || off > 0 {
                        self.cut("a write timed out in the middle of a frame");
                    }
                    return Err(Error::Timeout(timeout));
                }
            };
            let res = guard.try_io(|inner| sendmsg(inner.as_raw_fd(), &bufs[idx..], off, fd, 0));
            match res {
                Ok(Ok(n)) => {
                    fd = None;
                    advance(bufs, &mut idx, &mut off, n);
                }
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok(Err(e)) => return Err(Error::Closed(format!("write failed: {e}"))),
                Err(_would_block) => continue,
            }
        }
        Ok(())
    }

    /// As [`Conn::write_all`], on the calling thread with blocking `sendmsg` (the socket's
    /// SO_SNDTIMEO wakes it every [`TICK`] to look at the deadline).
    pub(crate) fn write_all_blocking(
        &self,
        bufs: &[&[u8]],
        fd: Option<RawFd>,
        deadline: Instant,
    ) -> Result<(), Error> {
        let timeout = deadline.saturating_duration_since(Instant::now());
        self.write_all_blocking_t(bufs, fd, deadline, timeout)
    }

    /// As [`Conn::write_all_blocking`], for a caller that knows the timeout the deadline came
    /// from (no clock read unless the socket is full).
    fn write_all_blocking_t(
        &self,
        bufs: &[&[u8]],
        fd: Option<RawFd>,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<(), Error> {
        let w = self.swlock.lock().unwrap();
        self.write_rest(w, bufs, 0, 0, fd, deadline, timeout)
    }

    /// The rest of a frame, from `bufs[idx][off..]` on, under the write lock `_w` (taken by
    /// the caller: no other frame's bytes come between this one's).
    #[allow(clippy::too_many_arguments)]
    fn write_rest(
        &self,
        _w: MutexGuard<'_, ()>,
        bufs: &[&[u8]],
        mut idx: usize,
        mut off: usize,
        mut fd: Option<RawFd>,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<(), Error> {
        let torn_at_start = idx > 0 || off > 0;
        while idx < bufs.len() {
            match sendmsg(self.raw_fd(), &bufs[idx..], off, fd, 0) {
                Ok(n) => {
                    fd = None;
                    advance(bufs, &mut idx, &mut off, n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        if torn_at_start || idx > 0 || off > 0 {
                            self.cut("a write timed out in the middle of a frame");
                        }
                        return Err(Error::Timeout(timeout));
                    }
                }
                Err(e) => return Err(Error::Closed(format!("write failed: {e}"))),
            }
        }
        Ok(())
    }

    /// Cuts the connection (the reader task sees the end and cleans up).
    pub(crate) fn cut(&self, why: &str) {
        {
            let mut st = self.st.lock().unwrap();
            if st.closed.is_none() {
                st.closed = Some(why.to_string());
            }
        }
        self.shutdown();
    }

    pub(crate) async fn write_frame(
        &self,
        mtype: u8,
        flags: u16,
        rid: u64,
        payload: &[u8],
        deadline: Instant,
    ) -> Result<(), Error> {
        let h = wire::header_for(mtype, flags, rid, payload);
        self.write_all(&[&h, payload], None, deadline).await
    }

    /// Registers a new request and returns its id and the receiver of its answer.
    pub(crate) fn register(&self) -> Result<(u64, oneshot::Receiver<Result<Payload, Error>>), Error> {
        let rid = self.next_request_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        let mut st = self.st.lock().unwrap();
        if let Some(why) = &st.closed {
            return Err(Error::Closed(why.clone()));
        }
        st.pending.insert(rid, Pending::Chan(tx));
        Ok((rid, rx))
    }

    /// Registers a request id chosen by the caller (test-only raw requests).
    pub(crate) fn register_id(&self, rid: u64) -> Result<oneshot::Receiver<Result<Payload, Error>>, Error> {
        let (tx, rx) = oneshot::channel();
        let mut st = self.st.lock().unwrap();
        if let Some(why) = &st.closed {
            return Err(Error::Closed(why.clone()));
        }
        st.pending.insert(rid, Pending::Chan(tx));
        Ok(rx)
    }

    /// Registers a request whose answer a blocking caller takes from its slot
    /// ([`Conn::take_answer`]).
    fn register_slot(&self, rid: u64) -> Result<u64, Error> {
        let mut st = self.st.lock().unwrap();
        if let Some(why) = &st.closed {
            return Err(Error::Closed(why.clone()));
        }
        st.pending.insert(rid, Pending::Slot(None));
        Ok(rid)
    }

    /// The answer in request `rid`'s slot, if it has come (its entry is then removed), or the
    /// connection's end if the entry is gone (`finish` took it).
    fn take_answer(&self, rid: u64) -> Option<Result<Payload, Error>> {
        let mut st = self.st.lock().unwrap();
        match st.pending.get_mut(&rid) {
            Some(Pending::Slot(s)) => {
                let r = s.take()?;
                st.pending.remove(&rid);
                Some(r)
            }
            Some(Pending::Chan(_)) => None,
            None => Some(Err(Error::Closed(
                st.closed.clone().unwrap_or_else(|| "closed".into()),
            ))),
        }
    }

    /// Hands an answer to request `rid`'s waiter (an answer to an id not pending is dropped).
    fn deliver(&self, rid: u64, res: Result<Payload, Error>) {
        let mut st = self.st.lock().unwrap();
        match st.pending.get_mut(&rid) {
            // A second answer to the same id is dropped (the first one stands).
            Some(Pending::Slot(s)) if s.is_none() => *s = Some(res),
            Some(Pending::Slot(_)) => {}
            Some(Pending::Chan(_)) => {
                if let Some(Pending::Chan(tx)) = st.pending.remove(&rid) {
                    drop(st);
                    let _ = tx.send(res);
                }
            }
            None => {}
        }
    }

    pub(crate) fn unregister(&self, rid: u64) {
        self.st.lock().unwrap().pending.remove(&rid);
    }

    /// A request: sends `payload`, waits for its answer until `deadline`.
    pub(crate) async fn request(&self, payload: &[u8], timeout: Duration) -> Result<Payload, Error> {
        let deadline = Instant::now() + timeout;
        let (rid, rx) = self.register()?;
        let res = async {
            self.send(REQUEST, rid, Body::Bytes(payload), deadline)
                .await
                .map_err(|e| {
                    if let Error::Timeout(_) = e {
                        Error::Timeout(timeout)
                    } else {
                        e
                    }
                })?;
            match tokio::time::timeout_at(deadline.into(), rx).await {
                Ok(Ok(r)) => r,
                Ok(Err(_)) => Err(self.closed_error()),
                Err(_) => Err(Error::Timeout(timeout)),
            }
        }
        .await;
        if res.is_err() {
            self.unregister(rid);
        }
        res
    }

    /// Waits for an answer to a request whose frame was written by other means.
    pub(crate) async fn wait_answer(
        &self,
        rid: u64,
        rx: oneshot::Receiver<Result<Payload, Error>>,
        timeout: Duration,
    ) -> Result<Payload, Error> {
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(self.closed_error()),
            Err(_) => {
                self.unregister(rid);
                Err(Error::Timeout(timeout))
            }
        }
    }

    async fn peer_hello(&self, deadline: Instant) -> Option<Hello> {
        let until = deadline.min(self.hello_by);
        loop {
            let n = self.hello_arrived.notified();
            if let Some(h) = self.st.lock().unwrap().peer_hello.clone() {
                return Some(h);
            }
            if self.is_closed() || tokio::time::timeout_at(until.into(), n).await.is_err() {
                return self.st.lock().unwrap().peer_hello.clone();
            }
        }
    }

    /// Whether `body` goes inline whatever the peer's hello says (`plan` would say
    /// `Inline`): under the shared-memory threshold and the peer's limit, and no view of a
    /// segment (which may go back as an echo). Needs no lock.
    fn plainly_inline(&self, body: &Body<'_>) -> bool {
        let len = body.len();
        len < self.limits.shm_threshold
            && len as u64 <= u64::from(self.peer_limit.load(Ordering::Acquire))
            && !matches!(body, Body::Echo(p) if p.is_shared())
    }

    /// What a send of `body` becomes, given the peer's hello (sections 8b, 9): the protocol
    /// decision shared by the async and the blocking paths.
    fn plan(&self, body: &Body<'_>, hello: Option<Hello>) -> Result<Plan, Error> {
        let len = body.len();
        let peer_limit = hello
            .as_ref()
            .map_or(wire::DEFAULT_MAX_PAYLOAD, |h| h.max_payload);
        let negotiated = self.limits.shm && hello.as_ref().is_some_and(|h| h.features & FEATURE_SHM != 0);
        if let Body::Echo(p) = body {
            if let Some((id, size, offset, length)) = p.peer_segment_on(self) {
                if negotiated {
                    let d = Descriptor {
                        segment_id: id,
                        flags: PEER_SEGMENT,
                        size,
                        offset,
                        length,
                    };
                    return Ok(Plan::PeerEcho(d.encode()));
                }
            }
        }
        if negotiated && (len >= self.limits.shm_threshold || len as u64 > peer_limit as u64) {
            return Ok(Plan::Shm(hello.expect("negotiated implies a hello")));
        }
        if len as u64 > peer_limit as u64 {
            return Err(Error::TooLarge {
                len,
                limit: peer_limit as u64,
            });
        }
        Ok(Plan::Inline)
    }

    /// Sends a Request, Response or Event: inline, or through shared memory when negotiated
    /// and the payload is large or over the peer's limit (sections 8b, 9).
    pub(crate) async fn send(
        &self,
        mtype: u8,
        rid: u64,
        body: Body<'_>,
        deadline: Instant,
    ) -> Result<(), Error> {
        if self.is_blocking() {
            return self.send_blocking(mtype, rid, body, deadline);
        }
        let hello = if body.len() >= self.limits.shm_threshold {
            self.peer_hello(deadline).await
        } else {
            self.st.lock().unwrap().peer_hello.clone()
        };
        match self.plan(&body, hello)? {
            Plan::PeerEcho(d) => {
                self.write_frame(mtype, FLAG_SHM, rid, &d, deadline).await?;
                self.shm_sent.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Plan::Shm(hello) => self.send_shm(mtype, rid, body.bytes(), &hello, deadline).await,
            Plan::Inline => self.write_frame(mtype, 0, rid, body.bytes(), deadline).await,
        }
    }

    /// As [`Conn::send`], on the calling thread (a blocking connection).
    pub(crate) fn send_blocking(
        &self,
        mtype: u8,
        rid: u64,
        body: Body<'_>,
        deadline: Instant,
    ) -> Result<(), Error> {
        let timeout = deadline.saturating_duration_since(Instant::now());
        self.send_blocking_t(mtype, rid, body, deadline, timeout)
    }

    /// As [`Conn::send_blocking`]; `timeout` is what a timeout error reports.
    pub(crate) fn send_blocking_t(
        &self,
        mtype: u8,
        rid: u64,
        body: Body<'_>,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<(), Error> {
        // Hand-backs and refusals queued before this frame leave before it, as they do on an
        // async connection.
        self.wait_queue_flushed(deadline);
        if self.plainly_inline(&body) {
            let p = body.bytes();
            let h = wire::header_for(mtype, 0, rid, p);
            return self.write_all_blocking_t(&[&h, p], None, deadline, timeout);
        }
        let hello = if body.len() >= self.limits.shm_threshold {
            self.peer_hello_blocking(deadline)
        } else {
            self.st.lock().unwrap().peer_hello.clone()
        };
        let frame = |flags: u16, p: &[u8]| {
            let h = wire::header_for(mtype, flags, rid, p);
            self.write_all_blocking_t(&[&h, p], None, deadline, timeout)
        };
        match self.plan(&body, hello)? {
            Plan::PeerEcho(d) => {
                frame(FLAG_SHM, &d)?;
                self.shm_sent.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Plan::Shm(hello) => {
                let data = body.bytes();
                let (size, cap_bytes, cap_segs) = self.shm_size(data.len() as u64, &hello)?;
                let (seg, new) = loop {
                    let gen = self.pool_gen.load(Ordering::Acquire);
                    let (found, retire) = self.take_segment(data.len() as u64, size, cap_bytes, cap_segs)?;
                    for chunk in retire.chunks(wire::MAX_CONTROL_IDS) {
                        frame(0, &wire::encode_control(Control::Retire, chunk))?;
                    }
                    if let Some(f) = found {
                        break f;
                    }
                    // Wait for a release (read by whichever thread leads).
                    let changed = self.wait_sync(deadline, || self.pool_gen.load(Ordering::Acquire) != gen);
                    if !changed {
                        if let Some(why) = &self.st.lock().unwrap().closed {
                            return Err(Error::Closed(why.clone()));
                        }
                        return Err(Error::Timeout(Duration::ZERO));
                    }
                };
                let (h, dp) = self.shm_frame(mtype, rid, &seg, new, data);
                let res = self.write_all_blocking_t(
                    &[&h, &dp],
                    if new { Some(seg.raw_fd()) } else { None },
                    deadline,
                    timeout,
                );
                if res.is_ok() {
                    self.shm_written(&seg, new);
                }
                res
            }
            Plan::Inline => frame(0, body.bytes()),
        }
    }

    /// The segment size for a shared payload of `len` bytes, and the caps of the pool lent to
    /// this peer.
    fn shm_size(&self, len: u64, hello: &Hello) -> Result<(u64, u64, usize), Error> {
        let cap_bytes = self.limits.shm_pool_bytes.min(hello.shm_receive_bytes);
        let cap_segs = hello.shm_receive_segments as usize;
        if len > cap_bytes || cap_segs == 0 {
            return Err(Error::TooLarge {
                len: len as usize,
                limit: cap_bytes,
            });
        }
        let p = len.max(MIN_SEGMENT).next_power_of_two();
        Ok((if p <= cap_bytes { p } else { len.max(1) }, cap_bytes, cap_segs))
    }

    /// Takes a free segment of ours (or creates one, retiring free ones until it fits): the
    /// segment and whether the peer has yet to map it, or `None` when all are lent; and the
    /// ids to retire (HRET) before anything else is sent.
    #[allow(clippy::type_complexity)]
    fn take_segment(
        &self,
        len: u64,
        size: u64,
        cap_bytes: u64,
        cap_segs: usize,
    ) -> Result<(Option<(Arc<Segment>, bool)>, Vec<u32>), Error> {
        let mut retire = Vec::new();
        let mut st = self.st.lock().unwrap();
        if let Some(why) = &st.closed {
            return Err(Error::Closed(why.clone()));
        }
        let free = st
            .own
            .values()
            .filter(|s| s.peer_holds == 0 && s.local_views == 0 && s.seg.size >= len)
            .min_by_key(|s| s.seg.size)
            .map(|s| s.seg.id);
        if let Some(id) = free {
            let s = st.own.get_mut(&id).unwrap();
            s.peer_holds = 1;
            return Ok((Some((s.seg.clone(), !s.introduced)), retire));
        }
        // Retire free segments until the new one fits (HRET before it).
        let fits = |st: &State| st.own_bytes + size <= cap_bytes && st.own.len() < cap_segs;
        if !fits(&st) {
            let mut frees: Vec<(u32, u64)> = st
                .own
                .values()
                .filter(|s| s.peer_holds == 0 && s.local_views == 0)
                .map(|s| (s.seg.id, s.seg.size))
                .collect();
            frees.sort_by_key(|f| f.1);
            while !fits(&st) {
                let Some((id, sz)) = frees.pop() else { break };
                st.own.remove(&id);
                st.own_bytes -= sz;
                retire.push(id);
            }
        }
        if !fits(&st) {
            return Ok((None, retire));
        }
        let id = st.next_segment_id;
        st.next_segment_id = st.next_segment_id.checked_add(1).unwrap_or(1);
        let seg = Arc::new(Segment::create(id, size)?);
        st.own_bytes += size;
        st.own.insert(
            id,
            OwnSeg {
                seg: seg.clone(),
                peer_holds: 1,
                local_views: 0,
                introduced: false,
            },
        );
        Ok((Some((seg, true)), retire))
    }

    /// Copies `data` into `seg` (just taken, so not lent) and builds the frame naming it.
    fn shm_frame(
        &self,
        mtype: u8,
        rid: u64,
        seg: &Segment,
        new: bool,
        data: &[u8],
    ) -> ([u8; wire::HEADER_LEN], [u8; 32]) {
        // SAFETY: the segment is ours and not lent (we just took it with peer_holds 0 -> 1).
        unsafe { seg.write(data) };
        let d = Descriptor {
            segment_id: seg.id,
            flags: if new { NEW_SEGMENT } else { 0 },
            size: seg.size,
            offset: 0,
            length: data.len() as u64,
        };
        let dp = d.encode();
        (wire::header_for(mtype, FLAG_SHM, rid, &dp), dp)
    }

    fn shm_written(&self, seg: &Segment, new: bool) {
        if new {
            if let Some(s) = self.st.lock().unwrap().own.get_mut(&seg.id) {
                s.introduced = true;
            }
        }
        self.shm_sent.fetch_add(1, Ordering::Relaxed);
    }

    async fn send_shm(
        &self,
        mtype: u8,
        rid: u64,
        data: &[u8],
        hello: &Hello,
        deadline: Instant,
    ) -> Result<(), Error> {
        let len = data.len() as u64;
        let (size, cap_bytes, cap_segs) = self.shm_size(len, hello)?;
        let (seg, new) = loop {
            let notified = self.pool_freed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let (found, retire) = self.take_segment(len, size, cap_bytes, cap_segs)?;
            for chunk in retire.chunks(wire::MAX_CONTROL_IDS) {
                let p = wire::encode_control(Control::Retire, chunk);
                self.write_frame(EVENT, 0, 0, &p, deadline).await?;
            }
            if let Some(f) = found {
                break f;
            }
            if tokio::time::timeout_at(deadline.into(), notified).await.is_err() {
                return Err(Error::Timeout(Duration::ZERO));
            }
        };
        let (h, dp) = self.shm_frame(mtype, rid, &seg, new, data);
        let res = self
            .write_all(&[&h, &dp], if new { Some(seg.raw_fd()) } else { None }, deadline)
            .await;
        if res.is_ok() {
            self.shm_written(&seg, new);
        }
        res
    }

    // -- releasing (called from Payload's Drop) ------------------------------------------------

    pub(crate) fn release_peer(&self, id: u32) {
        if !self.is_closed() {
            self.queue(wire::encode_frame(
                EVENT,
                0,
                0,
                &wire::encode_control(Control::Release, &[id]),
            ));
        }
    }

    pub(crate) fn release_own_view(&self, id: u32) {
        if let Some(s) = self.st.lock().unwrap().own.get_mut(&id) {
            s.local_views = s.local_views.saturating_sub(1);
        }
        self.pool_gen.fetch_add(1, Ordering::Release);
        self.pool_freed.notify_waiters();
        self.wake_sync();
    }

    // -- reading ------------------------------------------------------------------------------

    async fn reader(conn: Arc<Conn>, dispatch: Arc<dyn Dispatch>) {
        let budget = conn.budget.clone();
        let mut dec = FrameDecoder::new(conn.limits.max_payload).with_budget(budget);
        let mut frame_started: Option<tokio::time::Instant> = None;
        let mut fds: VecDeque<OwnedFd> = VecDeque::new();
        let mut linger = false;
        let mut draining = false;
        let Io::Async(aio) = &conn.io else {
            unreachable!("the reader task drives async connections only")
        };
        let why = loop {
            let frame_deadline = frame_started.map(|t0| t0 + conn.limits.frame_timeout);
            let readable = tokio::select! {
                r = aio.readable() => r,
                // A frame must arrive whole within frame_timeout of its first byte.
                _ = sleep_until(frame_deadline) => {
                    break "a frame did not arrive whole within frame_timeout".to_string();
                }
                _ = conn.drain.notified(), if !draining => {
                    draining = true;
                    if let Err(why) = conn.drain_now(&mut dec, &mut fds, &dispatch) {
                        break why;
                    }
                    dispatch.drained(&conn);
                    continue;
                }
            };
            let mut guard = match readable {
                Ok(g) => g,
                Err(e) => break format!("poll failed: {e}"),
            };
            let (ptr, room) = dec.spare();
            match recvmsg(conn.raw_fd(), ptr, room, &mut fds, 0) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    guard.clear_ready();
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => break format!("read failed: {e}"),
                Ok(0) => break "the peer closed the connection".to_string(),
                Ok(n) => {
                    // A short read drained the socket (as tokio's own streams assume): wait
                    // for the next edge instead of paying a recvmsg that says EAGAIN.
                    if n < room {
                        guard.clear_ready();
                    }
                    // SAFETY: recvmsg wrote n <= room bytes there.
                    unsafe { dec.commit(n) };
                }
            }
            if let Err((why, last_frame)) = conn.process(&mut dec, &mut fds, &dispatch, &mut Solo::none()) {
                linger = last_frame;
                break why;
            }
            if dec.in_frame() {
                frame_started.get_or_insert_with(tokio::time::Instant::now);
            } else {
                frame_started = None;
                fds.clear();
            }
        };
        conn.finish(why, linger);
        dispatch.closed(&conn);
    }

    // -- blocking connections: leader/follower reading ----------------------------------------

    /// Wakes the threads waiting on a blocking connection (an answer, a release, the end).
    pub(crate) fn wake_sync(&self) {
        if let Some(sr) = &self.sync {
            let rs = sr.rs.lock().unwrap();
            if rs.waiters > 0 {
                sr.cv.notify_all();
            }
        }
    }

    /// Blocking connections: waits until `done()` (checked with the reading state locked, so
    /// a wake-up cannot be missed) or `deadline`. While no other thread reads, this one leads:
    /// it reads the socket and processes frames itself, so an answer is read on the thread
    /// that waits for it. Returns `done()`'s last value.
    pub(crate) fn wait_sync(&self, deadline: Instant, done: impl FnMut() -> bool) -> bool {
        self.wait_sync_at(deadline, None, done)
    }

    /// As [`Conn::wait_sync`]; `now`, when given, is a clock reading the caller just made,
    /// used instead of reading the clock again on the first round.
    pub(crate) fn wait_sync_at(
        &self,
        deadline: Instant,
        now_hint: Option<Instant>,
        done: impl FnMut() -> bool,
    ) -> bool {
        self.wait_sync_with(deadline, now_hint, false, false, done)
    }

    /// As [`Conn::wait_sync_at`], for a blocking server's connection thread: while no frame
    /// is in progress and no drain was asked for, its read waits with no timeout (a
    /// `SO_RCVTIMEO` sleep arms and cancels a kernel timer each time, measurably slower on
    /// the 64 B round trip than an untimed one). `deadline` then bounds only followers; the
    /// read returns when bytes arrive or the socket is shut down: `start_drain` and `cut`
    /// both do that, and a frame in progress is read with a timeout again.
    pub(crate) fn wait_sync_idle_at(
        &self,
        deadline: Instant,
        now_hint: Option<Instant>,
        done: impl FnMut() -> bool,
    ) -> bool {
        self.wait_sync_with(deadline, now_hint, true, false, done)
    }

    fn wait_sync_with(
        &self,
        deadline: Instant,
        mut now_hint: Option<Instant>,
        untimed_idle: bool,
        spin: bool,
        mut done: impl FnMut() -> bool,
    ) -> bool {
        let sr = self.sync.as_ref().expect("a blocking connection");
        let mut rs = sr.rs.lock().unwrap();
        loop {
            if done() {
                return true;
            }
            if rs.dead {
                return false;
            }
            let now = now_hint.take().unwrap_or_else(Instant::now);
            if now >= deadline {
                return false;
            }
            if !rs.leader {
                let lead = Self::take_lead(sr, &mut rs, deadline, now, untimed_idle);
                drop(rs);
                let this = self.me.upgrade().expect("a caller holds the connection");
                let lead = this.lead_once(lead, spin, &mut Solo::none());
                rs = this.give_lead(sr, lead);
                continue;
            }
            rs.waiters += 1;
            rs = sr.cv.wait_timeout(rs, deadline - now).unwrap().0;
            rs.waiters -= 1;
        }
    }

    /// Makes the calling thread the leader (no one leads: the caller checked, with `rs`
    /// locked): it takes the decoder and the reading state.
    fn take_lead(
        sr: &SyncRead,
        rs: &mut ReadState,
        deadline: Instant,
        now: Instant,
        untimed_idle: bool,
    ) -> Lead {
        rs.leader = true;
        let state = rs.dec.take().expect("the decoder is home when no one leads");
        let started = rs.frame_started;
        let drain = sr.drain_requested.load(Ordering::Acquire) && !rs.drained;
        let untimed = untimed_idle && started.is_none() && !drain;
        Lead {
            state,
            started,
            drain,
            set_timeo: Self::timeo_for(rs, deadline, now, untimed),
            end: None,
        }
    }

    /// The receive timeout the leader's next read needs, when the socket's differs (it is then
    /// recorded as set). Whole milliseconds, so that a caller that waits "up to TICK" again
    /// and again does not change the socket's timeout (a system call) on every read. Zero: no
    /// timeout.
    fn timeo_for(rs: &mut ReadState, deadline: Instant, now: Instant, untimed: bool) -> Option<Duration> {
        let want = if untimed {
            Duration::ZERO
        } else {
            let left = deadline.saturating_duration_since(now);
            if left >= TICK {
                TICK
            } else {
                // Never zero, which would mean no timeout at all.
                ceil_ms(left).max(Duration::from_millis(1))
            }
        };
        if want == rs.rcvtimeo {
            return None;
        }
        rs.rcvtimeo = want;
        Some(want)
    }

    /// Ends a lead: ends the connection if the lead's read did, hands the decoder back, and
    /// wakes the threads waiting. Returns the reading state, locked.
    fn give_lead<'a>(self: &Arc<Self>, sr: &'a SyncRead, lead: Lead) -> MutexGuard<'a, ReadState> {
        let ended = lead.end.is_some();
        if let Some((why, linger)) = lead.end {
            self.finish(why, linger);
            sr.dispatch.closed(self);
        }
        let mut rs = sr.rs.lock().unwrap();
        if lead.set_timeo.is_some() {
            // Recorded by take_lead, never set (the lead ended before reading): the socket's
            // timeout is unknown, so the next leader sets its own.
            rs.rcvtimeo = Duration::MAX;
        }
        rs.dec = Some(lead.state);
        rs.frame_started = lead.started;
        rs.leader = false;
        if lead.drain {
            rs.drained = true;
        }
        if ended {
            rs.dead = true;
        }
        if rs.waiters > 0 {
            sr.cv.notify_all();
        }
        rs
    }

    /// One read by the leader of a blocking connection, and the frames it completes (an answer
    /// `solo` waits for goes there). Sets `lead.end` when the connection is over.
    fn lead_once(self: &Arc<Self>, mut lead: Lead, spin: bool, solo: &mut Solo) -> Lead {
        let sr = self.sync.as_ref().expect("a blocking connection");
        let (dec, fds) = &mut *lead.state;
        let end = 'end: {
            if lead.drain {
                if let Err(why) = self.drain_now(dec, fds, &sr.dispatch) {
                    break 'end Some((why, false));
                }
                sr.dispatch.drained(self);
                // Let the caller answer what the drain read before reading on: the socket's
                // receiving side is shut down, so the next read returns at once.
                break 'end None;
            }
            if lead
                .started
                .is_some_and(|t0| t0.elapsed() >= self.limits.frame_timeout)
            {
                break 'end Some((
                    "a frame did not arrive whole within frame_timeout".to_string(),
                    false,
                ));
            }
            if let Some(t) = lead.set_timeo.take() {
                let _ = set_timeo(self.raw_fd(), libc::SO_RCVTIMEO, t);
            }
            let (ptr, room) = dec.spare();
            // An answer is on its way and no frame is half read: try for it a moment first.
            let read = if spin && lead.started.is_none() && !dec.in_frame() {
                spin_recvmsg(&sr.spin, self.raw_fd(), ptr, room, fds)
            } else {
                recvmsg(self.raw_fd(), ptr, room, fds, 0)
            };
            match read {
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) => None,
                Err(e) => Some((format!("read failed: {e}"), false)),
                Ok(0) if sr.drain_requested.load(Ordering::Acquire) => {
                    // Our own SHUT_RD (start_drain): everything sent before it was read. Let
                    // the writer thread flush the hand-backs queued so far, then end.
                    self.wait_queue_flushed(Instant::now() + self.limits.send_timeout);
                    Some(("the server shut down".to_string(), false))
                }
                Ok(0) => Some(("the peer closed the connection".to_string(), false)),
                Ok(n) => {
                    // SAFETY: recvmsg wrote n <= room bytes there.
                    unsafe { dec.commit(n) };
                    self.process(dec, fds, &sr.dispatch, solo).err()
                }
            }
        };
        if end.is_none() {
            if dec.in_frame() {
                lead.started.get_or_insert_with(Instant::now);
            } else {
                lead.started = None;
                if !fds.is_empty() {
                    fds.clear();
                }
            }
        }
        lead.end = end;
        lead
    }

    /// A request on a blocking connection: written and answered on the calling thread.
    pub(crate) fn request_blocking(
        self: &Arc<Self>,
        payload: &[u8],
        timeout: Duration,
    ) -> Result<Payload, Error> {
        // The one clock read of the request while nothing blocks.
        let now = Instant::now();
        let deadline = now + timeout;
        if let Some(res) = self.request_solo(payload, now, deadline, timeout) {
            return res;
        }
        let rid = self.register_slot(self.next_request_id.fetch_add(1, Ordering::Relaxed))?;
        let res = self
            .send_blocking_t(REQUEST, rid, Body::Bytes(payload), deadline, timeout)
            .map_err(|e| match e {
                Error::Timeout(_) => Error::Timeout(timeout),
                e => e,
            })
            .and_then(|()| self.wait_slot(rid, Some(now), deadline, timeout));
        if res.is_err() {
            self.unregister(rid);
        }
        res
    }

    /// Waits for the answer in request `rid`'s slot, reading while no other thread does.
    fn wait_slot(
        &self,
        rid: u64,
        now: Option<Instant>,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<Payload, Error> {
        let mut out = None;
        self.wait_sync_with(deadline, now, false, true, || {
            out = self.take_answer(rid);
            out.is_some()
        });
        out.unwrap_or_else(|| Err(Error::Timeout(timeout)))
    }

    /// [`Conn::request_blocking`]'s fast path, for an inline payload while no other thread
    /// reads or writes the connection: this thread leads the reading from before its write
    /// until its answer has come, so the answer comes straight to it ([`Solo`]), with no entry
    /// in the pending table and no lock of the connection's state. None when the path is not
    /// free (another thread reads or writes, frames queued for the writer thread must leave
    /// first, the payload does not go inline): the general path then takes the request.
    fn request_solo(
        self: &Arc<Self>,
        payload: &[u8],
        now: Instant,
        deadline: Instant,
        timeout: Duration,
    ) -> Option<Result<Payload, Error>> {
        let sr = self.sync.as_ref()?;
        if now >= deadline
            || !self.plainly_inline(&Body::Bytes(payload))
            || self.ctl_done.load(Ordering::Acquire) < self.ctl_queued.load(Ordering::Acquire)
        {
            return None;
        }
        let mut rs = sr.rs.lock().unwrap();
        if rs.leader || rs.dead || sr.drain_requested.load(Ordering::Acquire) {
            return None;
        }
        // Never wait for the write lock while leading: its holder may wait for the peer,
        // which may wait for someone to read.
        let w = self.swlock.try_lock().ok()?;
        let mut lead = Self::take_lead(sr, &mut rs, deadline, now, false);
        drop(rs);
        let rid = self.next_request_id.fetch_add(1, Ordering::Relaxed);
        let h = wire::header_for(REQUEST, 0, rid, payload);
        let bufs: [&[u8]; 2] = [&h, payload];
        let sent = loop {
            match sendmsg(self.raw_fd(), &bufs, 0, None, libc::MSG_DONTWAIT) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break Ok(0),
                other => break other,
            }
        };
        match sent {
            Ok(n) if n == h.len() + payload.len() => drop(w),
            Ok(n) => {
                // The socket is full. The peer may be waiting for us to read before it takes
                // more: register the request, let another thread lead, and write the rest as
                // the general path does (under the same write lock: the frame stays whole).
                let registered = self.register_slot(rid);
                drop(self.give_lead(sr, lead));
                let (mut idx, mut off) = (0, 0);
                advance(&bufs, &mut idx, &mut off, n);
                let res = registered
                    .and_then(|_| self.write_rest(w, &bufs, idx, off, None, deadline, timeout))
                    .and_then(|()| self.wait_slot(rid, None, deadline, timeout));
                if res.is_err() {
                    self.unregister(rid);
                }
                return Some(res);
            }
            Err(e) => {
                drop(w);
                drop(self.give_lead(sr, lead));
                // A connection cut (a send timed out) says why, as the general path does.
                let why = self.st.lock().unwrap().closed.clone();
                return Some(Err(Error::Closed(
                    why.unwrap_or_else(|| format!("write failed: {e}")),
                )));
            }
        }
        let mut solo = Solo { rid, answer: None };
        loop {
            lead = self.lead_once(lead, true, &mut solo);
            if lead.end.is_some() || solo.answer.is_some() {
                break;
            }
            // Frames for other threads may have come: wake them, and read on.
            let now = Instant::now();
            let mut rs = sr.rs.lock().unwrap();
            if rs.waiters > 0 {
                sr.cv.notify_all();
            }
            if now >= deadline {
                break;
            }
            lead.set_timeo = Self::timeo_for(&mut rs, deadline, now, false);
        }
        let ended = lead.end.is_some();
        drop(self.give_lead(sr, lead));
        Some(match solo.answer {
            Some(answer) => answer,
            None if ended => Err(self.closed_error()),
            None => Err(Error::Timeout(timeout)),
        })
    }

    fn peer_hello_blocking(&self, deadline: Instant) -> Option<Hello> {
        // Past hello_by, still one short look: a blocking client reads only while it waits,
        // so a hello that came while it sat idle since connecting is in the socket, unread.
        let until = deadline.min(self.hello_by.max(Instant::now() + HELLO_LOOK));
        let has = || self.st.lock().unwrap().peer_hello.is_some();
        if !has() {
            self.wait_sync(until, || has() || self.is_closed());
        }
        self.st.lock().unwrap().peer_hello.clone()
    }

    /// The spin counts of a blocking connection (zeros for others).
    pub(crate) fn spin_counts(&self) -> (u64, u64, u64) {
        self.sync.as_ref().map_or((0, 0, 0), |sr| sr.spin.counts())
    }

    /// Blocking connections: reads until the connection has ended (after `shutdown`).
    pub(crate) fn wait_closed_blocking(self: &Arc<Self>) {
        while !self.is_closed() {
            self.wait_sync(Instant::now() + TICK, || self.is_closed());
        }
    }

    /// Reads and processes whatever the socket holds now, without waiting.
    fn drain_now(
        self: &Arc<Self>,
        dec: &mut FrameDecoder,
        fds: &mut VecDeque<OwnedFd>,
        dispatch: &Arc<dyn Dispatch>,
    ) -> Result<(), String> {
        loop {
            let (ptr, room) = dec.spare();
            match recvmsg(self.raw_fd(), ptr, room, fds, libc::MSG_DONTWAIT) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(format!("read failed: {e}")),
                Ok(0) => return Ok(()),
                // SAFETY: recvmsg wrote n <= room bytes there.
                Ok(n) => unsafe { dec.commit(n) },
            }
            self.process(dec, fds, dispatch, &mut Solo::none())
                .map_err(|(why, _)| why)?;
        }
    }

    /// Ends the connection: fails pending requests, drops our segments and the peer's mappings
    /// (payloads still lent to the application keep theirs until dropped).
    pub(crate) fn finish(self: &Arc<Self>, why: String, linger: bool) {
        let (pending, own, mapped) = {
            let mut st = self.st.lock().unwrap();
            if st.closed.is_none() {
                st.closed = Some(why.clone());
            }
            st.mapped_sizes.clear();
            st.own_bytes = 0;
            (
                std::mem::take(&mut st.pending),
                std::mem::take(&mut st.own),
                std::mem::take(&mut st.mapped),
            )
        };
        self.closed_flag.store(true, Ordering::Release);
        if linger {
            // Let the writer task flush the last frame, then close (at most 1 s later).
            self.queue(Vec::new());
            let c = self.clone();
            if self.is_blocking() {
                std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_secs(1));
                    c.shutdown();
                });
            } else {
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    c.shutdown();
                });
            }
        } else {
            self.shutdown();
        }
        for (_, p) in pending {
            // A slot's waiter finds its entry gone and reports the end itself.
            if let Pending::Chan(tx) = p {
                let _ = tx.send(Err(Error::Closed(why.clone())));
            }
        }
        drop(own);
        drop(mapped);
        self.closed_notify.notify_waiters();
        self.pool_gen.fetch_add(1, Ordering::Release);
        self.pool_freed.notify_waiters();
        self.hello_arrived.notify_waiters();
    }

    /// Answers a frame's violation: a Request gets an Error frame (via the writer task).
    fn answer_error(
        self: &Arc<Self>,
        dispatch: &Arc<dyn Dispatch>,
        mtype: Option<u8>,
        rid: u64,
        code: u32,
        message: &str,
    ) {
        if mtype == Some(REQUEST) {
            dispatch.answer(
                self,
                wire::encode_frame(wire::ERROR, 0, rid, &wire::encode_error(code, message)),
            );
        }
    }

    /// Hands an answer to `solo` when it is the answer `solo` waits for, else to the pending
    /// table ([`Conn::deliver`]).
    fn deliver_to(&self, solo: &mut Solo, rid: u64, res: Result<Payload, Error>) {
        if rid != 0 && rid == solo.rid && solo.answer.is_none() {
            solo.answer = Some(res);
        } else {
            self.deliver(rid, res);
        }
    }

    /// A fatal violation (section 6): a server answers it with one Error frame (request id
    /// `rid`), a client closes without answering. Returns what ends the connection: the reason,
    /// and whether to let the writer flush that Error first.
    fn fatal(&self, rid: u64, code: u32, message: &str) -> (String, bool) {
        if self.is_server {
            self.queue(wire::encode_frame(
                wire::ERROR,
                0,
                rid,
                &wire::encode_error(code, message),
            ));
        }
        (format!("fatal protocol error {code}: {message}"), self.is_server)
    }

    /// Decodes and handles every whole frame buffered. `Err` ends the connection.
    fn process(
        self: &Arc<Self>,
        dec: &mut FrameDecoder,
        fds: &mut VecDeque<OwnedFd>,
        dispatch: &Arc<dyn Dispatch>,
        solo: &mut Solo,
    ) -> Result<(), (String, bool)> {
        loop {
            let frame = match dec.next_frame() {
                Ok(Some(f)) => f,
                Ok(None) => return Ok(()),
                Err(e) if e.fatal => return Err(self.fatal(e.request_id.unwrap_or(0), e.code, &e.message)),
                Err(e) => {
                    let rid = e.request_id.unwrap_or(0);
                    if e.flags & FLAG_SHM != 0 && e.code == code::CHECKSUM {
                        // The descriptor failed its CRC: hand the segment back all the same.
                        self.refuse_shm_segment(&e.payload, fds);
                    }
                    match e.mtype {
                        Some(wire::RESPONSE) | Some(wire::ERROR) => self.deliver_to(
                            solo,
                            rid,
                            Err(Error::Protocol {
                                code: e.code,
                                message: e.message,
                            }),
                        ),
                        m => self.answer_error(dispatch, m, rid, e.code, &e.message),
                    }
                    continue;
                }
            };
            let rid = frame.request_id;
            let payload = if frame.flags & FLAG_SHM != 0 {
                match self.receive_shm(frame.mtype, rid, frame.flags, &frame.payload, fds) {
                    Ok(p) => p,
                    Err((code, message)) => {
                        match frame.mtype {
                            wire::RESPONSE | wire::ERROR => {
                                self.deliver_to(solo, rid, Err(Error::Protocol { code, message }))
                            }
                            m => self.answer_error(dispatch, Some(m), rid, code, &message),
                        }
                        continue;
                    }
                }
            } else if frame.flags & wire::FLAG_COMPRESSED != 0 {
                // We never announce COMPRESSION, so it is never negotiated.
                let m = "COMPRESSED was not negotiated";
                match frame.mtype {
                    wire::RESPONSE | wire::ERROR => self.deliver_to(
                        solo,
                        rid,
                        Err(Error::Protocol {
                            code: code::UNSUPPORTED_FLAGS,
                            message: m.into(),
                        }),
                    ),
                    t => self.answer_error(dispatch, Some(t), rid, code::UNSUPPORTED_FLAGS, m),
                }
                continue;
            } else {
                Payload::inline(frame.payload)
            };
            match frame.mtype {
                REQUEST => dispatch.request(self, rid, payload),
                RESPONSE => self.deliver_to(solo, rid, Ok(payload)),
                wire::ERROR => {
                    let err = match wire::decode_error(&payload) {
                        Some((code, message)) => Error::Remote { code, message },
                        None => Error::Remote {
                            code: code::GENERIC,
                            message: "malformed Error payload".into(),
                        },
                    };
                    self.deliver_to(solo, rid, Err(err));
                }
                _ if rid == 0 => {
                    // (A control Event with SHM or COMPRESSED was refused above: it is no HRNG.)
                    if wire::is_ring_switch(&payload) {
                        return Err(self.fatal(
                            0,
                            code::BAD_HEADER,
                            "an HRNG on a connection that did not negotiate the ring",
                        ));
                    }
                    self.control(&payload)
                }
                _ => dispatch.event(self, payload),
            }
        }
    }

    /// A control Event (section 8a) other than HRNG (`process` ends the connection on one):
    /// the hello, or a release, reject or retire; any other magic is ignored.
    fn control(&self, payload: &[u8]) {
        if payload.starts_with(b"HELO") {
            let Some(h) = Hello::decode(payload) else { return };
            let mut st = self.st.lock().unwrap();
            if st.peer_hello.is_none() {
                self.peer_limit.store(h.max_payload, Ordering::Release);
                st.peer_hello = Some(h);
                drop(st);
                self.hello_arrived.notify_waiters();
            }
            return;
        }
        let Some((kind, ids)) = wire::decode_control(payload) else {
            return;
        };
        let mut st = self.st.lock().unwrap();
        match kind {
            Control::Release | Control::Reject => {
                for id in ids {
                    if let Some(s) = st.own.get_mut(&id) {
                        if s.peer_holds > 0 {
                            s.peer_holds -= 1;
                        }
                        if kind == Control::Reject {
                            s.introduced = false;
                        }
                    }
                }
                drop(st);
                self.pool_gen.fetch_add(1, Ordering::Release);
                self.pool_freed.notify_waiters();
            }
            Control::Retire => {
                for id in ids {
                    // Payloads still lent keep their mapping alive until dropped.
                    st.mapped.remove(&id);
                    st.mapped_sizes.remove(&id);
                }
            }
        }
    }

    /// Hands back the segment of a refused SHM frame, and closes a NEW_SEGMENT's descriptor.
    fn refuse_shm_segment(&self, payload: &[u8], fds: &mut VecDeque<OwnedFd>) {
        let st = self.st.lock().unwrap();
        if let Some(d) = Descriptor::parse(payload) {
            if d.flags & NEW_SEGMENT != 0 && d.flags & PEER_SEGMENT == 0 {
                fds.pop_front();
            }
        }
        let hb = shm::hand_back(payload, &st.mapped_sizes);
        drop(st);
        if let Some((kind, id)) = hb {
            self.queue(wire::encode_frame(
                EVENT,
                0,
                0,
                &wire::encode_control(kind, &[id]),
            ));
        }
    }

    fn receive_shm(
        self: &Arc<Self>,
        mtype: u8,
        rid: u64,
        flags: u16,
        payload: &[u8],
        fds: &mut VecDeque<OwnedFd>,
    ) -> Result<Payload, (u32, String)> {
        let d = Descriptor::parse(payload);
        let wants_fd = d.is_some_and(|d| d.flags & NEW_SEGMENT != 0);
        let fd = if wants_fd { fds.pop_front() } else { None };
        let info = fd.as_ref().map(FdInfo::of);
        let mut st = self.st.lock().unwrap();
        let negotiated = self.limits.shm
            && st
                .peer_hello
                .as_ref()
                .is_some_and(|h| h.features & FEATURE_SHM != 0);
        let lent: HashMap<u32, u64> = st
            .own
            .values()
            .filter(|s| s.peer_holds > 0)
            .map(|s| (s.seg.id, s.seg.size))
            .collect();
        let view = ReceiverView {
            negotiated,
            compression: false,
            shm_receive_bytes: self.limits.shm_receive_bytes,
            shm_receive_segments: self.limits.shm_receive_segments,
            mapped: &st.mapped_sizes,
            lent: &lent,
            global: shm::global_mapped(),
        };
        match shm::decide(&view, mtype, rid, flags, payload, info) {
            Decision::Refuse {
                code,
                message,
                hand_back,
            } => {
                drop(st);
                if let Some((kind, id)) = hand_back {
                    self.queue(wire::encode_frame(
                        EVENT,
                        0,
                        0,
                        &wire::encode_control(kind, &[id]),
                    ));
                }
                Err((code, message))
            }
            Decision::Lend {
                at: Lent::Own { id },
                offset,
                length,
            } => {
                let s = st.own.get_mut(&id).expect("decide checked it is lent");
                s.local_views += 1;
                let seg = s.seg.clone();
                self.shm_received.fetch_add(1, Ordering::Relaxed);
                Ok(Payload::own(
                    seg,
                    offset,
                    length,
                    Release::new(Arc::downgrade(self), id, true),
                ))
            }
            Decision::Lend {
                at: Lent::Peer { id, new, size },
                offset,
                length,
            } => {
                let map = if new {
                    let fd = fd.expect("decide checked the descriptor");
                    match PeerMapping::map(&fd, size) {
                        Ok(m) => {
                            let m = Arc::new(m);
                            st.mapped.insert(id, m.clone());
                            st.mapped_sizes.insert(id, size);
                            m
                        }
                        Err(e) => {
                            drop(st);
                            self.queue(wire::encode_frame(
                                EVENT,
                                0,
                                0,
                                &wire::encode_control(Control::Reject, &[id]),
                            ));
                            return Err((code::SHM_ERROR, format!("mmap failed: {e}")));
                        }
                    }
                } else {
                    st.mapped.get(&id).expect("decide checked it is mapped").clone()
                };
                drop(st);
                self.shm_received.fetch_add(1, Ordering::Relaxed);
                Ok(Payload::peer(
                    map,
                    offset,
                    length,
                    Release::new(Arc::downgrade(self), id, false),
                ))
            }
        }
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// What to send: bytes, or a received payload (an echo of a shared one costs no copy).
pub(crate) enum Body<'a> {
    Bytes(&'a [u8]),
    Echo(&'a Payload),
}

impl Body<'_> {
    fn bytes(&self) -> &[u8] {
        match self {
            Body::Bytes(b) => b,
            Body::Echo(p) => p,
        }
    }
    fn len(&self) -> usize {
        self.bytes().len()
    }
}

/// Frames up to this size (header and payload) without a descriptor leave through one
/// `send(2)` of one gathered buffer: on the 64 B round trip, `sendmsg` with its msghdr and
/// two iovecs cost the kernel measurably more than `send` (as the raw floor writes), and
/// copying a few hundred bytes costs less than that difference.
const GATHER_BYTES: usize = 1024;

// The socket calls below are made with syscall(2), not through libc's wrappers: those are
// POSIX cancellation points, and entering and leaving one (nothing here uses
// pthread_cancel) cost as many instructions as the rest of a 64 B read or write.

/// One sendmsg(2) of `bufs` from `bufs[0][first_off..]` on (`flags` added to MSG_NOSIGNAL),
/// with `pass` as SCM_RIGHTS.
fn sendmsg(
    fd: RawFd,
    bufs: &[&[u8]],
    first_off: usize,
    pass: Option<RawFd>,
    flags: libc::c_int,
) -> io::Result<usize> {
    if pass.is_none() {
        let first = &bufs[0][first_off..];
        let total = first.len() + bufs[1..].iter().map(|b| b.len()).sum::<usize>();
        if bufs.len() == 1 || total <= GATHER_BYTES {
            // Not zeroed: only the `total` bytes copied in are sent.
            let mut gathered = std::mem::MaybeUninit::<[u8; GATHER_BYTES]>::uninit();
            let (ptr, len) = if bufs.len() == 1 {
                (first.as_ptr(), first.len())
            } else {
                let dst = gathered.as_mut_ptr() as *mut u8;
                let mut at = 0;
                for b in std::iter::once(first).chain(bufs[1..].iter().copied()) {
                    // SAFETY: `at + b.len() <= total <= GATHER_BYTES`, and the source is a
                    // live slice that cannot overlap our stack buffer.
                    unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), dst.add(at), b.len()) };
                    at += b.len();
                }
                (dst as *const u8, at)
            };
            // SAFETY: send from `len` initialised bytes at `ptr`.
            let n = unsafe {
                libc::syscall(
                    libc::SYS_sendto,
                    fd,
                    ptr as *const libc::c_void,
                    len,
                    libc::MSG_NOSIGNAL | flags,
                    std::ptr::null::<libc::sockaddr>(),
                    0 as libc::socklen_t,
                )
            };
            return if n < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(n as usize)
            };
        }
    }
    // At most 8 buffers per call (callers pass 1 to 3); the rest go in the next call.
    let mut iov = [libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    }; 8];
    let count = bufs.len().min(iov.len());
    for (i, b) in bufs.iter().take(count).enumerate() {
        let b = if i == 0 { &b[first_off..] } else { b };
        iov[i] = libc::iovec {
            iov_base: b.as_ptr() as *mut libc::c_void,
            iov_len: b.len(),
        };
    }
    // SAFETY: msghdr built from live buffers; cmsg space sized for one descriptor.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = iov.as_mut_ptr();
        msg.msg_iovlen = count as _;
        let space = libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) as usize;
        let mut cbuf = [0u64; 8];
        if let Some(pfd) = pass {
            msg.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
            msg.msg_controllen = space as _;
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as _;
            std::ptr::write_unaligned(libc::CMSG_DATA(c) as *mut RawFd, pfd);
        }
        let n = libc::syscall(
            libc::SYS_sendmsg,
            fd,
            &msg as *const libc::msghdr,
            libc::MSG_NOSIGNAL | flags,
        );
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
}

fn recvmsg(
    fd: RawFd,
    ptr: *mut u8,
    room: usize,
    fds: &mut VecDeque<OwnedFd>,
    flags: libc::c_int,
) -> io::Result<usize> {
    // SAFETY: recvmsg into `room` bytes at `ptr` (the decoder's spare capacity) and a local
    // control buffer; every descriptor received is wrapped in an OwnedFd at once.
    unsafe {
        let mut iov = libc::iovec {
            iov_base: ptr as *mut libc::c_void,
            iov_len: room,
        };
        let mut cbuf = [0u64; 32];
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = std::mem::size_of_val(&cbuf) as _;
        let n = libc::syscall(
            libc::SYS_recvmsg,
            fd,
            &mut msg as *mut libc::msghdr,
            libc::MSG_CMSG_CLOEXEC | flags,
        );
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c) as *const RawFd;
                let count =
                    ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / std::mem::size_of::<RawFd>();
                for i in 0..count {
                    let owned = OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i)));
                    if fds.len() < MAX_WAITING_FDS {
                        fds.push_back(owned);
                    }
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
        Ok(n as usize)
    }
}

/// A blocking read that spins first ([`Spin`]): tries with `MSG_DONTWAIT`, yielding the CPU
/// between tries, for up to the spin's budget, then blocks.
fn spin_recvmsg(
    spin: &Spin,
    fd: RawFd,
    ptr: *mut u8,
    room: usize,
    fds: &mut VecDeque<OwnedFd>,
) -> io::Result<usize> {
    if !spin.possible(fd) {
        return recvmsg(fd, ptr, room, fds, 0);
    }
    let started = Instant::now();
    if let Some(spinning) = spin.begin(fd) {
        loop {
            match recvmsg(fd, ptr, room, fds, libc::MSG_DONTWAIT) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                other => {
                    spin.end(spinning, other.is_ok(), false);
                    return other;
                }
            }
            // SAFETY: sched_yield has no preconditions.
            unsafe { libc::sched_yield() };
            if started.elapsed() >= spinning.budget {
                spin.end(spinning, false, true);
                break;
            }
        }
    }
    let read = recvmsg(fd, ptr, room, fds, 0);
    if read.is_ok() || matches!(&read, Err(e) if e.kind() == io::ErrorKind::WouldBlock) {
        spin.after(started);
    }
    read
}

/// What [`Conn::plan`] decided for a send.
enum Plan {
    Inline,
    /// A PEER_SEGMENT descriptor pointing back into the peer's own segment.
    PeerEcho([u8; 32]),
    Shm(Hello),
}

/// Moves `(idx, off)` past `n` bytes written from `bufs`.
fn advance(bufs: &[&[u8]], idx: &mut usize, off: &mut usize, mut n: usize) {
    while n > 0 {
        let left = bufs[*idx].len() - *off;
        if n >= left {
            n -= left;
            *idx += 1;
            *off = 0;
        } else {
            *off += n;
            n = 0;
        }
    }
    while *idx < bufs.len() && bufs[*idx].len() == *off {
        *idx += 1;
        *off = 0;
    }
}

fn ceil_ms(d: Duration) -> Duration {
    Duration::from_millis(d.as_nanos().div_ceil(1_000_000) as u64)
}

fn set_blocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we own.
    unsafe {
        let fl = libc::fcntl(fd, libc::F_GETFL);
        if fl < 0 || libc::fcntl(fd, libc::F_SETFL, fl & !libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Sets SO_RCVTIMEO or SO_SNDTIMEO: zero for none, else at least 1 ms.
fn set_timeo(fd: RawFd, which: libc::c_int, d: Duration) -> io::Result<()> {
    let d = if d.is_zero() {
        d
    } else {
        d.max(Duration::from_millis(1))
    };
    let tv = libc::timeval {
        tv_sec: d.as_secs() as libc::time_t,
        tv_usec: d.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: setsockopt with a timeval of the right size.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            which,
            &tv as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
