//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod s3;

use cairn::{
    DType, Lease, LeasedSave, LeasedTensor, NextLease, SaveState, StepSel, Store, StoreOptions,
};
use std::path::Path;

/// Wait until `cond` holds, failing the test after a minute.
pub fn wait_until(what: &str, cond: impl Fn() -> bool) {
    let t = std::time::Instant::now();
    while !cond() {
        assert!(
            t.elapsed() < std::time::Duration::from_secs(60),
            "timed out waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}

/// A fresh directory on the build's disk (not tmpfs: O_DIRECT needs a
/// real file system).
pub fn disk_dir() -> tempfile::TempDir {
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("temporary directory")
}

/// An owned tensor for tests.
#[derive(Clone, Debug, PartialEq)]
pub struct OwnedTensor {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<u64>,
    pub data: Vec<u8>,
}

/// An owned training state for tests.
#[derive(Clone, Debug, Default)]
pub struct OwnedState {
    pub tensors: Vec<OwnedTensor>,
    pub blobs: Vec<(String, Vec<u8>)>,
    pub metadata: serde_json::Value,
}

impl OwnedState {
    pub fn view(&self) -> SaveState<'_> {
        let mut s = SaveState::new();
        for t in &self.tensors {
            s = s.tensor(t.name.clone(), t.dtype, &t.shape, &t.data);
        }
        for (n, b) in &self.blobs {
            s = s.blob(n.clone(), b);
        }
        s.metadata(self.metadata.clone())
    }

    pub fn logical_bytes(&self) -> u64 {
        self.view().logical_bytes()
    }
}

/// splitmix64.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E3779B97F4A7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(n + 8);
        while v.len() < n {
            v.extend_from_slice(&self.next().to_le_bytes());
        }
        v.truncate(n);
        v
    }
}

/// A deterministic state of `n` f32 tensors, sizes up to `max_bytes`.
pub fn state_for_step(step: u64, n: usize, max_bytes: usize) -> OwnedState {
    let mut r = Rng(step.wrapping_mul(7919).wrapping_add(1));
    let mut s = OwnedState::default();
    for i in 0..n {
        let elems = 1 + r.below((max_bytes / 4) as u64) as usize;
        s.tensors.push(OwnedTensor {
            name: format!("layers.{i}.weight"),
            dtype: DType::F32,
            shape: vec![elems as u64],
            data: r.bytes(elems * 4),
        });
    }
    s.blobs.push(("rng".into(), r.bytes(100)));
    s.metadata = serde_json::json!({"step": step});
    s
}

/// Options with small chunks so tests cover multi-chunk tensors cheaply.
pub fn small_opts() -> StoreOptions {
    StoreOptions {
        chunk_size: 64 << 10,
        staging_bytes: 1 << 20,
        ..StoreOptions::default()
    }
}

pub fn open(dir: &Path) -> Store {
    Store::open(dir, small_opts()).expect("open store")
}

/// Assert a restore returned exactly `s`.
pub fn assert_restored_eq(r: &cairn::Restored, s: &OwnedState) {
    assert_eq!(r.tensors.len(), s.tensors.len());
    for (got, want) in r.tensors.iter().zip(&s.tensors) {
        assert_eq!(got.name, want.name);
        assert_eq!(got.dtype, want.dtype);
        assert_eq!(got.shape, want.shape);
        assert!(got.data == want.data, "bytes of {} differ", want.name);
    }
    assert_eq!(r.blobs.len(), s.blobs.len());
    for (got, want) in r.blobs.iter().zip(&s.blobs) {
        assert_eq!(got, want);
    }
    assert_eq!(r.manifest.metadata, s.metadata);
}

/// `n` byte tensors of 1.5 MiB each (one 1 MiB chunk and half of one,
/// for stores with 1 MiB chunks), from `seed`.
pub fn byte_tensors(seed: u64, n: usize) -> OwnedState {
    let mut r = Rng(seed);
    let mut s = OwnedState::default();
    for i in 0..n {
        let data = r.bytes(3 << 19);
        s.tensors.push(OwnedTensor {
            name: format!("layers.{i}.weight"),
            dtype: DType::U8,
            shape: vec![data.len() as u64],
            data,
        });
    }
    s
}

/// Assert that `run`/`step` of `store` restores exactly `s`.
pub fn assert_step_restores(store: &Store, run: &str, step: u64, s: &OwnedState) {
    let r = store
        .restore(run, StepSel::Step(step), &cairn::TensorFilter::All)
        .unwrap_or_else(|e| panic!("{run}/{step} does not restore: {e}"));
    assert_restored_eq(&r, s);
}

/// The tensors of `s` as a leased save takes them.
pub fn leased_specs(s: &OwnedState) -> Vec<LeasedTensor> {
    s.tensors
        .iter()
        .map(|t| LeasedTensor {
            name: t.name.clone(),
            dtype: t.dtype,
            shape: t.shape.clone(),
            shard: None,
        })
        .collect()
}

/// Take every lease of `save` (waiting for room), fill it from `data`
/// (the bytes of each tensor, in the order given to the save), and hand
/// it back.
pub fn fill_leases(save: &mut LeasedSave, data: &[&[u8]]) {
    loop {
        match save.lease(true).unwrap() {
            NextLease::Done => break,
            NextLease::Full => panic!("a waiting lease reported a full pool"),
            NextLease::Lease(mut l) => {
                fill_lease(&mut l, data);
                save.submit(l).unwrap();
            }
        }
    }
}

/// Fill lease `l` from `data` (the bytes of each tensor, in the order
/// given to the save).
pub fn fill_lease(l: &mut Lease, data: &[&[u8]]) {
    let segs = l.segments().to_vec();
    let buf = l.as_mut_slice();
    for g in segs {
        let src = &data[g.tensor][g.tensor_offset as usize..][..g.len as usize];
        buf[g.lease_offset as usize..][..g.len as usize].copy_from_slice(src);
    }
}

/// All chunk files under a store.
pub fn chunk_files(root: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for d in std::fs::read_dir(root.join("chunks")).unwrap() {
        for f in std::fs::read_dir(d.unwrap().path()).unwrap() {
            out.push(f.unwrap().path());
        }
    }
    out.sort();
    out
}
