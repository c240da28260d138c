//! A blocking client: [`Client`] runs an [`IPCClient`] on a private
//! one-thread tokio runtime, so its reader keeps running (Events, releases) between calls.

use std::path::Path;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::client::{ClientOptions, IPCClient};
use crate::error::Error;
use crate::payload::Payload;

/// A blocking hintens client. `&self` methods; share it between threads with `Arc`.
pub struct Client {
    rt: tokio::runtime::Runtime,
    inner: Option<IPCClient>,
}

impl Client {
    pub fn connect(path: impl AsRef<Path>) -> Result<Client, Error> {
        Self::connect_with(path, ClientOptions::default())
    }

    pub fn connect_with(path: impl AsRef<Path>, opts: ClientOptions) -> Result<Client, Error> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let inner = rt.block_on(IPCClient::connect_with(path, opts))?;
        Ok(Client {
            rt,
            inner: Some(inner),
        })
    }

    fn c(&self) -> &IPCClient {
        self.inner.as_ref().expect("open until dropped")
    }

    /// bincode in, bincode out (as [`IPCClient::send`]).
    pub fn send<T: Serialize, R: DeserializeOwned>(&self, value: T) -> Result<R, Error> {
        self.rt.block_on(self.c().send(value))
    }

    pub fn send_bytes(&self, payload: &[u8]) -> Result<Payload, Error> {
        self.rt.block_on(self.c().send_bytes(payload))
    }

    pub fn send_bytes_timeout(&self, payload: &[u8], timeout: Duration) -> Result<Payload, Error> {
        self.rt.block_on(self.c().send_bytes_timeout(payload, timeout))
    }

    pub fn send_event(&self, payload: &[u8]) -> Result<(), Error> {
        self.rt.block_on(self.c().send_event(payload))
    }

    /// The callback runs on the client's runtime thread.
    pub fn on_event(&self, handler: impl Fn(Payload) + Send + Sync + 'static) {
        self.c().on_event(handler)
    }

    pub fn close(&self) {
        self.rt.block_on(self.c().close())
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        if let Some(c) = self.inner.take() {
            self.rt.block_on(c.close());
        }
    }
}
