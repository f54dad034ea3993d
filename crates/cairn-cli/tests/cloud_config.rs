//! GCS and Azure configuration as each ecosystem does it, against the
//! emulators `scripts/test` starts: the standard variables alone
//! (`GOOGLE_SERVICE_ACCOUNT`, `STORAGE_EMULATOR_HOST`; `AZURE_STORAGE_*`,
//! `AZURE_STORAGE_USE_EMULATOR` with `AZURITE_BLOB_STORAGE_URL`) configure
//! `cairn ls`, `cairn restore --to` and `cairn daemon`; `--remote-option`
//! merges with them and wins; a wrong credential and a missing bucket or
//! container fail at once with a message naming them.

#[path = "../../../tests/common/azure.rs"]
mod azure;
#[path = "../../../tests/common/gcs.rs"]
mod gcs;

use cairn::{DType, SaveState, StepSel, Store, StoreOptions, TensorFilter};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A `cairn` command whose environment holds no inherited cloud variable,
/// and exactly the ones given.
fn cairn(vars: &[(&str, String)]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_cairn"));
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        if k.starts_with("AWS_")
            || k.starts_with("GOOGLE_")
            || k.starts_with("AZURE_")
            || k == "AZURITE_BLOB_STORAGE_URL"
            || k == "STORAGE_EMULATOR_HOST"
            || k == "SERVICE_ACCOUNT"
        {
            c.env_remove(&*k);
        }
    }
    for (k, v) in vars {
        c.env(k, v);
    }
    c
}

fn run(c: &mut Command, args: &[&str]) -> Output {
    c.args(args).output().expect("run cairn")
}

