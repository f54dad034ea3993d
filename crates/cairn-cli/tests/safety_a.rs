//! Listing, collection, retention and symbolic links: a store never loses
//! or hides a checkpoint it cannot read, and never acts through a link.

use cairn::{DType, ErrorKind, SaveState, Store, StoreOptions};
use cairn::{RemoteOptions, RemoteStore};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

fn opts() -> StoreOptions {
    StoreOptions {
        chunk_size: 64 << 10,
        staging_bytes: 4 << 20,
        ..StoreOptions::default()
    }
}

/// 256 KiB of f32 data that differs for every `seed`.
fn data(seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..256 << 10)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn save(store: &Store, run: &str, step: u64) {
    let d = data(step);
    let state = SaveState::new().tensor("w", DType::F32, &[d.len() as u64 / 4], &d);
    store.save(run, step, &state).unwrap().wait().unwrap();
}

fn chunk_files(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for fan in std::fs::read_dir(root.join("chunks")).unwrap() {
        let fan = fan.unwrap();
        if fan.file_type().unwrap().is_dir() {
            for c in std::fs::read_dir(fan.path()).unwrap() {
                out.push(c.unwrap().path());
            }
        }
    }
    out.sort();
    out
}

fn is_root() -> bool {
    // SAFETY: plain syscall.
    unsafe { libc::geteuid() == 0 }
}

/// `cairn ARGS` as a shell user types it; as root, run it as `nobody` so
/// file permissions apply.
fn cairn_unprivileged(args: &[&str]) -> Output {
    let mut cmd = if is_root() {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(env!("CARGO_BIN_EXE_cairn"));
        c
    } else {
        Command::new(env!("CARGO_BIN_EXE_cairn"))
    };
    cmd.args(args).output().unwrap()
}

fn cairn(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(args)
        .output()
        .unwrap()
}

/// `cairn ARGS`, killed if it has not exited by `deadline`; `None` then.
fn cairn_with_deadline(args: &[&str], deadline: Duration) -> Option<Output> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t0.elapsed() > deadline {
            child.kill().unwrap();
            child.wait().unwrap();
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Some(child.wait_with_output().unwrap())
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn step_dir(root: &Path, run: &str, step: u64) -> PathBuf {
    root.join("runs").join(run).join(format!("{:020}", step))
}

fn set_mode(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn file_remote(dir: &Path) -> RemoteStore {
    let url = format!("file://{}", dir.display());
    RemoteStore::open(&url, &[], RemoteOptions::default()).unwrap()
}

#[test]
fn p01_gc_aborts_on_unreadable_step_dir() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    {
        let store = Store::open(&root, opts()).unwrap();
        save(&store, "q", 1);
        save(&store, "q", 2);
    }
    if is_root() {
        let st = Command::new("chown")
            .args(["-R", "65534:65534"])
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(st.success());
    }
    let before = chunk_files(&root);
    let hidden = step_dir(&root, "q", 2);
    set_mode(&hidden, 0o000);
    let s = root.to_str().unwrap();

    let gc = cairn_unprivileged(&["gc", s, "--grace", "0s"]);
    let (_, err) = text(&gc);
    set_mode(&hidden, 0o755);
    assert_ne!(gc.status.code(), Some(0), "gc must abort: {err}");
    assert!(err.contains(hidden.to_str().unwrap()), "{err}");
    assert_eq!(chunk_files(&root), before, "gc deleted chunks");

    set_mode(&hidden, 0o000);
    let ls = cairn_unprivileged(&["ls", s]);
    let verify = cairn_unprivileged(&["verify", s]);
    set_mode(&hidden, 0o755);
    let (out, err) = text(&ls);
    assert_eq!(ls.status.code(), Some(1), "ls: {out}{err}");
    assert!(
        (out.clone() + &err).contains(hidden.to_str().unwrap()),
        "ls must name the unreadable step: {out}{err}"
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with("q ") && l.contains(" 1 ")),
        "ls still lists the readable step: {out}"
    );
    let (out, err) = text(&verify);
    assert_eq!(verify.status.code(), Some(1), "verify: {out}{err}");
    assert!(
        (out.clone() + &err).contains(hidden.to_str().unwrap()),
        "verify must name the unreadable step: {out}{err}"
    );

    // Readable again: everything is intact.
    let store = Store::open_read_only(&root, opts()).unwrap();
    assert_eq!(store.steps("q").unwrap(), vec![1, 2]);
    assert!(store.verify(None, None).unwrap().ok());
}

