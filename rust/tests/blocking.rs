//! The blocking client and the blocking server, over real sockets: every size across the
//! inline/shared-memory boundary, bincode, errors, Events both ways, many threads on one
//! client, timeouts, a dying server, graceful shutdown, and no memfd mapping left behind.

mod common;
use common::{memfd_maps, wait_bound};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use hintens::{
    blocking, wire, ClientOptions, Error, ErrorCode, HandlerError, Reply, Request, Server, ServerHandle,
    ServerOptions,
};

fn sock(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("hintens-rs-blk-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(format!("{tag}.sock"))
}

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| ((i * 31 + 7 + seed as usize) % 251) as u8)
        .collect()
}

/// The blocking handler: errors, pushed Events, a slow answer, else echo.
fn handler(r: Request) -> Result<Reply, HandlerError> {
    match &r.payload[..] {
        b"fail" => Err(HandlerError::new("it failed")),
        b"app" => Err(HandlerError::app(4321, "app said no")),
        b"push" => {
            let e = |e: Error| HandlerError::new(e.to_string());
            r.peer.send_event_blocking(b"pushed-1").map_err(e)?;
            r.peer.send_event_blocking(&vec![9u8; 200_000]).map_err(e)?;
            Ok("pushed".into())
        }
        b"slow" => {
            std::thread::sleep(Duration::from_millis(400));
            Ok("late".into())
        }
        b"slow20" => {
            std::thread::sleep(Duration::from_millis(20));
            Ok("late".into())
        }
        _ => Ok(r.payload.into()),
    }
}

struct Running {
    handle: ServerHandle,
    thread: Option<std::thread::JoinHandle<Result<(), Error>>>,
}

impl Running {
    fn stop(mut self) -> Result<(), Error> {
        self.handle.shutdown();
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.handle.shutdown();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn blocking_server(path: &Path, events: Arc<AtomicUsize>) -> Running {
    let server = Server::new_blocking(path, handler).on_event(move |p, _| {
        events.fetch_add(p.len(), Ordering::SeqCst);
    });
    let handle = server.handle();
    let thread = Some(std::thread::spawn(move || server.serve_blocking()));
    wait_bound(path);
    Running { handle, thread }
}

#[test]
fn blocking_client_against_the_blocking_server() {
    let _serial = common::serial();
    let path = sock("both");
    let events = Arc::new(AtomicUsize::new(0));
    let srv = blocking_server(&path, events.clone());
    let c = blocking::Client::connect(&path).unwrap();
    for n in [0usize, 1, 65535, 65536, 1 << 20, 8 << 20] {
        let p = pattern(n, 1);
        let a = c.send_bytes(&p).unwrap();
        assert!(a.len() == n && *a == *p, "size {n}");
        assert_eq!(a.is_shared(), n >= 65536, "size {n}");
    }
    assert_eq!(c.shm_counts(), (3, 3));
    let s: String = c.send("hi").unwrap();
    assert_eq!(s, "hi");
    let e = c.send_bytes(b"fail").unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::HandlerError), "{e}");
    assert!(e.to_string().contains("it failed"), "{e}");
    let e = c.send_bytes(b"app").unwrap_err();
    assert_eq!(e.code().map(|c| c.as_u32()), Some(4321), "{e}");
    // Events pushed by the handler arrive, in order, before its answer.
    let got = Arc::new(Mutex::new(Vec::new()));
    let g = got.clone();
    c.on_event(move |p| g.lock().unwrap().push(p.len()));
    assert_eq!(&c.send_bytes(b"push").unwrap()[..], b"pushed");
    assert_eq!(*got.lock().unwrap(), vec![8, 200_000]);
    // Events from the client reach the server's callback.
    c.send_event(b"12345").unwrap();
    c.send_event(&vec![1u8; 100_000]).unwrap();
    let t0 = Instant::now();
    while events.load(Ordering::SeqCst) < 100_005 {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "events: {}",
            events.load(Ordering::SeqCst)
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    drop(c);
    srv.stop().unwrap();
    assert!(!path.exists(), "shutdown removes the socket file");
    assert_eq!(memfd_maps(), 0);
}

/// The spin before an answer's blocking read (ClientOptions::spin): the first waits spin,
/// some win against a fast server (given time on a loaded machine), a slow server soon costs
/// none, and `spin: false` never spins. Answers are the same either way.
#[test]
fn the_blocking_client_spins_for_fast_answers_only_and_not_when_told() {
    let _serial = common::serial();
    // The machine has another CPU and this process (the server's threads too) may use two.
    // SAFETY: sysconf has no preconditions; sched_getaffinity writes into `set`.
    let may_spin = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::sysconf(libc::_SC_NPROCESSORS_ONLN) > 1
            && libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set) == 0
            && libc::CPU_COUNT(&set) >= 2
    };
    let path = sock("spin");
    let srv = blocking_server(&path, Arc::new(AtomicUsize::new(0)));
    let c = blocking::Client::connect(&path).unwrap();
    let t0 = Instant::now();
    let mut i = 0u32;
    loop {
        let p = format!("fast {i}");
        assert_eq!(&c.send_bytes(p.as_bytes()).unwrap()[..], p.as_bytes());
        i += 1;
        let (spins, won, _) = c.spin_counts();
        if i >= 300 && (!may_spin || won > 0 || t0.elapsed() > Duration::from_secs(5)) {
            assert_eq!(spins > 0 && won > 0, may_spin, "spins {spins}, won {won}");
            break;
        }
    }
    // A slow server (20 ms an answer): within 17 halvings the budget is spent, and of 40
    // waits at most 19 spun (the halvings, then a probe on the 8th and the 16th wait).
    let (before, won_before, _) = c.spin_counts();
    for _ in 0..40 {
        assert_eq!(&c.send_bytes(b"slow20").unwrap()[..], b"late");
    }
    let (after, won_after, budget) = c.spin_counts();
    if may_spin {
        assert_eq!(budget, 0);
        assert!((1..=19).contains(&(after - before)), "{before} -> {after}");
        assert_eq!(won_after, won_before);
    }
    let quiet = blocking::Client::connect_with(
        &path,
        ClientOptions {
            spin: false,
            ..Default::default()
        },
    )
    .unwrap();
    for n in [0usize, 64, 1 << 20] {
        let p = pattern(n, 3);
        assert_eq!(&quiet.send_bytes(&p).unwrap()[..], &p[..]);
    }
    assert_eq!(quiet.spin_counts().0, 0);
    drop((c, quiet));
    srv.stop().unwrap();
}

