//! The Rust peer of the cross-language contract (tests/ports/README.md): `serve`, `client`
//! scenarios, `bench`, `floor-serve`, `floor-bench` and `memcpy`.

use std::io::{Read, Write};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hintens::{Error, HandlerError, IPCClient, Payload, Reply, Request, Server};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Debug, PartialEq, Clone)]
struct Quote {
    id: u64,
    price: f64,
    venue: String,
    sizes: Vec<u32>,
}

fn pattern(n: usize) -> Vec<u8> {
    let block: Vec<u8> = (0..251u32).map(|i| ((i * 31 + 7) % 251) as u8).collect();
    let mut v = Vec::with_capacity(n);
    while v.len() < n {
        let k = (n - v.len()).min(251);
        v.extend_from_slice(&block[..k]);
    }
    v
}

fn json_str(s: &str) -> String {
    let mut o = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if (c as u32) < 0x20 => o.push_str(&format!("\\u{:04x}", c as u32)),
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

struct Failed(String);

impl From<Error> for Failed {
    fn from(e: Error) -> Self {
        Failed(format!("hintens error: {e}"))
    }
}

fn check(cond: bool, what: impl Into<String>) -> Result<(), Failed> {
    if cond {
        Ok(())
    } else {
        Err(Failed(what.into()))
    }
}

fn ready() {
    println!("READY {}", std::process::id());
    std::io::stdout().flush().unwrap();
}

// -- serve ------------------------------------------------------------------------------------

/// The echo handler of the peer contract, for the blocking server (a thread per connection).
fn handle(req: Request) -> Result<Reply, HandlerError> {
    let p: &[u8] = &req.payload;
    if let Some(rest) = p.strip_prefix(b"err:") {
        return Err(HandlerError::new(format!(
            "boom: {}",
            String::from_utf8_lossy(rest)
        )));
    }
    if let Some(rest) = p.strip_prefix(b"app:") {
        let s = String::from_utf8_lossy(rest);
        if let Some((c, m)) = s.split_once(':') {
            if let Ok(c) = c.parse::<u32>() {
                if c >= 1000 {
                    return Err(HandlerError::app(c, m));
                }
            }
        }
    }
    if let Some(rest) = p.strip_prefix(b"events:") {
        if let Ok(n) = std::str::from_utf8(rest).unwrap_or("").parse::<u64>() {
            for i in 0..n {
                req.peer
                    .send_event_blocking(format!("ev-{i}").as_bytes())
                    .map_err(|e| HandlerError::new(e.to_string()))?;
            }
            return Ok(format!("sent {n}").into());
        }
    }
    if p == b"count" {
        let (n, b) = (
            EVENTS.load(Ordering::Relaxed),
            EVENT_BYTES.load(Ordering::Relaxed),
        );
        return Ok(format!("{n} {b}").into());
    }
    if let Some(rest) = p.strip_prefix(b"quote:") {
        let mut q: Quote = bincode::deserialize(rest)?;
        q.id += 1;
        q.price *= 2.0;
        q.venue.push('!');
        q.sizes.reverse();
        return Ok(bincode::serialize(&q)?.into());
    }
    Ok(req.payload.into())
}

static EVENTS: AtomicU64 = AtomicU64::new(0);
static EVENT_BYTES: AtomicU64 = AtomicU64::new(0);

/// The same handler for the async server (`serve-async`, for comparisons).
async fn handle_async(req: Request) -> Result<Reply, HandlerError> {
    if let Some(rest) = req.payload.strip_prefix(b"events:") {
        if let Ok(n) = std::str::from_utf8(rest).unwrap_or("").parse::<u64>() {
            for i in 0..n {
                req.peer
                    .send_event(format!("ev-{i}").as_bytes())
                    .await
                    .map_err(|e| HandlerError::new(e.to_string()))?;
            }
            return Ok(format!("sent {n}").into());
        }
    }
    handle(req)
}

/// `serve` runs the blocking server (a thread per connection: the lowest latency);
/// `serve-async` the async one.
async fn serve(path: &str, blocking: bool) -> Result<(), Failed> {
    let server = if blocking {
        Server::new_blocking(path, handle)
    } else {
        Server::new(path, handle_async)
    };
    let server = server.on_event(|p: Payload, _| {
        EVENTS.fetch_add(1, Ordering::Relaxed);
        EVENT_BYTES.fetch_add(p.len() as u64, Ordering::Relaxed);
    });
    let handle = server.handle();
    let task = tokio::spawn(server.serve());
    // serve() binds at once; wait until the socket exists before announcing it.
    let t0 = Instant::now();
    while !std::path::Path::new(path).exists() {
        if task.is_finished() || t0.elapsed() > Duration::from_secs(5) {
            return Err(Failed("the server did not bind".into()));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    ready();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| Failed(e.to_string()))?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    handle.shutdown();
    match task.await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.into()),
        Err(e) => Err(Failed(e.to_string())),
    }
}