#[test]
fn p03_file_remote_retention_leaves_no_phantom_step() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path().join("local"), opts()).unwrap();
    let remote_dir = dir.path().join("remote");
    let remote = file_remote(&remote_dir);
    store.attach_remote(remote.clone());
    for step in 1..=3 {
        save(&store, "r", step);
        store.upload("r", step).unwrap();
    }
    let deleted = remote
        .block_on(remote.apply_retention(1, None))
        .unwrap()
        .unwrap();
    assert_eq!(deleted, vec![("r".to_string(), 1), ("r".to_string(), 2)]);
    assert_eq!(
        remote.block_on(remote.steps("r")).unwrap().unwrap(),
        vec![3]
    );
    // A second pass has nothing to do and does not fail.
    let again = remote
        .block_on(remote.apply_retention(1, None))
        .unwrap()
        .unwrap();
    assert!(again.is_empty(), "{again:?}");

    let url = format!("file://{}", remote_dir.display());
    let ls = cairn(&["ls", &url, "--json"]);
    let (out, err) = text(&ls);
    assert_eq!(ls.status.code(), Some(0), "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let steps: Vec<u64> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, vec![3]);
}

#[test]
fn p04_local_retention_confirms_remote_manifest() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path().join("local"), opts()).unwrap();
    let remote = file_remote(&dir.path().join("remote"));
    store.attach_remote(remote.clone());
    for step in 1..=4 {
        save(&store, "r", step);
        store.upload("r", step).unwrap();
    }
    // The remote loses everything behind the daemon's back.
    for step in 1..=4 {
        remote
            .block_on(remote.delete_checkpoint("r", step))
            .unwrap()
            .unwrap();
    }
    let deleted = store.apply_local_retention(1, &remote).unwrap();
    assert!(deleted.is_empty(), "deleted the only copies: {deleted:?}");
    assert_eq!(store.steps("r").unwrap(), vec![1, 2, 3, 4]);

    // Steps 1 and 2 are back remotely; 3 and 4 are not. Step 2 is the
    // newest durable one as seen now and stays; 3 is not durable and stays;
    // 4 is within keep_last.
    for step in 1..=2 {
        store.upload("r", step).unwrap();
    }
    let deleted = store.apply_local_retention(1, &remote).unwrap();
    assert_eq!(deleted, vec![("r".to_string(), 1)]);
    assert_eq!(store.steps("r").unwrap(), vec![2, 3, 4]);

    // Local retention deletes only what the remote still holds, so the
    // daemon refuses to keep more locally than remotely.
    let mut cfg = cairn::DaemonConfig::new(dir.path().join("local"), remote.url().into());
    cfg.retention.local_keep_last = Some(3);
    cfg.retention.remote_keep_last = Some(2);
    assert_eq!(cfg.check().unwrap_err().kind(), ErrorKind::Invalid);
    cfg.retention.local_keep_last = Some(2);
    cfg.check().unwrap();
}