/// Many threads on one blocking client: each answer reaches its own caller (leader/follower
/// hand-over), small and shared-memory payloads mixed.
fn many_threads(path: &Path) {
    let c = Arc::new(blocking::Client::connect(path).unwrap());
    let threads = 6;
    let barrier = Arc::new(Barrier::new(threads));
    let ts: Vec<_> = (0..threads)
        .map(|t| {
            let (c, barrier) = (c.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                for i in 0..300usize {
                    let n = if i % 25 == 0 { 70_000 + t } else { 10 + (i % 50) };
                    let p = pattern(n, (t * 7 + i) as u8);
                    let a = c.send_bytes(&p).unwrap();
                    assert!(*a == *p, "thread {t} request {i}");
                }
            })
        })
        .collect();
    for t in ts {
        t.join().unwrap();
    }
    let (sent, received) = c.shm_counts();
    assert_eq!((sent, received), (72, 72));
}

#[test]
fn many_threads_share_one_blocking_client() {
    let _serial = common::serial();
    let path = sock("threads-b");
    let srv = blocking_server(&path, Arc::new(AtomicUsize::new(0)));
    many_threads(&path);
    srv.stop().unwrap();
    // And against the async server.
    let path = sock("threads-a");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let server = Server::new(&path, |r: Request| async move {
        Ok::<Reply, HandlerError>(r.payload.into())
    });
    let handle = server.handle();
    let task = rt.spawn(server.serve());
    wait_bound(&path);
    many_threads(&path);
    handle.shutdown();
    rt.block_on(task).unwrap().unwrap();
    assert_eq!(memfd_maps(), 0);
}

