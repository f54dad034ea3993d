//! `cairn._cairn`: the extension module behind the `cairn` Python package.
//!
//! The public Python API lives in `python/cairn/__init__.py`; this module is
//! its private core. Tensors arrive as raw `(pointer, length)` pairs taken
//! from numpy's `__array_interface__` or torch's `data_ptr()` by that
//! wrapper, which keeps their owners alive for the whole call: the bytes
//! are copied once, straight into cairn's staging pool. Every call that
//! blocks (staging, waiting, reading) releases the GIL.
//!
//! Errors become Python exceptions by [`cairn::ErrorKind`]: `cairn.Error`
//! is the base class, with one subclass per kind.

use cairn::{DType, ErrorKind, MetricFilter, SaveState, ShardInfo, StepSel, StoreOptions};
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// The exception classes, named as Python sees them (`cairn.Error`, ...).
mod exc {
    use pyo3::create_exception;
    use pyo3::exceptions::PyException;

    create_exception!(
        cairn,
        Error,
        PyException,
        "Base class of every error cairn raises."
    );
    create_exception!(
        cairn,
        UnavailableError,
        Error,
        "An I/O resource was unavailable or failed; retrying may succeed."
    );
    create_exception!(
        cairn,
        InvalidError,
        Error,
        "The caller passed something invalid; fix the input."
    );
    create_exception!(
        cairn,
        DataError,
        Error,
        "Stored data is corrupt or malformed."
    );
    create_exception!(
        cairn,
        NotFoundError,
        Error,
        "The requested run, step or tensor does not exist."
    );
    create_exception!(
        cairn,
        AlreadyExistsError,
        Error,
        "The checkpoint already exists; checkpoints are immutable."
    );
    create_exception!(
        cairn,
        ClosedError,
        Error,
        "The store or its save pipeline has shut down."
    );
    create_exception!(cairn, InternalError, Error, "A bug in cairn.");
}

/// The Python exception for a cairn error, chosen by its kind.
fn err(e: cairn::Error) -> PyErr {
    kind_err(e.kind(), e.to_string())
}

fn kind_err(kind: ErrorKind, msg: String) -> PyErr {
    match kind {
        ErrorKind::Unavailable => exc::UnavailableError::new_err(msg),
        ErrorKind::Invalid => exc::InvalidError::new_err(msg),
        ErrorKind::Data => exc::DataError::new_err(msg),
        ErrorKind::NotFound => exc::NotFoundError::new_err(msg),
        ErrorKind::AlreadyExists => exc::AlreadyExistsError::new_err(msg),
        ErrorKind::Closed => exc::ClosedError::new_err(msg),
        ErrorKind::Internal => exc::InternalError::new_err(msg),
        _ => exc::Error::new_err(msg),
    }
}

fn invalid(what: &str, reason: impl std::fmt::Display) -> PyErr {
    err(cairn::Error::invalid(what, reason.to_string()))
}

/// Refuse a buffer of `nbytes > 0` at address 0: the wrapper's checks
/// keep tensors without addressable memory (meta tensors, `DTensor`s) away,
/// and nothing reaches memory at a null address whatever calls this.
fn check_address(name: &str, addr: usize, nbytes: usize) -> PyResult<()> {
    if addr == 0 && nbytes > 0 {
        return Err(invalid(
            &format!("buffer of {name:?}"),
            format!("{nbytes} bytes at address 0 (a tensor without addressable memory)"),
        ));
    }
    Ok(())
}

fn json_text<T: serde::Serialize>(v: &T) -> PyResult<String> {
    serde_json::to_string(v).map_err(|e| err(cairn::Error::Internal(e.to_string())))
}

/// One tensor of a save as the Python wrapper hands it over:
/// `(name, dtype, shape, address, nbytes, shard)` with `shard` either
/// `None` or `(global_shape, offsets)`.
type RawTensor = (
    String,
    String,
    Vec<u64>,
    usize,
    usize,
    Option<(Vec<u64>, Vec<u64>)>,
);

/// One region to read as the Python wrapper hands it over:
/// `(name, offsets, shape, address, nbytes)`.
type RawRegion = (String, Vec<u64>, Vec<u64>, usize, usize);

