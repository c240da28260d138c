//! The client against scripted raw-socket servers: what it does with bad answers, with
//! Requests sent to it, with an HRNG (fatal: RING is never negotiated), and how its shared-memory pool obeys the server's hello (keys 6, 7):
//! waiting for a release, reusing a segment, retiring one (HRET before the new NEW_SEGMENT).

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::Duration;

use hintens::wire::{self, Descriptor, FrameDecoder, Hello, EVENT, REQUEST, RESPONSE};
use hintens::{ClientOptions, Error, ErrorCode, IPCClient};

/// A raw server end: frames in (with the descriptors that came), frames out.
struct Raw {
    s: UnixStream,
    dec: FrameDecoder,
    fds: Vec<OwnedFd>,
}

impl Raw {
    fn recv_some(&mut self) -> bool {
        let mut buf = vec![0u8; 1 << 16];
        // SAFETY: recvmsg into a local buffer and control buffer; descriptors wrapped at once.
        unsafe {
            let mut iov = libc::iovec {
                iov_base: buf.as_mut_ptr() as *mut _,
                iov_len: buf.len(),
            };
            let mut cbuf = [0u64; 16];
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = cbuf.as_mut_ptr() as *mut _;
            msg.msg_controllen = std::mem::size_of_val(&cbuf) as _;
            let n = libc::recvmsg(self.s.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC);
            if n <= 0 {
                return false;
            }
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_type == libc::SCM_RIGHTS {
                    self.fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(
                        libc::CMSG_DATA(c) as *const i32
                    )));
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
            self.dec.feed(&buf[..n as usize]);
        }
        true
    }

    /// The next frame (control Events included, the client's hello excluded).
    fn next(&mut self) -> Option<wire::Frame> {
        loop {
            match self.dec.next_frame() {
                Ok(Some(f)) if f.mtype == EVENT && f.request_id == 0 && f.payload.starts_with(b"HELO") => {}
                Ok(Some(f)) => return Some(f),
                Ok(None) => {
                    if !self.recv_some() {
                        return None;
                    }
                }
                Err(e) => panic!("client sent a bad frame: {e:?}"),
            }
        }
    }

    fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).unwrap();
    }
}

/// Listens on a fresh socket named for `tag` and runs `serve` on a thread for the one
/// connection it accepts (reads time out after `timeout`).
fn spawn_raw<S>(tag: &str, timeout: Duration, serve: S) -> (PathBuf, std::thread::JoinHandle<()>)
where
    S: FnOnce(Raw) + Send + 'static,
{
    let dir = std::env::temp_dir().join(format!("hintens-rs-cs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{tag}.sock"));
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).unwrap();
    let t = std::thread::spawn(move || {
        let (s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(timeout)).unwrap();
        serve(Raw {
            s,
            dec: FrameDecoder::new(64 << 20),
            fds: Vec::new(),
        });
    });
    (path, t)
}