/// Run, expecting exit status 1; returns stderr and prints the time taken.
fn fails(c: &mut Command, args: &[&str], what: &str) -> String {
    let t = Instant::now();
    let o = run(c, args);
    eprintln!("{what}: failed in {:?}", t.elapsed());
    assert_eq!(o.status.code(), Some(1), "{what}: {}", stderr(&o));
    stderr(&o)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn data(step: u64) -> Vec<u8> {
    (0..200_000u32)
        .map(|i| (i as u64).wrapping_mul(step * 31 + 5) as u8)
        .collect()
}

fn opts() -> StoreOptions {
    StoreOptions {
        chunk_size: 64 << 10,
        staging_bytes: 4 << 20,
        ..StoreOptions::default()
    }
}

fn local_store(dir: &Path) -> std::path::PathBuf {
    let local = dir.join("local");
    let store = Store::open(&local, opts()).unwrap();
    for step in [1, 2] {
        let d = data(step);
        let st = SaveState::new().tensor("w", DType::U8, &[d.len() as u64], &d);
        store.save("r", step, &st).unwrap().wait().unwrap();
    }
    local
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn remote_steps(env: &[(&str, String)], url: &str) -> Option<Vec<u64>> {
    let o = run(&mut cairn(env), &["ls", url, "--json"]);
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

/// The daemon, configured by `daemon_env` alone, uploads steps 1 and 2;
/// then `ls` and `restore --to` configured by `read_env` alone see them.
fn daemon_ls_restore(url: &str, daemon_env: &[(&str, String)], read_env: &[(&str, String)]) {
    let dir = tempfile::tempdir().unwrap();
    let local = local_store(dir.path());
    let o = run(&mut cairn(read_env), &["ls", url, "--json"]);
    assert!(o.status.success(), "{url}: ls: {}", stderr(&o));

    let port = free_port();
    let log = dir.path().join("daemon.log");
    let mut child = cairn(daemon_env)
        .args([
            "daemon",
            local.to_str().unwrap(),
            "--remote",
            url,
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
        if let Some(s) = remote_steps(read_env, url).filter(|s| s == &[1, 2]) {
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
        "{url}: daemon log: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );

    let target = dir.path().join("restored");
    let o = run(
        &mut cairn(read_env),
        &[
            "restore",
            url,
            "--run",
            "r",
            "--step",
            "latest",
            "--to",
            target.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{url}: restore --to: {}", stderr(&o));
    let s = Store::open_read_only(&target, opts()).unwrap();
    let got = s
        .restore("r", StepSel::Step(2), &TensorFilter::All)
        .unwrap();
    assert_eq!(got.tensor("w").unwrap().data, data(2), "{url}");
}

/// A service-account file naming the emulator, in `dir`.
fn gcs_service_account_file(dir: &Path) -> String {
    let path = dir.join("service-account.json");
    std::fs::write(&path, gcs::service_account_key()).unwrap();
    path.display().to_string()
}

/// Azurite's account through the standard account variables.
fn azure_account_env() -> Vec<(&'static str, String)> {
    vec![
        ("AZURE_STORAGE_ACCOUNT_NAME", azure::ACCOUNT.into()),
        ("AZURE_STORAGE_ACCOUNT_KEY", azure::KEY.into()),
        (
            "AZURE_STORAGE_ENDPOINT",
            format!("{}/{}", azure::endpoint(), azure::ACCOUNT),
        ),
        ("AZURE_ALLOW_HTTP", "true".into()),
    ]
}

/// The emulator switch and Azurite's address, nothing else.
fn azure_emulator_env() -> Vec<(&'static str, String)> {
    vec![
        ("AZURE_STORAGE_USE_EMULATOR", "true".into()),
        ("AZURITE_BLOB_STORAGE_URL", azure::endpoint()),
    ]
}

#[test]
fn standard_google_variables_alone_configure_ls_restore_and_the_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let sa = gcs_service_account_file(dir.path());
    let bucket = gcs::new_bucket("envcfg");
    let url = format!("gs://{bucket}/ckpt");
    let emulator_host = gcs::endpoint().trim_start_matches("http://").to_string();
    daemon_ls_restore(
        &url,
        &[("GOOGLE_SERVICE_ACCOUNT", sa)],
        &[("STORAGE_EMULATOR_HOST", emulator_host)],
    );
}

#[test]
fn standard_azure_variables_alone_configure_ls_restore_and_the_daemon() {
    let container = azure::new_container("envcfg");
    let url = format!("az://{container}/ckpt");
    daemon_ls_restore(&url, &azure_emulator_env(), &azure_account_env());
}

#[test]
fn remote_options_merge_with_the_google_and_azure_variables_and_win() {
    let dir = tempfile::tempdir().unwrap();
    // GCS: a key given as an option replaces a file named by the
    // environment (object_store alone refuses the two together).
    let bucket = gcs::new_bucket("merge");
    let url = format!("gs://{bucket}/ckpt");
    let missing = dir.path().join("no-such-file.json").display().to_string();
    let env = [("GOOGLE_SERVICE_ACCOUNT", missing.clone())];
    let e = fails(
        &mut cairn(&env),
        &["ls", &url],
        "gcs: missing service-account file",
    );
    assert!(
        e.contains(&missing) && e.contains("GOOGLE_SERVICE_ACCOUNT"),
        "{e}"
    );
    let key = format!("service_account_key={}", gcs::service_account_key());
    let o = run(&mut cairn(&env), &["ls", &url, "--remote-option", &key]);
    assert!(o.status.success(), "{}", stderr(&o));

    // Azure: a wrong key in an option wins over the right one in the
    // environment, and the other way round.
    let container = azure::new_container("merge");
    let url = format!("az://{container}/ckpt");
    let wrong = "access_key=d3Jvbmcta2V5LXdyb25nLWtleS13cm9uZy1rZXk=";
    let e = fails(
        &mut cairn(&azure_account_env()),
        &["ls", &url, "--remote-option", wrong],
        "azure: wrong key in an option",
    );
    assert!(e.contains("AZURE_STORAGE_ACCOUNT_KEY"), "{e}");
    let mut wrong_env = azure_account_env();
    wrong_env[1].1 = "d3Jvbmcta2V5LXdyb25nLWtleS13cm9uZy1rZXk=".into();
    let right = format!("access_key={}", azure::KEY);
    let o = run(
        &mut cairn(&wrong_env),
        &["ls", &url, "--remote-option", &right],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    // The emulator switch with an endpoint option: the endpoint would be
    // ignored, so it is refused, naming the variable to set instead.
    let e = fails(
        &mut cairn(&azure_emulator_env()),
        &[
            "ls",
            &url,
            "--remote-option",
            "endpoint=http://127.0.0.1:1/devstoreaccount1",
        ],
        "azure: endpoint with use_emulator",
    );
    assert!(e.contains("AZURITE_BLOB_STORAGE_URL"), "{e}");
}

#[test]
fn an_azure_sas_token_works_from_the_variable_and_an_option_one_wins_over_a_key() {
    const WRONG_KEY: &str = "d3Jvbmcta2V5LXdyb25nLWtleS13cm9uZy1rZXk=";
    let dir = tempfile::tempdir().unwrap();
    let local = local_store(dir.path());
    let container = azure::new_container("sas");
    let url = format!("az://{container}/ckpt");
    let sas = azure::account_sas();
    let sas_option = format!("sas_key={sas}");
    let mut wrong_key_env = azure_account_env();
    wrong_key_env[1].1 = WRONG_KEY.into();

    // The account key in the environment is wrong on its own ...
    let e = fails(
        &mut cairn(&wrong_key_env),
        &["ls", &url],
        "azure: wrong key",
    );
    assert!(e.contains("credentials were rejected"), "{e}");
    // ... and a SAS token given as an option is used in its place: a
    // checkpoint copied up with it reads back with it.
    let o = run(
        &mut cairn(&wrong_key_env),
        &[
            "restore",
            local.to_str().unwrap(),
            "--run",
            "r",
            "--step",
            "latest",
            "--to",
            &url,
            "--remote-option",
            &sas_option,
        ],
    );
    assert!(
        o.status.success(),
        "restore --to with sas_key: {}",
        stderr(&o)
    );
    let o = run(
        &mut cairn(&wrong_key_env),
        &["ls", &url, "--json", "--remote-option", &sas_option],
    );
    assert!(o.status.success(), "ls with sas_key: {}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let steps: Vec<u64> = v
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["step"].as_u64())
        .collect();
    assert_eq!(steps, [2], "{url}");

    // The token alone, through AZURE_STORAGE_SAS_KEY, restores it.
    let sas_env = vec![
        ("AZURE_STORAGE_ACCOUNT_NAME", azure::ACCOUNT.to_string()),
        ("AZURE_STORAGE_SAS_KEY", sas.clone()),
        (
            "AZURE_STORAGE_ENDPOINT",
            format!("{}/{}", azure::endpoint(), azure::ACCOUNT),
        ),
        ("AZURE_ALLOW_HTTP", "true".into()),
    ];
    let target = dir.path().join("back");
    let o = run(
        &mut cairn(&sas_env),
        &[
            "restore",
            &url,
            "--run",
            "r",
            "--step",
            "2",
            "--to",
            target.to_str().unwrap(),
        ],
    );
    assert!(
        o.status.success(),
        "restore with AZURE_STORAGE_SAS_KEY: {}",
        stderr(&o)
    );
    let got = Store::open_read_only(&target, opts())
        .unwrap()
        .restore("r", StepSel::Step(2), &TensorFilter::All)
        .unwrap();
    assert_eq!(got.tensor("w").unwrap().data, data(2));

    // The other way round: a token given as an option is not passed over
    // for a right key in the environment. A bad one fails.
    let bad_sas = sas.replacen("sp=rwdlac", "sp=rl", 1);
    let e = fails(
        &mut cairn(&azure_account_env()),
        &["ls", &url, "--remote-option", &format!("sas_key={bad_sas}")],
        "azure: bad sas_key option over a right key",
    );
    assert!(e.contains("credentials were rejected"), "{e}");
}

#[test]
fn a_variable_that_is_not_utf8_does_not_stop_a_credential_option() {
    use std::os::unix::ffi::OsStrExt;
    let not_utf8 = std::ffi::OsStr::from_bytes(b"caf\xe9");
    // GCS: the service-account key as an option, so the GOOGLE_* variables
    // are read one by one.
    let dir = tempfile::tempdir().unwrap();
    let sa = gcs_service_account_file(dir.path());
    let bucket = gcs::new_bucket("notutf8");
    let key = format!("service_account_key={}", gcs::service_account_key());
    let o = cairn(&[("GOOGLE_SERVICE_ACCOUNT", sa)])
        .env("CAIRN_TEST_NOT_UTF8", not_utf8)
        .env("GOOGLE_CAIRN_TEST_NOT_UTF8", not_utf8)
        .args([
            "ls",
            &format!("gs://{bucket}/ckpt"),
            "--remote-option",
            &key,
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "gcs: {}", stderr(&o));
    // Azure: a SAS token as an option, likewise.
    let container = azure::new_container("notutf8");
    let sas = format!("sas_key={}", azure::account_sas());
    let o = cairn(&azure_account_env())
        .env("AZURE_CAIRN_TEST_NOT_UTF8", not_utf8)
        .args([
            "ls",
            &format!("az://{container}/ckpt"),
            "--remote-option",
            &sas,
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "azure: {}", stderr(&o));
}

#[test]
fn a_wrong_credential_or_a_missing_bucket_fails_at_once_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    // GCS: a service-account file whose key is not a key.
    let bad = dir.path().join("bad-service-account.json");
    std::fs::write(
        &bad,
        r#"{"client_email":"x@y","private_key":"not a key","private_key_id":"k"}"#,
    )
    .unwrap();
    let bucket = gcs::new_bucket("cred");
    let url = format!("gs://{bucket}/ckpt");
    let e = fails(
        &mut cairn(&[("GOOGLE_SERVICE_ACCOUNT", bad.display().to_string())]),
        &["ls", &url],
        "gcs: broken service-account key",
    );
    assert!(e.contains(&bad.display().to_string()), "{e}");
    // GCS: a bucket that does not exist.
    let missing = gcs::bucket_name("missing");
    let sa = gcs_service_account_file(dir.path());
    let e = fails(
        &mut cairn(&[("GOOGLE_SERVICE_ACCOUNT", sa)]),
        &["ls", &format!("gs://{missing}/ckpt")],
        "gcs: missing bucket",
    );
    assert!(e.contains(&format!("bucket \"{missing}\"")), "{e}");
    assert!(e.contains("create it"), "{e}");

    // Azure: a wrong account key.
    let container = azure::new_container("cred");
    let mut env = azure_account_env();
    env[1].1 = "d3Jvbmcta2V5LXdyb25nLWtleS13cm9uZy1rZXk=".into();
    let e = fails(
        &mut cairn(&env),
        &["ls", &format!("az://{container}/ckpt")],
        "azure: wrong key",
    );
    assert!(e.contains("credentials were rejected"), "{e}");
    assert!(e.contains("AZURE_STORAGE_ACCOUNT_KEY"), "{e}");
    // Azure: a container that does not exist.
    let missing = azure::container_name("missing");
    let e = fails(
        &mut cairn(&azure_account_env()),
        &["ls", &format!("az://{missing}/ckpt")],
        "azure: missing container",
    );
    assert!(e.contains(&format!("container \"{missing}\"")), "{e}");
    assert!(e.contains("create it"), "{e}");
}

/// With no credential set, the GCS client asks Compute Engine's metadata
/// server for a token and the Azure client its managed identity
/// endpoint. Off those clouds nothing answers: the user has set no
/// credential and is told so at once, with the variables to set, rather
/// than after the operation's retries or as access denied. Both services
/// are closed loopback ports (`GCE_METADATA_HOST`, `GCE_METADATA_IP`,
/// `AZURE_MSI_ENDPOINT`); no request reaches a bucket. Planted bug this
/// catches: metadata failures retried as transient, or explained as
/// access to the bucket.
#[test]
fn no_credential_anywhere_is_said_at_once_for_gcs_and_azure() {
    let home = tempfile::tempdir().unwrap();
    let closed = || format!("127.0.0.1:{}", free_port());
    let cases = [
        (
            "gs://cairn-nocred/x",
            vec![
                ("GCE_METADATA_HOST", closed()),
                ("GCE_METADATA_IP", closed()),
            ],
            "GOOGLE_SERVICE_ACCOUNT",
        ),
        (
            "az://cairn-nocred/x",
            vec![
                ("AZURE_STORAGE_ACCOUNT_NAME", "cairnnocred".to_string()),
                (
                    "AZURE_MSI_ENDPOINT",
                    format!("http://{}/metadata/identity/oauth2/token", closed()),
                ),
            ],
            "AZURE_STORAGE_ACCOUNT_KEY",
        ),
    ];
    for (url, mut env, variable) in cases {
        env.push(("HOME", home.path().display().to_string()));
        let e = fails(&mut cairn(&env), &["ls", url], url);
        assert!(e.contains("no credential"), "{url}: {e}");
        assert!(e.contains(variable), "{url}: {e}");
        assert!(!e.contains("gave up after"), "{url}: {e}");
        assert!(!e.contains("access denied"), "{url}: {e}");
    }
}
