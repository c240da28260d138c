//! The server, [`Server`]. Async (`Server::new`, `serve`): one task reads each connection,
//! one runs its Requests in arrival order (so replies leave in that order). Blocking
//! (`Server::new_blocking`, `serve_blocking`): one thread per connection reads with blocking
//! `recvmsg`, runs the handler and writes the reply. Events go to an optional callback.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};

use crate::conn::{self, Body, Conn, Dispatch, Limits};
use crate::error::{Error, HandlerError};
use crate::payload::Payload;
use crate::wire::{self, code, ERROR, EVENT, RESPONSE};

/// What a handler answers: bytes, or a received [`Payload`] sent back as it is (an echo of a
/// shared-memory payload points back into the client's segment: no copy).
pub enum Reply {
    Bytes(Vec<u8>),
    Payload(Payload),
}

impl From<Vec<u8>> for Reply {
    fn from(v: Vec<u8>) -> Self {
        Reply::Bytes(v)
    }
}
impl From<&[u8]> for Reply {
    fn from(v: &[u8]) -> Self {
        Reply::Bytes(v.to_vec())
    }
}
impl From<String> for Reply {
    fn from(v: String) -> Self {
        Reply::Bytes(v.into_bytes())
    }
}
impl From<&str> for Reply {
    fn from(v: &str) -> Self {
        Reply::Bytes(v.as_bytes().to_vec())
    }
}
impl From<Payload> for Reply {
    fn from(p: Payload) -> Self {
        Reply::Payload(p)
    }
}

/// One client connection, as a handler sees it: push Events to it.
#[derive(Clone)]
pub struct Peer {
    conn: Arc<Conn>,
    timeout: Duration,
    next_event_id: Arc<AtomicU64>,
}

impl Peer {
    /// Sends an Event to this client (inline, or through shared memory when large).
    pub async fn send_event(&self, payload: &[u8]) -> Result<(), Error> {
        let id = self.next_event_id.fetch_add(1, Ordering::Relaxed);
        self.conn
            .send(EVENT, id, Body::Bytes(payload), Instant::now() + self.timeout)
            .await
    }

    /// As [`Peer::send_event`], on the calling thread: for the handlers of a blocking server
    /// (on an async server's connection it blocks the calling thread while it writes).
    pub fn send_event_blocking(&self, payload: &[u8]) -> Result<(), Error> {
        let id = self.next_event_id.fetch_add(1, Ordering::Relaxed);
        let deadline = Instant::now() + self.timeout;
        if !self.conn.is_blocking() {
            return Err(Error::Closed(
                "send_event_blocking is for a blocking server's connections: use send_event".into(),
            ));
        }
        self.conn.send_blocking(EVENT, id, Body::Bytes(payload), deadline)
    }

    /// The client's uid (SO_PEERCRED).
    pub fn uid(&self) -> Option<u32> {
        conn::peer_uid(self.conn.raw_fd()).ok()
    }
}

/// A Request as a handler receives it.
pub struct Request {
    /// The payload (a zero-copy view when it came through shared memory).
    pub payload: Payload,
    /// The connection it came on.
    pub peer: Peer,
}

type BoxFut = Pin<Box<dyn Future<Output = Result<Reply, HandlerError>> + Send>>;
type HandlerFn = Arc<dyn Fn(Request) -> BoxFut + Send + Sync>;
type SyncHandlerFn = Arc<dyn Fn(Request) -> Result<Reply, HandlerError> + Send + Sync>;

enum Handler {
    Async(HandlerFn),
    Sync(SyncHandlerFn),
}
type EventFn = Arc<dyn Fn(Payload, Peer) + Send + Sync>;

/// Server settings.
#[derive(Clone)]
pub struct ServerOptions {
    pub limits: Limits,
    /// Socket file mode (default 0600).
    pub mode: u32,
    /// Client uids allowed besides our own.
    pub allow_uids: Vec<u32>,
    /// Most connections at once (default 1024).
    pub max_connections: usize,
    /// How long [`ServerHandle::shutdown`] lets connections finish (default 5 s).
    pub shutdown_timeout: Duration,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            limits: Limits::default(),
            mode: 0o600,
            allow_uids: Vec::new(),
            max_connections: 1024,
            shutdown_timeout: Duration::from_secs(5),
        }
    }
}

