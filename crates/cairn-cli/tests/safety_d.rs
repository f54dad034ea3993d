//! Exports that must not harm a store or a model directory, a listing of
//! any valid manifest, and a bench that fails cleaning up after itself.

use cairn::format::manifest::{decode_manifest_file, encode_manifest_file};
use cairn::{DType, SaveState, Store, StoreOptions};
use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_cairn");

fn cairn(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .current_dir("/")
        .output()
        .expect("run cairn")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn code(o: &Output) -> i32 {
    o.status.code().unwrap_or(-1)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Every file under `dir` (relative path -> bytes).
fn files_under(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                let rel = p.strip_prefix(root).unwrap().to_path_buf();
                out.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// Options of the stores these tests make: 64 KiB chunks, 4 MiB staging.
fn small_opts() -> StoreOptions {
    StoreOptions {
        chunk_size: 64 << 10,
        staging_bytes: 4 << 20,
        ..StoreOptions::default()
    }
}

/// Run `r` steps 1 and 2 of six 64 KiB tensors, one chunk each; step 2
/// changes only the last tensor. Returns the chunk files step 2 alone uses.
fn make_store(root: &Path) -> Vec<PathBuf> {
    let store = Store::open(root, small_opts()).expect("open store");
    let mut before = Vec::new();
    for step in [1u64, 2] {
        let data: Vec<Vec<u8>> = (0..6u32)
            .map(|i| {
                let v = if step == 2 && i == 5 { 77 } else { 0 };
                (0..64u32 << 10)
                    .map(|k| (k.wrapping_mul(2_654_435_761) >> (i + 3)) as u8 ^ v)
                    .collect()
            })
            .collect();
        let mut st = SaveState::new();
        for (i, d) in data.iter().enumerate() {
            st = st.tensor(format!("w.{i}"), DType::U8, &[d.len() as u64], d);
        }
        store.save("r", step, &st).unwrap().wait().unwrap();
        if step == 1 {
            before = files_under(&root.join("chunks")).into_keys().collect();
        }
    }
    files_under(&root.join("chunks"))
        .into_keys()
        .filter(|p| !before.contains(p))
        .map(|p| root.join("chunks").join(p))
        .collect()
}

fn step_dir(root: &Path, step: u64) -> PathBuf {
    root.join("runs").join("r").join(format!("{step:020}"))
}

/// `cairn export ROOT --run r --step STEP --out OUT --max-shard-size MAX`.
fn export(root: &Path, step: &str, out: &Path, max: &str) -> Output {
    cairn(&[
        "export",
        s(root),
        "--run",
        "r",
        "--step",
        step,
        "--out",
        s(out),
        "--max-shard-size",
        max,
    ])
}

#[test]
fn an_export_into_a_store_is_refused_and_the_store_kept() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("s");
    let new_chunks = make_store(&root);
    let other = dir.path().join("other");
    make_store(&other);
    let kept = files_under(&root);
    let kept_other = files_under(&other);
    let targets: Vec<(PathBuf, &str)> = vec![
        (step_dir(&root, 2).join("manifest.cairn"), "5GiB"),
        (root.join("cairn-store.json"), "5GiB"),
        (new_chunks[0].clone(), "5GiB"),
        (root.join("gc.lock"), "5GiB"),
        (root.join("tmp").join("m.safetensors"), "5GiB"),
        (root.join("runs"), "128KiB"),
        (
            root.join("chunks").join("new").join("m.safetensors"),
            "5GiB",
        ),
        (root.join("new").join("..").join("runs").join("x"), "128KiB"),
        (other.join("runs").join("r"), "128KiB"),
        (other.join("cairn-store.json"), "5GiB"),
    ];
    for (out, max) in &targets {
        let o = export(&root, "1", out, max);
        assert_eq!(code(&o), 1, "export to {}: {}", out.display(), stderr(&o));
        let e = stderr(&o);
        assert!(
            e.contains("inside the cairn store") && e.contains("among its own files"),
            "export to {}: {e}",
            out.display()
        );
    }
    assert!(files_under(&root) == kept, "the source store changed");
    assert!(files_under(&other) == kept_other, "the other store changed");
    for store in [&root, &other] {
        let o = cairn(&["verify", s(store)]);
        assert_eq!(code(&o), 0, "{}", stderr(&o));
    }
    // Beside the store's own files, and beside the store, is fine.
    for out in [
        root.clone(),
        root.join("exports"),
        dir.path().join("m.safetensors"),
    ] {
        let o = export(&root, "1", &out, "128KiB");
        assert_eq!(code(&o), 0, "{}: {}", out.display(), stderr(&o));
    }
    assert!(root.join("model.safetensors.index.json").is_file());
    // A path ending in '/' names a directory to make, as an existing one.
    let fresh = dir.path().join("fresh").join("x");
    let o = export(&root, "1", Path::new(&format!("{}/", s(&fresh))), "5GiB");
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let got = files_under(&fresh);
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        [Path::new("model.safetensors")]
    );
    let o = cairn(&["verify", s(&root)]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
}

#[test]
fn a_failed_sharded_export_leaves_the_earlier_export_whole() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("s");
    let new_chunks = make_store(&root);
    let out = dir.path().join("model");
    let o = export(&root, "1", &out, "128KiB");
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let first = files_under(&out);
    assert!(
        first.len() == 4,
        "three shards and an index: {:?}",
        first.keys()
    );
    // Step 2's own chunk (its last tensor, in the last shard) is corrupt:
    // the export of step 2 fails after writing the first two shards.
    assert_eq!(new_chunks.len(), 1, "{new_chunks:?}");
    let mut bytes = std::fs::read(&new_chunks[0]).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    std::fs::write(&new_chunks[0], &bytes).unwrap();
    let o = export(&root, "2", &out, "128KiB");
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert!(stderr(&o).contains("corrupt"), "{}", stderr(&o));
    let now = files_under(&out);
    assert_eq!(
        now.keys().collect::<Vec<_>>(),
        first.keys().collect::<Vec<_>>()
    );
    for (name, b) in &first {
        assert!(
            now[name] == *b,
            "{} changed: the directory mixes two steps",
            name.display()
        );
    }
}

#[test]
fn ls_lists_a_step_made_after_the_year_9999() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("s");
    make_store(&root);
    let path = step_dir(&root, 2).join("manifest.cairn");
    let mut m = decode_manifest_file(&std::fs::read(&path).unwrap(), &path).unwrap();
    // 10000-01-01T00:00:00Z, and the largest value the field holds.
    for ms in [253_402_300_800_000u64, u64::MAX] {
        m.created_unix_ms = ms;
        let tmp = path.with_extension("new");
        std::fs::write(&tmp, encode_manifest_file(&m)).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        let o = cairn(&["ls", s(&root)]);
        assert_eq!(code(&o), 0, "{ms}: {}", stderr(&o));
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        assert!(out.lines().count() >= 2, "{ms}: {out}");
        let o = cairn(&["ls", s(&root), "--json"]);
        assert_eq!(code(&o), 0, "{ms}: {}", stderr(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert!(v.to_string().contains(&ms.to_string()), "{ms}: {v}");
    }
}

#[test]
fn a_bench_that_fails_removes_its_files() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("s");
    let mut c = Command::new(BIN);
    c.args(["bench", s(&root), "--size", "64MiB", "--iterations", "1"]);
    // Writes past 24 MiB fail (EFBIG): the disk-limit sweep writes the
    // state's size in one file, so the bench fails there, after its first
    // files are made.
    // SAFETY: setrlimit and signal are async-signal-safe; nothing else runs
    // in the child.
    unsafe {
        c.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: 24 << 20,
                rlim_max: 24 << 20,
            };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            Ok(())
        });
    }
    let o = c.output().unwrap();
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert!(stderr(&o).contains("bench-"), "{}", stderr(&o));
    let left: Vec<_> = std::fs::read_dir(root.join("tmp"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "left in tmp/: {left:?}");
}

