//! Remote configuration as the ecosystem does it: the standard `AWS_*`
//! variables alone configure `cairn ls`, `cairn restore --to` and
//! `cairn daemon`; `--remote-option` merges with them and wins; a plain
//! HTTP endpoint without `allow_http` and a missing bucket are clear
//! errors. Against the loopback S3-compatible server.

#[path = "../../../tests/common/proxy.rs"]
mod proxy;

use cairn::{DType, SaveState, StepSel, Store, StoreOptions, TensorFilter};
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

fn endpoint() -> String {
    std::env::var("CAIRN_TEST_S3_ENDPOINT").expect("CAIRN_TEST_S3_ENDPOINT is not set")
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

/// A `cairn` command whose environment holds no inherited `AWS_*`,
/// `GOOGLE_*` or `AZURE_*` variable, and exactly the standard ones given.
fn cairn(vars: &[(&str, String)]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_cairn"));
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        if k.starts_with("AWS_") || k.starts_with("GOOGLE_") || k.starts_with("AZURE_") {
            c.env_remove(&*k);
        }
    }
    for (k, v) in vars {
        c.env(k, v);
    }
    c
}

/// The standard variables for the loopback server, nothing else.
fn aws_env() -> Vec<(&'static str, String)> {
    vec![
        ("AWS_ENDPOINT", endpoint()),
        ("AWS_ALLOW_HTTP", "true".into()),
        ("AWS_ACCESS_KEY_ID", "cairn-test".into()),
        ("AWS_SECRET_ACCESS_KEY", "cairn-test-secret".into()),
        ("AWS_REGION", "us-east-1".into()),
    ]
}