struct Shared {
    handler: Handler,
    on_event: Option<EventFn>,
    opts: ServerOptions,
    conns: Mutex<HashMap<u64, Weak<Conn>>>,
    next_event_id: Arc<AtomicU64>,
}

/// An async hintens server.
pub struct Server {
    path: PathBuf,
    shared: Arc<Shared>,
    stop_tx: watch::Sender<bool>,
}

/// Stops a running [`Server`] from another task.
#[derive(Clone)]
pub struct ServerHandle {
    stop_tx: watch::Sender<bool>,
    shared: Arc<Shared>,
}

impl ServerHandle {
    /// Stops accepting, removes the socket file, lets each connection finish the Requests it
    /// has read (up to `shutdown_timeout`), then closes them. [`Server::serve`] returns.
    pub fn shutdown(&self) {
        let _ = self.stop_tx.send(true);
    }

    /// Sends an Event to every connected client; returns how many it reached.
    pub async fn broadcast(&self, payload: &[u8]) -> usize {
        broadcast(&self.shared, payload).await
    }
}

async fn broadcast(shared: &Arc<Shared>, payload: &[u8]) -> usize {
    let conns: Vec<Arc<Conn>> = shared
        .conns
        .lock()
        .unwrap()
        .values()
        .filter_map(|w| w.upgrade())
        .collect();
    let mut n = 0;
    for c in conns {
        let id = shared.next_event_id.fetch_add(1, Ordering::Relaxed);
        let deadline = Instant::now() + shared.opts.limits.send_timeout;
        if c.send(EVENT, id, Body::Bytes(payload), deadline).await.is_ok() {
            n += 1;
        }
    }
    n
}

impl Server {
    /// A server on `path` whose handler answers each Request.
    ///
    /// ```no_run
    /// # async fn f() -> Result<(), hintens::Error> {
    /// let server = hintens::Server::new("/tmp/hintens.sock", |req: hintens::Request| async move {
    ///     Ok(req.payload.into())   // echo
    /// });
    /// server.serve().await?;
    /// # Ok(()) }
    /// ```
    pub fn new<F, Fut>(path: impl AsRef<Path>, handler: F) -> Server
    where
        F: Fn(Request) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Reply, HandlerError>> + Send + 'static,
    {
        Self::with_options(path, handler, ServerOptions::default())
    }

    pub fn with_options<F, Fut>(path: impl AsRef<Path>, handler: F, opts: ServerOptions) -> Server
    where
        F: Fn(Request) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Reply, HandlerError>> + Send + 'static,
    {
        let handler: HandlerFn = Arc::new(move |r| Box::pin(handler(r)));
        Self::build(path, Handler::Async(handler), opts)
    }

    /// A blocking server on `path`: [`Server::serve_blocking`] runs a thread per connection,
    /// which reads with blocking `recvmsg`, calls `handler` and writes its reply, all on that
    /// thread (the lowest latency; Requests of one connection run in order).
    ///
    /// ```no_run
    /// # fn f() -> Result<(), hintens::Error> {
    /// let server = hintens::Server::new_blocking("/tmp/hintens.sock", |req: hintens::Request| {
    ///     Ok(req.payload.into())   // echo
    /// });
    /// server.serve_blocking()?;
    /// # Ok(()) }
    /// ```
    pub fn new_blocking<F>(path: impl AsRef<Path>, handler: F) -> Server
    where
        F: Fn(Request) -> Result<Reply, HandlerError> + Send + Sync + 'static,
    {
        Self::with_options_blocking(path, handler, ServerOptions::default())
    }