/// Runs `script` as a raw server that announced `hello`, and `client` against it.
fn with_raw_server<F, C>(tag: &str, hello: Hello, script: F, client: C)
where
    F: FnOnce(&mut Raw) + Send + 'static,
    C: FnOnce(PathBuf) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()>>>,
{
    let (path, t) = spawn_raw(tag, Duration::from_secs(10), move |mut raw| {
        raw.send(&wire::encode_frame(EVENT, 0, 0, &hello.encode()));
        script(&mut raw);
        // Drain until the client closes.
        let mut b = [0u8; 4096];
        while matches!(raw.s.read(&mut b), Ok(n) if n > 0) {}
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(client(path));
    t.join().unwrap();
}

/// As [`with_raw_server`], for a blocking client.
fn with_raw_server_blocking<F, C>(tag: &str, hello: Hello, script: F, client: C)
where
    F: FnOnce(&mut Raw) + Send + 'static,
    C: FnOnce(PathBuf),
{
    with_raw_server(tag, hello, script, move |path| {
        client(path);
        Box::pin(async {})
    });
}

fn shm_hello(bytes: u64, segments: u32) -> Hello {
    Hello {
        features: wire::FEATURE_SHM,
        shm_receive_bytes: bytes,
        shm_receive_segments: segments,
        ..Default::default()
    }
}

#[test]
fn bad_answers_fail_their_request_and_the_connection_survives() {
    with_raw_server("bad", Hello::default(), bad_answers_script, |path| {
        Box::pin(async move {
            let c = IPCClient::connect(&path).await.unwrap();
            let e = c.send_bytes(b"1").await.unwrap_err();
            assert_eq!(e.code(), Some(ErrorCode::Checksum), "{e}");
            let e = c.send_bytes(b"2").await.unwrap_err();
            assert_eq!(e.code(), Some(ErrorCode::Generic), "{e}");
            let e = c.send_bytes(b"3").await.unwrap_err();
            assert_eq!(e.code(), Some(ErrorCode::UnsupportedFlags), "{e}");
            assert_eq!(&c.send_bytes(b"4").await.unwrap()[..], b"fine");
            let e = c.send_bytes(b"5").await.unwrap_err();
            assert_eq!(e.code(), Some(ErrorCode::ShmError), "{e}");
            assert_eq!(&c.send_bytes(b"6").await.unwrap()[..], b"still here");
            c.close().await;
        })
    });
}

#[test]
fn the_pool_waits_for_releases_reuses_segments_and_retires_before_growing() {
    const MIB: u64 = 1 << 20;
    with_raw_server(
        "pool",
        // The server maps at most one segment of ours, of at most 2 MiB.
        shm_hello(2 * MIB, 1),
        pool_script,
        |path| {
            Box::pin(async move {
                let opts = ClientOptions {
                    timeout: Duration::from_millis(300),
                    ..Default::default()
                };
                let c = IPCClient::connect_with(&path, opts).await.unwrap();
                let mib = vec![7u8; 1 << 20];
                assert_eq!(&c.send_bytes(&mib).await.unwrap()[..], b"one");
                let e = c.send_bytes(&mib).await.unwrap_err();
                assert!(matches!(e, Error::Timeout(_)), "{e}");
                tokio::time::sleep(Duration::from_millis(500)).await;
                assert_eq!(
                    &c.send_bytes_timeout(&mib, Duration::from_secs(5)).await.unwrap()[..],
                    b"three"
                );
                let big = vec![8u8; 3 << 19];
                assert_eq!(
                    &c.send_bytes_timeout(&big, Duration::from_secs(5)).await.unwrap()[..],
                    b"four"
                );
                c.close().await;
            })
        },
    );
}

#[test]
fn over_the_peer_limit_without_shm_is_refused_before_sending() {
    with_raw_server(
        "limit",
        Hello {
            max_payload: 1000,
            ..Default::default()
        },
        |raw| {
            let f = raw.next().unwrap();
            assert_eq!(f.payload, b"small");
            raw.send(&wire::encode_frame(RESPONSE, 0, f.request_id, b"ok"));
        },
        |path| {
            Box::pin(async move {
                let c = IPCClient::connect(&path).await.unwrap();
                // Wait for the hello to arrive (a small send first).
                tokio::time::sleep(Duration::from_millis(100)).await;
                let e = c.send_bytes(&[0u8; 1001]).await.unwrap_err();
                assert!(
                    matches!(
                        e,
                        Error::TooLarge {
                            len: 1001,
                            limit: 1000
                        }
                    ),
                    "{e}"
                );
                assert_eq!(&c.send_bytes(b"small").await.unwrap()[..], b"ok");
                c.close().await;
            })
        },
    );
}

fn sealed_memfd(name: &std::ffi::CStr, data: &[u8]) -> OwnedFd {
    // SAFETY: plain syscalls on a descriptor we own.
    unsafe {
        let fd = OwnedFd::from_raw_fd(libc::memfd_create(
            name.as_ptr(),
            libc::MFD_ALLOW_SEALING | libc::MFD_CLOEXEC,
        ));
        assert_eq!(
            libc::write(fd.as_raw_fd(), data.as_ptr() as *const _, data.len()),
            data.len() as isize
        );
        let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        assert_eq!(libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals), 0);
        fd
    }
}

fn send_with_fd(s: &UnixStream, b: &[u8], fd: &OwnedFd) {
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
        assert_eq!(libc::sendmsg(s.as_raw_fd(), &msg, 0), b.len() as isize);
    }
}

