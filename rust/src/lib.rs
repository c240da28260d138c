//! hintens: the Rust port of the hintens IPC protocol (docs/PROTOCOL.md in the repository).
pub(crate) mod conn;
pub mod crc16;
mod error;
mod payload;
pub mod shm;
pub mod wire;

pub use error::{Error, ErrorCode, HandlerError};
pub use payload::Payload;
pub mod blocking;
mod client;
mod server;

pub use client::{ClientOptions, EventHandler, IPCClient};
pub use conn::Limits;
pub use server::{Peer, Reply, Request, Server, ServerHandle, ServerOptions};
