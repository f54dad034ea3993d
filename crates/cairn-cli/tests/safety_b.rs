//! Data-safety regressions in import, export, chunk reuse and special
//! files. Each test is named after the point of the report it covers.

use cairn::{DType, ErrorKind, SaveState, StepSel, Store, StoreOptions, TensorFilter};
use std::io::Write;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Run the release binary, killing it (and failing the test) if it has not
/// finished within `limit`: a hang is a failure, never a stuck test.
fn cairn_within(args: &[&str], limit: Duration) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run cairn");
    // Drain the pipes on threads so a chatty child cannot block on them.
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let to = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = std::io::Read::read_to_end(&mut out, &mut v);
        v
    });
    let te = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = std::io::Read::read_to_end(&mut err, &mut v);
        v
    });
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("cairn {args:?} did not finish within {limit:?} (hung)");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: to.join().unwrap_or_default(),
        stderr: te.join().unwrap_or_default(),
    }
}

fn cairn(args: &[&str]) -> Output {
    cairn_within(args, Duration::from_secs(300))
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn code(o: &Output) -> i32 {
    o.status.code().unwrap_or(-1)
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn small_opts() -> StoreOptions {
    StoreOptions {
        chunk_size: 64 << 10,
        staging_bytes: 8 << 20,
        ..StoreOptions::default()
    }
}

/// Deterministic pseudo-random bytes.
fn bytes(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Save `(run, step)` with two tensors (one chunked, one packed) in a
/// store at `root`.
fn save_sample(root: &Path, run: &str, step: u64) -> (Vec<u8>, Vec<u8>) {
    let big = bytes(1, 200 << 10);
    let small = bytes(2, 1024);
    let store = Store::open(root, small_opts()).unwrap();
    let state = SaveState::new()
        .tensor("w", DType::U8, &[big.len() as u64], &big)
        .tensor("b", DType::F32, &[256], &small);
    store.save(run, step, &state).unwrap().wait().unwrap();
    (big, small)
}

/// Every chunk file of a store.
fn chunk_files(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for d in std::fs::read_dir(root.join("chunks")).unwrap() {
        let d = d.unwrap().path();
        if d.is_dir() {
            for f in std::fs::read_dir(&d).unwrap() {
                out.push(f.unwrap().path());
            }
        }
    }
    out.sort();
    out
}

/// Flip the last byte of a file (a payload byte of a chunk).
fn flip_last_byte(p: &Path) {
    let mut b = std::fs::read(p).unwrap();
    let n = b.len();
    b[n - 1] ^= 0x40;
    // Write in place: chunk files are read-only for nobody, root writes.
    std::fs::write(p, b).unwrap();
}

fn mkfifo(p: &Path) {
    let c = std::ffi::CString::new(s(p)).unwrap();
    // SAFETY: plain syscall with a valid NUL-terminated path.
    let rc = unsafe { libc::mkfifo(c.as_ptr(), 0o644) };
    assert_eq!(rc, 0, "mkfifo {}", p.display());
}

fn is_fifo(p: &Path) -> bool {
    std::fs::symlink_metadata(p)
        .map(|m| m.file_type().is_fifo())
        .unwrap_or(false)
}

/// A safetensors file from a literal header and data section.
fn st_file(path: &Path, header: &str, data: &[u8]) {
    let mut f = std::fs::File::create(path).unwrap();
    f.write_all(&(header.len() as u64).to_le_bytes()).unwrap();
    f.write_all(header.as_bytes()).unwrap();
    f.write_all(data).unwrap();
}

// ---------------------------------------------------------------- point 2

#[test]
fn p02_import_refuses_manifest_over_read_limit() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    // Three shards of 90 MB metadata each: every header is under the
    // 100 MB header cap, together they are over the 256 MiB manifest limit.
    let mut weight_map = serde_json::Map::new();
    for k in 0..3 {
        let name = format!("model-{k}.safetensors");
        let big = "x".repeat(90_000_000);
        let header = format!(
            r#"{{"__metadata__":{{"m{k}":"{big}"}},"t{k}":{{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}}}"#
        );
        drop(big);
        st_file(&dir.path().join(&name), &header, &[k as u8; 4]);
        weight_map.insert(format!("t{k}"), name.into());
    }
    let index = dir.path().join("model.safetensors.index.json");
    std::fs::write(
        &index,
        serde_json::to_vec(&serde_json::json!({"metadata": {}, "weight_map": weight_map})).unwrap(),
    )
    .unwrap();
    let o = cairn(&["import", s(&store), "--run", "r", "--step", "1", s(&index)]);
    assert_eq!(code(&o), 1, "import must refuse: {}", stderr(&o));
    assert!(
        stderr(&o).contains("limit"),
        "the error names the limit: {}",
        stderr(&o)
    );
    // The store stays readable: nothing was published.
    let o = cairn(&["ls", s(&store)]);
    assert_eq!(code(&o), 0, "ls after the refused import: {}", stderr(&o));
    let o = cairn(&["gc", s(&store), "--dry-run"]);
    assert_eq!(code(&o), 0, "gc after the refused import: {}", stderr(&o));
    let st = Store::open_read_only(&store, StoreOptions::default()).unwrap();
    assert!(st.steps("r").unwrap().is_empty());
}

#[test]
fn p02_save_refuses_manifest_over_read_limit() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), small_opts()).unwrap();
    let data = [1u8; 4];
    let meta = serde_json::json!({ "notes": "y".repeat(257 << 20) });
    let state = SaveState::new()
        .tensor("w", DType::U8, &[4], &data)
        .metadata(meta);
    let err = match store.save("r", 1, &state) {
        Err(e) => e,
        Ok(h) => h
            .wait()
            .expect_err("a manifest over the read limit is refused"),
    };
    assert_eq!(err.kind(), ErrorKind::Invalid, "{err}");
    assert!(err.to_string().contains("limit"), "{err}");
    assert!(store.steps("r").unwrap().is_empty());
    // A normal save still works afterwards.
    let state = SaveState::new().tensor("w", DType::U8, &[4], &data);
    store.save("r", 2, &state).unwrap().wait().unwrap();
    assert_eq!(store.steps("r").unwrap(), vec![2]);
}