#[test]
fn a_shared_answer_is_released_only_when_the_payload_is_dropped() {
    with_raw_server(
        "guard",
        shm_hello(1 << 30, 64),
        |raw| {
            let f = raw.next().unwrap();
            let data: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
            let fd = sealed_memfd(c"srv-guard", &data);
            let d = Descriptor {
                segment_id: 3,
                flags: wire::NEW_SEGMENT,
                size: 8192,
                offset: 100,
                length: 5000,
            };
            send_with_fd(
                &raw.s,
                &wire::encode_frame(RESPONSE, wire::FLAG_SHM, f.request_id, &d.encode()),
                &fd,
            );
            // While the client holds the payload, its next request comes without a release.
            let f = raw.next().unwrap();
            assert_eq!((f.mtype, &f.payload[..]), (REQUEST, &b"while held"[..]));
            raw.send(&wire::encode_frame(RESPONSE, 0, f.request_id, b"ok"));
            // Dropped: HREL for segment 3 (queued for the writer task, so it may come just
            // before or just after the next request).
            let (mut released, mut answered) = (false, false);
            while !(released && answered) {
                let f = raw.next().unwrap();
                if f.mtype == EVENT {
                    assert_eq!(f.payload, wire::encode_control(wire::Control::Release, &[3]));
                    released = true;
                } else {
                    assert_eq!(&f.payload[..], b"after drop");
                    raw.send(&wire::encode_frame(RESPONSE, 0, f.request_id, b"ok"));
                    answered = true;
                }
            }
        },
        |path| {
            Box::pin(async move {
                let c = IPCClient::connect(&path).await.unwrap();
                tokio::time::sleep(Duration::from_millis(50)).await;
                let p = c.send_bytes(b"give me shared").await.unwrap();
                assert!(p.is_shared());
                let want: Vec<u8> = (100..5100u32).map(|i| (i % 251) as u8).collect();
                assert!(*p == *want);
                c.send_bytes(b"while held").await.unwrap();
                drop(p);
                c.send_bytes(b"after drop").await.unwrap();
                c.close().await;
                let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
                assert!(
                    !maps.contains("/memfd:srv-guard"),
                    "the server's segment is unmapped after close"
                );
            })
        },
    );
}

#[test]
fn a_retired_segment_is_unmapped_and_no_longer_accepted() {
    with_raw_server(
        "retire",
        shm_hello(1 << 30, 64),
        |raw| {
            let f = raw.next().unwrap();
            let fd = sealed_memfd(c"srv-retire", &vec![42u8; 4096]);
            let d = Descriptor {
                segment_id: 3,
                flags: wire::NEW_SEGMENT,
                size: 4096,
                offset: 0,
                length: 10,
            };
            send_with_fd(
                &raw.s,
                &wire::encode_frame(RESPONSE, wire::FLAG_SHM, f.request_id, &d.encode()),
                &fd,
            );
            drop(fd);
            // The client dropped it: HREL; then we retire the segment.
            let hrel = raw.next().unwrap();
            assert_eq!(hrel.payload, wire::encode_control(wire::Control::Release, &[3]));
            raw.send(&wire::encode_frame(
                EVENT,
                0,
                0,
                &wire::encode_control(wire::Control::Retire, &[3]),
            ));
            // Naming it again without NEW_SEGMENT: refused, and rejected (it is not mapped).
            let f = raw.next().unwrap();
            let d = Descriptor {
                segment_id: 3,
                flags: 0,
                size: 4096,
                offset: 0,
                length: 10,
            };
            raw.send(&wire::encode_frame(
                RESPONSE,
                wire::FLAG_SHM,
                f.request_id,
                &d.encode(),
            ));
            let hrej = raw.next().unwrap();
            assert_eq!(hrej.payload, wire::encode_control(wire::Control::Reject, &[3]));
            let f = raw.next().unwrap();
            raw.send(&wire::encode_frame(RESPONSE, 0, f.request_id, b"done"));
        },
        |path| {
            Box::pin(async move {
                let c = IPCClient::connect(&path).await.unwrap();
                tokio::time::sleep(Duration::from_millis(50)).await;
                let p = c.send_bytes(b"first").await.unwrap();
                assert_eq!(&p[..], &[42u8; 10]);
                drop(p);
                // The retire arrives after the release; give it a moment, then the mapping is gone.
                tokio::time::sleep(Duration::from_millis(100)).await;
                let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
                assert!(
                    !maps.contains("/memfd:srv-retire"),
                    "retired segment still mapped"
                );
                let e = c.send_bytes(b"again").await.unwrap_err();
                assert_eq!(e.code(), Some(ErrorCode::ShmError), "{e}");
                assert_eq!(&c.send_bytes(b"last").await.unwrap()[..], b"done");
                c.close().await;
            })
        },
    );
}

