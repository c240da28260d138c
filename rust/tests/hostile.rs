//! Hostile raw-socket peers against a real Rust server (and a client against a dying server):
//! after each, the server still serves, and this process's descriptors are back to baseline.

mod common;
use common::listening;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use hintens::wire::{self, Descriptor, FrameDecoder, Hello, EVENT, REQUEST};
use hintens::{Reply, Request, Server, ServerHandle, ServerOptions};

thread_local! {
    /// Whether this test's server is the blocking one (`Server::new_blocking`).
    static BLOCKING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Each server test runs against the async server and against the blocking one.
macro_rules! both_servers {
    ($($name:ident),* $(,)?) => {
        mod async_server {
            $(#[test] fn $name() { let _serial = crate::common::serial(); super::$name() })*
        }
        mod blocking_server {
            $(#[test] fn $name() {
                let _serial = crate::common::serial();
                super::BLOCKING.with(|b| b.set(true));
                super::$name()
            })*
        }
    };
}

struct TestServer {
    path: PathBuf,
    handle: ServerHandle,
    _rt: tokio::runtime::Runtime,
}

fn start_server(tag: &str) -> TestServer {
    start_server_with(tag, ServerOptions::default())
}

fn start_server_with(tag: &str, opts: ServerOptions) -> TestServer {
    let dir = std::env::temp_dir().join(format!("hintens-rs-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kind = if BLOCKING.with(|b| b.get()) { "b" } else { "a" };
    let path = dir.join(format!("{tag}-{kind}.sock"));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let server = if BLOCKING.with(|b| b.get()) {
        Server::with_options_blocking(&path, |r: Request| Ok(r.payload.into()), opts)
    } else {
        Server::with_options(
            &path,
            |r: Request| async move { Ok::<Reply, hintens::HandlerError>(r.payload.into()) },
            opts,
        )
    };
    let handle = server.handle();
    // A blocking server's serve() runs serve_blocking on the runtime's blocking pool.
    rt.spawn(server.serve());
    let t0 = Instant::now();
    while !listening(&path) {
        assert!(t0.elapsed() < Duration::from_secs(5), "server did not bind");
        std::thread::sleep(Duration::from_millis(2));
    }
    TestServer {
        path,
        handle,
        _rt: rt,
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.handle.shutdown();
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// Descriptors return to (near) baseline: tokio and the test harness may hold a couple more.
fn assert_fds_back(baseline: usize) {
    let t0 = Instant::now();
    loop {
        let n = fd_count();
        if n <= baseline + 1 {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(3),
            "descriptors: {n}, baseline {baseline}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

struct RawPeer {
    s: UnixStream,
    dec: FrameDecoder,
}

impl RawPeer {
    fn connect(path: &PathBuf, hello_shm: bool) -> RawPeer {
        RawPeer::connect_with(
            path,
            Some(Hello {
                features: if hello_shm { wire::FEATURE_SHM } else { 0 },
                ..Default::default()
            }),
        )
    }

    /// Connects and sends `hello` (none: a peer that sends no hello).
    fn connect_with(path: &PathBuf, hello: Option<Hello>) -> RawPeer {
        let s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut p = RawPeer {
            s,
            dec: FrameDecoder::new(64 << 20),
        };
        if let Some(h) = hello {
            // A server over its connection limit answers UNAVAILABLE and closes, maybe before
            // our hello is written: that refusal is read by the test, not a failure here.
            p.try_send(&wire::encode_frame(EVENT, 0, 0, &h.encode()));
        }
        p
    }

    fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).unwrap();
    }

    /// Writes `b`; false if the server has closed the connection already (EPIPE, ECONNRESET).
    fn try_send(&mut self, b: &[u8]) -> bool {
        match self.s.write_all(b) {
            Ok(()) => true,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
                ) =>
            {
                false
            }
            Err(e) => panic!("write failed: {e}"),
        }
    }

    fn send_with_fd(&mut self, b: &[u8], fd: &OwnedFd) {
        // SAFETY: a sendmsg with one SCM_RIGHTS descriptor from live buffers.
        unsafe {
            let mut iov = libc::iovec {
                iov_base: b.as_ptr() as *mut _,
                iov_len: b.len(),
            };
            let mut cbuf = [0u64; 4];
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = cbuf.as_mut_ptr() as *mut _;
            msg.msg_controllen = libc::CMSG_SPACE(4) as _;
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(4) as _;
            std::ptr::write_unaligned(libc::CMSG_DATA(c) as *mut i32, fd.as_raw_fd());
            assert_eq!(libc::sendmsg(self.s.as_raw_fd(), &msg, 0), b.len() as isize);
        }
    }

    /// The next frame that is not a control Event; `None` at the end of the stream.
    fn next(&mut self) -> Option<wire::Frame> {
        loop {
            match self.dec.next_frame() {
                Ok(Some(f)) if f.mtype == EVENT && f.request_id == 0 => continue,
                Ok(Some(f)) => return Some(f),
                Ok(None) => {}
                Err(e) => panic!("server sent a bad frame: {e:?}"),
            }
            let mut buf = [0u8; 65536];
            match self.s.read(&mut buf) {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.dec.feed(&buf[..n]),
            }
        }
    }

    /// Control Events seen so far and the next frame, for SHM hand-back checks.
    fn next_with_controls(&mut self) -> (Vec<Vec<u8>>, Option<wire::Frame>) {
        let mut controls = Vec::new();
        loop {
            match self.dec.next_frame() {
                Ok(Some(f)) if f.mtype == EVENT && f.request_id == 0 => {
                    if !f.payload.starts_with(b"HELO") {
                        controls.push(f.payload)
                    }
                    continue;
                }
                Ok(Some(f)) => return (controls, Some(f)),
                Ok(None) => {}
                Err(e) => panic!("server sent a bad frame: {e:?}"),
            }
            let mut buf = [0u8; 65536];
            match self.s.read(&mut buf) {
                Ok(0) | Err(_) => return (controls, None),
                Ok(n) => self.dec.feed(&buf[..n]),
            }
        }
    }

    fn echo_ok(&mut self, rid: u64) {
        self.send(&wire::encode_frame(REQUEST, 0, rid, b"still-serving"));
        let f = self.next().expect("an answer");
        assert_eq!(
            (f.mtype, f.request_id, &f.payload[..]),
            (wire::RESPONSE, rid, &b"still-serving"[..])
        );
    }
}

fn error_of(f: &wire::Frame) -> (u32, String) {
    assert_eq!(
        f.mtype,
        wire::ERROR,
        "expected an Error frame, got type {}",
        f.mtype
    );
    wire::decode_error(&f.payload).unwrap()
}

/// A fresh client works (the server survived the previous peer).
fn server_still_serves(path: &PathBuf) {
    let mut p = RawPeer::connect(path, false);
    p.echo_ok(77);
}

fn bad_crc_is_answered_and_the_connection_survives() {
    let srv = start_server("badcrc");
    let base = fd_count();
    let mut p = RawPeer::connect(&srv.path, false);
    let mut f = wire::encode_frame(REQUEST, 0, 9, b"payload");
    f[14] ^= 0xff;
    p.send(&f);
    let e = p.next().unwrap();
    assert_eq!(e.request_id, 9);
    assert_eq!(error_of(&e).0, wire::code::CHECKSUM);
    p.echo_ok(10);
    drop(p);
    assert_fds_back(base);
    drop(srv);
}

fn oversized_length_is_fatal_and_nothing_is_allocated() {
    let srv = start_server("oversize");
    let base = fd_count();
    let mut p = RawPeer::connect(&srv.path, false);
    let mut h = wire::header_for(REQUEST, 0, 5, b"");
    h[10..14].copy_from_slice(&u32::MAX.to_be_bytes());
    p.send(&h);
    let e = p.next().unwrap();
    assert_eq!(error_of(&e).0, wire::code::TOO_LARGE);
    assert_eq!(e.request_id, 5);
    assert!(p.next().is_none(), "the server closes after a fatal error");
    drop(p);
    server_still_serves(&srv.path);
    assert_fds_back(base);
}

fn declared_large_payload_never_sent_costs_only_what_arrived() {
    let srv = start_server("slowbig");
    let base = fd_count();
    let mut p = RawPeer::connect(&srv.path, false);
    let mut h = wire::header_for(REQUEST, 0, 5, b"");
    h[10..14].copy_from_slice(&(60u32 << 20).to_be_bytes());
    p.send(&h);
    p.send(&[0u8; 1000]);
    drop(p); // the peer dies mid-frame
    server_still_serves(&srv.path);
    assert_fds_back(base);
}

fn bad_magic_and_bad_version_are_fatal_after_three_bytes() {
    let srv = start_server("magic");
    let base = fd_count();
    for bytes in [&b"GET / HTTP/1.1\r\n"[..], &[0x48, 0x50, 0x02][..]] {
        let mut p = RawPeer::connect(&srv.path, false);
        p.send(bytes);
        let e = p.next().unwrap();
        assert_eq!((error_of(&e).0, e.request_id), (wire::code::BAD_HEADER, 0));
        assert!(p.next().is_none());
    }
    server_still_serves(&srv.path);
    assert_fds_back(base);
}

fn garbage_hellos_and_controls_are_ignored() {
    let srv = start_server("garbage");
    let mut p = RawPeer::connect(&srv.path, false);
    for junk in [
        &b"HELO"[..],
        &b"HELO\xff\xff\xff\xff\xff\xff\xff\xff"[..],
        &b"HREL\x05\x00\x00\x00"[..],
        &b"HRET\x01\x00\x00\x00\x07\x00\x00\x00"[..],
        &[0u8; 4000][..],
    ] {
        p.send(&wire::encode_frame(EVENT, 0, 0, junk));
    }
    p.echo_ok(3);
}

/// A valid HRNG payload (section 9b): layout version 2, a ring of 256 KiB.
fn ring_switch() -> Vec<u8> {
    let mut p = b"HRNG".to_vec();
    p.extend_from_slice(&2u32.to_le_bytes());
    p.extend_from_slice(&262144u64.to_le_bytes());
    p
}

/// An HRNG on a connection that did not negotiate RING (this crate never announces it) is a
/// fatal violation (section 8a): its sender's next bytes would be in a ring, not on the socket.
/// The server answers BAD_HEADER with request id 0, reads nothing after it (the Request behind
/// it is not answered), closes, and serves new connections; a peer whose own hello announces
/// RING changes nothing. An HRNG with a flag is no control Event anybody understands: ignored
/// as before, as are magics that are not HRNG.
fn an_hrng_is_fatal_and_the_server_still_serves() {
    let srv = start_server("hrng");
    let base = fd_count();
    let ring = Hello {
        features: wire::FEATURE_SHM | wire::FEATURE_RING,
        ..Default::default()
    };
    for hello in [None, Some(Hello::default()), Some(ring)] {
        let mut p = RawPeer::connect_with(&srv.path, hello.clone());
        p.echo_ok(1);
        let mut stream = wire::encode_frame(EVENT, 0, 0, &ring_switch());
        stream.extend(wire::encode_frame(REQUEST, 0, 2, b"after"));
        p.send(&stream);
        let e = p.next().expect("an Error frame");
        let (code, message) = error_of(&e);
        assert_eq!(
            (code, e.request_id),
            (wire::code::BAD_HEADER, 0),
            "{hello:?}: {message}"
        );
        assert!(message.contains("did not negotiate the ring"), "{message}");
        let after = p.next();
        assert!(
            after.is_none(),
            "{hello:?}: the server went on after the HRNG: {after:?}"
        );
    }
    let mut p = RawPeer::connect(&srv.path, true);
    for flags in [wire::FLAG_COMPRESSED, wire::FLAG_SHM] {
        p.send(&wire::encode_frame(EVENT, flags, 0, &ring_switch()));
    }
    for magic in [&b"HRNX"[..], b"HRN", b"HREL"] {
        let mut other = magic.to_vec();
        other.extend_from_slice(&ring_switch()[4..]);
        p.send(&wire::encode_frame(EVENT, 0, 0, &other));
    }
    p.echo_ok(3);
    drop(p);
    server_still_serves(&srv.path);
    assert_fds_back(base);
}

fn memfd(size: u64, seals: i32) -> OwnedFd {
    // SAFETY: plain syscalls on a descriptor we own.
    unsafe {
        let fd = OwnedFd::from_raw_fd(libc::memfd_create(
            c"t".as_ptr(),
            libc::MFD_ALLOW_SEALING | libc::MFD_CLOEXEC,
        ));
        assert_eq!(libc::ftruncate(fd.as_raw_fd(), size as i64), 0);
        if seals != 0 {
            assert_eq!(libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals), 0);
        }
        fd
    }
}

fn shm_request(rid: u64, d: Descriptor) -> Vec<u8> {
    wire::encode_frame(REQUEST, wire::FLAG_SHM, rid, &d.encode())
}

fn bogus_descriptors_and_memfds_are_refused_and_handed_back() {
    let srv = start_server("shm");
    let base = fd_count();
    let mut p = RawPeer::connect(&srv.path, true);
    let new = |id, size, len| Descriptor {
        segment_id: id,
        flags: wire::NEW_SEGMENT,
        size,
        offset: 0,
        length: len,
    };
    type Case<'a> = (&'a str, Vec<u8>, Option<OwnedFd>, Option<&'a [u8; 4]>);
    let cases: Vec<Case> = vec![
        (
            "short descriptor",
            wire::encode_frame(REQUEST, wire::FLAG_SHM, 1, &[1u8; 31]),
            None,
            None,
        ),
        (
            "unknown id",
            shm_request(
                2,
                Descriptor {
                    segment_id: 40,
                    flags: 0,
                    size: 4096,
                    offset: 0,
                    length: 1,
                },
            ),
            None,
            Some(b"HREJ"),
        ),
        (
            "unsealed memfd",
            shm_request(3, new(41, 4096, 16)),
            Some(memfd(4096, 0)),
            Some(b"HREJ"),
        ),
        (
            "memfd smaller than its size",
            shm_request(4, new(42, 1 << 20, 16)),
            Some(memfd(4096, libc::F_SEAL_SHRINK)),
            Some(b"HREJ"),
        ),
        (
            "sparse 1 TiB over the cap",
            shm_request(5, new(43, 1 << 40, 16)),
            Some(memfd(1 << 40, libc::F_SEAL_SHRINK)),
            Some(b"HREJ"),
        ),
        (
            "region past the end",
            shm_request(
                6,
                Descriptor {
                    segment_id: 44,
                    flags: wire::NEW_SEGMENT,
                    size: 4096,
                    offset: 4000,
                    length: 97,
                },
            ),
            Some(memfd(4096, libc::F_SEAL_SHRINK)),
            Some(b"HREJ"),
        ),
        (
            "PEER_SEGMENT we never lent",
            shm_request(
                7,
                Descriptor {
                    segment_id: 45,
                    flags: wire::PEER_SEGMENT,
                    size: 4096,
                    offset: 0,
                    length: 1,
                },
            ),
            None,
            None,
        ),
        (
            "NEW_SEGMENT without a descriptor",
            shm_request(8, new(46, 4096, 1)),
            None,
            Some(b"HREJ"),
        ),
    ];
    for (what, frame, fd, hand_back) in cases {
        let rid = u64::from_be_bytes(frame[16..24].try_into().unwrap());
        match &fd {
            Some(fd) => p.send_with_fd(&frame, fd),
            None => p.send(&frame),
        }
        drop(fd);
        let (controls, f) = p.next_with_controls();
        let f = f.unwrap_or_else(|| panic!("{what}: connection closed"));
        assert_eq!(
            (f.request_id, error_of(&f).0),
            (rid, wire::code::SHM_ERROR),
            "{what}"
        );
        // The hand-back was queued before the Error: it has arrived.
        match hand_back {
            Some(magic) => assert!(
                controls.iter().any(|c| c.starts_with(magic)),
                "{what}: {controls:?}"
            ),
            None => assert!(controls.is_empty(), "{what}: {controls:?}"),
        }
    }
    // A valid segment is accepted and echoed (the echo points back into it: PEER_SEGMENT).
    let fd = memfd(4096, libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL);
    let frame = shm_request(20, new(50, 4096, 100));
    p.send_with_fd(&frame, &fd);
    drop(fd);
    let (before, f) = p.next_with_controls();
    assert!(before.is_empty(), "{before:?}");
    let f = f.unwrap();
    assert_eq!((f.mtype, f.flags), (wire::RESPONSE, wire::FLAG_SHM));
    let d = Descriptor::parse(&f.payload).unwrap();
    assert_eq!((d.segment_id, d.flags, d.length), (50, wire::PEER_SEGMENT, 100));
    // The server releases the segment after its echo frame (no release came before the
    // echo), and only once.
    let mut controls = Vec::new();
    for rid in 21..24 {
        p.send(&wire::encode_frame(REQUEST, 0, rid, b"sync"));
        let (c, f) = p.next_with_controls();
        assert_eq!(f.unwrap().request_id, rid);
        controls.extend(c);
    }
    assert_eq!(
        controls,
        vec![wire::encode_control(wire::Control::Release, &[50])]
    );
    p.echo_ok(30);
    drop(p);
    server_still_serves(&srv.path);
    // The server unmapped and closed everything of ours.
    assert_fds_back(base);
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    assert!(!maps.contains("/memfd:t"), "a test memfd is still mapped");
}

#[test]
fn client_fails_promptly_when_the_server_dies_mid_frame() {
    let _serial = common::serial();
    let dir = std::env::temp_dir().join(format!("hintens-rs-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("dying.sock");
    let _ = std::fs::remove_file(&path);
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let t = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = [0u8; 4096];
        let _ = s.read(&mut buf);
        // Half a Response header, then death.
        s.write_all(&wire::header_for(wire::RESPONSE, 0, 1, b"abc")[..10])
            .unwrap();
        std::thread::sleep(Duration::from_millis(100));
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let c = hintens::IPCClient::connect(&path).await.unwrap();
        let t0 = Instant::now();
        let r = c.send_bytes(b"hello").await;
        assert!(matches!(r, Err(hintens::Error::Closed(_))), "{r:?}");
        assert!(t0.elapsed() < Duration::from_secs(2));
    });
    t.join().unwrap();
}

fn pending_bytes_budget_refuses_with_unavailable_and_the_connection_survives() {
    let mut opts = ServerOptions::default();
    opts.limits.max_payload = 1 << 20;
    opts.limits.max_pending_bytes = 1 << 20;
    let srv = start_server_with("budget", opts);
    let base = fd_count();
    let len = 800_000usize;
    // A takes 800 kB of the 1 MiB budget with a frame whose payload is slow to come.
    let a_frame = wire::encode_frame(REQUEST, 0, 1, &vec![1u8; len]);
    let mut a = RawPeer::connect(&srv.path, false);
    a.send(&a_frame[..24 + 1000]);
    std::thread::sleep(Duration::from_millis(100));
    // B's frame would take the budget over its cap: refused now, its payload skipped unread.
    let mut b = RawPeer::connect(&srv.path, false);
    let payload = vec![2u8; len];
    let mut frame = wire::encode_frame(REQUEST, 0, 2, &payload);
    frame.truncate(24 + 10);
    b.send(&frame);
    let e = b.next().unwrap();
    assert_eq!((e.request_id, error_of(&e).0), (2, wire::code::UNAVAILABLE));
    b.send(&payload[10..]);
    b.echo_ok(3);
    // A finishes its frame: answered, and the budget is free again for B.
    a.send(&a_frame[24 + 1000..]);
    let f = a.next().unwrap();
    assert_eq!(
        (f.request_id, f.mtype, f.payload.len()),
        (1, wire::RESPONSE, len),
        "{:?}",
        wire::decode_error(&f.payload)
    );
    let frame = wire::encode_frame(REQUEST, 0, 4, &payload);
    b.send(&frame[..100]);
    std::thread::sleep(Duration::from_millis(20));
    b.send(&frame[100..]);
    let f = b.next().unwrap();
    assert_eq!((f.request_id, f.payload.len()), (4, len));
    drop((a, b));
    assert_fds_back(base);
}

fn a_frame_that_stalls_past_frame_timeout_is_cut() {
    let mut opts = ServerOptions::default();
    opts.limits.frame_timeout = Duration::from_millis(200);
    let srv = start_server_with("stall", opts);
    let base = fd_count();
    let mut p = RawPeer::connect(&srv.path, false);
    p.echo_ok(1);
    p.send(&wire::encode_frame(REQUEST, 0, 2, b"never finished")[..30]);
    let t0 = Instant::now();
    assert!(p.next().is_none(), "the server cuts the stalled connection");
    assert!(t0.elapsed() < Duration::from_secs(3));
    drop(p);
    server_still_serves(&srv.path);
    assert_fds_back(base);
}

fn connections_past_max_connections_get_unavailable() {
    let opts = ServerOptions {
        max_connections: 2,
        ..Default::default()
    };
    let srv = start_server_with("maxconn", opts);
    let base = fd_count();
    let mut a = RawPeer::connect(&srv.path, false);
    let mut b = RawPeer::connect(&srv.path, false);
    a.echo_ok(1);
    b.echo_ok(1);
    let mut c = RawPeer::connect(&srv.path, false);
    let e = c.next().expect("one Error frame");
    assert_eq!((e.request_id, error_of(&e).0), (0, wire::code::UNAVAILABLE));
    assert!(c.next().is_none(), "then closed");
    drop((a, c));
    // A place is free again.
    let t0 = Instant::now();
    loop {
        let mut d = RawPeer::connect(&srv.path, false);
        let sent = d.try_send(&wire::encode_frame(REQUEST, 0, 5, b"x"));
        match if sent { d.next() } else { None } {
            Some(f) if f.mtype == wire::RESPONSE => break,
            _ => assert!(t0.elapsed() < Duration::from_secs(3), "no place freed"),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    b.echo_ok(2);
    drop(b);
    assert_fds_back(base);
}

both_servers!(
    bad_crc_is_answered_and_the_connection_survives,
    oversized_length_is_fatal_and_nothing_is_allocated,
    declared_large_payload_never_sent_costs_only_what_arrived,
    bad_magic_and_bad_version_are_fatal_after_three_bytes,
    garbage_hellos_and_controls_are_ignored,
    an_hrng_is_fatal_and_the_server_still_serves,
    bogus_descriptors_and_memfds_are_refused_and_handed_back,
    pending_bytes_budget_refuses_with_unavailable_and_the_connection_survives,
    a_frame_that_stalls_past_frame_timeout_is_cut,
    connections_past_max_connections_get_unavailable,
);