#[test]
fn p02_manifest_encoder_refuses_body_over_read_limit() {
    // The encoder every commit goes through (saves, copies between tiers)
    // refuses what decode_manifest_file would refuse.
    let mut m = cairn::Manifest {
        format_version: 1,
        run: "r".into(),
        step: 1,
        created_unix_ms: 0,
        chunk_size: 4096,
        tensors: vec![],
        blobs: vec![],
        metadata: serde_json::json!({ "notes": "z".repeat(257 << 20) }),
        metrics: Default::default(),
        part: None,
        world_size: None,
        sharded: vec![],
        attempt: None,
    };
    let err = cairn::format::manifest::encode_manifest(&m).expect_err("over the limit");
    assert_eq!(err.kind(), ErrorKind::Invalid, "{err}");
    assert!(err.to_string().contains("limit"), "{err}");
    m.metadata = serde_json::json!({"notes": "small"});
    let bytes = cairn::format::manifest::encode_manifest(&m).unwrap();
    let back = cairn::format::manifest::decode_manifest_file(&bytes, Path::new("m")).unwrap();
    assert_eq!(back, m);
}

// ---------------------------------------------------------------- point 5

#[test]
fn p05_restore_to_repairs_corrupt_chunk_at_target() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    save_sample(&a, "r", 1);
    save_sample(&a, "r", 2);
    let o = cairn(&["restore", s(&a), "--run", "r", "--step", "1", "--to", s(&b)]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    for c in chunk_files(&b) {
        flip_last_byte(&c);
    }
    // Step 2 shares every chunk with step 1: the copy must not trust the
    // corrupt ones it finds at the target.
    let o = cairn(&["restore", s(&a), "--run", "r", "--step", "2", "--to", s(&b)]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let o = cairn(&["verify", s(&b), "--run", "r", "--step", "2"]);
    assert_eq!(code(&o), 0, "step 2 at the target verifies: {}", stderr(&o));
    // Re-running the copy of step 1 repairs nothing left: all clean.
    let o = cairn(&["restore", s(&a), "--run", "r", "--step", "1", "--to", s(&b)]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let o = cairn(&["verify", s(&b)]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
}

#[test]
fn p05_rerun_restore_to_repairs_committed_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    save_sample(&a, "r", 1);
    let o = cairn(&["restore", s(&a), "--run", "r", "--step", "1", "--to", s(&b)]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let chunks = chunk_files(&b);
    flip_last_byte(&chunks[0]);
    let o = cairn(&["verify", s(&b)]);
    assert_eq!(code(&o), 1, "the flip is visible: {}", stderr(&o));
    let o = cairn(&["restore", s(&a), "--run", "r", "--step", "1", "--to", s(&b)]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let o = cairn(&["verify", s(&b)]);
    assert_eq!(
        code(&o),
        0,
        "running the copy again repairs it: {}",
        stderr(&o)
    );
}

#[test]
fn p05_import_does_not_reuse_corrupt_chunk() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let f = dir.path().join("m.safetensors");
    let data = bytes(7, 4096);
    st_file(
        &f,
        r#"{"w":{"dtype":"U8","shape":[4096],"data_offsets":[0,4096]}}"#,
        &data,
    );
    let o = cairn(&["import", s(&store), "--run", "r", "--step", "1", s(&f)]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let chunks = chunk_files(&store);
    assert_eq!(chunks.len(), 1);
    flip_last_byte(&chunks[0]);
    let o = cairn(&["import", s(&store), "--run", "r", "--step", "2", s(&f)]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let o = cairn(&["verify", s(&store), "--run", "r", "--step", "2"]);
    assert_eq!(code(&o), 0, "the new checkpoint is whole: {}", stderr(&o));
}

#[test]
fn p05_save_rewrites_reused_chunk_with_bad_header_or_size() {
    let dir = tempfile::tempdir().unwrap();
    let (big, small) = save_sample(dir.path(), "r", 1);
    let chunks = chunk_files(dir.path());
    assert!(chunks.len() >= 2);
    // One chunk truncated, one with a damaged header.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&chunks[0])
        .unwrap();
    let len = f.metadata().unwrap().len();
    f.set_len(len - 1).unwrap();
    drop(f);
    let mut b = std::fs::read(&chunks[1]).unwrap();
    b[0] ^= 0xff;
    std::fs::write(&chunks[1], b).unwrap();
    save_sample(dir.path(), "r", 2);
    let store = Store::open_read_only(dir.path(), small_opts()).unwrap();
    let r = store
        .restore("r", StepSel::Step(2), &TensorFilter::All)
        .expect("step 2 restores");
    assert_eq!(r.tensor("w").unwrap().data, big);
    assert_eq!(r.tensor("b").unwrap().data, small);
}

// ---------------------------------------------------------------- point 7

#[test]
fn p07_export_refuses_non_regular_out() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    save_sample(&store, "r", 1);
    let export = |out: &Path| {
        cairn_within(
            &[
                "export",
                s(&store),
                "--run",
                "r",
                "--step",
                "1",
                "--out",
                s(out),
            ],
            Duration::from_secs(60),
        )
    };
    // A FIFO.
    let fifo = dir.path().join("fifo");
    mkfifo(&fifo);
    let o = export(&fifo);
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert!(stderr(&o).contains("not a regular file"), "{}", stderr(&o));
    assert!(is_fifo(&fifo), "the FIFO is still there");
    // A symlink to a device node.
    let link = dir.path().join("null");
    std::os::unix::fs::symlink("/dev/null", &link).unwrap();
    let o = export(&link);
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert!(stderr(&o).contains("not a regular file"), "{}", stderr(&o));
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    let m = std::fs::metadata("/dev/null").unwrap();
    assert!(m.file_type().is_char_device(), "/dev/null is intact");
    // A directory target whose model.safetensors is a FIFO.
    let out = dir.path().join("outdir");
    std::fs::create_dir(&out).unwrap();
    mkfifo(&out.join("model.safetensors"));
    let o = export(&out);
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert!(is_fifo(&out.join("model.safetensors")));
    // No temporary file is left behind.
    let left: Vec<_> = std::fs::read_dir(&out).unwrap().collect();
    assert_eq!(left.len(), 1, "{left:?}");
    // A regular file is replaced as before.
    let file = dir.path().join("m.safetensors");
    std::fs::write(&file, b"old").unwrap();
    let o = export(&file);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(std::fs::metadata(&file).unwrap().len() > 3);
}

// --------------------------------------------------------------- point 12

#[test]
fn p12_fifo_chunk_does_not_hang_readers() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    save_sample(&store, "r", 1);
    for c in chunk_files(&store) {
        std::fs::remove_file(&c).unwrap();
        mkfifo(&c);
    }
    let limit = Duration::from_secs(60);
    let st = s(&store);
    let o = cairn_within(&["verify", st], limit);
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout).into_owned() + &stderr(&o);
    assert!(out.contains("not a regular file"), "{out}");
    let b = dir.path().join("b");
    let o = cairn_within(
        &["restore", st, "--run", "r", "--step", "1", "--to", s(&b)],
        limit,
    );
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    let x = dir.path().join("x.safetensors");
    let o = cairn_within(
        &["export", st, "--run", "r", "--step", "1", "--out", s(&x)],
        limit,
    );
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert!(!x.exists());
    // A save of the same state does not trust the FIFOs either.
    save_sample(&store, "r", 2);
    let o = cairn_within(&["verify", st, "--run", "r", "--step", "2"], limit);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
}

#[test]
fn p12_fifo_import_file_does_not_hang() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let limit = Duration::from_secs(60);
    // The file itself.
    let fifo = dir.path().join("m.safetensors");
    mkfifo(&fifo);
    let o = cairn_within(
        &["import", s(&store), "--run", "r", "--step", "1", s(&fifo)],
        limit,
    );
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert!(stderr(&o).contains("not a regular file"), "{}", stderr(&o));
    // An index that is a FIFO.
    let idx = dir.path().join("model.safetensors.index.json");
    mkfifo(&idx);
    let o = cairn_within(
        &["import", s(&store), "--run", "r", "--step", "1", s(&idx)],
        limit,
    );
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert!(stderr(&o).contains("not a regular file"), "{}", stderr(&o));
    // An index naming a shard that is a FIFO.
    let sub = dir.path().join("sub");
    std::fs::create_dir(&sub).unwrap();
    let idx = sub.join("model.safetensors.index.json");
    std::fs::write(&idx, br#"{"weight_map": {"w": "m.safetensors"}}"#).unwrap();
    mkfifo(&sub.join("m.safetensors"));
    let o = cairn_within(
        &["import", s(&store), "--run", "r", "--step", "1", s(&idx)],
        limit,
    );
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert!(stderr(&o).contains("not a regular file"), "{}", stderr(&o));
}

// --------------------------------------------------------------- point 13

#[test]
fn p13_export_100k_tiny_tensors_is_exact() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let n = 100_000usize;
    let data: Vec<[u8; 4]> = (0..n)
        .map(|i| (i as u32).wrapping_mul(2654435761).to_le_bytes())
        .collect();
    {
        let st = Store::open(&store, small_opts()).unwrap();
        let mut state = SaveState::new();
        for (i, d) in data.iter().enumerate() {
            state = state.tensor(format!("t{i:06}"), DType::F32, &[1], d);
        }
        st.save("r", 1, &state).unwrap().wait().unwrap();
    }
    let out = dir.path().join("out.safetensors");
    let o = cairn(&[
        "export",
        s(&store),
        "--run",
        "r",
        "--step",
        "1",
        "--out",
        s(&out),
    ]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let file = std::fs::read(&out).unwrap();
    let h = cairn::safetensors::parse_header(&file, file.len() as u64, &out).unwrap();
    assert_eq!(h.tensors.len(), n);
    let mut seen = vec![false; n];
    for t in &h.tensors {
        let i: usize = t.name[1..].parse().unwrap();
        assert_eq!(t.dtype, DType::F32);
        assert_eq!(t.shape, vec![1]);
        let at = (h.data_start + t.begin) as usize;
        assert_eq!(&file[at..at + 4], &data[i], "bytes of {}", t.name);
        assert!(!seen[i]);
        seen[i] = true;
    }
    assert!(seen.iter().all(|&b| b));
}

// --------------------------------------------------------------- point 18

/// Import `header` + `data` as a single file; returns the CLI output.
fn import_one(header: &str, data: &[u8]) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("m.safetensors");
    st_file(&f, header, data);
    let store = dir.path().join("store");
    cairn(&["import", s(&store), "--run", "r", "--step", "1", s(&f)])
}

#[test]
fn p18_import_rejects_duplicate_keys() {
    let o = import_one(
        r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"a":{"dtype":"U8","shape":[4],"data_offsets":[4,8]}}"#,
        &[1; 8],
    );
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert!(stderr(&o).contains("duplicate"), "{}", stderr(&o));
    let o = import_one(
        r#"{"__metadata__":{"k":"1","k":"2"},"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}"#,
        &[1; 4],
    );
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert!(stderr(&o).contains("duplicate"), "{}", stderr(&o));
}

