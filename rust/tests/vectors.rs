//! The vectors of ../tests/vectors/*.json (PROTOCOL.md section 12) against this crate: every
//! vector of every file except ring.json, of which only what applies to a crate without the
//! ring is checked (`ring_vectors`: the hello's RING bit, and the switches as control Events).

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::Duration;

use hintens::shm::{decide, Decision, FdInfo, Lent, ReceiverView};
use hintens::wire::{self, Control, Descriptor, FrameDecoder, Header, Hello};
use hintens::{ClientOptions, HandlerError, Limits, Reply, Request, Server, ServerOptions};
use serde_json::Value;

fn load(name: &str) -> Value {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/vectors")
        .join(name);
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).unwrap()
}

fn hex(v: &Value) -> Vec<u8> {
    let s = v.as_str().expect("hex string");
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a u64: {v}"))
}

fn arr(v: &Value) -> &Vec<Value> {
    v.as_array().expect("array")
}

#[test]
fn crc16_vectors() {
    let d = load("crc16.json");
    for v in arr(&d["vectors"]) {
        assert_eq!(
            hintens::crc16::crc16(&hex(&v["input"])) as u64,
            u(&v["crc"]),
            "{}",
            v["name"]
        );
    }
    for v in arr(&d["patterns"]) {
        let (mul, add, m) = (u(&v["mul"]), u(&v["add"]), u(&v["mod"]));
        let data: Vec<u8> = (0..u(&v["length"]))
            .map(|i| ((mul * i + add) % m) as u8)
            .collect();
        assert_eq!(hintens::crc16::crc16(&data) as u64, u(&v["crc"]), "{}", v["name"]);
    }
}

#[test]
fn header_vectors() {
    let d = load("headers.json");
    for v in arr(&d["headers"]) {
        let h = Header {
            version: u(&v["version"]) as u16,
            mtype: u(&v["type"]) as u32,
            flags: u(&v["flags"]) as u16,
            length: u(&v["length"]) as u32,
            checksum: u(&v["checksum"]) as u16,
            request_id: u(&v["request_id"]),
        };
        let bytes = hex(&v["hex"]);
        assert_eq!(h.encode().to_vec(), bytes, "{}", v["name"]);
        assert_eq!(Header::parse(bytes[..].try_into().unwrap()), h, "{}", v["name"]);
    }
}

fn frame_matches(f: &wire::Frame, v: &Value) -> bool {
    f.mtype as u64 == u(&v["type"])
        && f.flags as u64 == u(&v["flags"])
        && f.version as u64 == u(&v["version"])
        && f.request_id == u(&v["request_id"])
        && f.payload == hex(&v["payload"])
}