fn run(c: &mut Command, args: &[&str]) -> Output {
    c.args(args).output().expect("run cairn")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn data(step: u64) -> Vec<u8> {
    (0..200_000u32)
        .map(|i| (i as u64).wrapping_mul(step * 31 + 5) as u8)
        .collect()
}

fn save(store: &Store, step: u64) {
    let d = data(step);
    let st = SaveState::new().tensor("w", DType::U8, &[d.len() as u64], &d);
    store.save("r", step, &st).unwrap().wait().unwrap();
}

fn opts() -> StoreOptions {
    StoreOptions {
        chunk_size: 64 << 10,
        staging_bytes: 4 << 20,
        ..StoreOptions::default()
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn remote_steps(url: &str) -> Option<Vec<u64>> {
    let o = run(&mut cairn(&aws_env()), &["ls", url, "--json"]);
    if !o.status.success() {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).ok()?;
    Some(
        v.as_array()?
            .iter()
            .filter_map(|e| e["step"].as_u64())
            .collect(),
    )
}

fn restored_w(dir: &Path, step: u64) -> Vec<u8> {
    let s = Store::open_read_only(dir, opts()).unwrap();
    let got = s
        .restore("r", StepSel::Step(step), &TensorFilter::All)
        .unwrap();
    got.tensor("w").unwrap().data.clone()
}

#[test]
fn standard_aws_variables_alone_configure_ls_restore_and_the_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("local");
    let store = Store::open(&local, opts()).unwrap();
    save(&store, 1);
    save(&store, 2);
    drop(store);
    let bucket = new_bucket("envcfg");
    let url = format!("s3://{bucket}/ckpt");

    // An empty prefix lists as an empty store.
    let o = run(&mut cairn(&aws_env()), &["ls", &url, "--json"]);
    assert!(o.status.success(), "ls: {}", stderr(&o));

    // The daemon uploads both checkpoints, configured by the variables.
    let port = free_port();
    let log = dir.path().join("daemon.log");
    let mut child = cairn(&aws_env())
        .args([
            "daemon",
            local.to_str().unwrap(),
            "--remote",
            &url,
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--poll-interval",
            "50ms",
        ])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let t = Instant::now();
    let mut steps = None;
    while t.elapsed() < Duration::from_secs(60) {
        if let Some(s) = remote_steps(&url).filter(|s| s == &[1, 2]) {
            steps = Some(s);
            break;
        }
        if child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    // SAFETY: plain kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
    assert_eq!(
        steps,
        Some(vec![1, 2]),
        "daemon log: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );

    // restore --to a fresh directory, from the variables alone.
    let target = dir.path().join("restored");
    let o = run(
        &mut cairn(&aws_env()),
        &[
            "restore",
            &url,
            "--run",
            "r",
            "--step",
            "latest",
            "--to",
            target.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "restore --to: {}", stderr(&o));
    assert_eq!(restored_w(&target, 2), data(2));
}

#[test]
fn remote_options_merge_with_the_environment_and_win() {
    let bucket = new_bucket("merge");
    let url = format!("s3://{bucket}/ckpt");
    let no_http: Vec<_> = aws_env()
        .into_iter()
        .filter(|(k, _)| *k != "AWS_ALLOW_HTTP")
        .collect();

    // The endpoint from the environment, allow_http from an option.
    let o = run(
        &mut cairn(&no_http),
        &["ls", &url, "--remote-option", "allow_http=true"],
    );
    assert!(o.status.success(), "{}", stderr(&o));

    // Without allow_http: a clear error naming the option and the variable.
    let o = run(&mut cairn(&no_http), &["ls", &url]);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(e.contains("allow_http"), "{e}");
    assert!(e.contains("AWS_ALLOW_HTTP"), "{e}");
    assert!(e.contains(&endpoint()), "{e}");

    // An explicit option wins over the environment.
    let o = run(
        &mut cairn(&aws_env()),
        &["ls", &url, "--remote-option", "allow_http=false"],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("allow_http"), "{}", stderr(&o));
    let o = run(
        &mut cairn(&aws_env()),
        &["ls", &url, "--remote-option", "endpoint=http://127.0.0.1:1"],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("127.0.0.1:1"), "{}", stderr(&o));
}

#[test]
fn a_missing_bucket_or_a_bad_option_is_a_clear_error() {
    let bucket = bucket_name("missing");
    let url = format!("s3://{bucket}/x");
    let o = run(&mut cairn(&aws_env()), &["ls", &url]);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(e.contains(&format!("bucket \"{bucket}\"")), "{e}");
    assert!(e.contains("create it"), "{e}");

    let o = run(
        &mut cairn(&aws_env()),
        &["ls", &url, "--remote-option", "no_such_option=1"],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("no_such_option"), "{}", stderr(&o));

    let o = run(
        &mut cairn(&aws_env()),
        &["ls", &url, "--remote-option", "allow_http=maybe"],
    );
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(e.contains("allow_http") && e.contains("maybe"), "{e}");
}

/// The session tokens and access key ids of the requests the proxy saw
/// since the last call, and clears them.
fn credentials_seen(counts: &proxy::Shared) -> (Vec<String>, Vec<String>) {
    let mut c = counts.lock().unwrap();
    let tokens = c
        .headers
        .remove("x-amz-security-token")
        .unwrap_or_default()
        .into_iter()
        .collect();
    let keys = c
        .headers
        .remove("authorization")
        .unwrap_or_default()
        .iter()
        .filter_map(|a| {
            let cred = a.split("Credential=").nth(1)?;
            Some(cred.split('/').next()?.to_string())
        })
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    c.headers.clear();
    (tokens, keys)
}

#[test]
fn keys_given_as_options_are_not_sent_with_a_session_token_from_the_environment() {
    let running = proxy::start(&endpoint());
    let (counts, addr) = (&running.counts, &running.addr);
    let bucket = new_bucket("token");
    let url = format!("s3://{bucket}/ckpt");
    // A shell holding temporary credentials: keys and a session token.
    let mut env: Vec<(&str, String)> = aws_env()
        .into_iter()
        .map(|(k, v)| match k {
            "AWS_ENDPOINT" => (k, format!("http://{addr}")),
            "AWS_ACCESS_KEY_ID" => (k, "ASIA-ENV-KEY".to_string()),
            _ => (k, v),
        })
        .collect();
    env.push(("AWS_SESSION_TOKEN", "session-token-from-env".into()));

    // The environment alone: its key and its token are sent.
    let o = run(&mut cairn(&env), &["ls", &url]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        credentials_seen(counts),
        (
            vec!["session-token-from-env".to_string()],
            vec!["ASIA-ENV-KEY".to_string()]
        )
    );

    // Long-term keys given as options: the environment's token belongs to
    // other keys and is not sent with them.
    let keys = [
        "--remote-option",
        "access_key_id=AKIA-OPTION-KEY",
        "--remote-option",
        "secret_access_key=option-secret",
    ];
    let o = run(
        &mut cairn(&env),
        &[&["ls", url.as_str()][..], &keys].concat(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        credentials_seen(counts),
        (vec![], vec!["AKIA-OPTION-KEY".to_string()])
    );

    // Temporary credentials given as options, token included: that token.
    let o = run(
        &mut cairn(&env),
        &[
            &["ls", url.as_str()][..],
            &keys,
            &["--remote-option", "token=session-token-from-option"],
        ]
        .concat(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        credentials_seen(counts),
        (
            vec!["session-token-from-option".to_string()],
            vec!["AKIA-OPTION-KEY".to_string()]
        )
    );

    // A token option alone would be paired with no key: refused, naming it.
    let o = run(
        &mut cairn(&env),
        &[
            "ls",
            &url,
            "--remote-option",
            "token=session-token-from-option",
        ],
    );
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(
        e.contains("token") && e.contains("access_key_id") && e.contains("secret_access_key"),
        "{e}"
    );
    assert_eq!(credentials_seen(counts), (vec![], vec![]), "nothing sent");
}

/// A loopback HTTP server that answers every request with 403 and no
/// body, as a proxy that denies the metadata service's address does.
/// Returns its URL; it serves until the test process ends.
fn denying_server() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let _ = s.write_all(
                b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            );
        }
    });
    url
}

/// With no credential set anywhere, the S3 client asks the instance
/// metadata service for one. Off EC2 none answers, or a proxy refuses:
/// either way the user has set no credential, and is told so at once,
/// with the variables to set, rather than after the operation's retries
/// or as the bucket denying access. The metadata service is a closed
/// loopback port, then a server answering 403 (`AWS_METADATA_ENDPOINT`).
/// Planted bug this catches: metadata failures retried as transient, or
/// explained as access to the bucket.
#[test]
fn no_credential_anywhere_is_said_at_once_naming_the_variables() {
    let bucket = new_bucket("nocred");
    let url = format!("s3://{bucket}/x");
    for (what, metadata) in [
        ("closed port", format!("http://127.0.0.1:{}", free_port())),
        ("403", denying_server()),
    ] {
        let env = vec![
            ("AWS_ENDPOINT", endpoint()),
            ("AWS_ALLOW_HTTP", "true".into()),
            ("AWS_REGION", "us-east-1".into()),
            ("AWS_METADATA_ENDPOINT", metadata),
        ];
        let o = run(&mut cairn(&env), &["ls", &url]);
        let e = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{what}: {e}");
        assert!(e.contains("no credential"), "{what}: {e}");
        assert!(e.contains("AWS_ACCESS_KEY_ID"), "{what}: {e}");
        assert!(!e.contains("gave up after"), "{what}: {e}");
        assert!(!e.contains("access denied"), "{what}: {e}");
    }
    // The same bucket with the standard variables set lists fine.
    let o = run(&mut cairn(&aws_env()), &["ls", &url]);
    assert!(o.status.success(), "{}", stderr(&o));
}