fn bad_answers_script(raw: &mut Raw) {
    // 1: a Response with a bad CRC.
    let f = raw.next().unwrap();
    let mut bad = wire::encode_frame(RESPONSE, 0, f.request_id, b"answer");
    bad[15] ^= 1;
    raw.send(&bad);
    // 2: a malformed Error payload; 3: a Response with reserved flags.
    let f = raw.next().unwrap();
    raw.send(&wire::encode_frame(wire::ERROR, 0, f.request_id, b"short"));
    let f = raw.next().unwrap();
    raw.send(&wire::encode_frame(RESPONSE, 0x0100, f.request_id, b"x"));
    // 4: the server sends the client a Request (answered UNAVAILABLE), then answers.
    let f = raw.next().unwrap();
    raw.send(&wire::encode_frame(REQUEST, 0, 99, b"serve me"));
    let answer = raw.next().unwrap();
    assert_eq!((answer.mtype, answer.request_id), (wire::ERROR, 99));
    assert_eq!(
        wire::decode_error(&answer.payload).unwrap().0,
        wire::code::UNAVAILABLE
    );
    raw.send(&wire::encode_frame(RESPONSE, 0, f.request_id, b"fine"));
    // 5: an SHM Response although SHM was never negotiated: SHM_ERROR, and HREJ.
    let f = raw.next().unwrap();
    let d = Descriptor {
        segment_id: 5,
        flags: 0,
        size: 4096,
        offset: 0,
        length: 1,
    };
    raw.send(&wire::encode_frame(
        RESPONSE,
        wire::FLAG_SHM,
        f.request_id,
        &d.encode(),
    ));
    let hrej = raw.next().unwrap();
    assert_eq!(hrej.payload, wire::encode_control(wire::Control::Reject, &[5]));
    let f = raw.next().unwrap();
    raw.send(&wire::encode_frame(RESPONSE, 0, f.request_id, b"still here"));
}

fn pool_script(raw: &mut Raw) {
    const MIB: u64 = 1 << 20;
    // 1 MiB: a new 1 MiB segment, with its descriptor. Not released yet.
    let f = raw.next().unwrap();
    let d = Descriptor::parse(&f.payload).unwrap();
    assert_eq!(
        (f.flags, d.flags, d.size, d.length),
        (wire::FLAG_SHM, wire::NEW_SEGMENT, MIB, MIB)
    );
    assert_eq!(raw.fds.len(), 1);
    let first = d.segment_id;
    raw.send(&wire::encode_frame(RESPONSE, 0, f.request_id, b"one"));
    // The client's second send waits for the release (its timeout is 300 ms), fails.
    std::thread::sleep(Duration::from_millis(600));
    raw.send(&wire::encode_frame(
        EVENT,
        0,
        0,
        &wire::encode_control(wire::Control::Release, &[first]),
    ));
    // Third: the same segment again, by id alone.
    let f = raw.next().unwrap();
    let d = Descriptor::parse(&f.payload).unwrap();
    assert_eq!((d.segment_id, d.flags, d.size), (first, 0, MIB));
    assert_eq!(raw.fds.len(), 1, "no new descriptor");
    raw.send(&wire::encode_frame(
        EVENT,
        0,
        0,
        &wire::encode_control(wire::Control::Release, &[first]),
    ));
    raw.send(&wire::encode_frame(RESPONSE, 0, f.request_id, b"three"));
    // 1.5 MiB does not fit beside the 1 MiB segment: HRET first, then a new 2 MiB one.
    let f = raw.next().unwrap();
    assert_eq!(f.payload, wire::encode_control(wire::Control::Retire, &[first]));
    let f = raw.next().unwrap();
    let d = Descriptor::parse(&f.payload).unwrap();
    assert_eq!(
        (d.flags, d.size, d.length),
        (wire::NEW_SEGMENT, 2 * MIB, 3 * MIB / 2)
    );
    assert_ne!(d.segment_id, first);
    assert_eq!(raw.fds.len(), 2);
    raw.send(&wire::encode_frame(RESPONSE, 0, f.request_id, b"four"));
}