// -- client scenarios -------------------------------------------------------------------------

fn expect_code(
    r: Result<Payload, Error>,
    code: u32,
    msg_check: impl Fn(&str) -> bool,
    what: &str,
) -> Result<(), Failed> {
    match r {
        Ok(p) => Err(Failed(format!(
            "{what}: expected error {code}, got an answer of {} bytes",
            p.len()
        ))),
        Err(e) => {
            let c = e.code().map(|c| c.as_u32());
            check(c == Some(code), format!("{what}: expected code {code}, got {e}"))?;
            check(
                msg_check(e.message().unwrap_or("")),
                format!("{what}: unexpected message: {e}"),
            )
        }
    }
}

async fn scenario(path: &str, name: &str) -> Result<String, Failed> {
    let client = Arc::new(IPCClient::connect(path).await?);
    let out = match name {
        "sizes" => {
            for n in [0usize, 1, 65535, 65536, 1 << 20, 64 << 20] {
                let p = pattern(n);
                let a = client.send_bytes(&p).await?;
                check(a.len() == n && *a == *p, format!("size {n}: the echo differs"))?;
            }
            let (s, r) = client.shm_counts();
            format!("{{\"ok\": true, \"shm_sent\": {s}, \"shm_received\": {r}}}")
        }
        "pipeline" => {
            let mut tasks = Vec::new();
            for i in 0..1000 {
                let c = client.clone();
                tasks.push(tokio::spawn(async move {
                    let p = format!("p-{i}");
                    let a = c.send_bytes(p.as_bytes()).await?;
                    Ok::<bool, Error>(*a == *p.as_bytes())
                }));
            }
            for (i, t) in tasks.into_iter().enumerate() {
                let ok = t.await.map_err(|e| Failed(e.to_string()))??;
                check(ok, format!("pipeline: answer {i} differs"))?;
            }
            "{\"ok\": true, \"count\": 1000}".to_string()
        }
        "errors" => {
            expect_code(
                client.send_bytes(b"err:x").await,
                5,
                |m| m.contains("boom: x"),
                "err:x",
            )?;
            expect_code(
                client.send_bytes(b"app:1234:custom").await,
                1234,
                |m| m == "custom",
                "app:1234",
            )?;
            let a = client.send_bytes(b"ok").await?;
            check(*a == *b"ok", "ok did not echo")?;
            "{\"ok\": true}".to_string()
        }
        "badcrc" => {
            let rid = 1u64 << 40;
            let mut frame = hintens::wire::encode_frame(hintens::wire::REQUEST, 0, rid, b"bad");
            frame[14] ^= 0xff;
            frame[15] ^= 0xff;
            expect_code(client.__raw_request(&frame, rid).await, 1, |_| true, "badcrc")?;
            let a = client.send_bytes(b"ok").await?;
            check(*a == *b"ok", "ok did not echo after the bad CRC")?;
            "{\"ok\": true}".to_string()
        }
        "events" => {
            let got: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
            let g = got.clone();
            client.on_event(move |p| g.lock().unwrap().push(p.to_vec()));
            for i in 0..5 {
                client.send_event(format!("c-{i}").as_bytes()).await?;
            }
            let a = client.send_bytes(b"count").await?;
            check(
                *a == *b"5 15",
                format!("count answered {:?}", String::from_utf8_lossy(&a)),
            )?;
            let a = client.send_bytes(b"events:3").await?;
            check(
                *a == *b"sent 3",
                format!("events:3 answered {:?}", String::from_utf8_lossy(&a)),
            )?;
            let got = got.lock().unwrap().clone();
            let want: Vec<Vec<u8>> = (0..3).map(|i| format!("ev-{i}").into_bytes()).collect();
            check(got == want, format!("events received: {got:?}"))?;
            "{\"ok\": true}".to_string()
        }
        "quote" => {
            let q = Quote {
                id: 7,
                price: 9.5,
                venue: "XNAS".into(),
                sizes: vec![100, 200, 300],
            };
            let mut req = b"quote:".to_vec();
            req.extend(bincode::serialize(&q).unwrap());
            let a = client.send_bytes(&req).await?;
            let want = Quote {
                id: 8,
                price: 19.0,
                venue: "XNAS!".into(),
                sizes: vec![300, 200, 100],
            };
            let got: Quote = bincode::deserialize(&a).map_err(|e| Failed(format!("quote: {e}")))?;
            check(got == want, format!("quote answered {got:?}"))?;
            check(
                *a == *bincode::serialize(&want).unwrap(),
                "quote: not exactly its bincode",
            )?;
            "{\"ok\": true}".to_string()
        }
        "kill" => {
            let small = pattern(64);
            let big = pattern(1 << 20);
            let mut i = 0u64;
            let (err, after_ms) = loop {
                let p = if i % 2 == 0 { &small } else { &big };
                let t0 = Instant::now();
                match client.send_bytes(p).await {
                    Ok(a) => {
                        check(*a == **p, "kill: an echo differs before the kill")?;
                        if i == 0 {
                            println!("RUNNING");
                            std::io::stdout().flush().unwrap();
                        }
                    }
                    Err(e) => break (e, t0.elapsed().as_secs_f64() * 1000.0),
                }
                i += 1;
            };
            check(i > 0, format!("kill: the first request failed: {err}"))?;
            check(
                matches!(err, Error::Closed(_)),
                format!("kill: expected a connection-closed error, got {err}"),
            )?;
            check(after_ms < 2000.0, format!("kill: the error took {after_ms} ms"))?;
            client.close().await;
            drop(client);
            let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
            let left = maps.lines().filter(|l| l.contains("/memfd:")).count();
            check(left == 0, format!("kill: {left} memfd mappings left:\n{maps}"))?;
            return Ok(format!(
                "{{\"ok\": true, \"error\": {}, \"after_ms\": {:.1}, \"maps_left\": 0}}",
                json_str(&err.to_string()),
                after_ms
            ));
        }
        other => return Err(Failed(format!("unknown scenario {other}"))),
    };
    client.close().await;
    Ok(out)
}

