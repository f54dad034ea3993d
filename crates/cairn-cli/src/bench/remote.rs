//! Upload and restore throughput of the remote tier, and the bytes each
//! tier stores, against a plain `object_store` multipart put and a plain
//! concurrent ranged get of the same logical bytes, measured in the same
//! run.

use super::run::median;
use super::synthetic::{Precision, SyntheticState};
use cairn::RemoteStore;
use cairn::TensorFilter;
use cairn::{Error, Result};
use cairn::{StepSel, Store, StoreOptions};
use futures::{StreamExt, TryStreamExt};
use serde::Serialize;
use std::path::PathBuf;
use std::time::Instant;

/// One iteration's figures.
#[derive(Debug, Clone, Serialize)]
pub struct RemoteBenchIteration {
    /// Seconds for cairn to upload a full checkpoint (all chunks new).
    pub upload_s: f64,
    /// Seconds for a plain multipart put of the same logical bytes.
    pub raw_put_s: f64,
    /// Seconds for cairn to restore it from the remote into memory, every
    /// chunk verified.
    pub download_s: f64,
    /// Seconds for a plain concurrent ranged get of the same logical bytes
    /// into one buffer.
    pub raw_get_s: f64,
    /// Seconds for a plain single GET of the same logical bytes.
    pub raw_single_get_s: f64,
    /// Bytes the local tier wrote for the full checkpoint.
    pub local_bytes: u64,
    /// Bytes cairn uploaded (and the remote stores) for the full checkpoint.
    pub bytes_uploaded: u64,
    /// Chunk objects uploaded for it.
    pub objects_uploaded: u64,
    /// GET requests of the restore.
    pub restore_gets: u64,
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
    /// Precision of the synthetic state.
    pub dtype: Precision,
    /// The remote tier's codec.
    pub remote_codec: String,
    /// Bytes of the state.
    pub logical_bytes: u64,
    /// Median bytes stored by the local tier / logical bytes.
    pub local_stored_ratio: f64,
    /// Median bytes stored by the remote tier / logical bytes.
    pub remote_stored_ratio: f64,
    /// Median upload throughput / plain put throughput (of logical bytes).
    pub upload_ratio: f64,
    /// Lowest and highest upload ratio of the iterations.
    pub upload_ratio_range: (f64, f64),
    /// Median restore throughput / plain ranged get throughput.
    pub download_ratio: f64,
    /// Lowest and highest restore ratio of the iterations.
    pub download_ratio_range: (f64, f64),
    /// Median cairn upload GB/s (logical bytes).
    pub upload_gbps: f64,
    /// Median plain put GB/s.
    pub raw_put_gbps: f64,
    /// Median cairn restore GB/s (logical bytes).
    pub download_gbps: f64,
    /// Median plain ranged get GB/s.
    pub raw_get_gbps: f64,
    /// Median restore throughput / plain single GET throughput.
    pub download_vs_single_get: f64,
    /// Median plain single GET GB/s.
    pub raw_single_get_gbps: f64,
    /// Median bytes uploaded for the ~10%-changed checkpoint / full upload.
    pub second_upload_fraction: f64,
    /// Per iteration.
    pub iterations: Vec<RemoteBenchIteration>,
}