    pub fn with_options_blocking<F>(path: impl AsRef<Path>, handler: F, opts: ServerOptions) -> Server
    where
        F: Fn(Request) -> Result<Reply, HandlerError> + Send + Sync + 'static,
    {
        Self::build(path, Handler::Sync(Arc::new(handler)), opts)
    }

    fn build(path: impl AsRef<Path>, handler: Handler, opts: ServerOptions) -> Server {
        let (stop_tx, _) = watch::channel(false);
        Server {
            path: path.as_ref().to_path_buf(),
            shared: Arc::new(Shared {
                handler,
                on_event: None,
                opts,
                conns: Mutex::new(HashMap::new()),
                next_event_id: Arc::new(AtomicU64::new(1)),
            }),
            stop_tx,
        }
    }

    /// Sets the callback for Events from clients (without one, plain Events are dropped).
    pub fn on_event(mut self, f: impl Fn(Payload, Peer) + Send + Sync + 'static) -> Server {
        Arc::get_mut(&mut self.shared).expect("before serve").on_event = Some(Arc::new(f));
        self
    }

    /// A handle to stop the server or broadcast, usable from other tasks.
    pub fn handle(&self) -> ServerHandle {
        ServerHandle {
            stop_tx: self.stop_tx.clone(),
            shared: self.shared.clone(),
        }
    }

    /// Binds (mode 0600 unless configured) and serves until [`ServerHandle::shutdown`]. A
    /// blocking server (`new_blocking`) runs [`Server::serve_blocking`] on a blocking thread.
    pub async fn serve(self) -> Result<(), Error> {
        if matches!(self.shared.handler, Handler::Sync(_)) {
            return tokio::task::spawn_blocking(move || self.serve_blocking())
                .await
                .map_err(|e| Error::Closed(format!("the server thread failed: {e}")))?;
        }
        let listener = tokio::net::UnixListener::from_std(bind(&self.path, self.shared.opts.mode)?)?;
        self.serve_on(listener).await
    }

    /// Serves a blocking server (`new_blocking`) on the calling thread until
    /// [`ServerHandle::shutdown`]: a thread per connection. Shutdown, limits and checks are
    /// those of [`Server::serve`]: each connection answers what it had read, later Requests
    /// get UNAVAILABLE, and connections still busy after `shutdown_timeout` are cut.
    pub fn serve_blocking(self) -> Result<(), Error> {
        let Handler::Sync(handler) = &self.shared.handler else {
            return Err(Error::Closed(
                "serve_blocking needs a blocking handler (Server::new_blocking)".into(),
            ));
        };
        let handler = handler.clone();
        let listener = bind(&self.path, self.shared.opts.mode)?;
        listener.set_nonblocking(true)?;
        let stop = self.stop_tx.subscribe();
        let my_uid = conn::my_uid();
        let mut next_conn = 0u64;
        let limits = &self.shared.opts.limits;
        let budget = wire::PendingBudget::new(limits.max_pending_bytes.max(limits.max_payload as u64));
        let mut threads: Vec<std::thread::JoinHandle<()>> = Vec::new();
        while !*stop.borrow() {
            let mut pfd = libc::pollfd {
                fd: listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: poll on one pollfd of ours; wakes every 100 ms to look at `stop`.
            unsafe { libc::poll(&mut pfd, 1, 100) };
            let fd: OwnedFd = match listener.accept() {
                Ok((s, _)) => s.into(),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    eprintln!("hintens: accept failed: {e}");
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
            };
            let Some(conn_id) = self.admit(&fd, my_uid, &mut next_conn) else {
                continue;
            };
            let dispatch = Arc::new(SyncDispatch {
                shared: self.shared.clone(),
                queue: Mutex::new(VecDeque::new()),
                queued: AtomicUsize::new(0),
                taking: AtomicBool::new(true),
            });
            let conn = match Conn::start_blocking(
                fd,
                self.shared.opts.limits.clone(),
                dispatch.clone(),
                true,
                Some(budget.clone()),
                false,
            ) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("hintens: connection setup failed: {e}");
                    continue;
                }
            };
            self.shared
                .conns
                .lock()
                .unwrap()
                .insert(conn_id, Arc::downgrade(&conn));
            let (shared, handler) = (self.shared.clone(), handler.clone());
            match std::thread::Builder::new()
                .name("hintens-conn".into())
                .spawn(move || conn_thread(conn, shared, handler, dispatch))
            {
                Ok(t) => threads.push(t),
                Err(e) => eprintln!("hintens: no thread for a connection: {e}"),
            }
            threads.retain(|t| !t.is_finished());
        }
        drop(listener);
        let _ = std::fs::remove_file(&self.path);
        for c in self.shared.conns.lock().unwrap().values() {
            if let Some(c) = c.upgrade() {
                c.start_drain();
            }
        }
        let deadline = Instant::now() + self.shared.opts.shutdown_timeout;
        while threads.iter().any(|t| !t.is_finished()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        for c in self.shared.conns.lock().unwrap().drain() {
            if let Some(c) = c.1.upgrade() {
                c.shutdown();
            }
        }
        Ok(())
    }

