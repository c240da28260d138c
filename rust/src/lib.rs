//! hintens: the Rust port of the hintens IPC protocol (docs/PROTOCOL.md in the repository).
pub mod crc16;
pub(crate) mod conn;
mod error;
mod payload;
pub mod shm;
pub mod wire;

pub use error::{Error, ErrorCode, HandlerError};
pub use payload::Payload;
mod client;
mod server;
pub mod blocking;

pub use client::{ClientOptions, EventHandler, IPCClient};
pub use conn::Limits;
pub use server::{Peer, Reply, Request, Server, ServerHandle, ServerOptions};