#[test]
fn bad_answers_fail_their_request_and_the_blocking_client_survives() {
    with_raw_server_blocking("bad-b", Hello::default(), bad_answers_script, |path| {
        let c = hintens::blocking::Client::connect(&path).unwrap();
        let e = c.send_bytes(b"1").unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::Checksum), "{e}");
        let e = c.send_bytes(b"2").unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::Generic), "{e}");
        let e = c.send_bytes(b"3").unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::UnsupportedFlags), "{e}");
        assert_eq!(&c.send_bytes(b"4").unwrap()[..], b"fine");
        let e = c.send_bytes(b"5").unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::ShmError), "{e}");
        assert_eq!(&c.send_bytes(b"6").unwrap()[..], b"still here");
        c.close();
    });
}

#[test]
fn the_blocking_client_pool_waits_for_releases_reuses_segments_and_retires_before_growing() {
    const MIB: u64 = 1 << 20;
    with_raw_server_blocking("pool-b", shm_hello(2 * MIB, 1), pool_script, |path| {
        let opts = ClientOptions {
            timeout: Duration::from_millis(300),
            ..Default::default()
        };
        let c = hintens::blocking::Client::connect_with(&path, opts).unwrap();
        let mib = vec![7u8; 1 << 20];
        assert_eq!(&c.send_bytes(&mib).unwrap()[..], b"one");
        let e = c.send_bytes(&mib).unwrap_err();
        assert!(matches!(e, Error::Timeout(_)), "{e}");
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(
            &c.send_bytes_timeout(&mib, Duration::from_secs(5)).unwrap()[..],
            b"three"
        );
        let big = vec![8u8; 3 << 19];
        assert_eq!(
            &c.send_bytes_timeout(&big, Duration::from_secs(5)).unwrap()[..],
            b"four"
        );
        c.close();
    });
}

/// A valid HRNG payload (section 9b): layout version 2, a ring of 256 KiB.
fn ring_switch() -> Vec<u8> {
    let mut p = b"HRNG".to_vec();
    p.extend_from_slice(&2u32.to_le_bytes());
    p.extend_from_slice(&262144u64.to_le_bytes());
    p
}

/// A raw server that sends an HRNG although RING was not negotiated (this crate never
/// announces it): after the client's first Request when `pending` (it is never answered), else
/// at once. The client must close without answering (section 8a: fatal).
fn hrng_script(pending: bool) -> impl FnOnce(&mut Raw) + Send + 'static {
    move |raw: &mut Raw| {
        if pending {
            assert_eq!(raw.next().unwrap().mtype, REQUEST);
        }
        raw.send(&wire::encode_frame(EVENT, 0, 0, &ring_switch()));
        // Then only the client's close (or, not pending, a Request it sent before it read the
        // HRNG): never an answer.
        while let Some(f) = raw.next() {
            assert!(
                !pending && f.mtype == REQUEST,
                "after the HRNG the client sent {f:?}"
            );
        }
    }
}

/// The request failed at once, with the end of the connection the HRNG caused.
fn failed_for_the_hrng(r: Result<hintens::Payload, Error>, t0: std::time::Instant) {
    match r {
        Err(Error::Closed(why)) => assert!(why.contains("did not negotiate the ring"), "{why}"),
        r => panic!("want Closed, got {:?}", r.map(|p| p.to_vec())),
    }
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "failed after {:?}",
        t0.elapsed()
    );
}

