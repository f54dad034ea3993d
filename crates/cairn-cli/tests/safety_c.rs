//! The command line as a shell user meets it: relative paths, closed or
//! full stdout, bench sizes, bounded reads, selections that match nothing,
//! and the exit code of bad arguments.

use cairn::{DType, SaveState, Store, StoreOptions};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_cairn");

/// Address-space limit for runs that could otherwise eat the machine's
/// memory: such a run fails instead.
const AS_LIMIT: u64 = 1 << 30;

fn cairn_in(dir: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run cairn")
}

fn cairn(args: &[&str]) -> Output {
    cairn_in(Path::new("/"), args)
}

/// Run with an address-space limit, so a runaway allocation fails the
/// test rather than the machine.
fn cairn_limited(args: &[&str]) -> Output {
    let mut c = Command::new(BIN);
    c.args(args);
    // SAFETY: setrlimit is async-signal-safe; nothing else runs in the child.
    unsafe {
        c.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: AS_LIMIT,
                rlim_max: AS_LIMIT,
            };
            if libc::setrlimit(libc::RLIMIT_AS, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    c.output().expect("run cairn")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn small_opts() -> StoreOptions {
    StoreOptions {
        chunk_size: 64 << 10,
        staging_bytes: 1 << 20,
        ..StoreOptions::default()
    }
}

/// A store at `root` with run `r`, steps 1 and 2, each `n` small tensors
/// (step 2 changes every third one).
fn make_store(root: &Path, n: usize) {
    let store = Store::open(root, small_opts()).expect("open store");
    for step in [1u64, 2] {
        let data: Vec<Vec<u8>> = (0..n)
            .map(|i| {
                let v = if step == 2 && i % 3 == 0 { 7 } else { 1 };
                vec![(i as u8).wrapping_add(v); 64]
            })
            .collect();
        let mut s = SaveState::new();
        for (i, d) in data.iter().enumerate() {
            s = s.tensor(
                format!("model.layers.{i}.weight"),
                DType::F32,
                &[16],
                d.as_slice(),
            );
        }
        store.save("r", step, &s).unwrap().wait().unwrap();
    }
}

#[test]
fn p08_bare_relative_paths_work() {
    let dir = tempfile::tempdir().unwrap();
    let cwd = dir.path();
    make_store(&cwd.join("src"), 4);

    let o = cairn_in(
        cwd,
        &[
            "export",
            "src",
            "--run",
            "r",
            "--step",
            "1",
            "--out",
            "model.safetensors",
        ],
    );
    assert_eq!(o.status.code(), Some(0), "export: {}", stderr(&o));
    assert!(cwd.join("model.safetensors").is_file());

    let o = cairn_in(
        cwd,
        &[
            "import",
            "ck",
            "--run",
            "r",
            "--step",
            "1",
            "model.safetensors",
        ],
    );
    assert_eq!(o.status.code(), Some(0), "import: {}", stderr(&o));
    assert!(cwd.join("ck").join("runs").join("r").is_dir());

    let o = cairn_in(
        cwd,
        &["restore", "src", "--run", "r", "--step", "2", "--to", "ck2"],
    );
    assert_eq!(o.status.code(), Some(0), "restore: {}", stderr(&o));
    let o = cairn_in(cwd, &["verify", "ck2", "--run", "r", "--step", "2"]);
    assert_eq!(o.status.code(), Some(0), "verify ck2: {}", stderr(&o));

    let o = cairn_in(
        cwd,
        &[
            "bench",
            "bk",
            "--size",
            "1MiB",
            "--iterations",
            "1",
            "--chunk-size",
            "256KiB",
        ],
    );
    assert_eq!(o.status.code(), Some(0), "bench: {}", stderr(&o));
    let o = cairn_in(cwd, &["verify", "bk"]);
    assert_eq!(o.status.code(), Some(0), "verify bk: {}", stderr(&o));
}

/// Run `args` with stdout a pipe whose read end is already closed.
fn with_closed_stdout(args: &[&str]) -> Output {
    use std::os::fd::{FromRawFd, OwnedFd};
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two new descriptors into the array.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both descriptors are new and owned here alone.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    drop(r);
    Command::new(BIN)
        .args(args)
        .stdout(w)
        .stderr(Stdio::piped())
        .output()
        .expect("run cairn")
}

/// Run `args` with stdout on /dev/full.
fn with_full_stdout(args: &[&str]) -> Output {
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    Command::new(BIN)
        .args(args)
        .stdout(full)
        .stderr(Stdio::piped())
        .output()
        .expect("run cairn")
}

#[test]
fn p09_closed_stdout_exits_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("s");
    make_store(&root, 300);
    let s = root.to_str().unwrap();
    let commands: Vec<Vec<&str>> = vec![
        vec!["ls", s],
        vec!["ls", s, "--json"],
        vec!["inspect", s, "--run", "r", "--step", "latest"],
        vec!["inspect", s, "--run", "r", "--step", "1", "--json"],
        vec!["verify", s],
        vec!["diff", s, "--run", "r", "1", "2"],
        vec!["gc", s, "--dry-run"],
        vec!["completions", "bash"],
        vec!["--help"],
        vec!["ls", "--help"],
        vec!["--version"],
    ];
    for args in &commands {
        let o = with_closed_stdout(args);
        let err = stderr(&o);
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert_eq!(o.status.code(), Some(0), "{args:?} on a closed pipe: {err}");

        let o = with_full_stdout(args);
        let err = stderr(&o);
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert_eq!(o.status.code(), Some(1), "{args:?} on /dev/full: {err}");
        assert!(
            err.contains("error:") && err.contains("No space left on device"),
            "{args:?} on /dev/full: {err}"
        );
    }
}

#[test]
fn p10_bench_size_is_checked() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("b");
    let s = store.to_str().unwrap();
    let o = cairn_limited(&["bench", s, "--size", "1TiB"]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "--size 1TiB: {err}");
    assert!(
        err.contains("--size") && err.contains("available memory"),
        "{err}"
    );
    assert!(
        !err.contains("panicked") && !err.contains("allocation"),
        "{err}"
    );
    assert!(!store.exists(), "a refused bench must not create the store");

    for tiny in ["0", "1000", "512KiB"] {
        let o = cairn(&["bench", s, "--size", tiny]);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "--size {tiny}: {err}");
        assert!(err.contains("at least 1 MiB"), "--size {tiny}: {err}");
        assert!(!store.exists());
    }
}