#[test]
fn p18_import_rejects_gaps_between_tensors() {
    let o = import_one(
        r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"b":{"dtype":"U8","shape":[4],"data_offsets":[8,12]}}"#,
        &[1; 12],
    );
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert!(stderr(&o).contains("gap"), "{}", stderr(&o));
    // Trailing bytes after the last tensor are a gap too.
    let o = import_one(
        r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}"#,
        &[1; 6],
    );
    assert_eq!(code(&o), 1, "{}", stderr(&o));
}

#[test]
fn p18_import_rejects_non_string_metadata() {
    let o = import_one(
        r#"{"__metadata__":{"epoch":3},"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}"#,
        &[1; 4],
    );
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert!(stderr(&o).contains("__metadata__"), "{}", stderr(&o));
}

#[test]
fn p18_import_rejects_index_disagreeing_with_shards() {
    let dir = tempfile::tempdir().unwrap();
    st_file(
        &dir.path().join("s1.safetensors"),
        r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"b":{"dtype":"U8","shape":[4],"data_offsets":[4,8]}}"#,
        &[1; 8],
    );
    st_file(
        &dir.path().join("s2.safetensors"),
        r#"{"c":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}"#,
        &[2; 4],
    );
    let store = dir.path().join("store");
    let run = |name: &str, map: serde_json::Value| {
        let idx = dir.path().join(name);
        std::fs::write(
            &idx,
            serde_json::to_vec(&serde_json::json!({ "weight_map": map })).unwrap(),
        )
        .unwrap();
        cairn(&["import", s(&store), "--run", "r", "--step", "1", s(&idx)])
    };
    // Tensor b is in s1 but the index does not list it.
    let o = run(
        "i1.index.json",
        serde_json::json!({"a": "s1.safetensors", "c": "s2.safetensors"}),
    );
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert!(stderr(&o).contains("\"b\""), "{}", stderr(&o));
    // The index puts c in the wrong shard.
    let o = run(
        "i2.index.json",
        serde_json::json!({"a": "s1.safetensors", "b": "s1.safetensors", "c": "s1.safetensors", "x": "s2.safetensors"}),
    );
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    // The index lists a tensor no shard holds.
    let o = run(
        "i3.index.json",
        serde_json::json!({"a": "s1.safetensors", "b": "s1.safetensors", "c": "s2.safetensors", "d": "s2.safetensors"}),
    );
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert!(stderr(&o).contains("\"d\""), "{}", stderr(&o));
    // The agreeing index imports.
    let o = run(
        "i4.index.json",
        serde_json::json!({"a": "s1.safetensors", "b": "s1.safetensors", "c": "s2.safetensors"}),
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
}

