//! The save pipeline's hashing workers run below the priority of the
//! thread that opened the store, except `StoreOptions::lead_workers` of
//! them, which keep it (so chunks are hashed, and written, while the
//! caller is still copying its state). Read back from `/proc`, for each
//! setting, with a save and restore through the store to show the
//! setting changes nothing a user reads back.

mod common;

use cairn::{StepSel, Store, StoreOptions, TensorFilter};
use common::*;
use std::time::{Duration, Instant};

/// Nice value of a thread, from its `stat` (field 19).
fn nice_of(stat: &str) -> i32 {
    // The name (field 2) is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')').expect("stat has a name") + 2..];
    rest.split(' ').nth(16).unwrap().parse().unwrap()
}

/// Nice values of this process's threads named `cairn-worker-<i>`, by `i`.
fn worker_nices() -> Vec<(usize, i32)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc/self/task").unwrap() {
        let dir = e.unwrap().path();
        let Ok(comm) = std::fs::read_to_string(dir.join("comm")) else {
            continue; // the thread ended meanwhile
        };
        let Some(i) = comm.trim().strip_prefix("cairn-worker-") else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(dir.join("stat")) else {
            continue;
        };
        out.push((i.parse().unwrap(), nice_of(&stat)));
    }
    out.sort();
    out
}

/// Open a store with `workers` workers, `lead` of them lead workers, and
/// return the nice values its workers settle at once they all run.
fn settled_nices(dir: &std::path::Path, workers: usize, lead: usize, own: i32) -> Vec<i32> {
    let store = Store::open(
        dir,
        StoreOptions {
            workers,
            lead_workers: lead,
            ..small_opts()
        },
    )
    .unwrap();
    let s = state_for_step(1, 12, 300_000);
    store
        .save("p", lead as u64 + 1, &s.view())
        .unwrap()
        .wait()
        .unwrap();
    let r = store
        .restore("p", StepSel::Step(lead as u64 + 1), &TensorFilter::All)
        .unwrap();
    assert_restored_eq(&r, &s);
    // Workers lower their own priority as they start: wait until each
    // has, or for the ones that keep it, until all are there.
    let lowered = (own + 10).min(19);
    let t = Instant::now();
    let nices = loop {
        let n = worker_nices();
        let settled = n.len() == workers
            && n.iter()
                .all(|&(i, v)| if i < lead { v == own } else { v == lowered });
        if settled || t.elapsed() > Duration::from_secs(10) {
            break n;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    drop(store);
    // The store's threads end with it, before the next setting is read.
    let t = Instant::now();
    while !worker_nices().is_empty() {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "workers outlived the store"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    nices.into_iter().map(|(_, v)| v).collect()
}

#[test]
fn lead_workers_keep_the_opening_threads_priority_and_the_rest_run_lower() {
    let own = nice_of(&std::fs::read_to_string("/proc/thread-self/stat").unwrap());
    let lowered = (own + 10).min(19);
    let dir = tempfile::tempdir().unwrap();
    // The default: no lead worker.
    assert_eq!(StoreOptions::default().lead_workers, 0);
    assert_eq!(
        settled_nices(dir.path(), 3, 0, own),
        vec![lowered, lowered, lowered]
    );
    assert_eq!(
        settled_nices(dir.path(), 3, 1, own),
        vec![own, lowered, lowered]
    );
    assert_eq!(settled_nices(dir.path(), 2, 2, own), vec![own, own]);
    // More lead workers than workers: all keep the priority.
    assert_eq!(settled_nices(dir.path(), 2, 5, own), vec![own, own]);
}
