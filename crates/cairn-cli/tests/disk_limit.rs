//! The disk limit `cairn bench` measures cairn against: its sweep tries
//! many chunk-sized files written and read at once as well as one file,
//! reports the winning shapes, and leaves nothing behind; and
//! `scripts/bench-disk`, the fio cross-check.

use cairn_cli::bench::raw::{self, IoShape};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn cairn(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(args)
        .output()
        .expect("run cairn")
}

/// A temporary directory on the build's disk (O_DIRECT needs a real file
/// system, which /tmp may not be).
fn tmpdir() -> tempfile::TempDir {
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap()
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Every entry below `dir`, recursively.
fn entries(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(entries(&p));
            }
            out.push(p);
        }
    }
    out
}

#[test]
fn many_file_limit_writes_chunk_sized_files_and_reads_them_all() {
    let dir = tmpdir();
    let at = dir.path().join("limit");
    let len = (5 << 20) + 123;
    let shape = IoShape {
        block: 1 << 20,
        depth: 3,
        file_bytes: 2 << 20,
    };
    raw::limit_write(&at, len, shape).unwrap();
    let mut sizes: Vec<u64> = raw::limit_files(&at)
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .collect();
    sizes.sort();
    // Two whole files and the rest, padded to 4 KiB for O_DIRECT.
    assert_eq!(sizes, vec![(1 << 20) + 4096, 2 << 20, 2 << 20]);
    let (_, n) = raw::limit_read(&at, shape).unwrap();
    assert_eq!(n, (5 << 20) + 4096, "bytes read back");
    raw::remove_limit(&at);
    assert!(!at.exists(), "the limit's directory is removed");

    // One file: the same bytes, one file of exactly `len`.
    let one = IoShape::one_file(1 << 20, 2);
    raw::limit_write(&at, len, one).unwrap();
    assert_eq!(std::fs::metadata(&at).unwrap().len(), len as u64);
    let (_, n) = raw::limit_read(&at, one).unwrap();
    assert_eq!(n, len as u64);
    raw::remove_limit(&at);
    assert!(!at.exists());
}

#[test]
fn sweep_tries_many_file_shapes_and_cleans_up() {
    let dir = tmpdir();
    let at = dir.path().join("sweep");
    let shapes = raw::file_shapes(1 << 20);
    assert!(
        shapes
            .iter()
            .any(|s| s.depth >= 8 && s.file_bytes == 1 << 20),
        "many chunk-sized files at once: {shapes:?}"
    );
    let (w, r) = raw::sweep(&at, 4 << 20, 1 << 20).unwrap();
    let known: Vec<IoShape> = raw::SWEEP.into_iter().chain(shapes).collect();
    for best in [&w, &r] {
        // The best of each layout, fastest first.
        assert_eq!(best.len(), 2, "{best:?}");
        assert!(best[0].1 <= best[1].1 && best[0].1 > 0.0, "{best:?}");
        let layouts: Vec<bool> = best.iter().map(|(s, _)| s.file_bytes > 0).collect();
        assert!(
            layouts.contains(&true) && layouts.contains(&false),
            "{best:?}"
        );
        assert!(best.iter().all(|(s, _)| known.contains(s)), "{best:?}");
    }
    assert!(!at.exists(), "the sweep removes what it wrote");
    assert!(entries(dir.path()).is_empty());
}