#[test]
fn p18_import_rejects_empty_header() {
    let o = import_one("{}", &[]);
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert!(stderr(&o).contains("no tensors"), "{}", stderr(&o));
    let o = import_one(r#"{"__metadata__":{"format":"pt"}}"#, &[]);
    assert_eq!(code(&o), 1, "{}", stderr(&o));
}

// --------------------------------------------------------------- point 19

#[test]
fn p19_sharded_export_removes_stale_single_file() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    save_sample(&store, "r", 1);
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let export = |max: &str| {
        cairn(&[
            "export",
            s(&store),
            "--run",
            "r",
            "--step",
            "1",
            "--out",
            s(&out),
            "--max-shard-size",
            max,
        ])
    };
    let o = export("1GiB");
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(out.join("model.safetensors").is_file());
    let o = export("4KiB");
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(out.join("model.safetensors.index.json").is_file());
    assert!(
        !out.join("model.safetensors").exists(),
        "the older single file is gone, loaders would prefer it"
    );
    // A model.safetensors that cairn did not write is left alone, and the
    // export is refused.
    let out2 = dir.path().join("out2");
    std::fs::create_dir(&out2).unwrap();
    st_file(
        &out2.join("model.safetensors"),
        r#"{"z":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}"#,
        &[5],
    );
    let before = std::fs::read(out2.join("model.safetensors")).unwrap();
    let o = cairn(&[
        "export",
        s(&store),
        "--run",
        "r",
        "--step",
        "1",
        "--out",
        s(&out2),
        "--max-shard-size",
        "4KiB",
    ]);
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert!(stderr(&o).contains("model.safetensors"), "{}", stderr(&o));
    assert_eq!(
        std::fs::read(out2.join("model.safetensors")).unwrap(),
        before
    );
    assert!(!out2.join("model.safetensors.index.json").exists());
}