/// A committed-or-failing save. `wait()` blocks (without the GIL) until
/// the checkpoint is durable on local disk and returns the report as JSON
/// text; a second `wait()` returns the same outcome.
#[pyclass(module = "cairn._cairn", frozen)]
struct SaveHandle {
    run: String,
    step: u64,
    stall_s: f64,
    state: Mutex<HandleState>,
}

enum HandleState {
    Pending(cairn::SaveHandle),
    Done(Result<String, (ErrorKind, String)>),
    Taken,
}

#[pymethods]
impl SaveHandle {
    /// The run being saved.
    #[getter]
    fn run(&self) -> &str {
        &self.run
    }

    /// The step being saved.
    #[getter]
    fn step(&self) -> u64 {
        self.step
    }

    /// Seconds `save` blocked the caller (the staging copy).
    #[getter]
    fn stall_s(&self) -> f64 {
        self.stall_s
    }

    /// Block until the checkpoint is committed on local disk; the report
    /// as JSON text.
    fn wait(&self, py: Python<'_>) -> PyResult<String> {
        // Waiters serialize on the lock; the GIL is released while waiting.
        let outcome = py.detach(|| {
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            // A second wait finds `Done` and returns the same outcome.
            if let HandleState::Pending(_) = &*st {
                let HandleState::Pending(h) = std::mem::replace(&mut *st, HandleState::Taken)
                else {
                    return Err((
                        ErrorKind::Internal,
                        "save handle changed while locked".into(),
                    ));
                };
                let res = h
                    .wait()
                    .map_err(|e| (e.kind(), e.to_string()))
                    .and_then(|r| {
                        serde_json::to_string(&r).map_err(|e| (ErrorKind::Internal, e.to_string()))
                    });
                *st = HandleState::Done(res);
            }
            match &*st {
                HandleState::Done(r) => r.clone(),
                _ => Err((ErrorKind::Internal, "save handle lost its outcome".into())),
            }
        });
        outcome.map_err(|(k, m)| kind_err(k, m))
    }
}

/// One leased tensor as the Python wrapper hands it over:
/// `(name, dtype, shape, shard)` with `shard` either `None` or
/// `(global_shape, offsets)`.
type RawLeased = (String, String, Vec<u64>, Option<(Vec<u64>, Vec<u64>)>);

/// One lease as Python sees it: `(index, address, length, segments)`, each
/// segment `(tensor, tensor_offset, lease_offset, length)`.
type RawLease = (usize, usize, usize, Vec<(usize, u64, u64, u64)>);

/// A save whose tensors the caller copies into leased slices of the
/// staging pool ([`cairn::LeasedSave`]). Keeps its store (and so the
/// pool) alive, a closed one included, until it is dropped.
#[pyclass(module = "cairn._cairn", frozen)]
struct LeasedSave {
    _store: Arc<cairn::Store>,
    run: String,
    step: u64,
    count: usize,
    session: Mutex<Option<cairn::LeasedSave>>,
    leases: Mutex<BTreeMap<usize, cairn::Lease>>,
}

impl LeasedSave {
    fn closed() -> PyErr {
        err(cairn::Error::invalid(
            "leased save",
            "already finished or aborted",
        ))
    }
}

#[pymethods]
impl LeasedSave {
    /// How many leases the save needs.
    #[getter]
    fn lease_count(&self) -> usize {
        self.count
    }