// -- benchmarks -------------------------------------------------------------------------------

fn count_arg(args: &[String], default: usize) -> usize {
    args.iter()
        .position(|a| a == "--count")
        .and_then(|i| args.get(i + 1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn p99(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() as f64 * 0.99) as usize).min(v.len() - 1)]
}

/// The blocking client: each request is written and its answer read on this thread (no
/// runtime), the fastest client of this crate.
fn bench(path: &str, what: &str, n: usize) -> Result<String, Failed> {
    let client = hintens::blocking::Client::connect(path)?;
    let r = match what {
        "rt64" => {
            let p = pattern(64);
            for _ in 0..2000 {
                client.send_bytes(&p)?;
            }
            let mut t = Vec::with_capacity(n);
            for _ in 0..n {
                let t0 = Instant::now();
                let a = client.send_bytes(&p)?;
                t.push(t0.elapsed().as_secs_f64() * 1e6);
                check(a.len() == 64, "rt64: wrong length")?;
            }
            format!(
                "{{\"median_us\": {:.2}, \"p99_us\": {:.2}, \"n\": {n}}}",
                median(&mut t),
                p99(&mut t)
            )
        }
        "echo64m" => {
            let p = pattern(64 << 20);
            for _ in 0..2 {
                client.send_bytes(&p)?;
            }
            let mut t = Vec::with_capacity(n);
            for _ in 0..n {
                let t0 = Instant::now();
                let a = client.send_bytes(&p)?;
                check(a.len() == p.len(), "echo64m: wrong length")?;
                drop(a);
                t.push(t0.elapsed().as_secs_f64() * 1e3);
            }
            format!("{{\"median_ms\": {:.3}, \"n\": {n}}}", median(&mut t))
        }
        other => return Err(Failed(format!("unknown benchmark {other}"))),
    };
    client.close();
    Ok(r)
}