#[test]
fn p11_reads_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    // A 2 GiB sparse manifest under a file:// remote.
    let remote = dir.path().join("remote");
    let step_dir = remote.join("runs").join("r").join(format!("{:020}", 1));
    std::fs::create_dir_all(&step_dir).unwrap();
    std::fs::create_dir_all(remote.join("chunks")).unwrap();
    let f = std::fs::File::create(step_dir.join("manifest.cairn")).unwrap();
    f.set_len(2 << 30).unwrap();
    drop(f);
    let url = format!("file://{}", remote.display());
    for args in [
        vec!["ls", url.as_str()],
        vec!["inspect", url.as_str(), "--run", "r", "--step", "1"],
        vec!["verify", url.as_str()],
    ] {
        let o = cairn_limited(&args);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        // `verify` reports it as a problem and `ls` flags it on its line
        // (listing the rest); `inspect` fails with the error.
        if args[0] == "verify" || args[0] == "ls" {
            assert!(
                stdout(&o).contains("larger than"),
                "{args:?}: {}",
                stdout(&o)
            );
        } else {
            assert!(err.contains("larger than"), "{args:?}: {err}");
        }
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }

    // Daemon config: a device that never ends, and an oversized file.
    let o = cairn_limited(&["daemon", "--config", "/dev/zero"]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("/dev/zero") && err.contains("not a regular file"),
        "{err}"
    );
    let big = dir.path().join("big.toml");
    std::fs::File::create(&big)
        .unwrap()
        .set_len(2 << 30)
        .unwrap();
    let o = cairn_limited(&["daemon", "--config", big.to_str().unwrap()]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("big.toml") && err.contains("larger than"),
        "{err}"
    );
}