#[test]
fn a_timed_out_request_fails_alone_and_its_late_answer_is_dropped() {
    let _serial = common::serial();
    let path = sock("timeout");
    let srv = blocking_server(&path, Arc::new(AtomicUsize::new(0)));
    let c = blocking::Client::connect_with(
        &path,
        ClientOptions {
            timeout: Duration::from_secs(5),
            ..Default::default()
        },
    )
    .unwrap();
    let t0 = Instant::now();
    let e = c
        .send_bytes_timeout(b"slow", Duration::from_millis(100))
        .unwrap_err();
    assert!(matches!(e, Error::Timeout(_)), "{e}");
    assert_eq!(e.code(), Some(ErrorCode::Timeout));
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(100) && took < Duration::from_millis(350),
        "{took:?}"
    );
    // The late answer ("late") is read and dropped; the next request gets its own.
    assert_eq!(&c.send_bytes(b"after").unwrap()[..], b"after");
    drop(c);
    srv.stop().unwrap();
}

#[test]
fn the_blocking_client_fails_promptly_when_the_server_dies_mid_frame() {
    let _serial = common::serial();
    let path = sock("dying");
    let _ = std::fs::remove_file(&path);
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let t = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = [0u8; 4096];
        let _ = s.read(&mut buf);
        s.write_all(&wire::header_for(wire::RESPONSE, 0, 1, b"abc")[..10])
            .unwrap();
        std::thread::sleep(Duration::from_millis(100));
    });
    let c = blocking::Client::connect(&path).unwrap();
    let t0 = Instant::now();
    let r = c.send_bytes(b"hello");
    assert!(matches!(r, Err(Error::Closed(_))), "{r:?}");
    assert!(t0.elapsed() < Duration::from_secs(2));
    assert!(c.is_closed());
    let r = c.send_bytes(b"again");
    assert!(matches!(r, Err(Error::Closed(_))), "{r:?}");
    t.join().unwrap();
}

#[test]
fn blocking_shutdown_answers_what_was_sent_then_closes() {
    let _serial = common::serial();
    let path = sock("graceful");
    let started = Arc::new(Barrier::new(2));
    let s2 = started.clone();
    let first = Arc::new(AtomicUsize::new(0));
    let server = Server::new_blocking(&path, move |r: Request| {
        if first.fetch_add(1, Ordering::SeqCst) == 0 {
            s2.wait();
        }
        std::thread::sleep(Duration::from_millis(20));
        Ok(r.payload.into())
    });
    let handle = server.handle();
    let srv = std::thread::spawn(move || server.serve_blocking());
    wait_bound(&path);
    let client = Arc::new(blocking::Client::connect(&path).unwrap());
    let calls: Vec<_> = (0..6)
        .map(|i| {
            let c = client.clone();
            std::thread::spawn(move || {
                let p = format!("slow-{i}");
                c.send_bytes(p.as_bytes()).map(|a| a.to_vec() == p.into_bytes())
            })
        })
        .collect();
    started.wait();
    std::thread::sleep(Duration::from_millis(30));
    handle.shutdown();
    for c in calls {
        assert!(c.join().unwrap().unwrap(), "an answer differs");
    }
    srv.join().unwrap().unwrap();
    assert!(!path.exists());
    let e = client.send_bytes(b"after").unwrap_err();
    assert!(matches!(e, Error::Closed(_)), "{e}");
}

#[test]
fn serve_blocking_refuses_an_async_handler() {
    let _serial = common::serial();
    let server = Server::new(sock("wrong"), |r: Request| async move {
        Ok::<Reply, HandlerError>(r.payload.into())
    });
    assert!(server.serve_blocking().is_err());
}

/// A blocking client reads only while it waits: one that sat idle past the hello wait (1 s
/// after connecting) still finds the server's hello in the socket before a large send, and
/// sends it through shared memory, not inline (where this server's 1 MiB limit refuses it).
#[test]
fn a_client_idle_past_the_hello_wait_still_takes_the_hello() {
    let path = sock("idle-hello");
    let mut opts = ServerOptions::default();
    opts.limits.max_payload = 1 << 20;
    let server = Server::with_options_blocking(&path, handler, opts);
    let handle = server.handle();
    let running = Running {
        handle,
        thread: Some(std::thread::spawn(move || server.serve_blocking())),
    };
    wait_bound(&path);
    let c = hintens::blocking::Client::connect(&path).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let big = pattern(4 << 20, 3);
    assert_eq!(&c.send_bytes(&big).unwrap()[..], &big[..]);
    drop(c);
    running.stop().unwrap();
}
