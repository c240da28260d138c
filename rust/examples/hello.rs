//! The original design's Rust example, as written. Run a server first, e.g.
//! `cargo run --release --bin hintens-peer serve /tmp/hintens.sock` (it echoes), then
//! `cargo run --example hello`.
#![allow(unused_variables)]

use hintens::IPCClient;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let client = IPCClient::connect("/tmp/hintens.sock").await?;

    // Send small message
    let response: String = client.send("Hello from Rust!").await?;

    // Send large data via shared memory
    let large_data = vec![0u8; 1024 * 1024]; // 1MB
    let result: Vec<u8> = client.send(large_data).await?;

    println!("response: {response:?}, result: {} bytes", result.len());
    Ok(())
}
