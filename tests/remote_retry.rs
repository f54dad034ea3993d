//! Which remote errors are retried: definite answers fail on the first
//! attempt, transient faults are retried within one time budget per
//! operation. Against the loopback S3-compatible server.

use cairn::testing::{FaultConfig, FaultyObjectStore};
use cairn::{DType, ErrorKind, RemoteOptions, RemoteStore, RetryPolicy, SaveState};
use cairn::{StepSel, Store, StoreOptions, TensorFilter};
use std::io::{Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

fn endpoint() -> String {
    std::env::var("CAIRN_TEST_S3_ENDPOINT").expect("CAIRN_TEST_S3_ENDPOINT is not set")
}

fn s3_options() -> Vec<(String, String)> {
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

fn bucket_name(tag: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "cairn-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

fn new_bucket(tag: &str) -> String {
    let name = bucket_name(tag);
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

fn tensor(step: u64) -> Vec<u8> {
    (0..300_000u32)
        .map(|i| (i as u64).wrapping_mul(step + 7) as u8)
        .collect()
}

fn store_opts() -> StoreOptions {
    StoreOptions {
        chunk_size: 64 << 10,
        staging_bytes: 4 << 20,
        ..StoreOptions::default()
    }
}

#[test]
fn missing_bucket_is_not_found_at_once() {
    let bucket = bucket_name("never-created");
    let url = format!("s3://{bucket}/ckpt");
    let remote = RemoteStore::open(&url, &s3_options(), RemoteOptions::default()).unwrap();
    let err = remote.block_on(remote.runs()).unwrap().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    let msg = err.to_string();
    assert!(msg.contains(&bucket), "{msg}");
    assert!(msg.contains("create it"), "{msg}");
    // A definite answer: no retry at all.
    assert_eq!(remote.metrics().snapshot().retries, 0, "{msg}");
}

#[test]
fn invalid_configuration_is_refused_when_opening() {
    let url = format!("s3://{}/ckpt", bucket_name("cfg"));
    let mut opts = s3_options();
    opts.retain(|(k, _)| k != "allow_http");
    let err = RemoteStore::open(&url, &opts, RemoteOptions::default()).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Invalid, "{err}");
    assert!(err.to_string().contains("allow_http"), "{err}");

    let mut opts = s3_options();
    opts.push(("no_such_option".into(), "1".into()));
    let err = RemoteStore::open(&url, &opts, RemoteOptions::default()).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Invalid, "{err}");
    assert!(err.to_string().contains("no_such_option"), "{err}");

    let mut opts = s3_options();
    opts.push(("timeout".into(), "soon".into()));
    let err = RemoteStore::open(&url, &opts, RemoteOptions::default()).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Invalid, "{err}");
    assert!(err.to_string().contains("soon"), "{err}");
}

fn faulty_remote(fail_before: f64, retry: RetryPolicy) -> (RemoteStore, Arc<FaultyObjectStore>) {
    let bucket = new_bucket("retry");
    let url = format!("s3://{bucket}/ckpt");
    let base = RemoteStore::open(&url, &s3_options(), RemoteOptions::default()).unwrap();
    let faulty = Arc::new(FaultyObjectStore::new(
        base.object_store().clone(),
        FaultConfig {
            fail_before,
            fail_after: 0.0,
            max_delay: Duration::ZERO,
            seed: 7,
        },
    ));
    let remote = RemoteStore::new(
        faulty.clone(),
        "ckpt".into(),
        &url,
        RemoteOptions {
            retry,
            ..RemoteOptions::default()
        },
    );
    (remote, faulty)
}

#[test]
fn transient_faults_are_retried_and_the_upload_succeeds() {
    let (remote, faulty) = faulty_remote(
        0.3,
        RetryPolicy {
            initial_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(10),
            max_attempts: 40,
            ..RetryPolicy::default()
        },
    );
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path(), store_opts()).unwrap();
    store.attach_remote(remote.clone());
    let data = tensor(1);
    let state = SaveState::new().tensor("w", DType::U8, &[data.len() as u64], &data);
    store.save("r", 1, &state).unwrap().wait().unwrap();
    store.upload("r", 1).unwrap();
    assert!(faulty.injected() > 0, "no fault injected");
    assert!(remote.metrics().snapshot().retries > 0);
    let got = remote
        .restore("r", StepSel::Step(1), &TensorFilter::All)
        .unwrap();
    assert_eq!(got.tensor("w").unwrap().data, data);
}

