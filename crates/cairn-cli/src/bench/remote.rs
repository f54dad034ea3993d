//! Upload and download throughput of the remote tier, against a plain
//! `object_store` multipart put and a plain get of the same bytes, measured
//! in the same run.

use super::run::median;
use super::synthetic::SyntheticState;
use cairn::RemoteStore;
use cairn::TensorFilter;
use cairn::{Error, Result};
use cairn::{StepSel, Store, StoreOptions};
use serde::Serialize;
use std::path::PathBuf;
use std::time::Instant;

/// One iteration's figures.
#[derive(Debug, Clone, Serialize)]
pub struct RemoteBenchIteration {
    /// Seconds for cairn to upload a full checkpoint (all chunks new).
    pub upload_s: f64,
    /// Seconds for a plain multipart put of the same bytes.
    pub raw_put_s: f64,
    /// Seconds for cairn to restore it from the remote, every chunk verified.
    pub download_s: f64,
    /// Seconds for a plain get of the same bytes.
    pub raw_get_s: f64,
    /// Bytes cairn uploaded for the full checkpoint.
    pub bytes_uploaded: u64,
    /// Bytes uploaded for the next checkpoint, with ~10% of bytes changed.
    pub second_bytes_uploaded: u64,
    /// Fraction of logical bytes changed for it.
    pub second_changed_fraction: f64,
}

/// Medians and per-iteration figures.
#[derive(Debug, Clone, Serialize)]
pub struct RemoteBenchReport {
    /// Remote URL.
    pub remote: String,
    /// Bytes of the state.
    pub logical_bytes: u64,
    /// Median upload throughput / plain put throughput.
    pub upload_ratio: f64,
    /// Median download throughput / plain get throughput.
    pub download_ratio: f64,
    /// Median cairn upload GB/s.
    pub upload_gbps: f64,
    /// Median plain put GB/s.
    pub raw_put_gbps: f64,
    /// Median cairn download GB/s.
    pub download_gbps: f64,
    /// Median plain get GB/s.
    pub raw_get_gbps: f64,
    /// Median bytes uploaded for the ~10%-changed checkpoint / full upload.
    pub second_upload_fraction: f64,
    /// Per iteration.
    pub iterations: Vec<RemoteBenchIteration>,
}

/// Save a synthetic state of `size` bytes in a local store at `local`,
/// then measure against `remote` `iterations` times. Blocking.
pub fn run_remote_bench(
    local: PathBuf,
    remote: RemoteStore,
    size: u64,
    iterations: usize,
    options: StoreOptions,
) -> Result<RemoteBenchReport> {
    let mut opts = options;
    let probe = SyntheticState::generate(size, super::run::BASE_SEED);
    let total = probe.logical_bytes();
    drop(probe);
    if opts.staging_bytes == 0 {
        opts.staging_bytes = total as usize + 4 * opts.chunk_size + (64 << 20);
    }
    let mut store = Store::open(&local, opts)?;
    store.attach_remote(remote.clone());
    let first = store.latest("remote-bench")?.map_or(0, |s| s + 1);
    let raw_path = remote
        .chunk_path(&cairn::ChunkId::of(b"raw"))
        .child("bench-raw-object");
    let mut iters = Vec::new();
    for i in 0..iterations {
        let step = first + 2 * i as u64;
        let mut state = SyntheticState::generate(size, super::run::BASE_SEED ^ step ^ 0xB0C3);
        store
            .save("remote-bench", step, &state.as_save_state())?
            .wait()?;
        let t = Instant::now();
        let up = store.upload("remote-bench", step)?;
        let upload_s = t.elapsed().as_secs_f64();

        // The same bytes through plain object_store calls.
        let mut all = Vec::with_capacity(total as usize);
        for t in &state.tensors {
            all.extend_from_slice(t.bytes());
        }
        all.extend_from_slice(&state.rng_state);
        all.extend_from_slice(&state.loader_state);
        let all = bytes::Bytes::from(all);
        let os = remote.object_store().clone();
        let part = remote.options().part_size;
        let conc = remote.options().concurrency;
        let raw_put_s = remote.block_on(async {
            let t = Instant::now();
            let upload = os
                .put_multipart(&raw_path)
                .await
                .map_err(|e| Error::remote("bench put", &raw_path, e))?;
            let mut w = object_store::WriteMultipart::new_with_chunk_size(upload, part);
            for p in all.chunks(part) {
                w.wait_for_capacity(conc)
                    .await
                    .map_err(|e| Error::remote("bench put", &raw_path, e))?;
                w.write(p);
            }
            w.finish()
                .await
                .map_err(|e| Error::remote("bench put", &raw_path, e))?;
            Ok::<f64, Error>(t.elapsed().as_secs_f64())
        })??;

        let t = Instant::now();
        let restored = remote.restore("remote-bench", StepSel::Step(step), &TensorFilter::All)?;
        let download_s = t.elapsed().as_secs_f64();
        for (got, want) in restored.tensors.iter().zip(&state.tensors) {
            if got.data != want.bytes() {
                return Err(Error::Internal(format!(
                    "{} differs after download",
                    want.name
                )));
            }
        }
        drop(restored);
        let raw_get_s = remote.block_on(async {
            let t = Instant::now();
            let r = os
                .get(&raw_path)
                .await
                .map_err(|e| Error::remote("bench get", &raw_path, e))?;
            let b = r
                .bytes()
                .await
                .map_err(|e| Error::remote("bench get", &raw_path, e))?;
            if b.len() != all.len() {
                return Err(Error::Internal("plain get returned a short object".into()));
            }
            let _ = os.delete(&raw_path).await;
            Ok::<f64, Error>(t.elapsed().as_secs_f64())
        })??;

        let changed = state.perturb(0.10, step ^ 0x5EC0);
        store
            .save("remote-bench", step + 1, &state.as_save_state())?
            .wait()?;
        let second = store.upload("remote-bench", step + 1)?;
        iters.push(RemoteBenchIteration {
            upload_s,
            raw_put_s,
            download_s,
            raw_get_s,
            bytes_uploaded: up.bytes_uploaded,
            second_bytes_uploaded: second.bytes_uploaded,
            second_changed_fraction: changed as f64 / total as f64,
        });
    }
    let gb = total as f64 / 1e9;
    let m = |f: &dyn Fn(&RemoteBenchIteration) -> f64| median(iters.iter().map(f).collect());
    Ok(RemoteBenchReport {
        remote: remote.url().to_string(),
        logical_bytes: total,
        upload_ratio: m(&|i| i.raw_put_s / i.upload_s),
        download_ratio: m(&|i| i.raw_get_s / i.download_s),
        upload_gbps: m(&|i| gb / i.upload_s),
        raw_put_gbps: m(&|i| gb / i.raw_put_s),
        download_gbps: m(&|i| gb / i.download_s),
        raw_get_gbps: m(&|i| gb / i.raw_get_s),
        second_upload_fraction: m(&|i| i.second_bytes_uploaded as f64 / i.bytes_uploaded as f64),
        iterations: iters,
    })
}