/// Decodes `stream` fed in chunks of `chunk` bytes: the frames, then the first error and the
/// stream offset at which it was reported (byte-exact when `chunk` is 1), then the frames after.
fn decode(
    stream: &[u8],
    max_payload: u32,
    chunk: usize,
) -> (
    Vec<wire::Frame>,
    Option<(wire::DecodeError, usize)>,
    Vec<wire::Frame>,
) {
    let mut dec = FrameDecoder::new(max_payload);
    let (mut before, mut after, mut err) = (Vec::new(), Vec::new(), None);
    let mut fed = 0;
    while fed < stream.len() {
        let end = (fed + chunk).min(stream.len());
        dec.feed(&stream[fed..end]);
        fed = end;
        loop {
            match dec.next_frame() {
                Ok(Some(f)) => {
                    if err.is_some() {
                        after.push(f)
                    } else {
                        before.push(f)
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    if err.is_none() {
                        let fatal = e.fatal;
                        err = Some((e, fed));
                        if fatal {
                            return (before, err, after);
                        }
                    } else if e.fatal {
                        return (before, err, after);
                    }
                }
            }
        }
    }
    (before, err, after)
}

#[test]
fn frame_vectors() {
    let d = load("frames.json");
    for v in arr(&d["frames"]) {
        let bytes = hex(&v["frame"]);
        let enc = wire::encode_frame(
            u(&v["type"]) as u8,
            u(&v["flags"]) as u16,
            u(&v["request_id"]),
            &hex(&v["payload"]),
        );
        if u(&v["version"]) == 0x0100 {
            assert_eq!(enc, bytes, "{}", v["name"]);
        }
        for chunk in [bytes.len(), 1] {
            let (frames, err, _) = decode(&bytes, wire::DEFAULT_MAX_PAYLOAD, chunk);
            assert!(err.is_none(), "{}: {:?}", v["name"], err);
            assert_eq!(frames.len(), 1, "{}", v["name"]);
            assert!(frame_matches(&frames[0], v), "{}", v["name"]);
        }
    }
    for v in arr(&d["streams"]) {
        let bytes = hex(&v["stream"]);
        for chunk in [bytes.len(), 1, 7] {
            let (frames, err, _) = decode(&bytes, wire::DEFAULT_MAX_PAYLOAD, chunk);
            assert!(err.is_none(), "{}", v["name"]);
            let want = arr(&v["frames"]);
            assert_eq!(frames.len(), want.len(), "{}", v["name"]);
            for (f, w) in frames.iter().zip(want) {
                assert!(frame_matches(f, w), "{}", v["name"]);
            }
        }
    }
}

#[test]
fn malformed_vectors() {
    let d = load("malformed.json");
    for v in arr(&d["cases"]) {
        let name = &v["name"];
        let stream = hex(&v["stream"]);
        let max = u(&v["max_payload"]) as u32;
        for chunk in [stream.len().max(1), 1] {
            let (before, err, after) = decode(&stream, max, chunk);
            let want_before = arr(&v["frames_before"]);
            assert_eq!(before.len(), want_before.len(), "{name} (chunk {chunk})");
            for (f, w) in before.iter().zip(want_before) {
                assert!(frame_matches(f, w), "{name}");
            }
            if v["error"].is_null() {
                assert!(err.is_none(), "{name}: {err:?}");
                continue;
            }
            let (e, at) = err.unwrap_or_else(|| panic!("{name}: no error"));
            let we = &v["error"];
            assert_eq!(e.code as u64, u(&we["code"]), "{name}");
            assert_eq!(e.fatal, we["fatal"].as_bool().unwrap(), "{name}");
            assert_eq!(e.request_id, we["request_id"].as_u64(), "{name}");
            if chunk == 1 {
                assert_eq!(at as u64, u(&v["error_at"]), "{name}: error_at");
            }
            if let Some(wa) = v["frames_after"].as_array() {
                assert_eq!(after.len(), wa.len(), "{name} frames_after (chunk {chunk})");
                for (f, w) in after.iter().zip(wa) {
                    assert!(frame_matches(f, w), "{name}");
                }
            }
        }
    }
}

#[test]
fn hello_vectors() {
    let d = load("hellos.json");
    for v in arr(&d["hellos"]) {
        let name = &v["name"];
        let payload = hex(&v["payload"]);
        let got = Hello::decode(&payload);
        assert_eq!(got.is_some(), v["understood"].as_bool().unwrap(), "{name}");
        let Some(h) = got else { continue };
        assert_eq!(h.minor as u64, u(&v["minor"]), "{name}");
        assert_eq!(h.features as u64, u(&v["features"]), "{name}");
        assert_eq!(h.max_payload as u64, u(&v["max_payload"]), "{name}");
        assert_eq!(h.shm_receive_bytes, u(&v["shm_receive_bytes"]), "{name}");
        assert_eq!(
            h.shm_receive_segments as u64,
            u(&v["shm_receive_segments"]),
            "{name}"
        );
        let entries = wire::hello_entries(&payload).unwrap();
        let want = arr(&v["entries"]);
        assert_eq!(entries.len(), want.len(), "{name}");
        for ((k, val), w) in entries.iter().zip(want) {
            assert_eq!(*k as u64, u(&w[0]), "{name}");
            assert_eq!(val.to_vec(), hex(&w[1]), "{name}");
        }
        if let Some(e) = v.get("encode").filter(|e| !e.is_null()) {
            let h = Hello {
                minor: u(&e["minor"]) as u8,
                features: u(&e["features"]) as u32,
                max_payload: u(&e["max_payload"]) as u32,
                session_id: None,
                instance_id: None,
                shm_receive_bytes: u(&e["shm_receive_bytes"]),
                shm_receive_segments: u(&e["shm_receive_segments"]) as u32,
            };
            let extra: Vec<(u16, Vec<u8>)> = arr(&e["extra_entries"])
                .iter()
                .map(|x| (u(&x[0]) as u16, hex(&x[1])))
                .collect();
            assert_eq!(h.encode_with(&extra), payload, "{name}: encode");
        }
    }
}

#[test]
fn control_vectors() {
    let d = load("control.json");
    for v in arr(&d["controls"]) {
        let name = &v["name"];
        let payload = hex(&v["payload"]);
        let got = wire::decode_control(&payload);
        if v["ignored"].as_bool().unwrap() {
            assert!(got.is_none(), "{name}");
            continue;
        }
        let (kind, ids) = got.unwrap_or_else(|| panic!("{name}: not decoded"));
        assert_eq!(kind.magic(), v["magic"].as_str().unwrap().as_bytes(), "{name}");
        let want: Vec<u32> = arr(&v["ids"]).iter().map(|x| u(x) as u32).collect();
        assert_eq!(ids, want, "{name}");
        assert_eq!(wire::encode_control(kind, &ids), payload, "{name}: encode");
    }
}

#[test]
fn error_payload_vectors() {
    let d = load("errors.json");
    for v in arr(&d["valid"]) {
        let (code, msg, payload) = (
            u(&v["code"]) as u32,
            v["message"].as_str().unwrap(),
            hex(&v["payload"]),
        );
        assert_eq!(wire::encode_error(code, msg), payload, "{}", v["name"]);
        assert_eq!(
            wire::decode_error(&payload),
            Some((code, msg.to_string())),
            "{}",
            v["name"]
        );
    }
    for v in arr(&d["hintens_truncation"]) {
        let payload = hex(&v["payload"]);
        assert_eq!(
            wire::encode_error(u(&v["code"]) as u32, v["message"].as_str().unwrap()),
            payload,
            "{}",
            v["name"]
        );
        let (c, m) = wire::decode_error(&payload).unwrap();
        assert_eq!(
            (c as u64, m.as_str()),
            (u(&v["code"]), v["sent_message"].as_str().unwrap()),
            "{}",
            v["name"]
        );
    }
    for v in arr(&d["invalid_utf8"]) {
        let (c, m) = wire::decode_error(&hex(&v["payload"])).unwrap();
        assert_eq!(c as u64, u(&v["code"]));
        assert!(
            m.starts_with(v["message_prefix"].as_str().unwrap()) && m.contains('\u{FFFD}'),
            "{}",
            v["name"]
        );
    }
    for v in arr(&d["malformed"]) {
        assert_eq!(wire::decode_error(&hex(&v["payload"])), None, "{}", v["name"]);
        assert_eq!(u(&v["reported_code"]), 0);
    }
}

fn idmap(v: &Value) -> HashMap<u32, u64> {
    v.as_object()
        .unwrap()
        .iter()
        .map(|(k, s)| (k.parse().unwrap(), u(s)))
        .collect()
}

#[test]
fn descriptor_vectors() {
    let d = load("descriptors.json");
    for v in arr(&d["descriptors"]) {
        let bytes = hex(&v["hex"]);
        let parsed = Descriptor::parse(&bytes);
        assert_eq!(
            parsed.is_some_and(|p| p.is_valid()),
            v["valid"].as_bool().unwrap(),
            "{}",
            v["name"]
        );
        if let Some(p) = parsed {
            assert_eq!(
                (p.segment_id as u64, p.flags as u64),
                (u(&v["segment_id"]), u(&v["flags"])),
                "{}",
                v["name"]
            );
            assert_eq!(
                (p.size, p.offset, p.length),
                (u(&v["size"]), u(&v["offset"]), u(&v["length"])),
                "{}",
                v["name"]
            );
            assert_eq!(p.encode().to_vec(), bytes);
        }
    }
}

#[test]
fn shm_decision_vectors() {
    let d = load("descriptors.json");
    for v in arr(&d["decisions"]) {
        let name = &v["name"];
        let r = &v["receiver"];
        let features = u(&r["features"]) as u32;
        let peer = if v["peer_hello"].is_null() {
            None
        } else {
            Hello::decode(&hex(&v["peer_hello"]))
        };
        let negotiated = features & 1 != 0 && peer.as_ref().is_some_and(|h| h.features & 1 != 0);
        let mapped = idmap(&r["mapped"]);
        let lent = idmap(&r["lent"]);
        let view = ReceiverView {
            negotiated,
            compression: features & 2 != 0 && peer.as_ref().is_some_and(|h| h.features & 2 != 0),
            shm_receive_bytes: u(&r["shm_receive_bytes"]),
            shm_receive_segments: u(&r["shm_receive_segments"]) as u32,
            mapped: &mapped,
            lent: &lent,
            global: None,
        };
        let f = &v["frame"];
        let fd = if v["fd"].is_null() {
            None
        } else {
            let fdv = &v["fd"];
            let seals: Vec<&str> = arr(&fdv["seals"]).iter().map(|s| s.as_str().unwrap()).collect();
            Some(FdInfo {
                regular: fdv["kind"] != "pipe",
                size: fdv["size"].as_u64().unwrap_or(0),
                seal_shrink: seals.contains(&"SHRINK"),
            })
        };
        let payload = hex(&f["payload"]);
        // A NEW_SEGMENT frame takes the descriptor; another frame's is not its own.
        let takes_fd = Descriptor::parse(&payload).is_some_and(|d| d.flags & wire::NEW_SEGMENT != 0);
        let got = decide(
            &view,
            u(&f["type"]) as u8,
            u(&f["request_id"]),
            u(&f["flags"]) as u16,
            &payload,
            fd.filter(|_| takes_fd),
        );
        let e = &v["expect"];
        let mut mapped_after = mapped.clone();
        match got {
            Decision::Lend { at, offset, length } => {
                assert_eq!(e["outcome"], "lend", "{name}: lent, expected {}", e["outcome"]);
                assert_eq!((offset, length), (u(&e["offset"]), u(&e["length"])), "{name}");
                match at {
                    Lent::Peer { id, new, size } => {
                        assert_eq!(e["hand_back"], "HREL", "{name}");
                        assert_eq!(
                            hex(&e["hand_back_payload"]),
                            wire::encode_control(Control::Release, &[id]),
                            "{name}"
                        );
                        if new {
                            mapped_after.insert(id, size);
                        }
                    }
                    Lent::Own { .. } => assert!(e["hand_back"].is_null(), "{name}"),
                }
            }
            Decision::Refuse {
                code,
                hand_back,
                message,
            } => {
                assert_eq!(Some(code as u64), e["code"].as_u64(), "{name}: {message}");
                match hand_back {
                    None => assert!(e["hand_back"].is_null(), "{name}: expected {}", e["hand_back"]),
                    Some((kind, id)) => {
                        assert_eq!(
                            e["hand_back"].as_str(),
                            Some(std::str::from_utf8(kind.magic()).unwrap()),
                            "{name}"
                        );
                        assert_eq!(
                            hex(&e["hand_back_payload"]),
                            wire::encode_control(kind, &[id]),
                            "{name}"
                        );
                    }
                }
            }
        }
        assert_eq!(mapped_after, idmap(&e["mapped_after"]), "{name}: mapped_after");
    }
}

/// Every frame `s` carries until the peer closes it (5 s at most).
fn frames_until_closed(s: &mut UnixStream) -> Vec<wire::Frame> {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut dec = FrameDecoder::new(64 << 20);
    let mut buf = [0u8; 65536];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => dec.feed(&buf[..n]),
            Err(e) => panic!("the peer did not close the connection: {e}"),
        }
    }
    std::iter::from_fn(|| dec.next_frame().expect("a well-formed stream")).collect()
}

