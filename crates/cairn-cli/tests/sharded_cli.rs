//! The `cairn` binary on sharded steps (format v2): `ls` shows world size
//! and parts, committed or pending; `inspect` shows each tensor's shards;
//! `verify` covers parts; `export` consolidates a sharded step into full
//! tensors; `restore --to` copies a sharded step between tiers.

use cairn::{DType, SaveState, ShardInfo, StepSel, Store, StoreOptions, TensorFilter};
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Output};

fn cairn(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(args)
        .output()
        .expect("run cairn")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn gen_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

const ROWS: u64 = 96;
const COLS: u64 = 40;

/// Global tensors: `w` [96, 40] F32 row-sharded over 4 ranks, `b` [40]
/// F32 replicated.
fn globals() -> (Vec<u8>, Vec<u8>) {
    (
        gen_bytes(1, (ROWS * COLS * 4) as usize),
        gen_bytes(2, (COLS * 4) as usize),
    )
}

fn save_rank(store: &Store, step: u64, rank: u32) {
    let (w, b) = globals();
    let rows = ROWS / 4;
    let start = (rank as u64 * rows * COLS * 4) as usize;
    let shard = &w[start..start + (rows * COLS * 4) as usize];
    let s = SaveState::new()
        .shard(
            "w",
            DType::F32,
            &[rows, COLS],
            shard,
            ShardInfo {
                global_shape: vec![ROWS, COLS],
                offsets: vec![rank as u64 * rows, 0],
            },
        )
        .tensor("b", DType::F32, &[COLS], &b);
    store
        .save_part("r", step, rank, 4, &s)
        .unwrap()
        .wait()
        .unwrap();
}

fn setup(dir: &Path) -> Store {
    let store = Store::open(
        dir,
        StoreOptions {
            chunk_size: 4096,
            staging_bytes: 1 << 20,
            ..StoreOptions::default()
        },
    )
    .unwrap();
    for r in 0..4 {
        save_rank(&store, 1, r);
    }
    store.commit("r", 1, 4).unwrap();
    // Step 2: two of four ranks so far.
    save_rank(&store, 2, 0);
    save_rank(&store, 2, 1);
    store
}

#[test]
fn ls_shows_world_size_and_parts_committed_or_pending() {
    let dir = tempfile::tempdir().unwrap();
    let _store = setup(dir.path());
    let s = dir.path().to_str().unwrap();
    let o = cairn(&["ls", s, "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rows: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(rows[0]["step"], 1);
    assert_eq!(rows[0]["world_size"], 4);
    assert_eq!(rows[0]["parts"], 4);
    assert_eq!(rows[0]["tensors"], 2);
    assert_eq!(rows[0]["logical_bytes"], ROWS * COLS * 4 + COLS * 4);
    assert_eq!(rows[1]["step"], 2);
    assert_eq!(rows[1]["pending"], true);
    assert_eq!(rows[1]["parts"]["4"], serde_json::json!([0, 1]));
    let o = cairn(&["ls", s]);
    assert!(o.status.success());
    let text = stdout(&o);
    assert!(text.contains("world 4, 4 parts committed"), "{text}");
    assert!(
        text.contains("PENDING  run r step 2: world 4: 2 of 4 parts (not committed)"),
        "{text}"
    );
}

/// Set the modification time of every part file of `(r, step)` to
/// `hours` ago, as if saved then.
fn age_parts(dir: &Path, step: u64, hours: u64) {
    let parts = dir.join(format!("runs/r/{step:020}/parts"));
    let then = std::time::SystemTime::now() - std::time::Duration::from_secs(hours * 3600);
    for e in std::fs::read_dir(&parts).unwrap() {
        let f = std::fs::File::options()
            .write(true)
            .open(e.unwrap().path())
            .unwrap();
        f.set_modified(then).unwrap();
    }
}

#[test]
fn gc_keeps_undrained_pending_parts_until_a_newer_step_completes() {
    let dir = tempfile::tempdir().unwrap();
    let store = setup(dir.path());
    let s = dir.path().to_str().unwrap();
    // Step 2's two parts, two days old: past the grace, but the newest step
    // of the run and never uploaded, so they stay.
    age_parts(dir.path(), 2, 48);
    let o = cairn(&["gc", s, "--grace", "1h"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = stdout(&o);
    assert!(
        text.contains("removed 0 part manifests of uncommitted steps; kept 2 older than the grace"),
        "{text}"
    );
    let o = cairn(&["ls", s]);
    assert!(
        stdout(&o).contains("PENDING  run r step 2: world 4: 2 of 4 parts"),
        "{}",
        stdout(&o)
    );
    // Step 3 completes: step 2 is superseded and its parts go.
    for r in 0..4 {
        save_rank(&store, 3, r);
    }
    store.commit("r", 3, 4).unwrap();
    let o = cairn(&["gc", s, "--grace", "1h", "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let g: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(g["parts_removed"], 2, "{g}");
    assert_eq!(g["pending_parts_kept"], 0, "{g}");
    let o = cairn(&["ls", s, "--json"]);
    let rows: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let steps: Vec<u64> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, vec![1, 3]);
    let o = cairn(&["verify", s]);
    assert!(o.status.success(), "{}", stdout(&o));
}

#[test]
fn inspect_shows_each_tensors_shards() {
    let dir = tempfile::tempdir().unwrap();
    let _store = setup(dir.path());
    let s = dir.path().to_str().unwrap();
    let o = cairn(&["inspect", s, "--run", "r", "--step", "1", "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["world_size"], 4);
    let w = v["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "w")
        .unwrap();
    assert_eq!(w["shape"], serde_json::json!([ROWS, COLS]));
    let shards = w["shards"].as_array().unwrap();
    assert_eq!(shards.len(), 4);
    for (i, sh) in shards.iter().enumerate() {
        assert_eq!(sh["rank"], i);
        assert_eq!(sh["offsets"], serde_json::json!([i as u64 * 24, 0]));
        assert_eq!(sh["shape"], serde_json::json!([24, COLS]));
    }
    let b = v["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "b")
        .unwrap();
    assert_eq!(
        b["shards"].as_array().unwrap().len(),
        1,
        "replicas stored once"
    );
    let o = cairn(&["inspect", s, "--run", "r", "--step", "1"]);
    let text = stdout(&o);
    assert!(text.contains("sharded over 4 ranks"), "{text}");
    assert!(text.contains("shard rank 3"), "{text}");
}

#[test]
fn verify_covers_committed_and_pending_parts() {
    let dir = tempfile::tempdir().unwrap();
    let store = setup(dir.path());
    let s = dir.path().to_str().unwrap();
    let o = cairn(&["verify", s, "--json"]);
    assert!(o.status.success(), "{}", stdout(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["parts"], 6);
    // A pending part (step 2, rank 2) with bytes no other step holds;
    // then corrupt its chunk: verify names the step and the part.
    let extra = gen_bytes(9, 24 * COLS as usize * 4);
    let st = SaveState::new().shard(
        "w",
        DType::F32,
        &[24, COLS],
        &extra,
        ShardInfo {
            global_shape: vec![ROWS, COLS],
            offsets: vec![48, 0],
        },
    );
    store.save_part("r", 2, 2, 4, &st).unwrap().wait().unwrap();
    let file = store
        .parts("r", 2)
        .unwrap()
        .into_iter()
        .find(|p| p.rank == 2)
        .unwrap()
        .file;
    let m = store.part_manifest("r", 2, &file).unwrap();
    let id = m.tensors[0].chunks[0].id;
    let path = store.chunk_path(&id);
    let mut bytes = std::fs::read(&path).unwrap();
    let n = bytes.len();
    bytes[n - 1] ^= 0xff;
    std::fs::write(&path, bytes).unwrap();
    let o = cairn(&["verify", s]);
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    let text = stdout(&o);
    assert!(text.contains("step 2"), "{text}");
    assert!(text.contains("w (part of rank 2)"), "{text}");
}

/// A safetensors file's tensors: name -> (dtype, shape, bytes).
fn read_safetensors(
    path: &Path,
) -> std::collections::BTreeMap<String, (String, Vec<u64>, Vec<u8>)> {
    let mut f = std::fs::File::open(path).unwrap();
    let mut all = Vec::new();
    f.read_to_end(&mut all).unwrap();
    let n = u64::from_le_bytes(all[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&all[8..8 + n]).unwrap();
    let data = &all[8 + n..];
    let mut out = std::collections::BTreeMap::new();
    for (k, v) in header.as_object().unwrap() {
        if k == "__metadata__" {
            continue;
        }
        let off = v["data_offsets"].as_array().unwrap();
        let (a, b) = (
            off[0].as_u64().unwrap() as usize,
            off[1].as_u64().unwrap() as usize,
        );
        let shape = v["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap())
            .collect();
        out.insert(
            k.clone(),
            (
                v["dtype"].as_str().unwrap().to_string(),
                shape,
                data[a..b].to_vec(),
            ),
        );
    }
    out
}

#[test]
fn export_consolidates_a_sharded_step_into_full_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let _store = setup(dir.path());
    let s = dir.path().to_str().unwrap();
    let out = dir.path().join("model.safetensors");
    let o = cairn(&[
        "export",
        s,
        "--run",
        "r",
        "--step",
        "1",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let t = read_safetensors(&out);
    let (w, b) = globals();
    assert_eq!(t["w"].0, "F32");
    assert_eq!(t["w"].1, vec![ROWS, COLS]);
    assert!(t["w"].2 == w, "w is the consolidated global tensor");
    assert_eq!(t["b"].1, vec![COLS]);
    assert!(t["b"].2 == b);
    // The same file loads in Python's safetensors, where available.
    if let Ok(py) = std::env::var("CAIRN_TEST_PYTHON") {
        let o = Command::new(py)
            .args([
                "-c",
                "import sys; from safetensors.numpy import load_file; t = load_file(sys.argv[1]); print(t['w'].shape, t['w'].dtype)",
                out.to_str().unwrap(),
            ])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert_eq!(stdout(&o).trim(), "(96, 40) float32");
    }
}

fn s3_bucket(tag: &str) -> String {
    let ep = std::env::var("CAIRN_TEST_S3_ENDPOINT").expect("CAIRN_TEST_S3_ENDPOINT");
    let name = format!("cairn-{tag}-{}", std::process::id());
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
fn restore_to_copies_a_sharded_step_between_tiers() {
    let dir = tempfile::tempdir().unwrap();
    let _store = setup(dir.path());
    let s = dir.path().to_str().unwrap();
    let ep = std::env::var("CAIRN_TEST_S3_ENDPOINT").expect("CAIRN_TEST_S3_ENDPOINT");
    let url = format!("s3://{}/ckpt", s3_bucket("shcli"));
    let opts = [
        "--remote-option",
        &format!("endpoint={ep}"),
        "--remote-option",
        "allow_http=true",
        "--remote-option",
        "region=us-east-1",
        "--remote-option",
        "access_key_id=cairn-test",
        "--remote-option",
        "secret_access_key=cairn-test-secret",
    ];
    let mut args = vec!["restore", s, "--run", "r", "--step", "1", "--to", &url];
    args.extend_from_slice(&opts);
    let o = cairn(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // And back from the remote into a fresh local store.
    let back = dir.path().join("back");
    let mut args = vec!["restore", &url, "--run", "r", "--step", "1", "--to"];
    let b = back.to_str().unwrap().to_string();
    args.push(&b);
    args.extend_from_slice(&opts);
    let o = cairn(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let store = Store::open_read_only(&back, StoreOptions::default()).unwrap();
    let m = store.manifest("r", 1).unwrap();
    assert_eq!(m.world_size, Some(4));
    let r = store
        .restore("r", StepSel::Step(1), &TensorFilter::All)
        .unwrap();
    let (w, bb) = globals();
    assert!(r.tensor("w").unwrap().data == w);
    assert!(r.tensor("b").unwrap().data == bb);
    // A region restores from the copy.
    let mut out = vec![0u8; 10 * 4];
    store
        .restore_region("r", StepSel::Step(1), "w", &[30, 5], &[1, 10], &mut out)
        .unwrap();
    let at = ((30 * COLS + 5) * 4) as usize;
    assert!(out == w[at..at + 40]);
}

/// Save `w` row-sharded over four ranks and `b` replicated as step `step`,
/// and commit it.
fn save_sharded(store: &Store, step: u64, w: &[u8], b: &[u8]) {
    let rows = ROWS / 4;
    let len = (rows * COLS * 4) as usize;
    for rank in 0..4u32 {
        let start = rank as usize * len;
        let s = SaveState::new()
            .shard(
                "w",
                DType::F32,
                &[rows, COLS],
                &w[start..start + len],
                ShardInfo {
                    global_shape: vec![ROWS, COLS],
                    offsets: vec![rank as u64 * rows, 0],
                },
            )
            .tensor("b", DType::F32, &[COLS], b);
        store
            .save_part("r", step, rank, 4, &s)
            .unwrap()
            .wait()
            .unwrap();
    }
    store.commit("r", step, 4).unwrap();
}

#[test]
fn diff_compares_sharded_tensors_shard_by_shard_and_with_whole_ones() {
    let dir = tempfile::tempdir().unwrap();
    let store = setup(dir.path());
    let s = dir.path().to_str().unwrap();
    let (w, b) = globals();
    // Step 3: one element of rank 2's rows changed.
    let mut w3 = w.clone();
    let at = (2 * (ROWS / 4) * COLS * 4 + 8) as usize;
    w3[at] ^= 0xff;
    save_sharded(&store, 3, &w3, &b);
    // Step 4: the same bytes as step 3, saved whole by one process.
    let whole = SaveState::new()
        .tensor("w", DType::F32, &[ROWS, COLS], &w3)
        .tensor("b", DType::F32, &[COLS], &b);
    store.save("r", 4, &whole).unwrap().wait().unwrap();

    let diff = |a: &str, b: &str| -> serde_json::Value {
        let o = cairn(&["diff", s, "--run", "r", a, b, "--json"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_str(&stdout(&o)).unwrap()
    };
    // Sharded against sharded: the changed byte differs (a tensor this
    // small is compared byte by byte).
    let d = diff("1", "3");
    assert_eq!(d["added"], serde_json::json!([]), "{d}");
    assert_eq!(d["removed"], serde_json::json!([]), "{d}");
    assert_eq!(d["changed"].as_array().unwrap().len(), 1, "{d}");
    assert_eq!(d["changed"][0]["name"], "w", "{d}");
    assert_eq!(d["changed"][0]["bytes_differing"], 1, "{d}");
    assert_eq!(d["changed"][0]["layout_changed"], false, "{d}");
    assert_eq!(d["unchanged"], 1, "{d}");
    assert_eq!(d["bytes_differing"], 1, "{d}");
    // The same tensors stored sharded and whole are the same tensors.
    for (a, b) in [("3", "4"), ("4", "3")] {
        let d = diff(a, b);
        assert_eq!(d["added"], serde_json::json!([]), "{d}");
        assert_eq!(d["removed"], serde_json::json!([]), "{d}");
        assert_eq!(d["changed"], serde_json::json!([]), "{d}");
        assert_eq!(d["unchanged"], 2, "{d}");
    }
    // Sharded against whole with one byte changed: that byte differs.
    let d = diff("1", "4");
    assert_eq!(d["changed"].as_array().unwrap().len(), 1, "{d}");
    assert_eq!(d["changed"][0]["name"], "w", "{d}");
    assert_eq!(d["changed"][0]["bytes_differing"], 1, "{d}");
    assert_eq!(d["unchanged"], 1, "{d}");
    let o = cairn(&["diff", s, "--run", "r", "1", "3"]);
    assert!(o.status.success());
    assert!(
        stdout(&o).contains("0 added, 0 removed, 1 changed, 1 unchanged"),
        "{}",
        stdout(&o)
    );
}

#[test]
fn diff_counts_a_large_sharded_tensor_by_chunk_and_reads_it_when_resharded() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(
        dir.path(),
        StoreOptions {
            chunk_size: 4096,
            staging_bytes: 1 << 20,
            ..StoreOptions::default()
        },
    )
    .unwrap();
    let s = dir.path().to_str().unwrap();
    // `e` [1024, 512] F32: 2 MiB, so compared by chunk references.
    let (rows, cols) = (1024u64, 512u64);
    let e1 = gen_bytes(7, (rows * cols * 4) as usize);
    let mut e2 = e1.clone();
    e2[(rows * cols * 4 / 2 + 100) as usize] ^= 1;
    let save = |step: u64, e: &[u8], world: u32| {
        let r = rows / world as u64;
        let len = (r * cols * 4) as usize;
        for rank in 0..world {
            let part = &e[rank as usize * len..(rank as usize + 1) * len];
            let st = SaveState::new().shard(
                "e",
                DType::F32,
                &[r, cols],
                part,
                ShardInfo {
                    global_shape: vec![rows, cols],
                    offsets: vec![rank as u64 * r, 0],
                },
            );
            store
                .save_part("r", step, rank, world, &st)
                .unwrap()
                .wait()
                .unwrap();
        }
        store.commit("r", step, world).unwrap();
    };
    save(1, &e1, 4);
    save(2, &e2, 4);
    save(3, &e2, 2);
    let diff = |a: &str, b: &str| -> serde_json::Value {
        let o = cairn(&["diff", s, "--run", "r", a, b, "--json"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_str(&stdout(&o)).unwrap()
    };
    // Same sharding: the one chunk holding the changed byte differs.
    let d = diff("1", "2");
    assert_eq!(d["changed"][0]["name"], "e", "{d}");
    assert_eq!(d["changed"][0]["bytes_differing"], 4096, "{d}");
    assert_eq!(d["unchanged"], 0, "{d}");
    // Resharded from four ranks to two, same bytes: unchanged.
    let d = diff("2", "3");
    assert_eq!(d["changed"], serde_json::json!([]), "{d}");
    assert_eq!(d["unchanged"], 1, "{d}");
    // Resharded and changed: read and compared, one byte.
    let d = diff("1", "3");
    assert_eq!(d["changed"][0]["bytes_differing"], 1, "{d}");
}