    /// The checks after `accept`: the client's uid, and `max_connections`. A refused client
    /// gets one Error frame (UNAVAILABLE) before anything of its is read.
    fn admit(&self, fd: &OwnedFd, my_uid: u32, next_conn: &mut u64) -> Option<u64> {
        let uid = conn::peer_uid(fd.as_raw_fd()).unwrap_or(u32::MAX);
        if uid != my_uid && !self.shared.opts.allow_uids.contains(&uid) {
            refuse(fd, &format!("uid {uid} may not use this server"));
            return None;
        }
        let live = {
            let mut conns = self.shared.conns.lock().unwrap();
            conns.retain(|_, w| w.strong_count() > 0);
            conns.len()
        };
        if live >= self.shared.opts.max_connections {
            refuse(fd, "too many connections");
            return None;
        }
        *next_conn += 1;
        Some(*next_conn)
    }

    async fn serve_on(self, listener: tokio::net::UnixListener) -> Result<(), Error> {
        let mut stop = self.stop_tx.subscribe();
        let my_uid = conn::my_uid();
        let mut next_conn = 0u64;
        // One budget for unfinished frames across the server's connections, at least
        // max_payload (section 10).
        let limits = &self.shared.opts.limits;
        let budget = wire::PendingBudget::new(limits.max_pending_bytes.max(limits.max_payload as u64));
        let mut tasks = Vec::new();
        loop {
            let accepted = tokio::select! {
                r = listener.accept() => r,
                _ = stopped(&mut stop) => break,
            };
            let (stream, _) = match accepted {
                Ok(s) => s,
                Err(e) => {
                    // EMFILE and the like: keep serving the others.
                    eprintln!("hintens: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            let fd: OwnedFd = match stream.into_std() {
                Ok(s) => s.into(),
                Err(_) => continue,
            };
            let Some(conn_id) = self.admit(&fd, my_uid, &mut next_conn) else {
                continue;
            };
            let (tx, rx) = mpsc::unbounded_channel();
            let dispatch = Arc::new(ServerDispatch {
                shared: self.shared.clone(),
                work: Mutex::new(Some(tx)),
            });
            let conn = match Conn::start(
                fd,
                self.shared.opts.limits.clone(),
                dispatch,
                true,
                Some(budget.clone()),
            ) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("hintens: connection setup failed: {e}");
                    continue;
                }
            };
            self.shared
                .conns
                .lock()
                .unwrap()
                .insert(conn_id, Arc::downgrade(&conn));
            tasks.push(tokio::spawn(worker(conn, self.shared.clone(), rx)));
            tasks.retain(|t| !t.is_finished());
        }
        drop(listener);
        let _ = std::fs::remove_file(&self.path);
        for c in self.shared.conns.lock().unwrap().values() {
            if let Some(c) = c.upgrade() {
                c.start_drain();
            }
        }
        // Shutdown: each worker answers what was read, then closes its connection.
        let deadline = tokio::time::Instant::now() + self.shared.opts.shutdown_timeout;
        for t in tasks {
            let abort = t.abort_handle();
            if tokio::time::timeout_at(deadline, t).await.is_err() {
                abort.abort();
            }
        }
        for c in self.shared.conns.lock().unwrap().drain() {
            if let Some(c) = c.1.upgrade() {
                c.shutdown();
            }
        }
        Ok(())
    }
}