/// The first frame `s` carries (5 s at most).
fn first_frame(s: &mut UnixStream) -> wire::Frame {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut dec = FrameDecoder::new(64 << 20);
    let mut buf = [0u8; 4096];
    loop {
        if let Some(f) = dec.next_frame().expect("a well-formed stream") {
            return f;
        }
        let n = s.read(&mut buf).expect("a frame");
        assert!(n > 0, "closed before its first frame");
        dec.feed(&buf[..n]);
    }
}

/// The features a hello frame announces.
fn hello_features(f: &wire::Frame) -> u32 {
    assert_eq!((f.mtype, f.request_id), (wire::EVENT, 0), "the hello comes first");
    Hello::decode(&f.payload).expect("a hello").features
}

/// ring.json (section 9b) describes the shared-memory ring, which this crate does not
/// implement. What applies to it is checked: `layout.feature_bit` is `FEATURE_RING`, the bit
/// its hellos never set (async and blocking, server and client, with or without shared
/// memory), so RING is never negotiated; and every entry of `switches` (valid or not), sent as
/// a control Event, is an HRNG to its control handling, fatal on a connection without RING
/// (section 8a): the server answers BAD_HEADER with request id 0 and closes (the client side of
/// the rule: tests/client_side.rs). The rest (the memfd's layout, its header, carriers,
/// records, sleep bits, and which switches a ring would accept) is not checked here: only an
/// implementation of the ring can use it.
#[test]
fn ring_vectors() {
    let d = load("ring.json");
    assert_eq!(
        u(&d["layout"]["feature_bit"]),
        wire::FEATURE_RING as u64,
        "layout.feature_bit"
    );
    let switches: Vec<(String, Vec<u8>)> = arr(&d["switches"])
        .iter()
        .map(|v| (v["name"].to_string(), hex(&v["payload"])))
        .collect();
    let valid = arr(&d["switches"]).iter().filter(|v| v["valid"] == true).count();
    assert!(valid > 0 && valid < switches.len(), "valid and invalid switches");
    for (name, payload) in &switches {
        assert!(wire::is_ring_switch(payload), "{name}: not taken for an HRNG");
    }
    let release = wire::encode_control(Control::Release, &[1]);
    for other in [&b""[..], b"HRN", b"HRNX\x02\0\0\0\0\x10\0\0\0\0\0\0", &release] {
        assert!(!wire::is_ring_switch(other), "{other:?} taken for an HRNG");
    }

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let _enter = rt.enter();
    let dir = std::env::temp_dir().join(format!("hintens-rs-vec-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for blocking in [false, true] {
        for shm in [false, true] {
            let limits = Limits {
                shm,
                ..Default::default()
            };
            // The server: its hello, and its answer to each switch.
            let path = dir.join(format!("ring-s-{blocking}-{shm}.sock"));
            let opts = ServerOptions {
                limits: limits.clone(),
                ..Default::default()
            };
            let server = if blocking {
                Server::with_options_blocking(&path, |r: Request| Ok(r.payload.into()), opts)
            } else {
                Server::with_options(
                    &path,
                    |r: Request| async move { Ok::<Reply, HandlerError>(r.payload.into()) },
                    opts,
                )
            };
            let handle = server.handle();
            rt.spawn(server.serve());
            common::wait_bound(&path);
            for (name, payload) in &switches {
                let mut s = UnixStream::connect(&path).unwrap();
                s.write_all(&wire::encode_frame(wire::EVENT, 0, 0, payload))
                    .unwrap();
                let frames = frames_until_closed(&mut s);
                let features = hello_features(&frames[0]);
                assert_eq!(
                    features & wire::FEATURE_RING,
                    0,
                    "the server's hello: {features:#x}"
                );
                let answers: Vec<_> = frames[1..]
                    .iter()
                    .filter(|f| !(f.mtype == wire::EVENT && f.request_id == 0))
                    .collect();
                assert_eq!(answers.len(), 1, "{name} (blocking {blocking}): {answers:?}");
                let (code, message) = wire::decode_error(&answers[0].payload).unwrap();
                assert_eq!(
                    (answers[0].mtype, answers[0].request_id, code),
                    (wire::ERROR, 0, wire::code::BAD_HEADER),
                    "{name} (blocking {blocking}): {message}"
                );
            }
            handle.shutdown();
            // The client: its hello.
            let path = dir.join(format!("ring-c-{blocking}-{shm}.sock"));
            let _ = std::fs::remove_file(&path);
            let listener = UnixListener::bind(&path).unwrap();
            let opts = ClientOptions {
                limits: limits.clone(),
                ..Default::default()
            };
            let (mut s, close): (UnixStream, Box<dyn FnOnce()>) = if blocking {
                let c = hintens::blocking::Client::connect_with(&path, opts).unwrap();
                (listener.accept().unwrap().0, Box::new(move || c.close()))
            } else {
                let c = rt
                    .block_on(hintens::IPCClient::connect_with(&path, opts))
                    .unwrap();
                let rt = rt.handle().clone();
                (
                    listener.accept().unwrap().0,
                    Box::new(move || rt.block_on(c.close())),
                )
            };
            let features = hello_features(&first_frame(&mut s));
            assert_eq!(
                features & wire::FEATURE_RING,
                0,
                "the client's hello: {features:#x}"
            );
            close();
            let _ = std::fs::remove_file(&path);
        }
    }
}