    /// Leases taken and not yet handed back or discarded.
    #[getter]
    fn held(&self) -> usize {
        self.leases.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// The next lease as `(index, address, length, segments)`, or `None`
    /// if the pool is full and `wait` is false. With `wait`, blocks
    /// (without the GIL) until there is room; fails if leases are still
    /// held.
    fn lease(&self, py: Python<'_>, wait: bool) -> PyResult<Option<RawLease>> {
        let next = py.detach(|| {
            let mut session = self.session.lock().unwrap_or_else(|p| p.into_inner());
            match session.as_mut() {
                Some(s) => s.lease(wait).map(Some),
                None => Ok(None),
            }
        });
        match next.map_err(err)? {
            None => Err(Self::closed()),
            Some(cairn::NextLease::Full) => Ok(None),
            Some(cairn::NextLease::Done) => Err(err(cairn::Error::invalid(
                "staging lease",
                format!(
                    "all {} leases of {} step {} were taken",
                    self.count, self.run, self.step
                ),
            ))),
            Some(cairn::NextLease::Lease(mut l)) => {
                let raw = (
                    l.index(),
                    l.addr(),
                    l.len(),
                    l.segments()
                        .iter()
                        .map(|s| (s.tensor, s.tensor_offset, s.lease_offset, s.len))
                        .collect(),
                );
                self.leases
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(l.index(), l);
                Ok(Some(raw))
            }
        }
    }

    /// Hand filled lease `index` back to the pipeline.
    fn submit(&self, py: Python<'_>, index: usize) -> PyResult<()> {
        let lease = self
            .leases
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&index)
            .ok_or_else(|| invalid("staging lease", format!("lease {index} is not held")))?;
        py.detach(|| {
            let mut session = self.session.lock().unwrap_or_else(|p| p.into_inner());
            match session.as_mut() {
                Some(s) => s.submit(lease),
                None => Err(cairn::Error::invalid(
                    "leased save",
                    "already finished or aborted",
                )),
            }
        })
        .map_err(err)
    }

    /// Drop lease `index` without handing it back: its space is freed and
    /// the save will fail at `finish`.
    fn discard(&self, index: usize) -> PyResult<()> {
        self.leases
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&index)
            .map(drop)
            .ok_or_else(|| invalid("staging lease", format!("lease {index} is not held")))
    }

    /// End staging; the `SaveHandle`. Fails (and abandons the save) if a
    /// lease was not handed back.
    fn finish(&self, py: Python<'_>) -> PyResult<SaveHandle> {
        let held = std::mem::take(&mut *self.leases.lock().unwrap_or_else(|p| p.into_inner()));
        drop(held);
        let session = self
            .session
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .ok_or_else(Self::closed)?;
        let h = py.detach(|| session.finish()).map_err(err)?;
        Ok(SaveHandle {
            run: h.run().to_string(),
            step: h.step(),
            stall_s: h.stall().as_secs_f64(),
            state: Mutex::new(HandleState::Pending(h)),
        })
    }

    /// Abandon the save: frees every lease, commits nothing. A no-op once
    /// finished.
    fn abort(&self, py: Python<'_>) {
        let held = std::mem::take(&mut *self.leases.lock().unwrap_or_else(|p| p.into_inner()));
        let session = self
            .session
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        py.detach(move || {
            drop(held);
            drop(session);
        });
    }
}

/// A checkpoint store on a local directory, optionally with a remote tier.
#[pyclass(module = "cairn._cairn", frozen)]
struct Store {
    /// The open store; `None` once closed. Each call holds its own
    /// reference for as long as it runs, so closing never frees what a
    /// call in another thread uses.
    inner: Mutex<Option<Arc<cairn::Store>>>,
    /// Its directory, still known once closed.
    root: std::path::PathBuf,
    /// The process that opened it. A child made by `fork` has a copy of
    /// the store but none of its threads: a save there would wait for
    /// them for ever.
    pid: u32,
}

impl Store {
    /// The open store, or `ClosedError` naming its directory, or
    /// `InvalidError` in a process forked from the one that opened it.
    fn open_store(&self) -> PyResult<Arc<cairn::Store>> {
        if self.forked() {
            return Err(exc::InvalidError::new_err(format!(
                "invalid store: the store at {} was opened in process {}, and this is process {} \
                 (forked from it), which has none of its threads; open the store anew here",
                self.root.display(),
                self.pid,
                std::process::id()
            )));
        }
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| {
                exc::ClosedError::new_err(format!(
                    "closed: the store at {} was closed",
                    self.root.display()
                ))
            })
    }

    /// Whether this process is a fork of the one that opened the store.
    fn forked(&self) -> bool {
        std::process::id() != self.pid
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        // In a forked child, dropping the store would wait for threads
        // that exist only in the parent: leave its memory to the exit.
        if self.forked() {
            if let Some(inner) = self
                .inner
                .get_mut()
                .unwrap_or_else(|p| p.into_inner())
                .take()
            {
                std::mem::forget(inner);
            }
        }
    }
}

fn sel(step: Option<u64>) -> StepSel {
    step.map_or(StepSel::Latest, StepSel::Step)
}