#[test]
fn p06_gc_never_follows_symlinks() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    let chunk_name = format!("ab{}", "0".repeat(62));
    {
        let store = Store::open(&root, opts()).unwrap();
        save(&store, "r", 1);
    }
    let s = root.to_str().unwrap();
    let old = |p: &Path| {
        assert!(Command::new("touch")
            .args(["-h", "-d", "2001-01-01"])
            .arg(p)
            .status()
            .unwrap()
            .success());
    };

    // A run directory that is a link to a directory outside the store.
    let victim = dir.path().join("victim");
    let v_step = victim.join(format!("{:020}", 7));
    std::fs::create_dir_all(&v_step).unwrap();
    std::fs::write(v_step.join("precious"), b"x").unwrap();
    old(&v_step);
    let link = root.join("runs").join("evil");
    std::os::unix::fs::symlink(&victim, &link).unwrap();
    let o = cairn(&["gc", s, "--grace", "0s"]);
    let (out, err) = text(&o);
    assert!(
        v_step.join("precious").exists(),
        "gc deleted through runs/evil"
    );
    assert_eq!(o.status.code(), Some(1), "{out}{err}");
    assert!(err.contains(link.to_str().unwrap()), "{err}");
    std::fs::remove_file(&link).unwrap();

    // tmp/ as a link.
    let victim_tmp = dir.path().join("victim-tmp");
    std::fs::create_dir(&victim_tmp).unwrap();
    std::fs::write(victim_tmp.join("precious"), b"x").unwrap();
    old(&victim_tmp.join("precious"));
    let tmp = root.join("tmp");
    std::fs::rename(&tmp, dir.path().join("real-tmp")).unwrap();
    std::os::unix::fs::symlink(&victim_tmp, &tmp).unwrap();
    let o = cairn(&["gc", s, "--grace", "0s"]);
    let (out, err) = text(&o);
    assert!(
        victim_tmp.join("precious").exists(),
        "gc deleted through tmp"
    );
    assert_eq!(o.status.code(), Some(1), "{out}{err}");
    assert!(err.contains(tmp.to_str().unwrap()), "{err}");
    std::fs::remove_file(&tmp).unwrap();
    std::fs::rename(dir.path().join("real-tmp"), &tmp).unwrap();

    // A chunk fan-out directory as a link.
    let victim_fan = dir.path().join("victim-fan");
    std::fs::create_dir(&victim_fan).unwrap();
    std::fs::write(victim_fan.join(&chunk_name), b"x").unwrap();
    old(&victim_fan.join(&chunk_name));
    let fan = root.join("chunks").join("ab");
    let real_fan = dir.path().join("real-fan");
    std::fs::rename(&fan, &real_fan).unwrap();
    std::os::unix::fs::symlink(&victim_fan, &fan).unwrap();
    let o = cairn(&["gc", s, "--grace", "0s"]);
    let (out, err) = text(&o);
    assert!(
        victim_fan.join(&chunk_name).exists(),
        "gc deleted through chunks/ab"
    );
    assert_eq!(o.status.code(), Some(1), "{out}{err}");
    assert!(err.contains(fan.to_str().unwrap()), "{err}");
    std::fs::remove_file(&fan).unwrap();
    std::fs::rename(&real_fan, &fan).unwrap();

    // Inside tmp/: an old directory (a killed bench's sweep) holding a
    // link out of the store goes whole, the link's target stays; a young
    // temporary file stays and is reported as kept.
    let victim_in = dir.path().join("victim-in");
    std::fs::create_dir(&victim_in).unwrap();
    std::fs::write(victim_in.join("precious"), b"x").unwrap();
    let sweep = tmp.join("bench-sweep.1.tmp");
    std::fs::create_dir(&sweep).unwrap();
    std::fs::write(sweep.join("0"), b"part of a limit write").unwrap();
    std::os::unix::fs::symlink(&victim_in, sweep.join("out")).unwrap();
    old(&sweep.join("0"));
    old(&sweep.join("out"));
    old(&sweep);
    std::fs::write(tmp.join("chunk.young.tmp"), b"still being written").unwrap();
    let o = cairn(&["gc", s, "--grace", "0s"]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}{err}");
    assert!(!sweep.exists(), "old directory in tmp/ left: {out}");
    assert!(
        victim_in.join("precious").exists(),
        "gc deleted through tmp/bench-sweep.1.tmp/out"
    );
    assert!(tmp.join("chunk.young.tmp").exists());
    assert!(
        out.contains("kept 1 entries of tmp/ younger than 10m"),
        "{out}"
    );
    std::fs::remove_file(tmp.join("chunk.young.tmp")).unwrap();

    // Without links, the store collects normally and is intact.
    let o = cairn(&["gc", s, "--grace", "0s"]);
    assert_eq!(o.status.code(), Some(0), "{:?}", text(&o));
    let o = cairn(&["verify", s]);
    assert_eq!(o.status.code(), Some(0), "{:?}", text(&o));
}