#[test]
fn a_special_file_as_the_collection_lock_is_named_not_waited_on() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    save_sample(&store, "r", 1);
    let lock = store.join("gc.lock");
    std::fs::remove_file(&lock).unwrap();
    mkfifo(&lock);
    for args in [
        vec!["gc", s(&store), "--dry-run"],
        vec!["gc", s(&store), "--grace", "0s"],
    ] {
        let o = cairn_within(&args, Duration::from_secs(60));
        assert_eq!(code(&o), 1, "{args:?}: {}", stderr(&o));
        assert!(
            stderr(&o).contains("gc.lock") && stderr(&o).contains("not a regular file"),
            "{args:?}: {}",
            stderr(&o)
        );
    }
    // A save into the store is refused the same way, and nothing is lost.
    let (tx, rx) = std::sync::mpsc::channel();
    let root = store.clone();
    std::thread::spawn(move || {
        let st = Store::open(&root, small_opts()).unwrap();
        let r = st
            .save(
                "r",
                2,
                &SaveState::new().tensor("x", DType::U8, &[4], &[1, 2, 3, 4]),
            )
            .and_then(|h| h.wait());
        let _ = tx.send(r.map(|_| ()).map_err(|e| e.to_string()));
    });
    let r = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("a save with a FIFO as the collection lock did not finish (hung)");
    let e = r.expect_err("a save took a FIFO as its lock");
    assert!(
        e.contains("gc.lock") && e.contains("not a regular file"),
        "{e}"
    );
    assert!(is_fifo(&lock), "the FIFO is left as it was");
    let o = cairn_within(&["verify", s(&store)], Duration::from_secs(60));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
}

