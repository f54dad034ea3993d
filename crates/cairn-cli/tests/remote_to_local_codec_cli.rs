//! `cairn restore s3://... --to DIR` leaves a local tier that is raw, as a
//! local store's saves leave it, though the remote holds its chunks
//! compressed: `cairn ls` on the directory reports no compression, every
//! chunk file's header says raw, and the directory verifies and restores
//! bit-exact on its own.

use cairn::{DType, RemoteOptions, RemoteStore, SaveState, StepSel, Store, StoreOptions};
use std::io::{Read, Write};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

fn endpoint() -> String {
    std::env::var("CAIRN_TEST_S3_ENDPOINT").expect(
        "CAIRN_TEST_S3_ENDPOINT is not set: run the suite with scripts/test, \
         which starts a loopback S3-compatible server",
    )
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

fn new_bucket(tag: &str) -> String {
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
    assert!(resp.starts_with("HTTP/1.1 200"), "create bucket: {resp}");
    name
}

/// fp32 values like trained weights (small, normal-ish): compressible by
/// byte-grouped zstd, as real checkpoints are.
fn weights(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed;
    (0..n)
        .flat_map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let u = ((x >> 40) as f32 / (1u64 << 24) as f32) - 0.5;
            let v = (((x >> 16) & 0xFF_FFFF) as f32 / (1u64 << 24) as f32) - 0.5;
            ((u + v) * 0.04).to_le_bytes()
        })
        .collect()
}

fn cairn(args: &[String]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(args)
        .output()
        .expect("run cairn")
}

fn ok_json(args: Vec<String>) -> serde_json::Value {
    let o = cairn(&args);
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap()
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[test]
fn restore_from_s3_to_a_directory_leaves_raw_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let tensors: Vec<(String, Vec<u8>)> = (0..3)
        .map(|i| (format!("layer{i}.weight"), weights(i + 1, 300_000)))
        .collect();
    let opts = StoreOptions {
        chunk_size: 256 << 10,
        staging_bytes: 8 << 20,
        ..StoreOptions::default()
    };
    let mut store = Store::open(dir.path().join("src"), opts.clone()).unwrap();
    let url = format!("s3://{}/ckpt", new_bucket("cli-codec"));
    let remote = RemoteStore::open(&url, &s3_options(), RemoteOptions::default()).unwrap();
    store.attach_remote(remote);
    let mut st = SaveState::new();
    for (name, data) in &tensors {
        st = st.tensor(name.clone(), DType::F32, &[data.len() as u64 / 4], data);
    }
    store.save("job", 5, &st).unwrap().wait().unwrap();
    store.upload("job", 5).unwrap();
    drop(store);
    let flags: Vec<String> = s3_options()
        .into_iter()
        .flat_map(|(k, v)| ["--remote-option".to_string(), format!("{k}={v}")])
        .collect();

    // The remote holds the chunks compressed.
    let mut args = strings(&["ls", &url, "--json"]);
    args.extend(flags.iter().cloned());
    let remote_ls = ok_json(args);
    let remote_ratio = remote_ls[0]["compression_ratio"].as_f64().unwrap();
    assert!(remote_ratio > 1.05, "remote compression {remote_ratio}");

    let target = dir.path().join("restored");
    let t = target.to_str().unwrap();
    let mut args = strings(&[
        "restore", &url, "--run", "job", "--step", "5", "--to", t, "--json",
    ]);
    args.extend(flags.iter().cloned());
    let rep = ok_json(args);
    assert_eq!(rep["chunks_copied"], rep["chunks"]);

    let ls = ok_json(strings(&["ls", t, "--json"]));
    let ratio = ls[0]["compression_ratio"].as_f64().unwrap();
    assert!(
        ratio <= 1.0,
        "the restored local tier is stored raw: compression {ratio}"
    );
    assert_eq!(
        rep["bytes_copied"], ls[0]["stored_bytes"],
        "restore reports the bytes the local tier stores"
    );
    let mut files = 0;
    for fan in std::fs::read_dir(target.join("chunks")).unwrap() {
        for f in std::fs::read_dir(fan.unwrap().path()).unwrap() {
            let b = std::fs::read(f.unwrap().path()).unwrap();
            assert_eq!((b[10], b[11]), (0, 0), "chunk header: raw, no filter");
            files += 1;
        }
    }
    assert!(files >= 6, "{files} chunk files");
    let v = ok_json(strings(&["verify", t, "--json"]));
    assert!(v["problems"].as_array().unwrap().is_empty(), "{v}");

    let local = Store::open_read_only(&target, opts).unwrap();
    let r = local
        .restore("job", StepSel::Step(5), &cairn::TensorFilter::All)
        .unwrap();
    assert_eq!(r.tensors.len(), tensors.len());
    for (got, (name, data)) in r.tensors.iter().zip(&tensors) {
        assert_eq!(&got.name, name);
        assert!(&got.data == data, "bytes of {name} differ");
    }
}