#[test]
fn an_hrng_fails_the_pending_or_next_request_and_closes() {
    for pending in [true, false] {
        with_raw_server(
            &format!("hrng-{pending}"),
            Hello::default(),
            hrng_script(pending),
            move |path| {
                Box::pin(async move {
                    let c = IPCClient::connect(&path).await.unwrap();
                    if !pending {
                        // The HRNG comes while nothing is in flight: the next request fails.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    let t0 = std::time::Instant::now();
                    failed_for_the_hrng(c.send_bytes(b"x").await, t0);
                    let t0 = std::time::Instant::now();
                    failed_for_the_hrng(c.send_bytes(b"y").await, t0);
                })
            },
        );
    }
}

#[test]
fn an_hrng_fails_the_blocking_clients_pending_or_next_request_and_closes() {
    for pending in [true, false] {
        with_raw_server_blocking(
            &format!("hrng-b-{pending}"),
            Hello::default(),
            hrng_script(pending),
            move |path| {
                let c = hintens::blocking::Client::connect(&path).unwrap();
                if !pending {
                    std::thread::sleep(Duration::from_millis(100));
                }
                let t0 = std::time::Instant::now();
                failed_for_the_hrng(c.send_bytes(b"x"), t0);
                let t0 = std::time::Instant::now();
                failed_for_the_hrng(c.send_bytes(b"y"), t0);
            },
        );
    }
}

/// A server that never sends a hello (sections 1-7 only), echoing Requests inline.
fn no_hello_server(tag: &str) -> (PathBuf, std::thread::JoinHandle<()>) {
    spawn_raw(tag, Duration::from_secs(30), |mut raw| {
        while let Some(f) = raw.next() {
            if f.mtype == REQUEST {
                raw.send(&wire::encode_frame(RESPONSE, 0, f.request_id, &f.payload));
            }
        }
    })
}

/// The client waits for a missing hello until `hello_wait` after connecting, not before
/// every large request: six 100 KB requests take about a second in all, where a wait per
/// send took six. Async and blocking.
#[test]
fn a_server_that_sends_no_hello_is_waited_for_once_per_connection() {
    let big: Vec<u8> = (0..100_000u32).map(|i| (i * 7) as u8).collect();
    let (path, t) = no_hello_server("nohello");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let b = big.clone();
    let elapsed = rt.block_on(async move {
        let c = IPCClient::connect(&path).await.unwrap();
        let started = std::time::Instant::now();
        for _ in 0..6 {
            assert_eq!(&c.send_bytes(&b).await.unwrap()[..], &b[..]);
        }
        let elapsed = started.elapsed();
        drop(c);
        elapsed
    });
    t.join().unwrap();
    assert!(
        elapsed < Duration::from_secs(4),
        "six large requests took {elapsed:?}"
    );

    let (path, t) = no_hello_server("nohello-blocking");
    let c = hintens::blocking::Client::connect(&path).unwrap();
    let started = std::time::Instant::now();
    for _ in 0..6 {
        assert_eq!(&c.send_bytes(&big).unwrap()[..], &big[..]);
    }
    let elapsed = started.elapsed();
    drop(c);
    t.join().unwrap();
    assert!(
        elapsed < Duration::from_secs(4),
        "blocking: six large requests took {elapsed:?}"
    );
}

/// A blocking request that finds the socket full (the server reads nothing for a while):
/// whether its frame went out in part or not at all, it fails with a timeout in time; a torn
/// frame cuts the connection, and every frame the server reads is whole. (The one-thread
/// fast path writes without waiting and hands over to the general path when the socket
/// takes less than the whole frame.)
#[test]
fn a_blocking_request_into_a_full_socket_times_out_and_never_tears_a_frame_silently() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    const TRIES: usize = 8;
    let (go, wait) = std::sync::mpsc::channel::<()>();
    let requests = Arc::new(AtomicUsize::new(0));
    let seen = requests.clone();
    with_raw_server_blocking(
        "full-b",
        Hello::default(),
        move |raw| {
            wait.recv().unwrap();
            // next() panics on a frame that is not whole and valid.
            while let Some(f) = raw.next() {
                if f.mtype == REQUEST {
                    seen.fetch_add(1, Ordering::SeqCst);
                    let _ = raw
                        .s
                        .write_all(&wire::encode_frame(RESPONSE, 0, f.request_id, b"ok"));
                }
            }
        },
        move |path| {
            let timeout = Duration::from_millis(200);
            let c = hintens::blocking::Client::connect_with(
                &path,
                ClientOptions {
                    timeout,
                    ..Default::default()
                },
            )
            .unwrap();
            let big = vec![5u8; 60_000];
            for i in 0..TRIES {
                let t0 = std::time::Instant::now();
                let e = c.send_bytes(&big).unwrap_err();
                let took = t0.elapsed();
                assert!(
                    took < timeout + Duration::from_millis(400),
                    "request {i}: {took:?}"
                );
                match e {
                    Error::Timeout(t) => assert_eq!(t, timeout),
                    Error::Closed(_) => break, // the torn frame cut the connection
                    other => panic!("request {i}: {other}"),
                }
                if c.is_closed() {
                    break;
                }
            }
            go.send(()).unwrap();
            match c.send_bytes_timeout(b"after", Duration::from_secs(5)) {
                Ok(a) => assert_eq!(&a[..], b"ok"),
                Err(Error::Closed(_)) => {}
                Err(e) => panic!("after: {e}"),
            }
            c.close();
        },
    );
    // Some of the large requests never went out whole: the socket was full for them.
    let n = requests.load(Ordering::SeqCst);
    assert!(n < TRIES, "the server read {n} requests");
}

