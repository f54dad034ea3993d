//! Interleavings between processes: a save that reuses chunks only a
//! just-deleted step referenced, in one process, while `cairn gc --grace
//! 0s` loops in others; and two processes saving the same step with
//! different bytes. The saver processes are this test binary re-executed
//! (the `child` test, ignored in a normal run).

#[path = "../../../tests/common/mod.rs"]
mod common;

use cairn::{StepSel, Store, StoreOptions, TensorFilter};
use common::{assert_restored_eq, state_for_step, OwnedState};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

const CHILD_ENV: &str = "CAIRN_INTERLEAVE_CHILD";
/// Rounds of delete-then-reuse in the collection race.
const GC_ROUNDS: u64 = 24;
/// Steps both processes save in the same-step race.
const SAME_STEPS: u64 = 16;

fn opts() -> StoreOptions {
    StoreOptions {
        chunk_size: 64 << 10,
        staging_bytes: 2 << 20,
        ..StoreOptions::default()
    }
}

/// The state of round `k` of the collection race: every chunk different
/// from every other round's.
fn gc_state(k: u64) -> OwnedState {
    state_for_step(1000 + k, 8, 200_000)
}

/// The state process `who` saves as step `step` in the same-step race.
fn same_state(who: u64, step: u64) -> OwnedState {
    state_for_step(who * 1_000_000 + step, 6, 150_000)
}

fn spawn_child(mode: &str) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args([
            "child",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, mode)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

/// What the child printed after `prefix` on each line holding it, once it
/// exits; its exit must be a success.
fn child_lines(mut child: Child, prefix: &str) -> Vec<String> {
    let out = child.stdout.take().unwrap();
    let lines: Vec<String> = BufReader::new(out)
        .lines()
        .map_while(Result::ok)
        // The harness's "test child ... " may precede the first line.
        .filter_map(|l| l.split_once(prefix).map(|(_, rest)| rest.to_string()))
        .collect();
    let status = child.wait().unwrap();
    assert!(status.success(), "child failed: {status}");
    lines
}

/// The child processes; fails when run without its variable.
#[test]
#[ignore = "a child process of the interleaving tests"]
fn child() {
    let mode = std::env::var(CHILD_ENV)
        .unwrap_or_else(|_| panic!("{CHILD_ENV} is not set: run by the interleaving tests"));
    let parts: Vec<&str> = mode.split('|').collect();
    match parts.as_slice() {
        ["gc-saver", dir] => gc_saver(Path::new(dir)),
        ["same-step", dir, who] => same_step_saver(Path::new(dir), who.parse().unwrap()),
        _ => panic!("unknown child mode {mode}"),
    }
}

/// Round k: save step 2k, delete it (its chunks are now garbage), then
/// save step 2k+1 with the same bytes, reusing them. On even rounds it
/// first waits until a collection has removed one of those chunks, so the
/// save writes it again; on odd rounds it races the collector.
fn gc_saver(dir: &Path) {
    let store = Store::open(dir, opts()).unwrap();
    for k in 0..GC_ROUNDS {
        let s = gc_state(k);
        store.save("g", 2 * k, &s.view()).unwrap().wait().unwrap();
        let victim = store
            .manifest("g", 2 * k)
            .unwrap()
            .distinct_chunks()
            .first()
            .map(|(id, _)| store.chunk_path(id))
            .unwrap();
        store.delete("g", 2 * k).unwrap();
        println!("@ deleted {}", 2 * k);
        if k % 2 == 0 {
            let mut waited = 0;
            while victim.exists() {
                std::thread::sleep(Duration::from_millis(2));
                waited += 1;
                assert!(
                    waited < 30_000,
                    "no collection removed {}",
                    victim.display()
                );
            }
            println!("@ collected-before-reuse {k}");
        }
        store
            .save("g", 2 * k + 1, &s.view())
            .unwrap()
            .wait()
            .unwrap();
        println!("@ committed {}", 2 * k + 1);
    }
}

/// Wait for the `go` file, then save steps 0.. as fast as possible and
/// print each outcome.
fn same_step_saver(dir: &Path, who: u64) {
    let store = Store::open(dir.join("store"), opts()).unwrap();
    while !dir.join("go").exists() {
        std::thread::sleep(Duration::from_micros(200));
    }
    for step in 0..SAME_STEPS {
        let s = same_state(who, step);
        match store.save("s", step, &s.view()).and_then(|h| h.wait()) {
            Ok(_) => println!("result {step} won"),
            Err(e) => println!("result {step} {:?}", e.kind()),
        }
    }
}

fn cairn_gc(store: &Path) -> serde_json::Value {
    let o = Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(["gc", store.to_str().unwrap(), "--grace", "0s", "--json"])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "cairn gc failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap()
}

/// A save in another process reuses chunks that only a just-deleted step
/// referenced while `cairn gc --grace 0s` loops: the collection lock keeps
/// every committed step whole.
///
/// Planted bug this catches: a save that does not take the shared
/// collection lock (`GcLock::shared` in `save::stage`): a collection then
/// runs while the save is in flight and removes what it relies on (seen:
/// its step directory, as an uncommitted leftover, so the save failed; a
/// chunk it found present would leave a step that does not restore).
#[test]
fn gc_loop_against_a_save_reusing_garbage() {
    let dir = tempfile::tempdir().unwrap();
    let root: PathBuf = dir.path().join("store");
    Store::open(&root, opts()).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let runs = Arc::new(AtomicU64::new(0));
    let deleted = Arc::new(AtomicU64::new(0));
    let collectors: Vec<_> = (0..2)
        .map(|_| {
            let (stop, runs, deleted, root) =
                (stop.clone(), runs.clone(), deleted.clone(), root.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let r = cairn_gc(&root);
                    runs.fetch_add(1, Ordering::SeqCst);
                    deleted.fetch_add(r["chunks_deleted"].as_u64().unwrap(), Ordering::SeqCst);
                }
            })
        })
        .collect();
    let child = spawn_child(&format!("gc-saver|{}", root.display()));
    let out = child_lines(child, "@ ");
    stop.store(true, Ordering::SeqCst);
    for c in collectors {
        c.join().unwrap();
    }
    let committed: Vec<u64> = out
        .iter()
        .filter_map(|l| l.strip_prefix("committed "))
        .map(|s| s.parse().unwrap())
        .collect();
    assert_eq!(
        committed,
        (0..GC_ROUNDS).map(|k| 2 * k + 1).collect::<Vec<_>>()
    );
    let collected_first = out
        .iter()
        .filter(|l| l.starts_with("collected-before-reuse"))
        .count();
    assert_eq!(collected_first as u64, GC_ROUNDS / 2);
    assert!(runs.load(Ordering::SeqCst) >= GC_ROUNDS / 2);
    assert!(deleted.load(Ordering::SeqCst) > 0);
    let store = Store::open_read_only(&root, opts()).unwrap();
    assert_eq!(store.steps("g").unwrap(), committed);
    for k in 0..GC_ROUNDS {
        let got = store
            .restore("g", StepSel::Step(2 * k + 1), &TensorFilter::All)
            .unwrap_or_else(|e| panic!("step {} does not restore: {e}", 2 * k + 1));
        assert_restored_eq(&got, &gc_state(k));
    }
    // One more collection after the race removes nothing a step needs.
    cairn_gc(&root);
    let report = store.verify(None, None).unwrap();
    assert!(report.ok(), "{:?}", report.problems);
    eprintln!(
        "gc race: {} collections, {} chunks collected",
        runs.load(Ordering::SeqCst),
        deleted.load(Ordering::SeqCst)
    );
}