/// Reads into `buf[*filled..]` (growing `buf` to hold `need` bytes) until `need` bytes are
/// there, taking as much as the socket holds per read.
/// `bench-async SOCKET rt64`: the async client's 64 B round trip (for comparisons).
async fn bench_async_rt64(path: &str, n: usize) -> Result<String, Failed> {
    let client = IPCClient::connect(path).await?;
    let p = pattern(64);
    for _ in 0..2000 {
        client.send_bytes(&p).await?;
    }
    let mut t = Vec::with_capacity(n);
    for _ in 0..n {
        let t0 = Instant::now();
        let a = client.send_bytes(&p).await?;
        t.push(t0.elapsed().as_secs_f64() * 1e6);
        check(a.len() == 64, "rt64: wrong length")?;
    }
    client.close().await;
    Ok(format!(
        "{{\"median_us\": {:.2}, \"p99_us\": {:.2}, \"n\": {n}}}",
        median(&mut t),
        p99(&mut t)
    ))
}

fn read_at_least(
    s: &mut impl Read,
    buf: &mut Vec<u8>,
    filled: &mut usize,
    need: usize,
) -> std::io::Result<()> {
    if buf.len() < need {
        buf.resize(need, 0);
    }
    while *filled < need {
        match s.read(&mut buf[*filled..]) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => *filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The raw floor's server (tests/ports/README.md): a message is a u32 little-endian length and
/// that many bytes; each goes back in one write of one buffer; reads take what the socket
/// holds into one buffer, grown to the largest message (a small message costs one read).
fn floor_serve(path: &str) -> Result<(), Failed> {
    let _ = std::fs::remove_file(path);
    let l = std::os::unix::net::UnixListener::bind(path).map_err(|e| Failed(e.to_string()))?;
    ready();
    for s in l.incoming() {
        let Ok(mut s) = s else { continue };
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            let mut filled = 0usize;
            loop {
                if read_at_least(&mut s, &mut buf, &mut filled, 4).is_err() {
                    return;
                }
                let n = 4 + u32::from_le_bytes(buf[..4].try_into().unwrap()) as usize;
                if read_at_least(&mut s, &mut buf, &mut filled, n).is_err() || s.write_all(&buf[..n]).is_err()
                {
                    return;
                }
                buf.copy_within(n..filled, 0);
                filled -= n;
            }
        });
    }
    Ok(())
}