#[test]
fn a_tensor_named_like_the_safetensors_metadata_key_is_not_exported() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let st = Store::open(&store, small_opts()).unwrap();
    let w = bytes(5, 64);
    let state = SaveState::new()
        .tensor("__metadata__", DType::F32, &[4], &w[..16])
        .tensor("w", DType::F32, &[16], &w);
    st.save("r", 1, &state).unwrap().wait().unwrap();
    let out = dir.path().join("m.safetensors");
    let export = |extra: &[&str]| {
        let mut args = vec![
            "export",
            s(&store),
            "--run",
            "r",
            "--step",
            "1",
            "--out",
            s(&out),
        ];
        args.extend_from_slice(extra);
        cairn_within(&args, Duration::from_secs(60))
    };
    let o = export(&[]);
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("__metadata__") && stderr(&o).contains("--tensor"),
        "{}",
        stderr(&o)
    );
    assert!(!out.exists(), "nothing is written");
    // The other tensors export, and the file reads back.
    let o = export(&["--tensor", "w"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let o = cairn_within(
        &["import", s(&store), "--run", "r", "--step", "2", s(&out)],
        Duration::from_secs(60),
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
}

#[test]
fn a_stray_file_in_runs_is_no_run_and_a_broken_marker_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    save_sample(&store, "r", 1);
    std::fs::write(store.join("runs/README.md"), b"notes about these runs\n").unwrap();
    for args in [vec!["ls", s(&store)], vec!["verify", s(&store)]] {
        let o = cairn_within(&args, Duration::from_secs(60));
        assert_eq!(code(&o), 0, "{args:?}: {}", stderr(&o));
    }
    let o = cairn_within(&["ls", s(&store), "--json"], Duration::from_secs(60));
    let rows: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(rows.as_array().map(|r| r.len()), Some(1), "{rows}");
    assert_eq!(rows[0]["run"], "r", "{rows}");
    // A store marker that does not parse is called what it is.
    std::fs::write(store.join("cairn-store.json"), b"garbage").unwrap();
    let o = cairn_within(&["ls", s(&store)], Duration::from_secs(60));
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    let e = stderr(&o);
    assert!(
        e.contains("store marker") && e.contains("cairn-store.json"),
        "{e}"
    );
    assert!(!e.contains("manifest"), "{e}");
}

#[test]
fn latest_names_a_newest_step_whose_manifest_is_damaged() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    save_sample(&store, "r", 1);
    save_sample(&store, "r", 2);
    let o = cairn_within(
        &["latest", s(&store), "--run", "r"],
        Duration::from_secs(60),
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "2");
    let manifest = store.join(format!("runs/r/{:020}/manifest.cairn", 2));
    std::fs::write(&manifest, b"garbage").unwrap();
    let o = cairn_within(
        &["latest", s(&store), "--run", "r"],
        Duration::from_secs(60),
    );
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert!(
        o.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    assert!(stderr(&o).contains("corrupt manifest"), "{}", stderr(&o));
}