/// A blocking request whose timeout is zero, or already spent, fails with a timeout at once,
/// also when nothing else uses the connection (the one-thread fast path): it never waits in
/// a read with no timeout for an answer that does not come.
#[test]
fn a_blocking_request_with_no_time_left_times_out_at_once() {
    with_raw_server_blocking(
        "zero-b",
        Hello::default(),
        |raw| {
            // Read the requests, answer none.
            while raw.next().is_some() {}
        },
        |path| {
            let c = hintens::blocking::Client::connect(&path).unwrap();
            for _ in 0..3 {
                let t0 = std::time::Instant::now();
                let e = c
                    .send_bytes_timeout(b"never answered", Duration::ZERO)
                    .unwrap_err();
                assert!(matches!(e, Error::Timeout(_)), "{e}");
                assert!(t0.elapsed() < Duration::from_millis(500), "{:?}", t0.elapsed());
            }
            let t0 = std::time::Instant::now();
            let e = c
                .send_bytes_timeout(b"never answered", Duration::from_micros(300))
                .unwrap_err();
            assert!(matches!(e, Error::Timeout(_)), "{e}");
            assert!(t0.elapsed() < Duration::from_millis(500), "{:?}", t0.elapsed());
            c.close();
        },
    );
}

/// The answers a blocking client reads for itself (one thread: the short way) from a hostile
/// server: an answer to an id it never used, two answers to one request, then a header that
/// declares a payload over the limit. Each request gets its own answer, the stray and the
/// repeated one are dropped, and the oversized header ends the connection at once, failing
/// the request that waits with `Closed`.
#[test]
fn a_blocking_client_takes_only_its_own_answers_from_a_hostile_server() {
    with_raw_server_blocking(
        "hostile-solo-b",
        Hello::default(),
        |raw| {
            let f = raw.next().unwrap();
            raw.send(&wire::encode_frame(RESPONSE, 0, f.request_id + 1000, b"nobody's"));
            raw.send(&wire::encode_frame(RESPONSE, 0, f.request_id, b"one"));
            raw.send(&wire::encode_frame(RESPONSE, 0, f.request_id, b"one again"));
            let f = raw.next().unwrap();
            raw.send(&wire::encode_frame(RESPONSE, 0, f.request_id, b"two"));
            let f = raw.next().unwrap();
            let mut h = wire::header_for(RESPONSE, 0, f.request_id, b"");
            h[10..14].copy_from_slice(&u32::MAX.to_be_bytes()); // the length field
            raw.send(&h);
        },
        |path| {
            let c = hintens::blocking::Client::connect(&path).unwrap();
            assert_eq!(&c.send_bytes(b"1").unwrap()[..], b"one");
            assert_eq!(&c.send_bytes(b"2").unwrap()[..], b"two");
            let t0 = std::time::Instant::now();
            let e = c.send_bytes(b"3").unwrap_err();
            assert!(matches!(e, Error::Closed(_)), "{e}");
            assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
            assert!(c.is_closed());
            let e = c.send_bytes(b"4").unwrap_err();
            assert!(matches!(e, Error::Closed(_)), "{e}");
            c.close();
        },
    );
}
