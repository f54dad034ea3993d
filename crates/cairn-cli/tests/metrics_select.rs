//! Training metrics stored with a checkpoint and roll back by them: the
//! library's `latest_where`, `cairn ls` (text and JSON, local and on the
//! S3 server) and `cairn latest --where`, through the built binary.

use cairn::{
    DType, ErrorKind, MetricFilter, RemoteOptions, RemoteStore, SaveState, Store, StoreOptions,
};
use std::io::{Read, Write};
use std::process::{Command, Output};

fn cairn(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(args)
        .output()
        .expect("run cairn")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn opts() -> StoreOptions {
    StoreOptions {
        chunk_size: 64 << 10,
        staging_bytes: 1 << 20,
        ..Default::default()
    }
}

/// Steps 1..=5 with losses 3.0, 2.4, 2.1, 9.5 (a spike), NaN, and step 6
/// without metrics.
fn fill(store: &Store) {
    let losses = [3.0, 2.4, 2.1, 9.5, f64::NAN];
    for (i, loss) in losses.iter().enumerate() {
        let step = i as u64 + 1;
        let data = vec![step as u8; 4096];
        let state = SaveState::new()
            .tensor("w", DType::U8, &[4096], &data)
            .metric("loss", *loss)
            .metric("grad_norm", step as f64);
        store.save("r", step, &state).unwrap().wait().unwrap();
    }
    let data = vec![0u8; 4096];
    let state = SaveState::new().tensor("w", DType::U8, &[4096], &data);
    store.save("r", 6, &state).unwrap().wait().unwrap();
}

#[test]
fn metrics_round_trip_and_select_the_newest_good_step() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), opts()).unwrap();
    fill(&store);
    let m = store.manifest("r", 3).unwrap();
    assert_eq!(m.metrics["loss"], 2.1);
    assert!(store.manifest("r", 5).unwrap().metrics["loss"].is_nan());
    assert!(store.manifest("r", 6).unwrap().metrics.is_empty());
    let f: MetricFilter = "loss<2.5".parse().unwrap();
    assert_eq!(store.latest_where("r", &f).unwrap(), Some(3));
    let f: MetricFilter = "loss<2.5,grad_norm<3".parse().unwrap();
    assert_eq!(store.latest_where("r", &f).unwrap(), Some(2));
    let f: MetricFilter = "loss>100".parse().unwrap();
    assert_eq!(store.latest_where("r", &f).unwrap(), None);
    // A manifest without metrics carries no `metrics` field at all, so
    // readers of the format before metrics existed still read it.
    let bytes = store.manifest_bytes("r", 6).unwrap();
    assert!(!text(&bytes).contains("\"metrics\""));
    assert!(text(&store.manifest_bytes("r", 5).unwrap()).contains("\"loss\":null"));
}

#[test]
fn save_refuses_bad_metric_names() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), opts()).unwrap();
    let data = [0u8; 4];
    for name in ["", "has space", "loss<", "é"] {
        let state = SaveState::new()
            .tensor("w", DType::U8, &[4], &data)
            .metric(name, 1.0);
        let err = store.save("r", 1, &state).expect_err(name);
        assert_eq!(err.kind(), ErrorKind::Invalid, "{err}");
        assert!(err.to_string().contains("metric name"), "{err}");
    }
    assert!(store.steps("r").unwrap().is_empty());
}

#[test]
fn cli_ls_shows_metrics_and_latest_selects_by_them() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), opts()).unwrap();
    fill(&store);
    drop(store);
    let s = dir.path().to_str().unwrap();

    let o = cairn(&["ls", s, "--json"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let rows: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 6);
    assert_eq!(
        rows[2]["metrics"],
        serde_json::json!({"loss": 2.1, "grad_norm": 3.0})
    );
    assert_eq!(rows[4]["metrics"]["loss"], serde_json::Value::Null);
    assert_eq!(rows[5]["metrics"], serde_json::json!({}));

    let o = cairn(&["ls", s, "--where", "loss<2.5"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let out = text(&o.stdout);
    assert!(out.lines().next().unwrap().ends_with("METRICS"), "{out}");
    let steps: Vec<&str> = out
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().nth(1).unwrap())
        .collect();
    assert_eq!(steps, ["2", "3"], "{out}");
    assert!(out.contains("grad_norm=3 loss=2.1"), "{out}");

    let o = cairn(&["latest", s, "--run", "r", "--where", "loss<2.5"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(text(&o.stdout).trim(), "3");
    let o = cairn(&["latest", s, "--run", "r"]);
    assert_eq!(text(&o.stdout).trim(), "6");
    let o = cairn(&["latest", s, "--run", "r", "--where", "loss<2.5", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["step"], 3);
    assert_eq!(v["metrics"]["loss"], 2.1);

    let o = cairn(&["latest", s, "--run", "r", "--where", "loss<1"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o.stderr).contains("loss<1"), "{}", text(&o.stderr));
    // `ls` too: a selection that matches nothing is an error.
    for json in [false, true] {
        let mut args = vec!["ls", s, "--where", "loss<1"];
        if json {
            args.push("--json");
        }
        let o = cairn(&args);
        assert_eq!(o.status.code(), Some(1), "{}", text(&o.stdout));
        assert!(text(&o.stderr).contains("loss<1"), "{}", text(&o.stderr));
    }
    for bad in ["loss<", "loss", "x y<1", "loss<nan"] {
        let o = cairn(&["latest", s, "--run", "r", "--where", bad]);
        assert_eq!(o.status.code(), Some(2), "{bad}: {}", text(&o.stderr));
    }
}

/// The loopback S3 server `scripts/test` starts.
fn s3_options() -> Vec<(String, String)> {
    let ep = std::env::var("CAIRN_TEST_S3_ENDPOINT")
        .expect("CAIRN_TEST_S3_ENDPOINT is not set: run the suite with scripts/test");
    [
        ("endpoint", ep),
        ("allow_http", "true".into()),
        ("region", "us-east-1".into()),
        ("access_key_id", "cairn-test".into()),
        ("secret_access_key", "cairn-test-secret".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

fn new_bucket() -> String {
    let name = format!("cairn-metrics-{}", std::process::id());
    let ep = std::env::var("CAIRN_TEST_S3_ENDPOINT").unwrap();
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

#[test]
fn metrics_travel_to_s3_and_select_there() {
    let opts_kv = s3_options();
    let url = format!("s3://{}/ckpt", new_bucket());
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path(), opts()).unwrap();
    store.attach_remote(RemoteStore::open(&url, &opts_kv, RemoteOptions::default()).unwrap());
    fill(&store);
    for step in 1..=6 {
        store.upload("r", step).unwrap();
    }
    let mut args: Vec<String> = vec!["latest".into(), url.clone(), "--run".into(), "r".into()];
    args.extend(["--where".into(), "loss<2.5".into()]);
    for (k, v) in &opts_kv {
        args.extend(["--remote-option".into(), format!("{k}={v}")]);
    }
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = cairn(&argv);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(text(&o.stdout).trim(), "3");
    let mut ls: Vec<&str> = vec!["ls", &url, "--json"];
    ls.extend(argv[6..].iter().copied());
    let o = cairn(&ls);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let rows: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(rows[1]["metrics"]["loss"], 2.4);
}
