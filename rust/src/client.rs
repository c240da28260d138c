//! The async client, [`IPCClient`].

use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::conn::{self, Body, Conn, Dispatch, Limits};
use crate::error::Error;
use crate::payload::Payload;
use crate::wire::{self, code, EVENT};

/// A callback for Events pushed by the server.
pub type EventHandler = Arc<dyn Fn(Payload) + Send + Sync>;

/// Client settings. `ClientOptions::default()` is what [`IPCClient::connect`] uses.
#[derive(Clone)]
pub struct ClientOptions {
    /// Timeout of each request (default 10 s).
    pub timeout: Duration,
    /// Receive limits and shared memory (defaults of PROTOCOL.md).
    pub limits: Limits,
    /// Server uids trusted besides our own and root.
    pub server_uids: Vec<u32>,
    /// Called for each Event the server pushes (in the connection's reader task: keep it short).
    pub on_event: Option<EventHandler>,
    /// The blocking client ([`crate::blocking::Client`]) only: while a request waits for its
    /// answer, try the socket again (yielding the CPU between tries) for up to 100 µs
    /// before the thread sleeps, so that an answer from a server on another CPU costs no
    /// wake-up. The budget adapts as the Python client's does (see the README); at most one
    /// thread per CPU beyond the first spins in a process, none while client and server are
    /// pinned to one same CPU. Default true.
    pub spin: bool,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            timeout: Duration::from_secs(10),
            limits: Limits::default(),
            server_uids: Vec::new(),
            on_event: None,
            spin: true,
        }
    }
}

pub(crate) struct ClientDispatch {
    pub(crate) on_event: Mutex<Option<EventHandler>>,
}

impl ClientDispatch {
    pub(crate) fn new(opts: &ClientOptions) -> Arc<ClientDispatch> {
        Arc::new(ClientDispatch {
            on_event: Mutex::new(opts.on_event.clone()),
        })
    }
}

/// Connects a Unix stream socket to `path` and checks the server's uid (SO_PEERCRED: ours,
/// root, or one of `server_uids`).
pub(crate) fn connect_checked(
    std: std::os::unix::net::UnixStream,
    opts: &ClientOptions,
) -> Result<OwnedFd, Error> {
    let fd: OwnedFd = std.into();
    let uid = conn::peer_uid(std::os::fd::AsRawFd::as_raw_fd(&fd))?;
    if uid != conn::my_uid() && uid != 0 && !opts.server_uids.contains(&uid) {
        return Err(Error::UntrustedServer(uid));
    }
    Ok(fd)
}

impl Dispatch for ClientDispatch {
    fn request(&self, conn: &Arc<Conn>, request_id: u64, _payload: Payload) {
        // A client serves no requests (section 4).
        conn.queue(wire::encode_frame(
            wire::ERROR,
            0,
            request_id,
            &wire::encode_error(code::UNAVAILABLE, "a client serves no requests"),
        ));
    }

    fn event(&self, _conn: &Arc<Conn>, payload: Payload) {
        let h = self.on_event.lock().unwrap().clone();
        if let Some(h) = h {
            h(payload);
        }
    }
}

/// An async hintens client on one Unix-socket connection. Cheap to share (`&self` methods,
/// many requests in flight at once, matched by request id).
pub struct IPCClient {
    conn: Arc<Conn>,
    dispatch: Arc<ClientDispatch>,
    timeout: Duration,
}

impl IPCClient {
    /// Connects with the default options.
    pub async fn connect(path: impl AsRef<Path>) -> Result<IPCClient, Error> {
        Self::connect_with(path, ClientOptions::default()).await
    }

    /// Connects, checks the server's uid (SO_PEERCRED: ours, root, or `server_uids`), and sends
    /// the hello.
    pub async fn connect_with(path: impl AsRef<Path>, opts: ClientOptions) -> Result<IPCClient, Error> {
        let stream = tokio::net::UnixStream::connect(path.as_ref()).await?;
        let fd = connect_checked(stream.into_std()?, &opts)?;
        let dispatch = ClientDispatch::new(&opts);
        let conn = Conn::start(fd, opts.limits.clone(), dispatch.clone(), false, None)?;
        Ok(IPCClient {
            conn,
            dispatch,
            timeout: opts.timeout,
        })
    }

    /// Sends `value` encoded with bincode 1.x (what Python's `hintens.bincode` writes) and
    /// decodes the answer as `R`.
    pub async fn send<T: Serialize, R: DeserializeOwned>(&self, value: T) -> Result<R, Error> {
        let bytes = bincode::serialize(&value)?;
        let answer = self.send_bytes(&bytes).await?;
        Ok(bincode::deserialize(&answer)?)
    }

    /// Sends raw bytes as a Request and returns the answer's payload (a zero-copy view when it
    /// came through shared memory: see [`Payload`]).
    pub async fn send_bytes(&self, payload: &[u8]) -> Result<Payload, Error> {
        self.conn.request(payload, self.timeout).await
    }

    /// As [`IPCClient::send_bytes`], with its own timeout.
    pub async fn send_bytes_timeout(&self, payload: &[u8], timeout: Duration) -> Result<Payload, Error> {
        self.conn.request(payload, timeout).await
    }

    /// Sends an Event (no answer).
    pub async fn send_event(&self, payload: &[u8]) -> Result<(), Error> {
        let deadline = Instant::now() + self.timeout;
        self.conn.send(EVENT, 1, Body::Bytes(payload), deadline).await
    }

    /// Sets (or replaces) the callback for Events the server pushes.
    pub fn on_event(&self, handler: impl Fn(Payload) + Send + Sync + 'static) {
        *self.dispatch.on_event.lock().unwrap() = Some(Arc::new(handler));
    }

    /// How many Requests went out through shared memory, and how many answers came back
    /// through it.
    pub fn shm_counts(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (
            self.conn.shm_sent.load(Relaxed),
            self.conn.shm_received.load(Relaxed),
        )
    }

    /// True once the connection has ended.
    pub fn is_closed(&self) -> bool {
        self.conn.is_closed()
    }

    /// Closes the connection: pending requests fail with [`Error::Closed`]; our segments and
    /// the server's mappings are dropped (payloads still held keep theirs until dropped).
    pub async fn close(&self) {
        self.conn.shutdown();
        self.conn.wait_closed().await;
    }

    /// Test-only: writes `frame` raw on the connection, then waits for the answer to
    /// `request_id` (used by the peer's `badcrc` scenario). Not part of the API.
    #[doc(hidden)]
    pub async fn __raw_request(&self, frame: &[u8], request_id: u64) -> Result<Payload, Error> {
        let rx = self.conn.register_id(request_id)?;
        self.conn
            .write_all(&[frame], None, Instant::now() + self.timeout)
            .await?;
        self.conn.wait_answer(request_id, rx, self.timeout).await
    }
}

impl Drop for IPCClient {
    fn drop(&mut self) {
        self.conn.shutdown();
    }
}
