//! A Rust client against a Rust server, over a real socket: sizes across the inline/shared
//! memory boundary, bincode, Events both ways, errors, the blocking client, and that no memfd
//! mapping is left once both sides are gone.

mod common;
use common::{memfd_maps, wait_bound};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hintens::{blocking, HandlerError, IPCClient, Reply, Request, Server};

fn sock(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("hintens-rs-rt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(format!("{tag}.sock"))
}

async fn handler(r: Request) -> Result<Reply, HandlerError> {
    match &r.payload[..] {
        b"fail" => Err(HandlerError::new("it failed")),
        b"app" => Err(HandlerError::app(4321, "app said no")),
        b"push" => {
            r.peer
                .send_event(b"pushed-1")
                .await
                .map_err(|e| HandlerError::new(e.to_string()))?;
            r.peer
                .send_event(&vec![9u8; 200_000])
                .await
                .map_err(|e| HandlerError::new(e.to_string()))?;
            Ok("pushed".into())
        }
        _ => Ok(r.payload.into()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::await_holding_lock)] // it serializes whole tests, never tasks
async fn async_client_and_server() {
    let _serial = common::serial();
    let path = sock("async");
    let events = Arc::new(AtomicUsize::new(0));
    let ev = events.clone();
    let server = Server::new(&path, handler).on_event(move |p, _| {
        ev.fetch_add(p.len(), Ordering::SeqCst);
    });
    let handle = server.handle();
    let task = tokio::spawn(server.serve());
    wait_bound(&path);
    let mode = std::fs::metadata(&path)
        .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()))
        .unwrap();
    assert_eq!(mode & 0o777, 0o600);

    let client = IPCClient::connect(&path).await.unwrap();
    for n in [0usize, 1, 65535, 65536, 1 << 20, 3 << 20] {
        let p: Vec<u8> = (0..n).map(|i| (i * 7 % 253) as u8).collect();
        let a = client.send_bytes(&p).await.unwrap();
        assert_eq!(a.len(), n);
        assert!(*a == *p, "size {n}");
        assert_eq!(a.is_shared(), n >= 65536, "size {n}");
    }
    let (sent, received) = client.shm_counts();
    assert_eq!((sent, received), (3, 3));

    let s: String = client.send("Hello from Rust!").await.unwrap();
    assert_eq!(s, "Hello from Rust!");
    let v: Vec<u8> = client.send(vec![0u8; 1024 * 1024]).await.unwrap();
    assert_eq!(v.len(), 1024 * 1024);

    let e = client.send_bytes(b"fail").await.unwrap_err();
    assert_eq!(e.code(), Some(hintens::ErrorCode::HandlerError));
    assert_eq!(e.message(), Some("it failed"));
    let e = client.send_bytes(b"app").await.unwrap_err();
    assert_eq!(e.code().map(|c| c.as_u32()), Some(4321));

    let got: Arc<Mutex<Vec<usize>>> = Arc::default();
    let g = got.clone();
    client.on_event(move |p| g.lock().unwrap().push(p.len()));
    client.send_event(b"abc").await.unwrap();
    client.send_event(&vec![1u8; 100_000]).await.unwrap();
    let a = client.send_bytes(b"push").await.unwrap();
    assert_eq!(&a[..], b"pushed");
    assert_eq!(*got.lock().unwrap(), vec![8, 200_000]);
    assert_eq!(events.load(Ordering::SeqCst), 100_003);

    // Broadcast reaches every connected client.
    let other = IPCClient::connect(&path).await.unwrap();
    let seen: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    let s2 = seen.clone();
    other.on_event(move |p| s2.lock().unwrap().push(p.to_vec()));
    assert_eq!(&other.send_bytes(b"hello").await.unwrap()[..], b"hello");
    got.lock().unwrap().clear();
    assert_eq!(handle.broadcast(b"to all").await, 2);
    // broadcast() returned once the Event was written to each socket, so the answer to a later
    // request arrives after it on the same stream: by then the Event has been handled.
    other.send_bytes(b"sync").await.unwrap();
    client.send_bytes(b"sync").await.unwrap();
    assert_eq!(*seen.lock().unwrap(), vec![b"to all".to_vec()]);
    assert_eq!(*got.lock().unwrap(), vec![6]);
    other.close().await;

    // 200 concurrent requests on one connection.
    let client = Arc::new(client);
    let mut tasks = Vec::new();
    for i in 0..200 {
        let c = client.clone();
        tasks.push(tokio::spawn(async move {
            let p = format!("req-{i}");
            assert_eq!(&c.send_bytes(p.as_bytes()).await.unwrap()[..], p.as_bytes());
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    client.close().await;
    assert!(client.send_bytes(b"x").await.is_err());
    drop(client);
    handle.shutdown();
    task.await.unwrap().unwrap();
    assert!(!path.exists(), "shutdown removes the socket file");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(memfd_maps(), 0);
}

#[test]
fn blocking_client() {
    let _serial = common::serial();
    let path = sock("blocking");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let server = Server::new(&path, handler);
    let handle = server.handle();
    rt.spawn(server.serve());
    wait_bound(&path);
    let c = blocking::Client::connect(&path).unwrap();
    let big = vec![5u8; 2 << 20];
    assert!(*c.send_bytes(&big).unwrap() == *big);
    let s: String = c.send("hi").unwrap();
    assert_eq!(s, "hi");
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    c.on_event(move |_| {
        n2.fetch_add(1, Ordering::SeqCst);
    });
    assert_eq!(&c.send_bytes(b"push").unwrap()[..], b"pushed");
    assert_eq!(n.load(Ordering::SeqCst), 2);
    drop(c);
    handle.shutdown();
}

/// A handler may answer with a payload lent by another connection: it is then copied into a
/// segment of this connection (a PEER_SEGMENT echo would name a segment this client never had).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::await_holding_lock)] // it serializes whole tests, never tasks
async fn a_payload_of_another_connection_is_sent_as_a_copy() {
    let _serial = common::serial();
    let path = sock("stash");
    let stash: Arc<Mutex<Option<hintens::Payload>>> = Arc::default();
    let st = stash.clone();
    let server = Server::new(&path, move |r: Request| {
        let st = st.clone();
        async move {
            if &r.payload[..] == b"replay" {
                let p = st
                    .lock()
                    .unwrap()
                    .take()
                    .ok_or_else(|| HandlerError::new("nothing stashed"))?;
                return Ok(Reply::from(p));
            }
            let n = r.payload.len();
            *st.lock().unwrap() = Some(r.payload);
            Ok(Reply::from(format!("stashed {n}")))
        }
    });
    let handle = server.handle();
    let task = tokio::spawn(server.serve());
    wait_bound(&path);
    let one = IPCClient::connect(&path).await.unwrap();
    let two = IPCClient::connect(&path).await.unwrap();
    let big: Vec<u8> = (0..(1usize << 20)).map(|i| (i % 241) as u8).collect();
    assert_eq!(&one.send_bytes(&big).await.unwrap()[..], b"stashed 1048576");
    let back = two.send_bytes(b"replay").await.unwrap();
    assert!(back.is_shared());
    assert!(*back == *big);
    drop(back);
    one.close().await;
    two.close().await;
    handle.shutdown();
    task.await.unwrap().unwrap();
}

/// Shutdown answers every Request already sent, then closes; the socket file goes at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::await_holding_lock)] // it serializes whole tests, never tasks
async fn shutdown_answers_what_was_sent_then_closes() {
    let _serial = common::serial();
    let path = sock("graceful");
    let started = Arc::new(tokio::sync::Notify::new());
    let s2 = started.clone();
    let server = Server::new(&path, move |r: Request| {
        let s2 = s2.clone();
        async move {
            s2.notify_one();
            tokio::time::sleep(Duration::from_millis(20)).await;
            Ok::<Reply, HandlerError>(r.payload.into())
        }
    });
    let handle = server.handle();
    let task = tokio::spawn(server.serve());
    wait_bound(&path);
    let client = Arc::new(IPCClient::connect(&path).await.unwrap());
    let mut calls = Vec::new();
    for i in 0..10 {
        let c = client.clone();
        calls.push(tokio::spawn(async move {
            let p = format!("slow-{i}");
            c.send_bytes(p.as_bytes())
                .await
                .map(|a| a.to_vec() == p.into_bytes())
        }));
    }
    started.notified().await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    handle.shutdown();
    for c in calls {
        assert!(c.await.unwrap().unwrap(), "an answer differs");
    }
    task.await.unwrap().unwrap();
    assert!(!path.exists());
    let e = client.send_bytes(b"after").await.unwrap_err();
    assert!(matches!(e, hintens::Error::Closed(_)), "{e}");
}
