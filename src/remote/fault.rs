//! An `ObjectStore` wrapper that injects faults: a share of calls fail
//! with a transient error (as an overloaded server's 503 would), some
//! after the operation took effect (a lost response), and calls may be
//! delayed. Used by tests and benchmarks to show that uploads and restores
//! survive a misbehaving remote.

use async_trait::async_trait;
use futures::stream::BoxStream;
use object_store::path::Path;
use object_store::{
    GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, Result, UploadPart,
};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// What to inject.
#[derive(Debug, Clone)]
pub struct FaultConfig {
    /// Share of calls that fail before reaching the inner store.
    pub fail_before: f64,
    /// Share of writes that take effect but still report an error.
    pub fail_after: f64,
    /// Largest random delay added to a call.
    pub max_delay: Duration,
    /// Seed of the deterministic fault sequence.
    pub seed: u64,
}

/// A function called before each operation reaches the inner store, with
/// the operation (`"put"`, `"get"`, `"delete"`, ...) and the object's path:
/// a test's way to act at an exact point of a protocol (move a manual
/// clock, delete an object as a concurrent collector would).
pub type OpHook = Arc<dyn Fn(&'static str, &Path) + Send + Sync>;

/// The fault-injecting wrapper.
pub struct FaultyObjectStore {
    inner: Arc<dyn ObjectStore>,
    cfg: FaultConfig,
    state: Arc<AtomicU64>,
    injected: Arc<AtomicU64>,
    hook: Option<OpHook>,
}

impl FaultyObjectStore {
    /// Wrap `inner`.
    pub fn new(inner: Arc<dyn ObjectStore>, cfg: FaultConfig) -> Self {
        FaultyObjectStore {
            inner,
            state: Arc::new(AtomicU64::new(cfg.seed)),
            cfg,
            injected: Arc::new(AtomicU64::new(0)),
            hook: None,
        }
    }

    /// Call `hook` before every operation (see [`OpHook`]).
    pub fn with_hook(mut self, hook: OpHook) -> Self {
        self.hook = Some(hook);
        self
    }

    /// Faults injected so far.
    pub fn injected(&self) -> u64 {
        self.injected.load(Ordering::Relaxed)
    }

    fn roll(&self) -> f64 {
        roll(&self.state)
    }

    async fn before(&self, op: &'static str, location: &Path) -> Result<()> {
        if let Some(h) = &self.hook {
            h(op, location);
        }
        if !self.cfg.max_delay.is_zero() {
            let d = self.cfg.max_delay.mul_f64(self.roll());
            tokio::time::sleep(d).await;
        }
        if self.roll() < self.cfg.fail_before {
            self.injected.fetch_add(1, Ordering::Relaxed);
            return Err(injected(op));
        }
        Ok(())
    }

    fn after(&self, op: &'static str) -> Result<()> {
        if self.roll() < self.cfg.fail_after {
            self.injected.fetch_add(1, Ordering::Relaxed);
            return Err(injected(op));
        }
        Ok(())
    }
}

fn roll(state: &AtomicU64) -> f64 {
    let mut z = state.fetch_add(0x9E3779B97F4A7C15, Ordering::Relaxed);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
    ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
}

fn injected(op: &'static str) -> object_store::Error {
    object_store::Error::Generic {
        store: "faulty",
        source: format!("injected fault in {op}: 503 Slow Down").into(),
    }
}

impl fmt::Display for FaultyObjectStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Faulty({})", self.inner)
    }
}

impl fmt::Debug for FaultyObjectStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Faulty({:?})", self.inner)
    }
}

#[async_trait]
impl ObjectStore for FaultyObjectStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> Result<PutResult> {
        self.before("put", location).await?;
        let r = self.inner.put_opts(location, payload, opts).await?;
        self.after("put")?;
        Ok(r)
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        self.before("put multipart", location).await?;
        let inner = self.inner.put_multipart_opts(location, opts).await?;
        Ok(Box::new(FaultyUpload {
            inner,
            cfg: self.cfg.clone(),
            state: self.state.clone(),
            injected: self.injected.clone(),
        }))
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        self.before("get", location).await?;
        self.inner.get_opts(location, options).await
    }

    async fn delete(&self, location: &Path) -> Result<()> {
        self.before("delete", location).await?;
        self.inner.delete(location).await?;
        self.after("delete")
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        if self.roll() < self.cfg.fail_before {
            self.injected.fetch_add(1, Ordering::Relaxed);
            return Box::pin(futures::stream::once(async { Err(injected("list")) }));
        }
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        self.before("list", prefix.unwrap_or(&Path::default()))
            .await?;
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy(&self, from: &Path, to: &Path) -> Result<()> {
        self.before("copy", to).await?;
        self.inner.copy(from, to).await
    }

    async fn copy_if_not_exists(&self, from: &Path, to: &Path) -> Result<()> {
        self.before("copy", to).await?;
        self.inner.copy_if_not_exists(from, to).await
    }
}

struct FaultyUpload {
    inner: Box<dyn MultipartUpload>,
    cfg: FaultConfig,
    state: Arc<AtomicU64>,
    injected: Arc<AtomicU64>,
}

impl fmt::Debug for FaultyUpload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FaultyUpload")
    }
}

#[async_trait]
impl MultipartUpload for FaultyUpload {
    fn put_part(&mut self, data: PutPayload) -> UploadPart {
        if roll(&self.state) < self.cfg.fail_before {
            self.injected.fetch_add(1, Ordering::Relaxed);
            return Box::pin(async { Err(injected("upload part")) });
        }
        self.inner.put_part(data)
    }

    async fn complete(&mut self) -> Result<PutResult> {
        if roll(&self.state) < self.cfg.fail_before {
            self.injected.fetch_add(1, Ordering::Relaxed);
            return Err(injected("complete multipart"));
        }
        self.inner.complete().await
    }

    async fn abort(&mut self) -> Result<()> {
        self.inner.abort().await
    }
}