#[pymethods]
impl Store {
    /// Open (creating it if missing) the store at `path`. `options_json`
    /// holds `StoreOptions` fields; `remote` is an object-store URL with
    /// `remote_options` as `(key, value)` pairs.
    #[new]
    #[pyo3(signature = (path, remote=None, remote_options=Vec::new(), options_json=None))]
    fn new(
        py: Python<'_>,
        path: std::path::PathBuf,
        remote: Option<String>,
        remote_options: Vec<(String, String)>,
        options_json: Option<String>,
    ) -> PyResult<Self> {
        let opts: StoreOptions = match options_json {
            Some(text) => serde_json::from_str(&text).map_err(|e| invalid("store options", e))?,
            None => StoreOptions::default(),
        };
        py.detach(move || {
            let mut inner = cairn::Store::open(&path, opts)?;
            if let Some(url) = remote {
                let r = cairn::RemoteStore::open(
                    &url,
                    &remote_options,
                    cairn::RemoteOptions::default(),
                )?;
                inner.attach_remote(r);
            }
            Ok(Store {
                root: inner.root().to_path_buf(),
                inner: Mutex::new(Some(Arc::new(inner))),
                pid: std::process::id(),
            })
        })
        .map_err(err)
    }

    /// The store's directory.
    #[getter]
    fn path(&self) -> std::path::PathBuf {
        self.root.clone()
    }

    /// Whether [`Store::close`] was called.
    #[getter]
    fn closed(&self) -> bool {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_none()
    }

    /// Close the store: later calls raise `ClosedError`. Waits (without
    /// the GIL) for the saves queued so far to commit, then frees the
    /// staging pool and stops the pipeline's threads; a call still running
    /// in another thread, or a leased save still open, keeps them until
    /// it ends. A no-op once closed.
    fn close(&self, py: Python<'_>) {
        let taken = self.inner.lock().unwrap_or_else(|p| p.into_inner()).take();
        if self.forked() {
            // See `Drop`: the pipeline's threads are the parent's.
            std::mem::forget(taken);
            return;
        }
        py.detach(move || drop(taken));
    }

    /// The staging pool as `(address, length)`, where every lease lies
    /// (for `cudaHostRegister`); `None` on a read-only store.
    fn staging_region(&self) -> PyResult<Option<(usize, usize)>> {
        Ok(self.open_store()?.staging_region())
    }