/// One Error frame (UNAVAILABLE, request id 0), then close, before reading anything.
fn refuse(fd: &OwnedFd, why: &str) {
    let frame = wire::encode_frame(ERROR, 0, 0, &wire::encode_error(code::UNAVAILABLE, why));
    // SAFETY: a plain send on a socket we own; best effort.
    unsafe {
        libc::send(
            fd.as_raw_fd(),
            frame.as_ptr() as *const libc::c_void,
            frame.len(),
            libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
        );
    }
}

fn bind(path: &Path, mode: u32) -> Result<std::os::unix::net::UnixListener, Error> {
    if let Ok(md) = std::fs::symlink_metadata(path) {
        // A stale socket of a server that is gone is replaced; a live one is not.
        if md.file_type().is_socket() && std::os::unix::net::UnixStream::connect(path).is_err() {
            std::fs::remove_file(path)?;
        }
    }
    // socket, bind, chmod, and only then listen: until the mode is set, a connect is refused
    // (std's UnixListener::bind listens at once, leaving a window with the umask's mode).
    // SAFETY: plain socket calls on a descriptor we own; `addr` outlives the bind call.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    // SAFETY: `fd` was just created and nothing else owns it.
    let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: sockaddr_un is plain data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str());
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("socket path too long or not a path: {}", path.display()),
        )
        .into());
    }
    for (slot, byte) in addr.sun_path.iter_mut().zip(bytes) {
        *slot = *byte as libc::c_char;
    }
    let len = (std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1) as libc::socklen_t;
    // SAFETY: `addr` is a valid sockaddr_un of at least `len` bytes.
    if unsafe {
        libc::bind(
            fd.as_raw_fd(),
            &addr as *const libc::sockaddr_un as *const libc::sockaddr,
            len,
        )
    } < 0
    {
        return Err(std::io::Error::last_os_error().into());
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    // SAFETY: a bound socket we own.
    if unsafe { libc::listen(fd.as_raw_fd(), 1024) } < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    let listener = std::os::unix::net::UnixListener::from(fd);
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// The answer to a Request that arrives while the server shuts down.
fn shutting_down(request_id: u64) -> Vec<u8> {
    wire::encode_frame(
        ERROR,
        0,
        request_id,
        &wire::encode_error(code::UNAVAILABLE, "the server is shutting down"),
    )
}

impl Shared {
    /// Hands a client's Event to `on_event`, if the server has one.
    fn deliver_event(&self, conn: &Arc<Conn>, payload: Payload) {
        if let Some(f) = &self.on_event {
            f(
                payload,
                Peer {
                    conn: conn.clone(),
                    timeout: self.opts.limits.send_timeout,
                    next_event_id: self.next_event_id.clone(),
                },
            );
        }
    }
}

struct ServerDispatch {
    shared: Arc<Shared>,
    work: Mutex<Option<mpsc::UnboundedSender<(u64, Payload)>>>,
}

impl Dispatch for ServerDispatch {
    fn request(&self, conn: &Arc<Conn>, request_id: u64, payload: Payload) {
        let sent = match &*self.work.lock().unwrap() {
            Some(tx) => tx.send((request_id, payload)).is_ok(),
            None => false,
        };
        if !sent {
            conn.queue(shutting_down(request_id));
        }
    }

    fn event(&self, conn: &Arc<Conn>, payload: Payload) {
        self.shared.deliver_event(conn, payload);
    }

    fn drained(&self, _conn: &Arc<Conn>) {
        self.work.lock().unwrap().take();
    }

    fn closed(&self, _conn: &Arc<Conn>) {
        self.work.lock().unwrap().take();
    }
}

async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// Runs one connection's Requests in arrival order, until the reader stops handing them on
/// (the connection ended, or a drain read everything), then closes the connection.
async fn worker(conn: Arc<Conn>, shared: Arc<Shared>, mut rx: mpsc::UnboundedReceiver<(u64, Payload)>) {
    let peer = Peer {
        conn: conn.clone(),
        timeout: shared.opts.limits.send_timeout,
        next_event_id: shared.next_event_id.clone(),
    };
    while let Some((rid, payload)) = rx.recv().await {
        let Handler::Async(handler) = &shared.handler else {
            unreachable!("a blocking server has no worker tasks")
        };
        let result = handler(Request {
            payload,
            peer: peer.clone(),
        })
        .await;
        let deadline = Instant::now() + shared.opts.limits.send_timeout;
        let sent = match result {
            Ok(Reply::Bytes(b)) => conn.send(RESPONSE, rid, Body::Bytes(&b), deadline).await,
            Ok(Reply::Payload(p)) => conn.send(RESPONSE, rid, Body::Echo(&p), deadline).await,
            Err(e) => {
                conn.write_frame(ERROR, 0, rid, &wire::encode_error(e.code, &e.message), deadline)
                    .await
            }
        };
        let fallback = match fallback(sent) {
            Ok(f) => f,
            Err(()) => break,
        };
        if let Some((c, m)) = fallback {
            let deadline = Instant::now() + shared.opts.limits.send_timeout;
            if conn
                .write_frame(ERROR, 0, rid, &wire::encode_error(c, m), deadline)
                .await
                .is_err()
            {
                break;
            }
        }
    }
    // Every reply was written (writes complete before they return): close once the frames
    // queued for the writer task (releases, refusals) are out. The reader task sees the end.
    conn.close_after_queued();
}

/// What a reply that could not be sent becomes: an Error frame with this code, or (`Err`) the
/// end of the connection.
#[allow(clippy::result_unit_err)]
fn fallback(sent: Result<(), Error>) -> Result<Option<(u32, &'static str)>, ()> {
    match sent {
        Ok(()) => Ok(None),
        Err(Error::TooLarge { .. }) => Ok(Some((code::TOO_LARGE, "the response is over the client's limit"))),
        Err(Error::Timeout(_)) => Ok(Some((
            code::UNAVAILABLE,
            "no shared memory free for the response",
        ))),
        Err(Error::Io(_)) => Ok(Some((code::SHM_ERROR, "shared memory failed for the response"))),
        Err(_) => Err(()),
    }
}

/// A blocking server connection's Dispatch: Requests wait in a queue that the connection's
/// thread runs once the frames of that read are processed (a handler never runs inside the
/// reader, so it may itself wait for a release the same thread must read).
struct SyncDispatch {
    shared: Arc<Shared>,
    queue: Mutex<VecDeque<Work>>,
    /// The queue's length, for the connection thread to look at without the lock (counted
    /// up after each push, down after each pop, under the lock).
    queued: AtomicUsize,
    taking: AtomicBool,
}

impl SyncDispatch {
    fn push(&self, w: Work) {
        let mut q = self.queue.lock().unwrap();
        q.push_back(w);
        self.queued.store(q.len(), Ordering::Release);
    }

    /// The next Work, if any (no lock taken when the queue is empty).
    fn pop(&self) -> Option<Work> {
        if self.queued.load(Ordering::Acquire) == 0 {
            return None;
        }
        let mut q = self.queue.lock().unwrap();
        let w = q.pop_front();
        self.queued.store(q.len(), Ordering::Release);
        w
    }
}

/// What a blocking server connection's thread does next, in arrival order.
enum Work {
    Request(u64, Payload),
    /// The Error frame answering a refused Request.
    Answer(Vec<u8>),
}

impl Dispatch for SyncDispatch {
    fn answer(&self, _conn: &Arc<Conn>, frame: Vec<u8>) {
        self.push(Work::Answer(frame));
    }

    fn request(&self, conn: &Arc<Conn>, request_id: u64, payload: Payload) {
        if self.taking.load(Ordering::Acquire) {
            self.push(Work::Request(request_id, payload));
        } else {
            self.answer(conn, shutting_down(request_id));
        }
    }

    fn event(&self, conn: &Arc<Conn>, payload: Payload) {
        self.shared.deliver_event(conn, payload);
    }

    fn drained(&self, _conn: &Arc<Conn>) {
        self.taking.store(false, Ordering::Release);
    }

    fn closed(&self, _conn: &Arc<Conn>) {
        self.taking.store(false, Ordering::Release);
    }
}

/// One blocking server connection: read (leading the reads), run the Requests read, write
/// their replies, all on this thread; after a drain, close once the queued frames are out.
fn conn_thread(conn: Arc<Conn>, shared: Arc<Shared>, handler: SyncHandlerFn, d: Arc<SyncDispatch>) {
    let peer = Peer {
        conn: conn.clone(),
        timeout: shared.opts.limits.send_timeout,
        next_event_id: shared.next_event_id.clone(),
    };
    let mut closing = false;
    // The clock reading of the last reply (or of the start, or of a wait that timed out): the
    // wait between frames has no timeout, so a slightly old reading only bounds the wait of a
    // frame in progress or a follower's, and saves a clock read per round trip.
    let mut now = Instant::now();
    loop {
        let was_closing = closing;
        let woken = conn.wait_sync_idle_at(now + Duration::from_millis(100), Some(now), || {
            d.queued.load(Ordering::Acquire) > 0
                || (!was_closing && !d.taking.load(Ordering::Acquire))
                || conn.is_closed()
        });
        if !woken {
            now = Instant::now();
        }
        loop {
            let (rid, payload) = match d.pop() {
                None => break,
                Some(Work::Request(rid, payload)) => (rid, payload),
                Some(Work::Answer(frame)) => {
                    let deadline = Instant::now() + shared.opts.limits.send_timeout;
                    conn.wait_queue_flushed(deadline);
                    if conn.write_all_blocking(&[&frame], None, deadline).is_err() {
                        conn.shutdown();
                    }
                    continue;
                }
            };
            let result = handler(Request {
                payload,
                peer: peer.clone(),
            });
            // One clock read for the reply (the handler may have taken a while), which the
            // next wait reuses.
            let timeout = shared.opts.limits.send_timeout;
            now = Instant::now();
            let deadline = now + timeout;
            conn.wait_queue_flushed(deadline);
            let sent = match result {
                Ok(Reply::Bytes(b)) => {
                    conn.send_blocking_t(RESPONSE, rid, Body::Bytes(&b), deadline, timeout)
                }
                Ok(Reply::Payload(p)) => {
                    conn.send_blocking_t(RESPONSE, rid, Body::Echo(&p), deadline, timeout)
                }
                Err(e) => conn.write_all_blocking(
                    &[&wire::encode_frame(
                        ERROR,
                        0,
                        rid,
                        &wire::encode_error(e.code, &e.message),
                    )],
                    None,
                    deadline,
                ),
            };
            let ok = match fallback(sent) {
                Ok(None) => true,
                Ok(Some((c, m))) => {
                    let frame = wire::encode_frame(ERROR, 0, rid, &wire::encode_error(c, m));
                    let deadline = Instant::now() + shared.opts.limits.send_timeout;
                    conn.write_all_blocking(&[&frame], None, deadline).is_ok()
                }
                Err(()) => false,
            };
            if !ok {
                conn.shutdown();
            }
        }
        if conn.is_closed() {
            break;
        }
        if !closing && !d.taking.load(Ordering::Acquire) {
            // Drained (or ended): every reply was written; close once the frames queued for
            // the writer thread (releases, refusals) are out.
            closing = true;
            conn.close_after_queued();
        }
    }
    // Requests still queued when the connection ended go unanswered (nothing can be sent).
    let mut q = d.queue.lock().unwrap();
    q.clear();
    d.queued.store(0, Ordering::Release);
}
