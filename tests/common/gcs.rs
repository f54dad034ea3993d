//! The loopback GCS emulator started by `scripts/test`: fake-gcs-server
//! behind `scripts/gcs-xml-adapter.py`, reached through object_store's GCS
//! client with a service-account key that names the emulator as its
//! `gcs_base_url` and turns OAuth off.
#![allow(dead_code)]

use cairn::{RemoteOptions, RemoteStore};
use std::io::{Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};

/// The emulator's endpoint.
pub fn endpoint() -> String {
    std::env::var("CAIRN_TEST_GCS_ENDPOINT").expect(
        "CAIRN_TEST_GCS_ENDPOINT is not set: run the suite with scripts/test, \
         which starts a loopback GCS emulator",
    )
}

/// A service-account key (JSON) pointing object_store at the emulator.
pub fn service_account_key() -> String {
    format!(
        r#"{{"gcs_base_url":"{}","disable_oauth":true,"client_email":"","private_key":"","private_key_id":""}}"#,
        endpoint()
    )
}

/// object_store options for the emulator.
pub fn options() -> Vec<(String, String)> {
    vec![("service_account_key".to_string(), service_account_key())]
}

/// A fresh, unique bucket name (not created).
pub fn bucket_name(tag: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "cairn-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Send one HTTP/1.1 request to the emulator and return the whole answer.
pub fn http(method: &str, path: &str, body: &str) -> String {
    let ep = endpoint();
    let hostport = ep.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(hostport).expect("connect to GCS emulator");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {hostport}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    resp
}

/// Create a fresh bucket and return its name.
pub fn new_bucket(tag: &str) -> String {
    let name = bucket_name(tag);
    let resp = http("POST", "/storage/v1/b", &format!(r#"{{"name":"{name}"}}"#));
    assert!(
        resp.starts_with("HTTP/1.1 200"),
        "create bucket {name}: {resp}"
    );
    name
}

/// A remote store on a fresh bucket.
pub fn remote(tag: &str, opts: RemoteOptions) -> RemoteStore {
    let bucket = new_bucket(tag);
    RemoteStore::open(&format!("gs://{bucket}/ckpt"), &options(), opts).expect("open gs remote")
}