/// Two processes save the same steps with different bytes, released
/// together: for each step exactly one wins, the other gets
/// `AlreadyExists`, and the winner's bytes restore.
///
/// Planted bug this catches: a manifest published by rename (replacing)
/// instead of the create-only hard link in `publish_new_on`: both saves
/// then report success.
#[test]
fn two_processes_save_the_same_step() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    Store::open(&root, opts()).unwrap();
    let children: Vec<Child> = (0..2)
        .map(|who| spawn_child(&format!("same-step|{}|{who}", dir.path().display())))
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    std::fs::write(dir.path().join("go"), b"").unwrap();
    let results: Vec<Vec<String>> = children
        .into_iter()
        .map(|c| child_lines(c, "result "))
        .collect();
    let store = Store::open_read_only(&root, opts()).unwrap();
    for step in 0..SAME_STEPS {
        let outcome = |who: usize| -> String {
            results[who]
                .iter()
                .find_map(|l| l.strip_prefix(&format!("{step} ")).map(str::to_string))
                .unwrap_or_else(|| panic!("process {who} reported nothing for step {step}"))
        };
        let (a, b) = (outcome(0), outcome(1));
        let winner = match (a.as_str(), b.as_str()) {
            ("won", "AlreadyExists") => 0,
            ("AlreadyExists", "won") => 1,
            _ => panic!("step {step}: process 0 {a}, process 1 {b}"),
        };
        let got = store
            .restore("s", StepSel::Step(step), &TensorFilter::All)
            .unwrap();
        assert_restored_eq(&got, &same_state(winner, step));
    }
    let report = store.verify(None, None).unwrap();
    assert!(report.ok(), "{:?}", report.problems);
    let wins: Vec<usize> = (0..2)
        .map(|w| results[w].iter().filter(|l| l.ends_with(" won")).count())
        .collect();
    eprintln!("same-step race: wins {wins:?}");
}