#[test]
fn gc_collects_beside_a_stray_file_in_runs() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("s");
    make_store(&root);
    std::fs::write(root.join("runs").join("README"), b"what these runs are").unwrap();
    let o = cairn(&["ls", s(&root)]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    // Step 1's own chunk becomes garbage once step 1 is deleted.
    let store = Store::open(&root, small_opts()).unwrap();
    store.delete("r", 1).unwrap();
    drop(store);
    let o = cairn(&["gc", s(&root), "--grace", "0s", "--json"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(report["chunks_deleted"], 1, "{report}");
    assert_eq!(
        std::fs::read(root.join("runs").join("README")).unwrap(),
        b"what these runs are"
    );
    let o = cairn(&["verify", s(&root)]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
}

#[test]
fn ls_writes_very_large_and_small_metrics_with_an_exponent() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("s");
    let store = Store::open(&root, small_opts()).unwrap();
    let data = vec![1u8; 64];
    let mut st = SaveState::new().tensor("w", DType::U8, &[64], &data);
    st.metrics = BTreeMap::from([
        ("huge".to_string(), 1e308),
        ("loss".to_string(), 2.31),
        ("lr".to_string(), 2.5e-9),
        ("neg".to_string(), -3.0e20),
    ]);
    store.save("r", 1, &st).unwrap().wait().unwrap();
    drop(store);
    let o = cairn(&["ls", s(&root)]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        out.contains("huge=1e308 loss=2.31 lr=2.5e-9 neg=-3e20"),
        "{out}"
    );
    // Each reads back as the number stored.
    for (text, v) in [("1e308", 1e308), ("2.5e-9", 2.5e-9), ("-3e20", -3.0e20)] {
        assert_eq!(text.parse::<f64>().unwrap(), v);
    }
}
