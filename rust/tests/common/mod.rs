//! Helpers the integration tests share (each test file is its own crate: `mod common;`).
#![allow(dead_code)] // not every test file uses every helper

use std::path::Path;
use std::time::{Duration, Instant};

/// Whether a socket is listening at `path` (its /proc/net/unix line has __SO_ACCEPTCON set).
/// A server sets the socket's mode before it listens, so this also means the mode is final;
/// unlike a probe connect, it adds no connection the server would see.
pub fn listening(path: &Path) -> bool {
    let want = path.to_string_lossy();
    std::fs::read_to_string("/proc/net/unix")
        .map(|table| {
            table.lines().skip(1).any(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                fields.len() >= 8 && fields[7] == want && fields[3] == "00010000"
            })
        })
        .unwrap_or(false)
}

/// Waits (5 s at most) until a server listens at `path`.
pub fn wait_bound(path: &Path) {
    let t0 = Instant::now();
    while !listening(path) {
        assert!(t0.elapsed() < Duration::from_secs(5), "the server did not bind");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// How many hintens memfd mappings this process has.
pub fn memfd_maps() -> usize {
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .filter(|l| l.contains("/memfd:hintens"))
        .count()
}

/// Serializes the tests of one test binary that read or change process-wide state: the
/// descriptor count (`/proc/self/fd`) and the memfd mappings (`/proc/self/maps`). Cargo runs
/// a binary's tests on parallel threads of one process, so without it one test's baseline or
/// "nothing left mapped" check sees another test's sockets and segments. A test that failed
/// (and so poisoned the lock) does not fail the ones after it.
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