    /// Open a leased save ([`cairn::Store::lease_save`]): the caller
    /// copies `tensors` into leases; `blobs`, metadata and metrics are
    /// staged now.
    #[pyo3(signature = (run, step, tensors, blobs, metadata_json=None, metrics=None, part=None))]
    #[allow(clippy::too_many_arguments)] // the Python signature
    fn lease_save(
        slf: &Bound<'_, Self>,
        run: &str,
        step: u64,
        tensors: Vec<RawLeased>,
        blobs: Vec<(String, Bound<'_, PyBytes>)>,
        metadata_json: Option<&str>,
        metrics: Option<BTreeMap<String, f64>>,
        part: Option<(u32, u32, Option<String>)>,
    ) -> PyResult<LeasedSave> {
        let py = slf.py();
        let metadata = match metadata_json {
            Some(t) => serde_json::from_str(t).map_err(|e| invalid("metadata", e))?,
            None => serde_json::Value::Null,
        };
        let mut specs = Vec::with_capacity(tensors.len());
        for (name, dtype, shape, shard) in tensors {
            specs.push(cairn::LeasedTensor {
                name,
                dtype: dtype.parse().map_err(err)?,
                shape,
                shard: shard.map(|(global_shape, offsets)| ShardInfo {
                    global_shape,
                    offsets,
                }),
            });
        }
        let blob_slices: Vec<(String, &[u8])> = blobs
            .iter()
            .map(|(n, b)| (n.clone(), b.as_bytes()))
            .collect();
        let inner = slf.get().open_store()?;
        let session = py
            .detach(|| {
                let mut state = SaveState::new().metadata(metadata);
                for (name, data) in &blob_slices {
                    state = state.blob(name.clone(), data);
                }
                if let Some(m) = metrics {
                    state.metrics = m;
                }
                match part {
                    Some((rank, world_size, attempt)) => {
                        state.attempt = attempt;
                        inner.lease_save_part(run, step, rank, world_size, specs, &state)
                    }
                    None => inner.lease_save(run, step, specs, &state),
                }
            })
            .map_err(err)?;
        Ok(LeasedSave {
            _store: inner,
            run: run.to_string(),
            step,
            count: session.lease_count(),
            session: Mutex::new(Some(session)),
            leases: Mutex::new(BTreeMap::new()),
        })
    }

    /// Stage a save; see the Python wrapper. The addresses in `tensors`
    /// must stay valid and unchanged until this returns.
    /// With `part = (rank, world_size)` the save is that rank's part of a
    /// sharded step ([`cairn::Store::save_part`]); [`Store::commit`] makes
    /// the step visible.
    #[pyo3(signature = (run, step, tensors, blobs, metadata_json=None, metrics=None, part=None))]
    #[allow(clippy::too_many_arguments)] // the Python signature
    fn save(
        &self,
        py: Python<'_>,
        run: &str,
        step: u64,
        tensors: Vec<RawTensor>,
        blobs: Vec<(String, Bound<'_, PyBytes>)>,
        metadata_json: Option<&str>,
        metrics: Option<BTreeMap<String, f64>>,
        part: Option<(u32, u32, Option<String>)>,
    ) -> PyResult<SaveHandle> {
        let metadata = match metadata_json {
            Some(t) => serde_json::from_str(t).map_err(|e| invalid("metadata", e))?,
            None => serde_json::Value::Null,
        };
        let mut dtypes = Vec::with_capacity(tensors.len());
        for (name, dtype, shape, addr, nbytes, _) in &tensors {
            check_address(name, *addr, *nbytes)?;
            let dt: DType = dtype.parse().map_err(err)?;
            let want = shape
                .iter()
                .try_fold(dt.size() as u64, |acc, &d| acc.checked_mul(d));
            if want != Some(*nbytes as u64) {
                return Err(invalid(
                    &format!("tensor {name:?}"),
                    format!("{nbytes} bytes given for {dt} of shape {shape:?}"),
                ));
            }
            dtypes.push(dt);
        }
        let blob_slices: Vec<(String, &[u8])> = blobs
            .iter()
            .map(|(n, b)| (n.clone(), b.as_bytes()))
            .collect();
        let inner = self.open_store()?;
        let h = py
            .detach(|| {
                let mut state = SaveState::new().metadata(metadata);
                for ((name, _, shape, addr, nbytes, shard), dt) in tensors.iter().zip(&dtypes) {
                    let data: &[u8] = if *nbytes == 0 {
                        &[]
                    } else {
                        // SAFETY: the Python wrapper passes the address and
                        // byte length of a live, C-contiguous host buffer
                        // (a numpy array's data or a CPU torch tensor's
                        // storage) and holds a reference to its owner until
                        // this call returns; the slice does not outlive the
                        // call (save copies every byte before returning).
                        unsafe { std::slice::from_raw_parts(*addr as *const u8, *nbytes) }
                    };
                    state = match shard {
                        None => state.tensor(name.clone(), *dt, shape, data),
                        Some((global_shape, offsets)) => state.shard(
                            name.clone(),
                            *dt,
                            shape,
                            data,
                            ShardInfo {
                                global_shape: global_shape.clone(),
                                offsets: offsets.clone(),
                            },
                        ),
                    };
                }
                for (name, data) in &blob_slices {
                    state = state.blob(name.clone(), data);
                }
                if let Some(m) = metrics {
                    state.metrics = m;
                }
                match part {
                    Some((rank, world_size, attempt)) => {
                        state.attempt = attempt;
                        inner.save_part(run, step, rank, world_size, &state)
                    }
                    None => inner.save(run, step, &state),
                }
            })
            .map_err(err)?;
        Ok(SaveHandle {
            run: h.run().to_string(),
            step: h.step(),
            stall_s: h.stall().as_secs_f64(),
            state: Mutex::new(HandleState::Pending(h)),
        })
    }

    /// Commit sharded step `(run, step)` saved by `world_size` ranks
    /// ([`cairn::Store::commit_attempt`]: the parts of `attempt`, or of
    /// the one attempt every rank saved); the report as JSON text.
    #[pyo3(signature = (run, step, world_size, attempt=None))]
    fn commit(
        &self,
        py: Python<'_>,
        run: &str,
        step: u64,
        world_size: u32,
        attempt: Option<&str>,
    ) -> PyResult<String> {
        let inner = self.open_store()?;
        let r = py
            .detach(|| inner.commit_attempt(run, step, world_size, attempt))
            .map_err(err)?;
        json_text(&r)
    }

    /// Read regions of tensors of a committed step into caller buffers
    /// ([`cairn::Store::restore_regions`]): `(name, offsets, shape,
    /// address, nbytes)` each, writable, C-contiguous and disjoint, kept
    /// alive by the caller. Each chunk is read once and verified. The
    /// report as JSON text.
    fn restore_regions(
        &self,
        py: Python<'_>,
        run: &str,
        step: u64,
        targets: Vec<RawRegion>,
    ) -> PyResult<String> {
        let inner = self.open_store()?;
        for t in &targets {
            check_address(&t.0, t.3, t.4)?;
        }
        let mut spans: Vec<(usize, usize)> = targets
            .iter()
            .filter(|t| t.4 > 0)
            .map(|t| (t.3, t.3.saturating_add(t.4)))
            .collect();
        spans.sort_unstable();
        if spans.windows(2).any(|w| w[1].0 < w[0].1) {
            return Err(invalid("region targets", "buffers overlap"));
        }
        let report = py
            .detach(|| {
                let mut regions: Vec<cairn::RegionTarget<'_>> = targets
                    .iter()
                    .map(|(name, offsets, shape, addr, nbytes)| {
                        let out: &mut [u8] = if *nbytes == 0 {
                            &mut []
                        } else {
                            // SAFETY: the Python wrapper passes the address
                            // and length of live, writable host buffers it
                            // holds until this call returns; they were
                            // checked above not to overlap, so each
                            // `&mut` slice is unique.
                            unsafe { std::slice::from_raw_parts_mut(*addr as *mut u8, *nbytes) }
                        };
                        cairn::RegionTarget {
                            name,
                            offsets,
                            shape,
                            out,
                        }
                    })
                    .collect();
                inner.restore_regions(run, StepSel::Step(step), &mut regions)
            })
            .map_err(err)?;
        json_text(&report)
    }

    /// Runs with at least one committed checkpoint.
    fn runs(&self, py: Python<'_>) -> PyResult<Vec<String>> {
        let inner = self.open_store()?;
        py.detach(|| inner.runs()).map_err(err)
    }

    /// Committed steps of `run`, ascending.
    fn steps(&self, py: Python<'_>, run: &str) -> PyResult<Vec<u64>> {
        let inner = self.open_store()?;
        py.detach(|| inner.steps(run)).map_err(err)
    }

    /// The newest committed step of `run`, or the newest whose metrics
    /// match the conditions in `where_` (e.g. `"loss<2.5"`); `None` if
    /// there is none.
    #[pyo3(signature = (run, where_=None))]
    fn latest(&self, py: Python<'_>, run: &str, where_: Option<&str>) -> PyResult<Option<u64>> {
        let inner = self.open_store()?;
        let filter: Option<MetricFilter> = where_.map(str::parse).transpose().map_err(err)?;
        py.detach(|| match &filter {
            Some(f) => inner.latest_where(run, f),
            None => inner.latest(run),
        })
        .map_err(err)
    }

    /// Resolve `step` (`None`: the latest) to a committed step.
    #[pyo3(signature = (run, step=None))]
    fn resolve(&self, py: Python<'_>, run: &str, step: Option<u64>) -> PyResult<u64> {
        let inner = self.open_store()?;
        py.detach(|| inner.resolve(run, sel(step))).map_err(err)
    }

    /// The manifest of a committed checkpoint as JSON text.
    fn manifest_json(&self, py: Python<'_>, run: &str, step: u64) -> PyResult<String> {
        let inner = self.open_store()?;
        let m = py.detach(|| inner.manifest(run, step)).map_err(err)?;
        json_text(&m)
    }

    /// Restore tensors into caller buffers: `(name, address, nbytes)` each,
    /// writable, C-contiguous and disjoint, kept alive by the caller. The
    /// report as JSON text.
    fn restore_into(
        &self,
        py: Python<'_>,
        run: &str,
        step: u64,
        targets: Vec<(String, usize, usize)>,
    ) -> PyResult<String> {
        let inner = self.open_store()?;
        for t in &targets {
            check_address(&t.0, t.1, t.2)?;
        }
        let mut spans: Vec<(usize, usize)> = targets
            .iter()
            .filter(|t| t.2 > 0)
            .map(|t| (t.1, t.1.saturating_add(t.2)))
            .collect();
        spans.sort_unstable();
        if spans.windows(2).any(|w| w[1].0 < w[0].1) {
            return Err(invalid("restore targets", "buffers overlap"));
        }
        let report = py
            .detach(|| {
                let mut bufs: Vec<(&str, &mut [u8])> = targets
                    .iter()
                    .map(|(name, addr, nbytes)| {
                        let buf: &mut [u8] = if *nbytes == 0 {
                            &mut []
                        } else {
                            // SAFETY: the Python wrapper passes the address
                            // and length of live, writable host buffers it
                            // holds until this call returns; they were
                            // checked above not to overlap, so each
                            // `&mut` slice is unique.
                            unsafe { std::slice::from_raw_parts_mut(*addr as *mut u8, *nbytes) }
                        };
                        (name.as_str(), buf)
                    })
                    .collect();
                inner.restore_into(run, StepSel::Step(step), &mut bufs)
            })
            .map_err(err)?;
        json_text(&report)
    }

    /// The blobs of a checkpoint (all of them, or those named).
    #[pyo3(signature = (run, step, names=None))]
    fn blobs<'py>(
        &self,
        py: Python<'py>,
        run: &str,
        step: u64,
        names: Option<Vec<String>>,
    ) -> PyResult<Vec<(String, Bound<'py, PyBytes>)>> {
        let inner = self.open_store()?;
        let r = py
            .detach(|| {
                inner.restore(
                    run,
                    StepSel::Step(step),
                    &cairn::TensorFilter::Names(Default::default()),
                )
            })
            .map_err(err)?;
        if let Some(names) = &names {
            if let Some(missing) = names.iter().find(|n| r.blob(n).is_none()) {
                return Err(err(cairn::Error::NotFound {
                    what: format!("blob {missing:?} in run {run} step {step}"),
                }));
            }
        }
        Ok(r.blobs
            .into_iter()
            .filter(|(n, _)| names.as_ref().is_none_or(|ns| ns.contains(n)))
            .map(|(n, b)| (n, PyBytes::new(py, &b)))
            .collect())
    }

    /// Delete a checkpoint's manifest (its chunks go at the next GC).
    fn delete(&self, py: Python<'_>, run: &str, step: u64) -> PyResult<()> {
        let inner = self.open_store()?;
        py.detach(|| inner.delete(run, step)).map_err(err)
    }

    /// Upload a checkpoint to the attached remote; the report as JSON text.
    fn upload(&self, py: Python<'_>, run: &str, step: u64) -> PyResult<String> {
        let inner = self.open_store()?;
        let r = py.detach(|| inner.upload(run, step)).map_err(err)?;
        json_text(&r)
    }
}

/// Every dtype name cairn stores (`"F32"`, `"BF16"`, ...).
#[pyfunction]
fn dtype_names() -> Vec<&'static str> {
    DType::ALL.iter().map(|d| d.name()).collect()
}

/// The extension module.
#[pymodule]
fn _cairn(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add_class::<Store>()?;
    m.add_class::<SaveHandle>()?;
    m.add_class::<LeasedSave>()?;
    m.add_function(wrap_pyfunction!(dtype_names, m)?)?;
    m.add("Error", py.get_type::<exc::Error>())?;
    m.add("UnavailableError", py.get_type::<exc::UnavailableError>())?;
    m.add("InvalidError", py.get_type::<exc::InvalidError>())?;
    m.add("DataError", py.get_type::<exc::DataError>())?;
    m.add("NotFoundError", py.get_type::<exc::NotFoundError>())?;
    m.add(
        "AlreadyExistsError",
        py.get_type::<exc::AlreadyExistsError>(),
    )?;
    m.add("ClosedError", py.get_type::<exc::ClosedError>())?;
    m.add("InternalError", py.get_type::<exc::InternalError>())?;
    Ok(())
}
