//! Blocking API: [`Client`], a client that writes each request and reads its answer on the
//! calling thread (no runtime), and the blocking server (`Server::new_blocking`, a thread
//! per connection).
//!
//! Both run the same protocol code as the async ones (frames, hello, shared-memory pool and
//! descriptor checks, releases); only the driving differs. Reading is leader/follower: a
//! thread that waits for something (its answer, a free segment, the peer's hello) reads the
//! socket itself while no other thread does, and hands what it reads for others to them.

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::client::{connect_checked, ClientDispatch, ClientOptions};
use crate::conn::{Body, Conn};
use crate::error::Error;
use crate::payload::Payload;
use crate::wire::EVENT;

/// The server type is shared: `Server::new_blocking` and `Server::serve_blocking` are its
/// blocking mode.
pub use crate::server::{Server, ServerHandle, ServerOptions};

/// A blocking hintens client. `&self` methods; share it between threads with `Arc` (many
/// requests in flight, answers matched by request id).
///
/// Without an Event callback, the socket is read only while a call waits, so Events and
/// releases sent between calls are processed at the next call. With one (`on_event`, or
/// [`ClientOptions::on_event`]), a reader thread keeps reading between calls too; answers
/// then may be read by that thread and handed over (one thread wake-up more per call).
pub struct Client {
    conn: Arc<Conn>,
    dispatch: Arc<ClientDispatch>,
    timeout: Duration,
    reader: AtomicBool,
}

impl Client {
    /// Connects with the default options.
    pub fn connect(path: impl AsRef<Path>) -> Result<Client, Error> {
        Self::connect_with(path, ClientOptions::default())
    }

    /// Connects, checks the server's uid (as [`crate::IPCClient::connect_with`]) and writes
    /// the hello.
    pub fn connect_with(path: impl AsRef<Path>, opts: ClientOptions) -> Result<Client, Error> {
        let fd = connect_checked(UnixStream::connect(path.as_ref())?, &opts)?;
        let dispatch = ClientDispatch::new(&opts);
        let conn = Conn::start_blocking(fd, opts.limits.clone(), dispatch.clone(), false, None, opts.spin)?;
        let c = Client {
            conn,
            dispatch,
            timeout: opts.timeout,
            reader: AtomicBool::new(false),
        };
        if opts.on_event.is_some() {
            c.start_reader();
        }
        Ok(c)
    }

    /// bincode in, bincode out (as [`crate::IPCClient::send`]).
    pub fn send<T: Serialize, R: DeserializeOwned>(&self, value: T) -> Result<R, Error> {
        let bytes = bincode::serialize(&value)?;
        let answer = self.send_bytes(&bytes)?;
        Ok(bincode::deserialize(&answer)?)
    }

    /// Sends raw bytes as a Request and returns the answer's payload (a zero-copy view when it
    /// came through shared memory: see [`Payload`]).
    pub fn send_bytes(&self, payload: &[u8]) -> Result<Payload, Error> {
        self.conn.request_blocking(payload, self.timeout)
    }

    /// As [`Client::send_bytes`], with its own timeout.
    pub fn send_bytes_timeout(&self, payload: &[u8], timeout: Duration) -> Result<Payload, Error> {
        self.conn.request_blocking(payload, timeout)
    }

    /// Sends an Event (no answer).
    pub fn send_event(&self, payload: &[u8]) -> Result<(), Error> {
        let deadline = Instant::now() + self.timeout;
        self.conn.send_blocking(EVENT, 1, Body::Bytes(payload), deadline)
    }

    /// Sets (or replaces) the callback for Events the server pushes, and starts the reader
    /// thread it runs on (it runs on whichever thread reads: keep it short, and do not send
    /// requests from it).
    pub fn on_event(&self, handler: impl Fn(Payload) + Send + Sync + 'static) {
        *self.dispatch.on_event.lock().unwrap() = Some(Arc::new(handler));
        self.start_reader();
    }

    fn start_reader(&self) {
        if self.reader.swap(true, Ordering::AcqRel) {
            return;
        }
        let weak: Weak<Conn> = Arc::downgrade(&self.conn);
        let spawned = std::thread::Builder::new()
            .name("hintens-reader".into())
            .spawn(move || loop {
                let Some(c) = weak.upgrade() else { return };
                if c.is_closed() {
                    return;
                }
                c.wait_sync(Instant::now() + Duration::from_millis(100), || c.is_closed());
            });
        if spawned.is_err() {
            // Without the thread, Events are still read during calls.
            self.reader.store(false, Ordering::Release);
        }
    }

    /// How many Requests went out through shared memory, and how many answers came back
    /// through it.
    pub fn shm_counts(&self) -> (u64, u64) {
        (
            self.conn.shm_sent.load(Ordering::Relaxed),
            self.conn.shm_received.load(Ordering::Relaxed),
        )
    }

    /// The spins before blocking reads of answers ([`crate::ClientOptions::spin`]): waits
    /// that spun, those that bytes ended, and how long the next wait may spin (ns; 0: it
    /// sleeps at once, but for a probe now and then).
    pub fn spin_counts(&self) -> (u64, u64, u64) {
        self.conn.spin_counts()
    }

    /// True once the connection has ended (as seen by the last read).
    pub fn is_closed(&self) -> bool {
        self.conn.is_closed()
    }

    /// Closes the connection: pending requests fail with [`Error::Closed`]; our segments and
    /// the server's mappings are dropped (payloads still held keep theirs until dropped).
    pub fn close(&self) {
        self.conn.shutdown();
        self.conn.wait_closed_blocking();
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.close();
    }
}
