//! hintens: the Rust port of the hintens IPC protocol. The wire contract is the repository's
//! `docs/PROTOCOL.md`, shared with the Python and Go implementations.
//!
//! * [`IPCClient`] (async, tokio) and [`blocking::Client`]: requests matched by id, Events.
//! * [`Server`]: a handler closure per Request, Events, broadcast, graceful shutdown; async
//!   (`Server::new`, `serve`) or blocking (`Server::new_blocking`, `serve_blocking`: a thread
//!   per connection).
//! * Shared memory both ways: sealed memfds passed with `SCM_RIGHTS`; a received shared
//!   payload is a [`Payload`] over the mapping, released when dropped.
//! * [`wire`] (frames, hello, control Events, descriptors) and [`shm::decide`] are free of I/O
//!   and checked against `tests/vectors/*.json`.

pub mod blocking;
mod client;
pub(crate) mod conn;
pub mod crc16;
mod error;
mod path;
mod payload;
mod server;
pub mod shm;
mod spin;
pub mod wire;

pub use client::{ClientOptions, EventHandler, IPCClient};
pub use conn::Limits;
pub use error::{Error, ErrorCode, HandlerError};
pub use path::default_socket_path;
pub use payload::Payload;
pub use server::{Peer, Reply, Request, Server, ServerHandle, ServerOptions};