#[test]
fn p06_save_refuses_symlinked_store_dirs() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    let outside = dir.path().join("outside");
    std::fs::create_dir(&outside).unwrap();

    // A run directory that is a link.
    let store = Store::open(&root, opts()).unwrap();
    let link = root.join("runs").join("r");
    std::os::unix::fs::symlink(&outside, &link).unwrap();
    let d = data(1);
    let state = SaveState::new().tensor("w", DType::F32, &[d.len() as u64 / 4], &d);
    let err = match store.save("r", 1, &state) {
        Ok(h) => h.wait().map(|_| ()).unwrap_err(),
        Err(e) => e,
    };
    assert!(err.to_string().contains(link.to_str().unwrap()), "{err}");
    assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
    drop(store);
    std::fs::remove_file(&link).unwrap();

    // A chunk fan-out directory that is a link: opening for writing refuses.
    let fan = root.join("chunks").join("00");
    std::fs::remove_dir(&fan).unwrap();
    std::os::unix::fs::symlink(&outside, &fan).unwrap();
    let err = Store::open(&root, opts()).err().expect("open must refuse");
    assert!(err.to_string().contains(fan.to_str().unwrap()), "{err}");
    std::fs::remove_file(&fan).unwrap();

    // The store root itself may be a link.
    let alias = dir.path().join("alias");
    std::os::unix::fs::symlink(&root, &alias).unwrap();
    let store = Store::open(&alias, opts()).unwrap();
    save(&store, "r", 1);
    assert_eq!(store.steps("r").unwrap(), vec![1]);
    assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
}

#[test]
fn p15_ls_lists_the_rest_and_flags_corrupt_manifest() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    {
        let store = Store::open(&root, opts()).unwrap();
        for step in 1..=3 {
            save(&store, "r", step);
        }
    }
    let bad = step_dir(&root, "r", 2).join("manifest.cairn");
    std::fs::write(&bad, b"not a manifest").unwrap();
    let s = root.to_str().unwrap();

    let o = cairn(&["ls", s]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}{err}");
    let listed: Vec<&str> = out.lines().filter(|l| l.starts_with("r ")).collect();
    assert_eq!(listed.len(), 2, "{out}");
    assert!(
        listed[0].contains(" 1 ") && listed[1].contains(" 3 "),
        "{out}"
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with("BAD") && l.contains("step 2")),
        "{out}"
    );

    let o = cairn(&["ls", s, "--json"]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let entries = v.as_array().unwrap();
    let good: Vec<u64> = entries
        .iter()
        .filter(|e| e.get("error").is_none())
        .map(|e| e["step"].as_u64().unwrap())
        .collect();
    assert_eq!(good, vec![1, 3]);
    let flagged: Vec<&serde_json::Value> = entries
        .iter()
        .filter(|e| e.get("error").is_some())
        .collect();
    assert_eq!(flagged.len(), 1, "{out}");
    assert_eq!(flagged[0]["step"], 2);
    assert_eq!(flagged[0]["run"], "r");

    // A run that is a symbolic link (never followed) is one BAD row, and
    // the other runs are still listed.
    std::os::unix::fs::symlink(dir.path(), root.join("runs/linked")).unwrap();
    let o = cairn(&["ls", s]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}{err}");
    assert_eq!(
        out.lines().filter(|l| l.starts_with("r ")).count(),
        2,
        "{out}{err}"
    );
    let linked: Vec<&str> = out.lines().filter(|l| l.contains("run linked")).collect();
    assert_eq!(linked.len(), 1, "{out}");
    assert!(
        linked[0].starts_with("BAD") && linked[0].contains("symbolic link"),
        "{out}"
    );
}