#[test]
fn an_operation_out_of_budget_fails_naming_it() {
    let (remote, faulty) = faulty_remote(
        1.0,
        RetryPolicy {
            initial_backoff: Duration::from_millis(5),
            max_backoff: Duration::from_millis(20),
            max_attempts: 100_000,
            budget: Duration::from_millis(300),
            ..RetryPolicy::default()
        },
    );
    let err = remote.block_on(remote.runs()).unwrap().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    match &err {
        cairn::Error::RetriesExhausted { op, attempts, .. } => {
            assert!(op.starts_with("list"), "{op}");
            assert!(op.contains("ckpt/runs"), "{op}");
            // Stopped by the budget, not by the attempt limit.
            assert!(*attempts > 1 && *attempts < 100_000, "{attempts}");
        }
        other => panic!("not a RetriesExhausted error: {other}"),
    }
    assert!(err.to_string().contains("list"), "{err}");
    assert!(faulty.injected() > 1);
}

/// A loopback HTTP server that answers every request with `status` and an
/// S3 error body, counting the requests it receives.
fn answering_server(status: &'static str, code: &'static str) -> (String, Arc<AtomicU64>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let count = Arc::new(AtomicU64::new(0));
    let seen = count.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut s) = conn else { continue };
            let mut req = Vec::new();
            let mut buf = [0u8; 4096];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => req.extend_from_slice(&buf[..n]),
                }
            }
            seen.fetch_add(1, Ordering::SeqCst);
            let body = format!("<Error><Code>{code}</Code><Message>{code}</Message></Error>");
            let _ = write!(
                s,
                "HTTP/1.1 {status}\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    (format!("http://{addr}"), count)
}

fn options_for(endpoint: &str) -> Vec<(String, String)> {
    let mut o = s3_options();
    o.retain(|(k, _)| k != "endpoint");
    o.push(("endpoint".into(), endpoint.to_string()));
    o
}

#[test]
fn access_denied_is_refused_after_one_request() {
    let (ep, requests) = answering_server("403 Forbidden", "AccessDenied");
    let remote = RemoteStore::open(
        "s3://locked/ckpt",
        &options_for(&ep),
        RemoteOptions::default(),
    )
    .unwrap();
    let err = remote.block_on(remote.runs()).unwrap().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Invalid, "{err}");
    assert!(
        matches!(err, cairn::Error::RemoteRefused { .. }),
        "not RemoteRefused: {err}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("access denied") && msg.contains("in s3://locked/ckpt"),
        "{msg}"
    );
    assert_eq!(requests.load(Ordering::SeqCst), 1, "{msg}");
}

#[test]
fn a_server_error_is_retried_by_one_layer_only() {
    let (ep, requests) = answering_server("503 Service Unavailable", "SlowDown");
    let retry = RetryPolicy {
        max_attempts: 3,
        initial_backoff: Duration::from_millis(1),
        max_backoff: Duration::from_millis(5),
        ..RetryPolicy::default()
    };
    let remote = RemoteStore::open(
        "s3://busy/ckpt",
        &options_for(&ep),
        RemoteOptions {
            retry,
            ..RemoteOptions::default()
        },
    )
    .unwrap();
    let err = remote.block_on(remote.runs()).unwrap().unwrap_err();
    assert!(
        matches!(err, cairn::Error::RetriesExhausted { attempts: 3, .. }),
        "{err}"
    );
    // Three attempts are three requests: object_store does not retry
    // each of them again.
    assert_eq!(requests.load(Ordering::SeqCst), 3, "{err}");
}