/// Save a synthetic state of `size` bytes in `precision` in a local store
/// at `local`, then measure against `remote` `iterations` times. Blocking.
pub fn run_remote_bench(
    local: PathBuf,
    remote: RemoteStore,
    size: u64,
    iterations: usize,
    options: StoreOptions,
    precision: Precision,
) -> Result<RemoteBenchReport> {
    let mut opts = options;
    let probe = SyntheticState::generate_with(size, super::run::BASE_SEED, precision);
    let total = probe.logical_bytes();
    drop(probe);
    if opts.staging_bytes == 0 {
        opts.staging_bytes = total as usize + 4 * opts.chunk_size + (64 << 20);
    }
    let mut store = Store::open(&local, opts)?;
    store.attach_remote(remote.clone());
    let run = format!("remote-bench-{precision}");
    let first = super::run::first_free_step(&store, &run, 2 * iterations as u64)?;
    let raw_path = remote
        .chunk_path(&cairn::ChunkId::of(b"raw"))
        .child("bench-raw-object");
    let os = remote.object_store().clone();
    let part = remote.options().part_size.max(1);
    let conc = remote.options().concurrency.max(1);
    let mut iters = Vec::new();
    for i in 0..iterations {
        let step = first + 2 * i as u64;
        let mut state =
            SyntheticState::generate_with(size, super::run::BASE_SEED ^ step ^ 0xB0C3, precision);
        let saved = store.save(&run, step, &state.as_save_state())?.wait()?;
        let before = remote.metrics().snapshot();
        let t = Instant::now();
        let up = store.upload(&run, step)?;
        let upload_s = t.elapsed().as_secs_f64();
        let objects_uploaded = remote.metrics().snapshot().chunks_uploaded - before.chunks_uploaded;

        // The same bytes through plain object_store calls.
        let mut all = Vec::with_capacity(total as usize);
        for t in &state.tensors {
            all.extend_from_slice(t.bytes());
        }
        all.extend_from_slice(&state.rng_state);
        all.extend_from_slice(&state.loader_state);
        let all = bytes::Bytes::from(all);
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

        let before = remote.metrics().snapshot();
        let t = Instant::now();
        let restored = remote.restore(&run, StepSel::Step(step), &TensorFilter::All)?;
        let download_s = t.elapsed().as_secs_f64();
        let restore_gets = remote.metrics().snapshot().get_requests - before.get_requests;
        for (got, want) in restored.tensors.iter().zip(&state.tensors) {
            if got.data != want.bytes() {
                return Err(Error::Internal(format!(
                    "{} differs after download",
                    want.name
                )));
            }
        }
        drop(restored);
        // A plain concurrent ranged get of the same bytes into one buffer.
        let size = all.len() as u64;
        let raw_get_s = remote.block_on(async {
            let t = Instant::now();
            let ranges: Vec<std::ops::Range<u64>> = (0..size.div_ceil(part as u64))
                .map(|i| i * part as u64..((i + 1) * part as u64).min(size))
                .collect();
            let mut out = vec![0u8; size as usize];
            let mut parts = futures::stream::iter(ranges)
                .map(|r| {
                    let os = &os;
                    let raw_path = &raw_path;
                    async move {
                        let b = os
                            .get_range(raw_path, r.clone())
                            .await
                            .map_err(|e| Error::remote("bench get", raw_path, e))?;
                        Ok::<_, Error>((r, b))
                    }
                })
                .buffer_unordered(conc);
            while let Some((r, b)) = parts.try_next().await? {
                out[r.start as usize..r.end as usize].copy_from_slice(&b);
            }
            let s = t.elapsed().as_secs_f64();
            if out[..] != all[..] {
                return Err(Error::Internal("plain get returned other bytes".into()));
            }
            drop(out);
            let t = Instant::now();
            let r = os
                .get(&raw_path)
                .await
                .map_err(|e| Error::remote("bench get", &raw_path, e))?;
            let b = r
                .bytes()
                .await
                .map_err(|e| Error::remote("bench get", &raw_path, e))?;
            let single = t.elapsed().as_secs_f64();
            if b.len() != all.len() {
                return Err(Error::Internal("plain get returned a short object".into()));
            }
            let _ = os.delete(&raw_path).await;
            Ok::<(f64, f64), Error>((s, single))
        })??;
        let (raw_get_s, raw_single_get_s) = raw_get_s;

        let changed = state.perturb(0.10, step ^ 0x5EC0);
        store.save(&run, step + 1, &state.as_save_state())?.wait()?;
        let second = store.upload(&run, step + 1)?;
        iters.push(RemoteBenchIteration {
            upload_s,
            raw_put_s,
            download_s,
            raw_get_s,
            raw_single_get_s,
            local_bytes: saved.bytes_written,
            bytes_uploaded: up.bytes_uploaded,
            objects_uploaded,
            restore_gets,
            second_bytes_uploaded: second.bytes_uploaded,
            second_changed_fraction: changed as f64 / total as f64,
        });
    }
    let gb = total as f64 / 1e9;
    let m = |f: &dyn Fn(&RemoteBenchIteration) -> f64| median(iters.iter().map(f).collect());
    let range = |f: &dyn Fn(&RemoteBenchIteration) -> f64| {
        iters
            .iter()
            .map(f)
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), x| {
                (lo.min(x), hi.max(x))
            })
    };
    Ok(RemoteBenchReport {
        remote: remote.url().to_string(),
        dtype: precision,
        remote_codec: remote.options().codec.to_string(),
        logical_bytes: total,
        local_stored_ratio: m(&|i| i.local_bytes as f64 / total as f64),
        remote_stored_ratio: m(&|i| i.bytes_uploaded as f64 / total as f64),
        upload_ratio: m(&|i| i.raw_put_s / i.upload_s),
        upload_ratio_range: range(&|i| i.raw_put_s / i.upload_s),
        download_ratio: m(&|i| i.raw_get_s / i.download_s),
        download_ratio_range: range(&|i| i.raw_get_s / i.download_s),
        upload_gbps: m(&|i| gb / i.upload_s),
        raw_put_gbps: m(&|i| gb / i.raw_put_s),
        download_gbps: m(&|i| gb / i.download_s),
        raw_get_gbps: m(&|i| gb / i.raw_get_s),
        download_vs_single_get: m(&|i| i.raw_single_get_s / i.download_s),
        raw_single_get_gbps: m(&|i| gb / i.raw_single_get_s),
        second_upload_fraction: m(&|i| i.second_bytes_uploaded as f64 / i.bytes_uploaded as f64),
        iterations: iters,
    })
}