#[test]
fn p17_tiny_remote_grace_is_rejected_up_front() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().join("remote").display());

    let o = cairn(&["gc", &url, "--grace", "0s"]);
    let (out, err) = text(&o);
    assert_ne!(o.status.code(), Some(0), "{out}{err}");
    assert!(err.contains("invalid") && err.contains("grace"), "{err}");
    assert!(
        !dir.path().join("remote").exists(),
        "refused before opening"
    );
    let o = cairn(&["gc", &url, "--grace", "10s"]);
    assert_ne!(o.status.code(), Some(0), "{:?}", text(&o));
    // A grace beyond a year (a mistyped one, recorded for good) too.
    let o = cairn(&["gc", &url, "--grace", "18446744073709551615s"]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}{err}");
    assert!(err.contains("longer than the maximum"), "{err}");
    assert!(!dir.path().join("remote").exists());
    // At the minimum grace, gc runs (on an existing, empty store: a
    // missing one is "not found", never created by gc).
    std::fs::create_dir(dir.path().join("remote")).unwrap();
    let min = humantime::format_duration(cairn::MIN_REMOTE_GC_GRACE).to_string();
    // A remote's grace is a policy for its uploads too: a collection with
    // the store's default (24 h) records that, and a one-off shorter
    // `--grace` is then refused; with the store's grace given as a remote
    // option, the minimum is recorded and runs.
    let o = cairn(&["gc", &url, "--grace", &min]);
    assert_eq!(o.status.code(), Some(1), "{:?}", text(&o));
    assert!(
        text(&o).1.contains(&format!("{url}/gc-grace.json")),
        "{:?}",
        text(&o)
    );
    let remote2 = dir.path().join("remote2");
    std::fs::create_dir(&remote2).unwrap();
    let url2 = format!("file://{}", remote2.display());
    let opt = format!("gc_grace={min}");
    let o = cairn(&["gc", &url2, "--grace", &min, "--remote-option", &opt]);
    assert_eq!(o.status.code(), Some(0), "{:?}", text(&o));

    // The library refuses it too, as an invalid input.
    let remote = file_remote(&dir.path().join("remote"));
    let e = remote.gc(Duration::ZERO, true).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Invalid, "{e}");

    // The daemon's configuration, from a file and from the command line.
    let mut cfg = cairn::DaemonConfig::new(dir.path().join("local"), url.clone());
    cfg.remote_tuning.gc_grace = Duration::ZERO;
    let e = cfg.check().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Invalid, "{e}");
    assert!(e.to_string().contains("grace"), "{e}");
    let conf = dir.path().join("cairn.toml");
    std::fs::write(
        &conf,
        format!(
            "local = {:?}\nremote = {url:?}\n\n[remote_tuning]\ngc_grace = \"0s\"\n",
            dir.path().join("local")
        ),
    )
    .unwrap();
    let o = cairn_with_deadline(
        &[
            "daemon",
            "--config",
            conf.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ],
        Duration::from_secs(30),
    )
    .expect("the daemon must refuse the configuration and exit");
    let (out, err) = text(&o);
    assert_ne!(o.status.code(), Some(0), "{out}{err}");
    assert!(err.contains("invalid") && err.contains("grace"), "{err}");

    // Local collection with no grace is legitimate: the lock makes it safe.
    let local = dir.path().join("local");
    drop(Store::open(&local, opts()).unwrap());
    let o = cairn(&["gc", local.to_str().unwrap(), "--grace", "0s"]);
    assert_eq!(o.status.code(), Some(0), "{:?}", text(&o));
}

fn status(port: u16) -> Option<serde_json::Value> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET /status HTTP/1.1\r\nHost: x\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    serde_json::from_str(out.split_once("\r\n\r\n")?.1).ok()
}

#[test]
fn p04_daemon_keeps_local_copies_the_remote_lost() {
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("local");
    let remote_dir = dir.path().join("remote");
    let url = format!("file://{}", remote_dir.display());
    {
        let mut store = Store::open(&local, opts()).unwrap();
        let remote = file_remote(&remote_dir);
        store.attach_remote(remote.clone());
        for step in 1..=3 {
            save(&store, "r", step);
            store.upload("r", step).unwrap();
        }
        // The remote is emptied behind the daemon's back; the local upload
        // markers still say every step is durable there.
        for step in 1..=3 {
            remote
                .block_on(remote.delete_checkpoint("r", step))
                .unwrap()
                .unwrap();
        }
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let mut child = Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(["daemon", local.to_str().unwrap(), "--remote", &url])
        .args(["--local-keep-last", "1", "--poll-interval", "50ms"])
        .args(["--gc-interval", "0s", "--listen", &listen])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Two whole cycles, retention included.
    let t0 = std::time::Instant::now();
    let mut cycles = 0;
    while cycles < 2 && t0.elapsed() < Duration::from_secs(60) {
        cycles = status(port).map_or(0, |s| s["cycles"].as_u64().unwrap_or(0));
        std::thread::sleep(Duration::from_millis(50));
    }
    // SAFETY: kill(2) on our child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let st = child.wait().unwrap();
    assert!(cycles >= 2, "the daemon did not complete two cycles");
    assert!(st.success(), "{st:?}");
    let store = Store::open_read_only(&local, opts()).unwrap();
    assert_eq!(
        store.steps("r").unwrap(),
        vec![1, 2, 3],
        "deleted the only copies"
    );
}