#[test]
fn p14_selections_and_missing_stores_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("s");
    make_store(&root, 4);
    let s = root.to_str().unwrap();

    // A run that does not exist.
    for args in [
        vec!["verify", s, "--run", "TYPO"],
        vec!["ls", s, "--run", "TYPO"],
    ] {
        let o = cairn(&args);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {}", stdout(&o));
        assert!(stderr(&o).contains("TYPO"), "{args:?}: {}", stderr(&o));
        assert!(!stdout(&o).contains("verified"), "{}", stdout(&o));
    }
    // A tensor glob that matches nothing.
    let o = cairn(&[
        "inspect", s, "--run", "r", "--step", "1", "--tensor", "nomatch*",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    assert!(stderr(&o).contains("nomatch*"), "{}", stderr(&o));
    let to = dir.path().join("copy");
    let o = cairn(&[
        "restore",
        s,
        "--run",
        "r",
        "--step",
        "1",
        "--to",
        to.to_str().unwrap(),
        "--tensor",
        "nomatch*",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    assert!(stderr(&o).contains("nomatch*"), "{}", stderr(&o));

    // Read-only commands never create a store.
    let missing = dir.path().join("typo");
    let url = format!("file://{}", missing.display());
    let not_store = dir.path().join("notastore");
    std::fs::create_dir(&not_store).unwrap();
    std::fs::write(not_store.join("hello.txt"), b"hi").unwrap();
    let not_store_url = format!("file://{}", not_store.display());
    for loc in [
        missing.to_str().unwrap(),
        url.as_str(),
        not_store.to_str().unwrap(),
        not_store_url.as_str(),
    ] {
        for args in [
            vec!["ls", loc],
            vec!["verify", loc],
            vec!["gc", loc, "--dry-run"],
            vec!["gc", loc],
            vec!["inspect", loc, "--run", "r", "--step", "latest"],
        ] {
            let o = cairn(&args);
            let err = stderr(&o);
            assert_eq!(o.status.code(), Some(1), "{args:?}: {}", stdout(&o));
            assert!(
                err.contains("not found") && err.contains(missing.to_str().unwrap())
                    || err.contains(not_store.to_str().unwrap()),
                "{args:?}: {err}"
            );
            assert!(!missing.exists(), "{args:?} created {}", missing.display());
        }
    }
    assert_eq!(std::fs::read_dir(&not_store).unwrap().count(), 1);
}

#[test]
fn p16_bad_arguments_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("s");
    make_store(&root, 4);
    let s = root.to_str().unwrap();
    let b = dir.path().join("bench");
    let bs = b.to_str().unwrap();
    let remote = format!("file://{}", dir.path().join("remote").display());
    let r = remote.as_str();
    let cases: Vec<Vec<&str>> = vec![
        // Invalid run names.
        vec!["ls", s, "--run", "../x"],
        vec!["inspect", s, "--run", "a/b", "--step", "1"],
        vec!["verify", s, "--run", ".hidden"],
        vec!["diff", s, "--run", "", "1", "2"],
        vec!["export", s, "--run", "a b", "--step", "1", "--out", "x"],
        vec![
            "import",
            s,
            "--run",
            "../up",
            "--step",
            "1",
            "x.safetensors",
        ],
        vec!["restore", s, "--run", "a/b", "--step", "1", "--to", bs],
        vec!["bench", bs, "--run", "../x"],
        // Bench sizes and counts.
        vec!["bench", bs, "--chunk-size", "0"],
        vec!["bench", bs, "--chunk-size", "2GiB"],
        vec!["bench", bs, "--staging", "1"],
        vec!["bench", bs, "--chunk-size", "4MiB", "--staging", "1MiB"],
        vec!["bench", bs, "--iterations", "0"],
        // Thread counts past MAX_THREADS (100000 workers aborted the
        // process: out of memory for their stacks).
        vec!["bench", bs, "--workers", "100000"],
        vec!["bench", bs, "--sync-threads", "100000"],
        vec!["bench", bs, "--read-threads", "1025"],
        vec!["bench", bs, "--copy-threads", "5000"],
        vec!["bench", bs, "--lead-workers", "2000"],
        // Daemon arguments.
        vec!["daemon"],
        vec!["daemon", bs],
        vec!["daemon", "--remote", r],
        vec!["daemon", bs, "--remote", r, "--poll-interval", "0s"],
        vec!["daemon", bs, "--remote", r, "--local-keep-last", "0"],
        vec!["daemon", bs, "--remote", r, "--remote-keep-last", "0"],
        vec!["daemon", bs, "--remote", r, "--listen", "0.0.0.0:9464"],
        vec!["daemon", bs, "--remote", r, "--listen", "10.1.2.3:80"],
        vec!["daemon", bs, "--remote", r, "--remote-option", "novalue"],
        // A malformed --remote-option anywhere.
        vec!["ls", r, "--remote-option", "region"],
        vec!["--remote-option", "=x", "verify", s],
    ];
    for args in &cases {
        let o = cairn(args);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains("error"), "{args:?}: {err}");
        assert!(!b.exists(), "{args:?} created {bs}");
        assert!(
            !dir.path().join("remote").exists(),
            "{args:?} created the remote"
        );
    }

    // Bad data in an input file is a failure, not a bad argument.
    let junk = dir.path().join("junk.safetensors");
    std::fs::write(&junk, b"this is not safetensors").unwrap();
    let o = cairn(&[
        "import",
        s,
        "--run",
        "r",
        "--step",
        "9",
        junk.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let cfg = dir.path().join("bad.toml");
    std::fs::write(&cfg, b"local = 3\n").unwrap();
    let o = cairn(&["daemon", "--config", cfg.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
}

#[test]
fn p17_a_file_where_a_store_would_be_made_is_named_and_kept() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("s");
    make_store(&root, 2);
    let s = root.to_str().unwrap();
    let file = dir.path().join("notes.txt");
    std::fs::write(&file, b"my notes").unwrap();
    let f = file.to_str().unwrap();
    let below = file.join("ckpt");
    let b = below.to_str().unwrap();
    let st = dir.path().join("m.safetensors");
    let o = cairn(&[
        "export",
        s,
        "--run",
        "r",
        "--step",
        "1",
        "--out",
        st.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let st = st.to_str().unwrap();
    for target in [f, b] {
        for args in [
            vec!["restore", s, "--run", "r", "--step", "1", "--to", target],
            vec!["import", target, "--run", "i", "--step", "0", st],
            vec!["bench", target, "--size", "1MiB", "--iterations", "1"],
        ] {
            let o = cairn(&args);
            let err = stderr(&o);
            assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
            // The file itself is named, not a path made inside it.
            assert!(
                err.contains(&format!("{f}: ")) && err.contains("not a directory"),
                "{args:?}: {err}"
            );
            assert_eq!(std::fs::read(&file).unwrap(), b"my notes", "{args:?}");
        }
    }
}

/// Whether process `pid` has open a file being written in `dir` that is
/// not yet in place: unnamed (`dir/#N (deleted)`) or under an export's
/// temporary name.
fn writing_in(pid: u32, dir: &Path) -> bool {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter(|t| t.parent() == Some(dir))
        .any(|t| {
            let name = t.file_name().unwrap_or_default().to_string_lossy();
            name.ends_with(" (deleted)") || name.starts_with(".cairn-export.")
        })
}

/// Whether the filesystem holding `dir` makes unnamed files (`O_TMPFILE`);
/// where it does not, an export writes under a temporary name, which a
/// killed export leaves (as documented).
fn unnamed_files_in(dir: &Path) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_TMPFILE)
        .open(dir)
        .is_ok()
}

#[test]
fn p18_an_export_killed_while_writing_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("s");
    {
        let store = Store::open(&root, StoreOptions::default()).expect("open store");
        let mut s = SaveState::new();
        let data: Vec<u8> = (0..64u32 << 20)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        for (i, d) in data.chunks(4 << 20).enumerate() {
            s = s.tensor(format!("w.{i}"), DType::U8, &[d.len() as u64], d);
        }
        for step in [1u64, 2] {
            store.save("r", step, &s).unwrap().wait().unwrap();
        }
    }
    let s = root.to_str().unwrap();
    let out = {
        std::fs::create_dir(dir.path().join("out")).unwrap();
        dir.path().join("out").canonicalize().unwrap()
    };
    let file = out.join("m.safetensors");
    let export = |step: &'static str, to: &Path| -> Output {
        let to = to.to_str().unwrap();
        cairn(&["export", s, "--run", "r", "--step", step, "--out", to])
    };
    // What step 2's export is, made elsewhere.
    let reference = dir.path().join("step2.safetensors");
    let o = export("2", &reference);
    assert!(o.status.success(), "{}", stderr(&o));
    let step2 = std::fs::read(&reference).unwrap();
    let o = export("1", &file);
    assert!(o.status.success(), "{}", stderr(&o));
    let committed = std::fs::read(&file).unwrap();
    let unnamed = unnamed_files_in(&out);
    let mut killed = 0;
    for _ in 0..3 {
        let mut child = Command::new(BIN)
            .args(["export", s, "--run", "r", "--step", "2", "--out"])
            .arg(&file)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let caught = loop {
            if writing_in(child.id(), &out) {
                break true;
            }
            if child.try_wait().unwrap().is_some() {
                break false;
            }
            std::thread::sleep(std::time::Duration::from_micros(200));
        };
        child.kill().unwrap();
        let status = child.wait().unwrap();
        if !caught || status.success() {
            continue;
        }
        killed += 1;
        let left: Vec<String> = std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n != "m.safetensors")
            .collect();
        if unnamed {
            assert_eq!(left, Vec::<String>::new(), "left in the output directory");
        } else {
            eprintln!("no unnamed files in {}: left {left:?}", out.display());
        }
        // The earlier export whole, or (killed as it finished) the new one.
        let now = std::fs::read(&file).unwrap();
        assert!(now == committed || now == step2, "the export file is torn");
    }
    assert!(killed > 0, "no export was caught while writing its file");
    let o = export("2", &file);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(std::fs::read(&file).unwrap(), step2);
}