#[test]
fn bench_names_the_winning_limit_shapes_and_leaves_no_limit_files() {
    let dir = tmpdir();
    let store = dir.path().join("store");
    let s = store.to_str().unwrap();
    let o = cairn(&[
        "bench",
        s,
        "--size",
        "8MiB",
        "--iterations",
        "1",
        "--chunk-size",
        "1MiB",
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).expect("bench --json is JSON");
    for key in [
        "limit_write_s",
        "limit_read_s",
        "durable_vs_limit",
        "restore_vs_limit",
    ] {
        let v = r[key].as_f64().unwrap_or_else(|| panic!("{key}: {r}"));
        assert!(v.is_finite() && v > 0.0, "{key} = {v}");
    }
    for key in ["limit_write_shape", "limit_read_shape"] {
        let shape = &r[key];
        let fb = shape["file_bytes"]
            .as_u64()
            .unwrap_or_else(|| panic!("{key} names its file layout: {shape}"));
        assert!(
            fb == 0 || fb == 1 << 20,
            "{key}: files of one chunk: {shape}"
        );
        assert!(shape["block"].as_u64().unwrap() > 0 && shape["depth"].as_u64().unwrap() > 0);
    }
    // Each iteration times every shape the sweep kept (its best one-file
    // and best many-file shape) and takes one of them as its limit.
    let kept = r["limit_write_shapes"]
        .as_array()
        .expect("limit_write_shapes");
    assert!(!kept.is_empty() && kept.len() <= 2, "{kept:?}");
    assert!(kept.contains(&r["limit_write_shape"]), "{r}");
    for it in r["iterations"].as_array().expect("iterations") {
        for (times, limit, shapes) in [
            (
                "limit_write_shapes_s",
                "limit_write_s",
                "limit_write_shapes",
            ),
            ("limit_read_shapes_s", "limit_read_s", "limit_read_shapes"),
        ] {
            let t: Vec<f64> = it[times]
                .as_array()
                .unwrap_or_else(|| panic!("{times}: {it}"))
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect();
            assert_eq!(t.len(), r[shapes].as_array().unwrap().len(), "{it}");
            let l = it[limit].as_f64().unwrap();
            assert!(t.contains(&l), "{limit} {l} is one of {t:?}");
        }
    }
    for key in ["hash_busy_s", "write_busy_s", "sync_busy_s", "commit_s"] {
        let v = r[key].as_f64().unwrap_or_else(|| panic!("{key}: {r}"));
        assert!(v.is_finite() && v >= 0.0, "{key} = {v}");
    }
    let left: Vec<PathBuf> = entries(&store.join("tmp"));
    assert!(left.is_empty(), "bench left files in tmp/: {left:?}");

    // The human report names the shapes too.
    let o = cairn(&[
        "bench",
        s,
        "--size",
        "8MiB",
        "--iterations",
        "1",
        "--chunk-size",
        "1MiB",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8_lossy(&o.stdout);
    let line = out
        .lines()
        .find(|l| l.starts_with("disk limit"))
        .unwrap_or_else(|| panic!("no disk limit line: {out}"));
    assert!(
        line.contains("one file") || line.contains("files"),
        "{line}"
    );
    assert!(out.contains("save busy"), "{out}");
}

#[test]
fn bench_disk_says_so_when_fio_is_missing() {
    // A PATH with the tools the script needs but no fio.
    let bin = tmpdir();
    let dirname = ["/usr/bin", "/bin"]
        .iter()
        .map(|d| Path::new(d).join("dirname"))
        .find(|p| p.exists())
        .expect("dirname installed");
    std::os::unix::fs::symlink(dirname, bin.path().join("dirname")).unwrap();
    let o = Command::new("/bin/bash")
        .arg(repo_root().join("scripts/bench-disk"))
        .env("PATH", bin.path())
        .output()
        .expect("run scripts/bench-disk");
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("fio is not installed"), "{err}");
}

#[test]
fn bench_disk_runs_fio_when_installed() {
    let has_fio = Command::new("fio")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_fio {
        // `scripts/test` installs fio and sets CAIRN_TEST_REQUIRE_FIO, so
        // in CI a missing fio fails here instead of passing unseen.
        assert!(
            std::env::var_os("CAIRN_TEST_REQUIRE_FIO").is_none(),
            "CAIRN_TEST_REQUIRE_FIO is set but fio is not installed"
        );
        eprintln!("fio not installed; skipping");
        return;
    }
    let dir = tmpdir();
    let o = Command::new(repo_root().join("scripts/bench-disk"))
        .arg(dir.path())
        .arg("64M")
        .output()
        .expect("run scripts/bench-disk");
    assert!(o.status.success(), "{o:?}");
    let out = String::from_utf8_lossy(&o.stdout);
    for what in ["sequential write", "sequential read"] {
        let line = out
            .lines()
            .find(|l| l.contains(what))
            .unwrap_or_else(|| panic!("no {what} line: {out}"));
        let gbps: f64 = line
            .split_whitespace()
            .rev()
            .nth(1)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no figure in {line}"));
        assert!(gbps > 0.0, "{line}");
    }
    assert!(entries(dir.path()).is_empty(), "fio's file is removed");
}