fn floor_bench(path: &str, what: &str, n: usize) -> Result<String, Failed> {
    let mut s = std::os::unix::net::UnixStream::connect(path).map_err(|e| Failed(e.to_string()))?;
    let (size, warm) = match what {
        "rt64" => (64usize, 2000),
        "echo64m" => (64 << 20, 2),
        other => return Err(Failed(format!("unknown benchmark {other}"))),
    };
    // The message, length and payload, in one buffer: one write.
    let mut msg = (size as u32).to_le_bytes().to_vec();
    msg.extend_from_slice(&pattern(size));
    let mut rbuf = vec![0u8; 4 + size];
    let mut one = |s: &mut std::os::unix::net::UnixStream| -> std::io::Result<()> {
        s.write_all(&msg)?;
        let mut filled = 0;
        read_at_least(s, &mut rbuf, &mut filled, 4)?;
        let n = 4 + u32::from_le_bytes(rbuf[..4].try_into().unwrap()) as usize;
        read_at_least(s, &mut rbuf, &mut filled, n)?;
        if filled != 4 + size {
            return Err(std::io::Error::other("the floor's echo has the wrong length"));
        }
        Ok(())
    };
    let io = |e: std::io::Error| Failed(e.to_string());
    for _ in 0..warm {
        one(&mut s).map_err(io)?;
    }
    let mut t = Vec::with_capacity(n);
    for _ in 0..n {
        let t0 = Instant::now();
        one(&mut s).map_err(io)?;
        t.push(t0.elapsed().as_secs_f64());
    }
    Ok(if what == "rt64" {
        let mut us: Vec<f64> = t.iter().map(|x| x * 1e6).collect();
        format!(
            "{{\"median_us\": {:.2}, \"p99_us\": {:.2}, \"n\": {n}}}",
            median(&mut us),
            p99(&mut us)
        )
    } else {
        let mut ms: Vec<f64> = t.iter().map(|x| x * 1e3).collect();
        format!("{{\"median_ms\": {:.3}, \"n\": {n}}}", median(&mut ms))
    })
}

fn memcpy() -> String {
    let src = pattern(64 << 20);
    let mut dst = vec![1u8; 64 << 20];
    let mut t = Vec::new();
    for _ in 0..10 {
        let t0 = Instant::now();
        dst.copy_from_slice(std::hint::black_box(&src));
        std::hint::black_box(&mut dst);
        t.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    format!("{{\"memcpy64m_ms\": {:.3}}}", median(&mut t))
}

fn usage() -> Failed {
    Failed("usage: hintens-peer serve SOCKET | serve-async SOCKET | bench-async SOCKET rt64 [--count N] | client SOCKET SCENARIO | bench SOCKET rt64|echo64m [--count N] | floor-serve SOCKET | floor-bench SOCKET rt64|echo64m [--count N] | memcpy".into())
}

fn run(args: &[String]) -> Result<Option<String>, Failed> {
    // One thread: the reader task, the caller and (on the server) the worker meet on it, so a
    // round trip costs no cross-thread wake-up.
    let rt = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Failed(e.to_string()))
    };
    match args.first().map(String::as_str) {
        Some("serve") if args.len() >= 2 => rt()?.block_on(serve(&args[1], true)).map(|_| None),
        Some("serve-async") if args.len() >= 2 => rt()?.block_on(serve(&args[1], false)).map(|_| None),
        Some("bench-async") if args.len() >= 3 && args[2] == "rt64" => {
            let n = count_arg(args, 20000);
            let path = args[1].clone();
            // As a spawned task, the measured loop and the reader task share the run queue.
            rt()?
                .block_on(async move { tokio::spawn(async move { bench_async_rt64(&path, n).await }).await })
                .map_err(|e| Failed(e.to_string()))?
                .map(Some)
        }
        Some("client") if args.len() >= 3 => rt()?.block_on(scenario(&args[1], &args[2])).map(Some),
        Some("bench") if args.len() >= 3 => {
            let n = count_arg(args, if args[2] == "rt64" { 20000 } else { 10 });
            bench(&args[1], &args[2], n).map(Some)
        }
        Some("floor-serve") if args.len() >= 2 => floor_serve(&args[1]).map(|_| None),
        Some("floor-bench") if args.len() >= 3 => {
            let n = count_arg(args, if args[2] == "rt64" { 20000 } else { 10 });
            floor_bench(&args[1], &args[2], n).map(Some)
        }
        Some("memcpy") => Ok(Some(memcpy())),
        _ => Err(usage()),
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(Some(out)) => {
            println!("{out}");
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(Failed(why)) => {
            eprintln!("hintens-peer: {why}");
            ExitCode::FAILURE
        }
    }
}
