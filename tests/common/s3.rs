//! The loopback S3-compatible server started by `scripts/test`.
#![allow(dead_code)]

use cairn::{RemoteOptions, RemoteStore};
use std::io::{Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};

/// The server's endpoint.
pub fn endpoint() -> String {
    std::env::var("CAIRN_TEST_S3_ENDPOINT").expect(
        "CAIRN_TEST_S3_ENDPOINT is not set: run the suite with scripts/test, \
         which starts a loopback S3-compatible server",
    )
}

/// object_store options for the server.
pub fn options() -> Vec<(String, String)> {
    [
        ("endpoint", endpoint()),
        ("allow_http", "true".into()),
        ("region", "us-east-1".into()),
        ("access_key_id", "cairn-test".into()),
        ("secret_access_key", "cairn-test-secret".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// Create a fresh bucket and return its name.
pub fn new_bucket(tag: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let name = format!(
        "cairn-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    );
    let ep = endpoint();
    let hostport = ep.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(hostport).expect("connect to S3 server");
    write!(
        s,
        "PUT /{name} HTTP/1.1\r\nHost: {hostport}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    assert!(
        resp.starts_with("HTTP/1.1 200"),
        "create bucket {name}: {resp}"
    );
    name
}

/// A remote store on a fresh bucket.
pub fn remote(tag: &str, opts: RemoteOptions) -> RemoteStore {
    let bucket = new_bucket(tag);
    RemoteStore::open(&format!("s3://{bucket}/ckpt"), &options(), opts).expect("open s3 remote")
}
