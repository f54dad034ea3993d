//! Memory stays within the staging budget plus a small constant, whatever
//! the checkpoint size. One test per binary: it reads this process's peak
//! RSS.

mod common;

use cairn::{CodecChoice, StepSel, Store, StoreOptions, TensorFilter};
use common::*;

fn status_kib(key: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap()
}

#[test]
fn state_four_times_the_budget_saves_within_budget() {
    const BUDGET: usize = 16 << 20;
    const SLACK: u64 = 12 << 20;
    let mut rng = Rng(1);
    let mut state = OwnedState::default();
    for i in 0..64 {
        state.tensors.push(OwnedTensor {
            name: format!("w{i}"),
            dtype: cairn::DType::F32,
            shape: vec![262_144],
            data: rng.bytes(1 << 20),
        });
    }
    assert_eq!(state.logical_bytes(), 4 * BUDGET as u64);
    for (i, codec) in [CodecChoice::Raw, CodecChoice::Zstd { level: 1 }]
        .into_iter()
        .enumerate()
    {
        let dir = tempfile::tempdir().unwrap();
        let before = status_kib("VmRSS:") * 1024;
        // Reset the peak to the current RSS.
        std::fs::write("/proc/self/clear_refs", "5").expect("reset VmHWM");
        let store = Store::open(
            dir.path(),
            StoreOptions {
                chunk_size: 1 << 20,
                staging_bytes: BUDGET,
                codec,
                ..StoreOptions::default()
            },
        )
        .unwrap();
        store
            .save("m", i as u64, &state.view())
            .unwrap()
            .wait()
            .unwrap();
        let peak = status_kib("VmHWM:") * 1024;
        let grew = peak.saturating_sub(before);
        assert!(
            grew <= BUDGET as u64 + SLACK,
            "{codec:?}: peak grew by {grew} bytes for a {BUDGET}-byte budget"
        );
        drop(store);
        let store = Store::open_read_only(dir.path(), StoreOptions::default()).unwrap();
        let got = store
            .restore("m", StepSel::Latest, &TensorFilter::All)
            .unwrap();
        assert_restored_eq(&got, &state);
    }
}
