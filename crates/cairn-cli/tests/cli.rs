//! End-to-end tests of the built `cairn` binary.

#[path = "../../../tests/common/mod.rs"]
mod common;

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

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn bench_then_ls_then_verify() {
    let dir = tempfile::tempdir().unwrap();
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
        "--warmup",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let r: serde_json::Value = serde_json::from_str(&stdout(&o)).expect("bench --json is JSON");
    for key in [
        "stall_s",
        "memcpy_s",
        "stall_ratio",
        "durable_s",
        "raw_write_fsync_s",
        "durable_ratio",
        "raw_direct_write_s",
        "durable_vs_direct_ratio",
        "restore_s",
        "raw_cold_read_s",
        "restore_ratio",
        "compression_ratio",
        "dedup_written_fraction",
        "peak_rss_bytes",
    ] {
        let v = r[key]
            .as_f64()
            .unwrap_or_else(|| panic!("{key} missing: {r}"));
        assert!(v.is_finite() && v > 0.0, "{key} = {v}");
    }
    let dedup = r["dedup_written_fraction"].as_f64().unwrap();
    assert!(dedup < 0.5, "a 10% change wrote {dedup} of the bytes");
    let first = r["first_save_durable_s"]
        .as_f64()
        .expect("warm-up save timed");
    assert!(first.is_finite() && first > 0.0, "first save {first}");

    // A second run adds new steps; without the warm-up save, two.
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
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("stall/memcpy"));
    assert!(!stdout(&o).contains("first save"), "{}", stdout(&o));

    let o = cairn(&["ls", s, "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let l: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let steps: Vec<u64> = l
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["step"].as_u64().unwrap())
        .collect();
    // First run: the warm-up (0), the full save (1), the ~10% changed
    // one (2); the second run: 3 and 4.
    assert_eq!(steps, vec![0, 1, 2, 3, 4]);
    assert_eq!(l[0]["run"], "bench");
    assert!(l[0]["tensors"].as_u64().unwrap() > 30);

    let o = cairn(&["ls", s]);
    assert!(stdout(&o).contains("bench"));

    let o = cairn(&["verify", s]);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    assert!(stdout(&o).contains("all verified"));
    let o = cairn(&["verify", s, "--run", "bench", "--step", "latest"]);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    assert!(stdout(&o).starts_with("1 checkpoints"), "{}", stdout(&o));

    // A copy among the store's own files would be removed by its gc as a
    // leftover: refused, nothing made there. Beside them is allowed.
    for inside in ["tmp", "chunks/new", "runs/bench/00000000000000000009"] {
        let to = store.join(inside);
        let o = cairn(&[
            "restore",
            s,
            "--run",
            "bench",
            "--step",
            "4",
            "--to",
            to.to_str().unwrap(),
        ]);
        assert_eq!(o.status.code(), Some(1), "{inside}: {}", stdout(&o));
        assert!(
            stderr(&o).contains("inside the cairn store"),
            "{}",
            stderr(&o)
        );
        assert!(!to.join(cairn::STORE_MARKER).exists(), "{inside}");
    }
    let beside = store.join("copy");
    let o = cairn(&[
        "restore",
        s,
        "--run",
        "bench",
        "--step",
        "4",
        "--to",
        beside.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));

    // A run whose newest step is the largest: a bench into it is refused
    // before it saves anything (the next step would wrap to 0).
    let st = dir.path().join("x.safetensors");
    let o = cairn(&[
        "export",
        s,
        "--run",
        "bench",
        "--step",
        "4",
        "--out",
        st.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let im = dir.path().join("im");
    let max = u64::MAX.to_string();
    let o = cairn(&[
        "import",
        im.to_str().unwrap(),
        "--run",
        "imp",
        "--step",
        &max,
        st.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = cairn(&[
        "bench",
        im.to_str().unwrap(),
        "--run",
        "imp",
        "--size",
        "1MiB",
        "--iterations",
        "1",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    assert!(stderr(&o).contains("no room"), "{}", stderr(&o));
    let o = cairn(&["ls", im.to_str().unwrap(), "--json"]);
    let l: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(l.as_array().unwrap().len(), 1, "{l}");
    let o = cairn(&[
        "import",
        im.to_str().unwrap(),
        "--run",
        "x",
        "--step",
        "latest",
        st.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("not a step number"), "{}", stderr(&o));

    // Corrupt one chunk: verify names it and exits 1.
    let chunk = common::chunk_files(&store)
        .into_iter()
        .find(|p| std::fs::metadata(p).unwrap().len() > 1000)
        .unwrap();
    let mut b = std::fs::read(&chunk).unwrap();
    let n = b.len();
    b[n - 5] ^= 1;
    std::fs::write(&chunk, &b).unwrap();
    let id = chunk.file_name().unwrap().to_str().unwrap().to_string();
    let o = cairn(&["verify", s]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stdout(&o).contains(&id), "{}", stdout(&o));
    let o = cairn(&["verify", s, "--json"]);
    assert_eq!(o.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let problems = v["problems"].as_array().unwrap();
    assert!(!problems.is_empty());
    assert!(problems.iter().all(|p| p["chunk"] == id.as_str()));
    assert!(!problems[0]["tensors"].as_array().unwrap().is_empty());
}

#[test]
fn bench_warmup_writes_a_whole_state_into_a_used_store() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let s = store.to_str().unwrap();
    let args = [
        "bench",
        s,
        "--size",
        "8MiB",
        "--iterations",
        "1",
        "--chunk-size",
        "1MiB",
        "--warmup",
    ];
    // Each run saves three whole-or-changed states: the warm-up, the
    // full save and the ~10%-changed one. The second run's warm-up goes
    // into a store already holding the first run's, and must still
    // write a state of its own, or the time it reports is of a save
    // that wrote almost nothing.
    let mut counts = Vec::new();
    for _ in 0..2 {
        let o = cairn(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        counts.push(common::chunk_files(&store).len());
    }
    let (first, added) = (counts[0], counts[1] - counts[0]);
    assert!(
        added * 10 >= first * 9,
        "the second run added {added} chunks, the first {first}"
    );
}

#[test]
fn errors_and_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope");
    let m = missing.to_str().unwrap();
    let o = cairn(&["ls", m]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("not found"), "{}", stderr(&o));
    assert!(!Path::new(m).exists(), "ls must not create a store");
    let o = cairn(&["verify", m]);
    assert_eq!(o.status.code(), Some(1));

    let o = cairn(&["bench", m, "--size", "lots"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("lots"));
    let o = cairn(&["frobnicate"]);
    assert_eq!(o.status.code(), Some(2));
    let o = cairn(&["verify", m, "--step", "3"]);
    assert_eq!(o.status.code(), Some(2), "--step needs --run");
    let o = cairn(&["bench", m, "--codec", "lz4"]);
    assert_eq!(o.status.code(), Some(2));
    let out = dir.path().join("x.safetensors");
    let o = cairn(&[
        "export",
        m,
        "--run",
        "r",
        "--step",
        "1",
        "--format",
        "safetensors",
        "--out",
        out.to_str().unwrap(),
        "--max-shard-size",
        "0",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("--max-shard-size") && stderr(&o).contains("is zero"),
        "{}",
        stderr(&o)
    );
    assert!(!out.exists());

    // Unknown run/step on an existing store.
    let store = dir.path().join("s");
    cairn::Store::open(&store, common::small_opts()).unwrap();
    let s = store.to_str().unwrap();
    let o = cairn(&["verify", s, "--run", "ghost", "--step", "9"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("ghost"), "{}", stderr(&o));
    let o = cairn(&["--help"]);
    assert!(o.status.success());
    assert!(stdout(&o).contains("bench"));
}
