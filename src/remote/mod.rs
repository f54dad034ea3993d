//! The object-storage tier: the same layout as a local store under a
//! bucket prefix, reached only through `Arc<dyn ObjectStore>`.
//!
//! ```text
//! <prefix>/chunks/<2 hex>/<64 hex>              chunk objects (same bytes as local files)
//! <prefix>/packs/<2 hex>/<64 hex>               packs of small chunk objects (see [`pack`])
//! <prefix>/runs/<run>/<step:020>/packs.<hash>.json  where the packed chunks of the
//!                                               manifest with that blake3 hash are
//! <prefix>/runs/<run>/<step:020>/manifest.cairn  the remote commit, put last with PutMode::Create
//! <prefix>/gc-grace.json                        the collection grace every writer follows (see [`grace`])
//! ```
//!
//! A remote checkpoint exists exactly when its manifest object exists, and
//! a manifest is only put after every chunk it references is present (in
//! its own object, or in a pack its pack map names), so a listed remote
//! checkpoint is always whole.

#[cfg(any(test, feature = "test-util"))]
pub mod fault;
pub mod fetch;
pub mod grace;
pub mod metrics;
pub mod pack;
pub mod retry;
pub mod upload;

pub use metrics::{RemoteMetrics, RemoteMetricsSnapshot};
pub use retry::RetryPolicy;
pub use upload::UploadReport;

use crate::chunk_id::ChunkId;
use crate::clock::{system_clock, SharedClock};
use crate::codec::{compress_chunk_object, CodecChoice, EncoderPool};
use crate::error::{Error, Result};
use crate::format::manifest::{decode_manifest_file, Manifest, ENVELOPE_LEN, MAX_MANIFEST_LEN};
use crate::layout::{
    chunk_components, manifest_components, parse_step_dir_name, validate_run_name, CHUNKS_DIR,
    MANIFEST_FILE, RUNS_DIR,
};
use futures::TryStreamExt;
use object_store::path::Path as ObjPath;
use object_store::{ObjectMeta, ObjectStore, ObjectStoreScheme, PutMode, PutOptions, PutPayload};
use serde::{Deserialize, Serialize};
use std::sync::{Arc, OnceLock};

/// Tuning of the remote tier.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RemoteOptions {
    /// Chunks uploaded or downloaded at once.
    pub concurrency: usize,
    /// Objects larger than this are uploaded in parts.
    pub multipart_threshold: usize,
    /// Part size of multipart uploads, and range size of downloads.
    pub part_size: usize,
    /// Retry policy for every call.
    pub retry: RetryPolicy,
    /// Unreferenced chunk objects younger than this are never collected.
    /// Uploads re-send a chunk the remote holds when its object is older
    /// than half of it, so a chunk a new manifest relies on is never a
    /// collection candidate, and an upload must finish within a quarter of
    /// it. Must be positive; the daemon and the CLI require at least
    /// [`MIN_REMOTE_GC_GRACE`] and at most [`MAX_REMOTE_GC_GRACE`] (see
    /// [`check_remote_gc_grace`]).
    #[serde(with = "humantime_serde")]
    pub gc_grace: std::time::Duration,
    /// How chunks are encoded for the wire and the bucket: a raw chunk is
    /// uploaded as byte-grouped zstd at this level when that saves at
    /// least 3% (raw otherwise); chunks the local tier already compressed
    /// go as they are. `raw`, `zstd` (level 1) or `zstd:LEVEL`; the
    /// `--remote-option codec=...` of the CLI.
    #[serde(with = "codec_string")]
    pub codec: CodecChoice,
    /// Chunks compressed at once by one store's uploaders (0: one per
    /// core); the `--remote-option compress_threads=N` of the CLI.
    pub compress_threads: usize,
    /// Chunks of at most this many bytes (uncompressed) are uploaded packed
    /// together into pack objects of about [`RemoteOptions::pack_size`]
    /// instead of one object each, located through the checkpoint's pack
    /// map (see "Packs" in `docs/architecture.md`); 0 (the default) uploads every chunk as its own
    /// object. The `--remote-option pack_threshold=SIZE` of the CLI
    /// (`4MiB`, `65536`, ...).
    pub pack_threshold: usize,
    /// Bytes of chunks (uncompressed) gathered into one pack at most; the
    /// `--remote-option pack_size=SIZE` of the CLI. Default 16 MiB: with
    /// the default read budget a restore fetches a whole pack in one
    /// ranged GET (ranges are at most an eighth of the budget), and a
    /// server that reads the whole object for every ranged GET (moto) reads
    /// each pack once.
    pub pack_size: usize,
}

/// [`CodecChoice`] as the strings `raw`, `zstd`, `zstd:LEVEL`.
mod codec_string {
    use crate::codec::CodecChoice;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(c: &CodecChoice, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&c.to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<CodecChoice, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Apply the tuning keys among `options` (`codec`, `compress_threads`,
/// `concurrency`, `pack_threshold`, `pack_size`) to `opts`; return the
/// others, for the object store.
fn split_tuning(
    options: &[(String, String)],
    opts: &mut RemoteOptions,
) -> Result<Vec<(String, String)>> {
    let mut rest = Vec::new();
    for (k, v) in options {
        let count = |what: &str| {
            v.trim().parse::<usize>().map_err(|_| {
                Error::invalid(
                    format!("remote option {what}"),
                    format!("{v:?} is not a count"),
                )
            })
        };
        match k.as_str() {
            "codec" => opts.codec = v.parse()?,
            "gc_grace" => {
                opts.gc_grace = humantime::parse_duration(v)
                    .map_err(|e| Error::invalid("remote option gc_grace", format!("{v:?}: {e}")))?;
                check_remote_gc_grace(opts.gc_grace)?;
            }
            "pack_threshold" => opts.pack_threshold = parse_size(k, v)?,
            "pack_size" => match parse_size(k, v)? {
                0 => {
                    return Err(Error::invalid(
                        "remote option pack_size",
                        "must be at least 1 byte",
                    ))
                }
                n => opts.pack_size = n,
            },
            "compress_threads" => opts.compress_threads = count(k)?,
            "concurrency" => match count(k)? {
                0 => {
                    return Err(Error::invalid(
                        "remote option concurrency",
                        "must be at least 1",
                    ))
                }
                n => opts.concurrency = n,
            },
            _ => rest.push((k.clone(), v.clone())),
        }
    }
    Ok(rest)
}

/// A size given as a remote option: bytes, or a number with a binary
/// unit (`KiB`, `MiB`, `GiB`; `K`, `M`, `G` alike).
fn parse_size(key: &str, v: &str) -> Result<usize> {
    let t = v.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let mult: usize = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => 0,
    };
    num.parse::<usize>()
        .ok()
        .filter(|_| mult > 0)
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| {
            Error::invalid(
                format!("remote option {key}"),
                format!("{v:?} is not a size (bytes, or with KiB, MiB, GiB)"),
            )
        })
}

impl Default for RemoteOptions {
    fn default() -> Self {
        RemoteOptions {
            concurrency: 8,
            multipart_threshold: 8 << 20,
            part_size: 8 << 20,
            retry: RetryPolicy::default(),
            gc_grace: std::time::Duration::from_secs(24 * 3600),
            codec: CodecChoice::Zstd { level: 1 },
            compress_threads: 0,
            pack_threshold: 0,
            pack_size: 16 << 20,
        }
    }
}

/// Bytes of chunks a store reads at once: twice what `concurrency` ranged
/// GETs of `part_size` hold.
fn read_budget(opts: &RemoteOptions) -> u64 {
    2 * opts.concurrency.max(1) as u64 * opts.part_size.max(1) as u64
}

/// Encoders of a store: `compress_threads`, or one per core.
fn compress_threads(opts: &RemoteOptions) -> usize {
    match opts.compress_threads {
        0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
        n => n,
    }
}

/// How many times a create-only put refused while no object is found
/// there is tried again (see [`RemoteStore::put_create_only_or_read`]).
const CREATE_CONTENTION_RETRIES: u32 = 4;

/// The shortest remote collection grace period the daemon and `cairn gc`
/// accept: an upload must finish within a quarter of it (15 seconds), and
/// node clocks must agree to within an eighth of it.
pub const MIN_REMOTE_GC_GRACE: std::time::Duration = std::time::Duration::from_secs(60);

/// The longest remote collection grace period the daemon and `cairn gc`
/// accept (one year, `1y`: 365.25 days): a grace is recorded at the remote and no later
/// collection may use a shorter one, so a mistyped long one would stop
/// collection there for good.
pub const MAX_REMOTE_GC_GRACE: std::time::Duration = std::time::Duration::from_secs(31_557_600);

/// Check a remote collection grace period given by a user: at least
/// [`MIN_REMOTE_GC_GRACE`], because the remote protocol needs every upload
/// to finish within a quarter of it, and at most [`MAX_REMOTE_GC_GRACE`].
/// An `InvalidInput` error otherwise.
pub fn check_remote_gc_grace(grace: std::time::Duration) -> Result<()> {
    if grace < MIN_REMOTE_GC_GRACE {
        return Err(Error::invalid(
            "remote gc grace",
            format!(
                "{} is shorter than the minimum of {}: uploads must finish within a quarter of the grace period",
                humantime::format_duration(grace),
                humantime::format_duration(MIN_REMOTE_GC_GRACE)
            ),
        ));
    }
    if grace > MAX_REMOTE_GC_GRACE {
        return Err(Error::invalid(
            "remote gc grace",
            format!(
                "{} is longer than the maximum of {}: the remote records it, and no later \
                 collection there may use a shorter one",
                humantime::format_duration(grace),
                humantime::format_duration(MAX_REMOTE_GC_GRACE)
            ),
        ));
    }
    Ok(())
}

/// What a create-only put found at its path (see
/// [`RemoteStore::put_create_only_or_read`]).
pub(crate) enum Created<T> {
    /// This put created the object.
    New,
    /// An object was there already: what the caller's read made of it.
    Existing(T),
}

/// `Ok(None)` for the remote's answer that an object does not exist.
pub(crate) fn found<T>(r: Result<T>) -> Result<Option<T>> {
    match r {
        Ok(t) => Ok(Some(t)),
        Err(Error::Remote {
            source: object_store::Error::NotFound { .. },
            ..
        }) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Whether `e` is a create-only put's refusal (see
/// [`RemoteStore::put_create_only`]): an object is at its path, or another
/// writer's put of it is under way.
pub(crate) fn is_create_refused(e: &Error) -> bool {
    matches!(
        e,
        Error::Remote {
            source: object_store::Error::AlreadyExists { .. }
                | object_store::Error::Precondition { .. },
            ..
        }
    )
}

/// The runtime a store starts for calls from plain threads. Dropped with
/// `shutdown_background`, so the last clone of a store may go away
/// anywhere, an async task included.
struct OwnRuntime(Option<tokio::runtime::Runtime>);

impl Drop for OwnRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// A checkpoint store in object storage.
#[derive(Clone)]
pub struct RemoteStore {
    inner: Arc<dyn ObjectStore>,
    prefix: ObjPath,
    url: String,
    opts: RemoteOptions,
    metrics: Arc<RemoteMetrics>,
    rt: Arc<OnceLock<OwnRuntime>>,
    clock: SharedClock,
    encoders: Arc<EncoderPool>,
    in_flight: Arc<ByteBudget>,
    packed: Arc<pack::PackIndex>,
    /// The grace uploads rely on, as the last upload read it (see
    /// [`grace`]).
    grace: Arc<std::sync::Mutex<Option<std::time::Duration>>>,
    /// Turned true by [`RemoteStore::cancel`], shared by every clone.
    cancelled: Arc<tokio::sync::watch::Sender<bool>>,
}

/// Bytes of chunks being read at once, across the threads of one store:
/// a reader waits while taking its chunk would exceed the limit (one chunk
/// is always let through), so a restore's memory does not grow with its
/// thread count.
#[derive(Debug)]
pub(crate) struct ByteBudget {
    limit: u64,
    used: std::sync::Mutex<u64>,
    freed: std::sync::Condvar,
}

/// Bytes taken from a [`ByteBudget`], given back on drop.
pub(crate) struct BudgetGuard<'a> {
    budget: &'a ByteBudget,
    n: u64,
}

impl ByteBudget {
    fn new(limit: u64) -> Self {
        ByteBudget {
            limit: limit.max(1),
            used: std::sync::Mutex::new(0),
            freed: std::sync::Condvar::new(),
        }
    }

    /// Take `n` bytes, waiting while others hold the budget and `n` does
    /// not fit.
    pub(crate) fn take(&self, n: u64) -> BudgetGuard<'_> {
        let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        while *used > 0 && *used + n > self.limit {
            used = self.freed.wait(used).unwrap_or_else(|p| p.into_inner());
        }
        *used += n;
        BudgetGuard { budget: self, n }
    }
}

impl Drop for BudgetGuard<'_> {
    fn drop(&mut self) {
        let mut used = self.budget.used.lock().unwrap_or_else(|p| p.into_inner());
        *used -= self.n;
        drop(used);
        self.budget.freed.notify_all();
    }
}

impl std::fmt::Debug for RemoteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RemoteStore({})", self.url)
    }
}

impl RemoteStore {
    /// Open a store from a URL: `s3://bucket/prefix`, `gs://bucket/prefix`,
    /// `az://container/prefix`, or `file:///path`. The configuration is the
    /// standard environment variables (`AWS_*`, `GOOGLE_*`, `AZURE_*`, read
    /// by object_store's builders, client options such as
    /// `AWS_ALLOW_HTTP` included) merged with `options` (object_store's
    /// configuration keys, e.g. `endpoint`, `region`, `access_key_id`,
    /// `secret_access_key`, `allow_http`), which win. An `http://` endpoint
    /// without `allow_http`, an unknown key or a value that does not parse
    /// is an [`Error::InvalidInput`] naming it. Five keys tune cairn's
    /// remote tier instead and override `opts`: `codec` (`raw`, `zstd`,
    /// `zstd:LEVEL`), `compress_threads`, `concurrency`, `pack_threshold`
    /// and `pack_size`.
    ///
    /// A `file://` directory is created if missing; see
    /// [`RemoteStore::open_existing`] to read a store without creating it.
    pub fn open(url: &str, options: &[(String, String)], opts: RemoteOptions) -> Result<Self> {
        Self::open_impl(url, options, opts, true)
    }

    /// Open an existing store from a URL, as [`RemoteStore::open`] does,
    /// but create nothing: a `file://` URL must name a directory that is
    /// empty or holds a store's `runs`/`chunks` layout, otherwise the result
    /// is [`Error::NotFound`] naming it. (Object-store prefixes have no
    /// directory to check; an empty prefix reads as an empty store.)
    pub fn open_existing(
        url: &str,
        options: &[(String, String)],
        opts: RemoteOptions,
    ) -> Result<Self> {
        Self::open_impl(url, options, opts, false)
    }

    fn open_impl(
        url: &str,
        options: &[(String, String)],
        mut opts: RemoteOptions,
        create: bool,
    ) -> Result<Self> {
        let options = &split_tuning(options, &mut opts)?[..];
        if opts.gc_grace.is_zero() {
            return Err(Error::invalid(
                "remote gc grace",
                "must be positive: uploads must finish within a quarter of it",
            ));
        }
        let parsed = url::Url::parse(url)
            .map_err(|e| Error::invalid("remote URL", format!("{url:?}: {e}")))?;
        let (scheme, mut prefix) = ObjectStoreScheme::parse(&parsed)
            .map_err(|e| Error::invalid("remote URL", format!("{url:?}: {e}")))?;
        // object_store's URL parsing drops the first path segment of an
        // `az://` URL (as if it named the container), while its Azure
        // builder takes the container from the host: `az://c/a/b` is
        // container `c`, prefix `a/b`, not `b`.
        if parsed.scheme() == "az" {
            prefix = ObjPath::from_url_path(parsed.path())
                .map_err(|e| Error::invalid("remote URL", format!("{url:?}: {e}")))?;
        }
        let bad_key = |k: &str, e: object_store::Error| {
            Error::invalid("remote option", format!("{k:?}: {e}"))
        };
        let bad_config =
            |e: object_store::Error| Error::invalid("remote configuration", format!("{url}: {e}"));
        let timeout = humantime::format_duration(opts.retry.request_timeout).to_string();
        // The three HTTP backends are configured the same way: the
        // builder's own reading of the environment (`from_env`), then the
        // explicit options on top (they win), then the request timeout of
        // the retry policy unless either set one. Nothing the user set is
        // replaced; object_store's own retry is off (see `retry`).
        macro_rules! http_backend {
            ($builder:expr, $key:ident, $env:literal) => {{
                use object_store::ClientConfigKey as C;
                let mut b = $builder.with_url(url).with_retry(opts.retry.client_retry());
                for (k, v) in options {
                    b = b.with_config(k.parse().map_err(|e| bad_key(k, e))?, v);
                }
                if b.get_config_value(&$key::Client(C::Timeout)).is_none() {
                    b = b.with_config($key::Client(C::Timeout), &timeout);
                }
                let allow_http = b.get_config_value(&$key::Client(C::AllowHttp));
                (b, allow_http, $env)
            }};
        }
        // Refuse a plain-HTTP endpoint that object_store would refuse on
        // every request ("builder error"), naming the option to set.
        let check_http = |endpoint: Option<String>, allow_http: Option<String>, env: &str| {
            let allowed = match allow_http
                .as_deref()
                .map(str::to_ascii_lowercase)
                .as_deref()
            {
                Some("1" | "true" | "on" | "yes" | "y") => true,
                None | Some("0" | "false" | "off" | "no" | "n") => false,
                Some(_) => {
                    return Err(Error::invalid(
                        "remote option allow_http",
                        format!(
                            "{:?} is not a boolean (true or false; from {env}_ALLOW_HTTP or \
                             --remote-option allow_http)",
                            allow_http.unwrap_or_default()
                        ),
                    ))
                }
            };
            let Some(ep) = endpoint else { return Ok(()) };
            if ep.to_ascii_lowercase().starts_with("http://") && !allowed {
                return Err(Error::invalid(
                    "remote option allow_http",
                    format!(
                        "endpoint {ep} is plain HTTP, which is refused unless allow_http is \
                         true: set {env}_ALLOW_HTTP=true or pass --remote-option allow_http=true \
                         (or use an https:// endpoint)"
                    ),
                ));
            }
            Ok(())
        };
        let inner: Arc<dyn ObjectStore> = match scheme {
            ObjectStoreScheme::AmazonS3 => {
                use object_store::aws::AmazonS3ConfigKey;
                let (b, allow, env) =
                    http_backend!(s3_builder_from_env(options)?, AmazonS3ConfigKey, "AWS");
                check_http(b.get_config_value(&AmazonS3ConfigKey::Endpoint), allow, env)?;
                Arc::new(b.build().map_err(bad_config)?)
            }
            ObjectStoreScheme::GoogleCloudStorage => {
                use object_store::gcp::GoogleConfigKey;
                let (mut b, _, _) =
                    http_backend!(gcs_builder_from_env(options), GoogleConfigKey, "GOOGLE");
                let source = gcs_credential_source(&b);
                if source.is_none() {
                    if let Some(key) = gcs_emulator_key()? {
                        b = b.with_config(GoogleConfigKey::ServiceAccountKey, key);
                    }
                }
                Arc::new(b.build().map_err(|e| {
                    let what = source.unwrap_or_else(|| {
                        "application default credentials (GOOGLE_APPLICATION_CREDENTIALS \
                         or the metadata server)"
                            .to_string()
                    });
                    Error::invalid(
                        "remote configuration",
                        format!("{url}: {e} (credentials from the {what})"),
                    )
                })?)
            }
            ObjectStoreScheme::MicrosoftAzure => {
                use object_store::azure::AzureConfigKey;
                let (b, allow, env) =
                    http_backend!(azure_builder_from_env(options), AzureConfigKey, "AZURE");
                // The emulator is plain HTTP and allowed as such. Its
                // address comes from AZURITE_BLOB_STORAGE_URL only: object_store
                // ignores `endpoint` then, so one given is refused rather
                // than silently unused.
                let emulator = b.get_config_value(&AzureConfigKey::UseEmulator);
                if !matches!(emulator.as_deref(), Some("true" | "1" | "on" | "yes" | "y")) {
                    check_http(b.get_config_value(&AzureConfigKey::Endpoint), allow, env)?;
                } else if let Some(ep) = b.get_config_value(&AzureConfigKey::Endpoint) {
                    return Err(Error::invalid(
                        "remote option endpoint",
                        format!(
                            "{ep} is ignored with use_emulator (AZURE_STORAGE_USE_EMULATOR): \
                             set AZURITE_BLOB_STORAGE_URL={ep} for the emulator's address, or \
                             drop use_emulator and give account_name and access_key with the \
                             endpoint (http://HOST:PORT/ACCOUNT for Azurite)"
                        ),
                    ));
                }
                Arc::new(b.build().map_err(bad_config)?)
            }
            ObjectStoreScheme::Local => {
                let root = parsed.to_file_path().map_err(|_| {
                    Error::invalid("remote URL", format!("{url:?} is not a local path"))
                })?;
                if create {
                    crate::local::durable::create_dir_all_durable(&root)?;
                } else if !is_local_store_dir(&root) {
                    return Err(Error::NotFound {
                        what: format!("cairn store at {url}"),
                    });
                }
                let fs = object_store::local::LocalFileSystem::new_with_prefix(&root)
                    .map_err(|e| Error::remote("open", url, e))?;
                return Ok(Self::new(Arc::new(fs), ObjPath::default(), url, opts));
            }
            other => {
                return Err(Error::invalid(
                    "remote URL",
                    format!("{url:?}: scheme {other:?} is not supported (use s3, gs, az or file)"),
                ))
            }
        };
        Ok(Self::new(inner, prefix, url, opts))
    }

    /// Wrap an existing object store (for wrappers such as retry, metrics
    /// or fault injection) with the checkpoint layout under `prefix`.
    pub fn new(
        inner: Arc<dyn ObjectStore>,
        prefix: ObjPath,
        url: &str,
        opts: RemoteOptions,
    ) -> Self {
        let encoders = Arc::new(EncoderPool::new(opts.codec, compress_threads(&opts)));
        let in_flight = Arc::new(ByteBudget::new(read_budget(&opts)));
        RemoteStore {
            inner,
            prefix,
            url: url.to_string(),
            opts,
            metrics: Arc::new(RemoteMetrics::default()),
            rt: Arc::new(OnceLock::new()),
            clock: system_clock(),
            encoders,
            in_flight,
            packed: Arc::default(),
            grace: Arc::default(),
            cancelled: Arc::new(tokio::sync::watch::Sender::new(false)),
        }
    }

    /// Stop this store and every clone of it, for a process that is
    /// stopping: operations running now end with [`Error::Cancelled`] (a
    /// request in flight is dropped) and later ones fail with it at once.
    /// What was interrupted is left as a crash would leave it: an upload
    /// stopped before its manifest put commits nothing, one whose put was
    /// already sent may commit without its post-commit re-checks, and a
    /// later upload of the same checkpoint skips what already arrived.
    /// The cancel is for good, for every clone: give a daemon a store of
    /// its own, not a clone of one the program goes on using.
    pub fn cancel(&self) {
        self.cancelled.send_replace(true);
    }

    /// Whether [`RemoteStore::cancel`] was called on this store or a clone.
    pub fn is_cancelled(&self) -> bool {
        *self.cancelled.borrow()
    }

    /// Run `f` unless or until the store is cancelled.
    async fn unless_cancelled<F: std::future::Future>(&self, f: F) -> Result<F::Output> {
        let cancelled = || Error::Cancelled {
            url: self.url.clone(),
        };
        if self.is_cancelled() {
            return Err(cancelled());
        }
        let mut rx = self.cancelled.subscribe();
        tokio::select! {
            biased;
            _ = rx.wait_for(|c| *c) => Err(cancelled()),
            r = f => Ok(r),
        }
    }

    /// Use `clock` for the time-based rules of the collection protocol
    /// (grace, upload freshness and deadline). Tests drive them with a
    /// [`crate::ManualClock`].
    pub fn with_clock(mut self, clock: SharedClock) -> Self {
        self.clock = clock;
        self
    }

    /// The clock the collection protocol's rules read.
    pub fn clock(&self) -> &SharedClock {
        &self.clock
    }

    /// The URL the store was opened with.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The underlying object store.
    pub fn object_store(&self) -> &Arc<dyn ObjectStore> {
        &self.inner
    }

    /// Tuning in effect.
    pub fn options(&self) -> &RemoteOptions {
        &self.opts
    }

    /// Activity counters.
    pub fn metrics(&self) -> &RemoteMetrics {
        &self.metrics
    }

    /// Shared handle to the activity counters.
    pub fn metrics_arc(&self) -> Arc<RemoteMetrics> {
        self.metrics.clone()
    }

    /// The object to upload for chunk object `object`: compressed with the
    /// store's codec when it is raw and compression pays (in one of at
    /// most `compress_threads` encoders at once), else `object` itself.
    pub(crate) fn encode_for_upload(&self, object: bytes::Bytes) -> Result<bytes::Bytes> {
        if self.opts.codec == CodecChoice::Raw {
            return Ok(object);
        }
        Ok(
            match self.encoders.with(|e| compress_chunk_object(&object, e))? {
                Some(v) => bytes::Bytes::from(v),
                None => object,
            },
        )
    }

    /// Threads a restore from this store reads chunks with: twice
    /// `concurrency`, so that small chunks keep as many bytes in flight as
    /// large ones. Chunk bytes in flight stay within the store's read
    /// budget, twice `concurrency` times `part_size`, however many threads
    /// read.
    pub fn restore_readers(&self) -> usize {
        2 * self.opts.concurrency.max(1)
    }

    /// Take `len` bytes of the store's read budget (twice `concurrency`
    /// times `part_size`) for a chunk about to be fetched and decoded,
    /// waiting while other readers hold it.
    pub(crate) fn take_read_budget(&self, len: u64) -> BudgetGuard<'_> {
        self.in_flight.take(len)
    }

    /// Run a future to completion from synchronous code: on the current
    /// tokio runtime when called from one of its blocking threads
    /// (`spawn_blocking`), otherwise on a runtime owned by this store
    /// (created on first use). Must not be called from an async task.
    /// Fails with [`Error::Cancelled`], dropping `f`, once the store is
    /// cancelled ([`RemoteStore::cancel`]).
    pub fn block_on<F: std::future::Future>(&self, f: F) -> Result<F::Output> {
        // On a blocking thread of a runtime (`spawn_blocking`), drive the
        // future there: no second runtime is started inside, or dropped
        // by, an async program such as the daemon.
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            return handle.block_on(self.unless_cancelled(f));
        }
        let rt = match self.rt.get() {
            Some(rt) => rt,
            None => {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .thread_name("cairn-remote")
                    .enable_all()
                    .build()
                    .map_err(|e| Error::Internal(format!("start remote runtime: {e}")))?;
                let _ = self.rt.set(OwnRuntime(Some(rt)));
                self.rt
                    .get()
                    .ok_or_else(|| Error::Internal("remote runtime".into()))?
            }
        };
        let rt =
            rt.0.as_ref()
                .ok_or_else(|| Error::Internal("remote runtime".into()))?;
        rt.block_on(self.unless_cancelled(f))
    }

    /// Path of chunk `id`.
    pub fn chunk_path(&self, id: &ChunkId) -> ObjPath {
        chunk_components(id)
            .iter()
            .fold(self.prefix.clone(), |p, c| p.child(c.as_str()))
    }

    fn run_path(&self, run: &str) -> ObjPath {
        self.prefix.child(RUNS_DIR).child(run)
    }

    /// Path of the manifest of `(run, step)`.
    pub fn manifest_path(&self, run: &str, step: u64) -> ObjPath {
        manifest_components(run, step)
            .iter()
            .fold(self.prefix.clone(), |p, c| p.child(c.as_str()))
    }

    /// Run one remote operation under the retry policy (see [`retry`]),
    /// turning definite refusals into errors that say what to do.
    pub(crate) async fn retry<T, F, Fut>(&self, op: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        self.unless_cancelled(retry::retry(&self.opts.retry, &self.metrics, op))
            .await?
            .map_err(|e| self.explain(e))
    }

    /// Put `bytes` at `path` only if no object is there (retried, counted
    /// as a put). The services refuse such a put differently (S3 412 or
    /// 409, GCS 412, Azure 409 or 412), also while another writer's put of
    /// the same path is under way and nothing is visible yet: the refusal
    /// comes back as the service's error, which [`is_create_refused`]
    /// recognizes, for the caller to resolve by reading what is there.
    pub(crate) async fn put_create_only(
        &self,
        path: &ObjPath,
        bytes: bytes::Bytes,
        op: &'static str,
    ) -> Result<()> {
        self.retry(|| {
            let bytes = bytes.clone();
            async move {
                self.metrics.add_put();
                self.inner
                    .put_opts(
                        path,
                        PutPayload::from(bytes),
                        PutOptions {
                            mode: PutMode::Create,
                            ..Default::default()
                        },
                    )
                    .await
                    .map(|_| ())
                    .map_err(|e| Error::remote(op, path, e))
            }
        })
        .await
    }

    /// Put `bytes` at `path` only if no object is there, and resolve a
    /// refusal by reading what is there with `read` (`Ok(None)` when it
    /// finds nothing). S3 and Azure can refuse a put that races another
    /// writer's put of the same path (409 or 412) while that object is not
    /// visible yet, and that writer may still fail: a refusal with nothing
    /// to read puts again, up to [`CREATE_CONTENTION_RETRIES`] times with
    /// growing pauses, and is returned as the error after that.
    pub(crate) async fn put_create_only_or_read<T, R, RF>(
        &self,
        path: &ObjPath,
        bytes: bytes::Bytes,
        op: &'static str,
        read: R,
    ) -> Result<Created<T>>
    where
        R: Fn() -> RF,
        RF: std::future::Future<Output = Result<Option<T>>>,
    {
        let mut contended = 0u32;
        loop {
            match self.put_create_only(path, bytes.clone(), op).await {
                Ok(()) => return Ok(Created::New),
                Err(e) if is_create_refused(&e) => {
                    if let Some(t) = read().await? {
                        return Ok(Created::Existing(t));
                    }
                    if contended >= CREATE_CONTENTION_RETRIES {
                        return Err(e);
                    }
                    contended += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(50 << contended)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The bucket (or container) the store lives in, from its URL.
    fn bucket(&self) -> String {
        url::Url::parse(&self.url)
            .ok()
            .and_then(|u| u.host_str().map(str::to_string))
            .unwrap_or_else(|| self.url.clone())
    }

    /// Turn a definite answer of the object store into an error naming the
    /// bucket or object and what to do: a missing bucket is
    /// [`Error::NotFound`] naming it; access denied, bad credentials,
    /// other 4xx answers and no credential at all (the instance metadata
    /// service, asked for one, failed) are [`Error::RemoteRefused`].
    /// Anything else is returned as it is.
    fn explain(&self, e: Error) -> Error {
        let Error::Remote { op, path, source } = e else {
            return e;
        };
        if retry::is_metadata_credential_failure(&source) {
            return Error::RemoteRefused {
                op,
                location: format!("{path} in {}", self.url),
                reason: "no credential: none is set, and the instance metadata service \
                         gave none"
                    .to_string(),
                hint: credential_hint(&self.url),
                source: Box::new(source),
            };
        }
        let text = error_chain_text(&source);
        let status = retry::http_status(&source);
        let azure = self.url.starts_with("az://")
            || self.url.starts_with("azure://")
            || self.url.starts_with("abfs");
        if text.contains("NoSuchBucket")
            || text.contains("ContainerNotFound")
            || text.contains("The specified bucket does not exist")
            || (op.starts_with("list") && status == Some(404))
        {
            return Error::NotFound {
                what: format!(
                    "{} {:?} of {}: create it, or correct the URL",
                    if azure { "container" } else { "bucket" },
                    self.bucket(),
                    self.url
                ),
            };
        }
        // A credential the service rejects: Azure answers 403
        // AuthenticationFailed (Azurite: AuthorizationFailure), S3 403
        // SignatureDoesNotMatch or InvalidAccessKeyId, GCS 401. Named with
        // the variables that set it.
        let credential_code = [
            "AuthenticationFailed",
            "AuthorizationFailure",
            "SignatureDoesNotMatch",
            "InvalidAccessKeyId",
            "InvalidAuthenticationInfo",
        ]
        .into_iter()
        .find(|c| text.contains(c));
        let refused = match (&source, status) {
            (_, Some(s @ (401 | 403))) if credential_code.is_some() => Some((
                format!(
                    "the credentials were rejected (HTTP {s} {})",
                    credential_code.unwrap_or_default()
                ),
                credential_hint(&self.url),
            )),
            (object_store::Error::PermissionDenied { .. }, _) | (_, Some(403)) => Some((
                "access denied (HTTP 403)".to_string(),
                "check that the credentials in use may access this bucket and prefix",
            )),
            (object_store::Error::Unauthenticated { .. }, _) | (_, Some(401)) => Some((
                "not authenticated (HTTP 401)".to_string(),
                credential_hint(&self.url),
            )),
            (object_store::Error::Generic { .. }, Some(s))
                if (400..500).contains(&s) && s != 404 && s != 408 && s != 429 =>
            {
                Some((
                    format!("HTTP {s}"),
                    "check the endpoint, region and credentials of the remote",
                ))
            }
            _ => None,
        };
        match refused {
            Some((reason, hint)) => Error::RemoteRefused {
                op,
                location: format!("{path} in {}", self.url),
                reason,
                hint,
                source: Box::new(source),
            },
            None => Error::Remote { op, path, source },
        }
    }

    /// Metadata of chunk `id`, or `None` if the remote does not hold it.
    pub async fn head_chunk(&self, id: &ChunkId) -> Result<Option<ObjectMeta>> {
        self.head_object("head chunk", &self.chunk_path(id)).await
    }

    /// Metadata of the object at `path`, or `None` if there is none;
    /// retried, errors naming `op`.
    pub(crate) async fn head_object(
        &self,
        op: &'static str,
        path: &ObjPath,
    ) -> Result<Option<ObjectMeta>> {
        let r = self
            .retry(|| async {
                self.inner
                    .head(path)
                    .await
                    .map_err(|e| Error::remote(op, path, e))
            })
            .await;
        found(r)
    }

    /// Upload a whole object, in parts when it is large; retried whole.
    pub async fn put_object(&self, path: &ObjPath, bytes: bytes::Bytes) -> Result<()> {
        let len = bytes.len();
        self.retry(|| {
            let bytes = bytes.clone();
            async move {
                self.metrics.add_put();
                if len <= self.opts.multipart_threshold {
                    self.inner
                        .put(path, PutPayload::from(bytes))
                        .await
                        .map(|_| ())
                        .map_err(|e| Error::remote("put object", path, e))
                } else {
                    let upload = self
                        .inner
                        .put_multipart(path)
                        .await
                        .map_err(|e| Error::remote("start multipart upload", path, e))?;
                    let mut w = object_store::WriteMultipart::new_with_chunk_size(
                        upload,
                        self.opts.part_size,
                    );
                    for part in bytes.chunks(self.opts.part_size) {
                        w.wait_for_capacity(4)
                            .await
                            .map_err(|e| Error::remote("upload part", path, e))?;
                        w.write(part);
                    }
                    w.finish()
                        .await
                        .map(|_| ())
                        .map_err(|e| Error::remote("finish multipart upload", path, e))
                }
            }
        })
        .await
    }

    /// Commit a manifest: put it only if absent. Returns `Ok(true)` if this
    /// call created it, `Ok(false)` if an identical manifest was already
    /// there; a different one is an `AlreadyExists` error. The services
    /// refuse a create-only put differently (S3 412 or 409, GCS 412, Azure
    /// 409 or 412); every refusal is resolved by reading the manifest that
    /// is there, and a refusal while none is found yet is tried again.
    pub async fn put_manifest(&self, run: &str, step: u64, bytes: bytes::Bytes) -> Result<bool> {
        validate_run_name(run)?;
        let path = self.manifest_path(run, step);
        // Writers refuse what readers refuse: a valid manifest that names
        // the run and step it is stored under.
        let display = std::path::PathBuf::from(path.to_string());
        let m = decode_manifest_file(&bytes, &display)?;
        if m.run != run || m.step != step {
            return Err(Error::manifest(
                &display,
                format!("names run {} step {}, not its location", m.run, m.step),
            ));
        }
        // A refused create-only put means another writer's manifest is
        // there, or was being written (then it is put again).
        let read = || async { found(self.get_manifest_object(&path).await) };
        match self
            .put_create_only_or_read(&path, bytes.clone(), "put manifest", read)
            .await?
        {
            Created::New => {
                self.metrics.add_manifest();
                crate::failpoint::hit("remote.after_manifest_put")
                    .map_err(|e| Error::io("fail point", display.clone(), e))?;
                Ok(true)
            }
            Created::Existing(existing) if existing == bytes => Ok(false),
            Created::Existing(_) => Err(Error::AlreadyExists {
                run: run.to_string(),
                step,
            }),
        }
    }

    /// Get a whole object (retried, body included).
    pub async fn get_object(&self, path: &ObjPath, op: &'static str) -> Result<bytes::Bytes> {
        self.retry(|| async {
            let r = self
                .inner
                .get(path)
                .await
                .map_err(|e| Error::remote(op, path, e))?;
            r.bytes().await.map_err(|e| Error::remote(op, path, e))
        })
        .await
    }

    /// Get a manifest object whole, refusing one larger than a manifest may
    /// be: the size comes from the object's metadata before any of the body
    /// is read, and the body is read with the same cap (retried).
    pub async fn get_manifest_object(&self, path: &ObjPath) -> Result<bytes::Bytes> {
        let limit = MAX_MANIFEST_LEN + ENVELOPE_LEN as u64;
        let display = || std::path::PathBuf::from(path.to_string());
        let too_large = || Error::manifest(display(), format!("larger than {limit} bytes"));
        self.retry(|| async {
            let op = "get manifest";
            let r = self
                .inner
                .get(path)
                .await
                .map_err(|e| Error::remote(op, path, e))?;
            if r.meta.size > limit {
                return Err(too_large());
            }
            let mut buf = Vec::with_capacity(r.meta.size as usize);
            let mut body = r.into_stream();
            while let Some(part) = body
                .try_next()
                .await
                .map_err(|e| Error::remote(op, path, e))?
            {
                if (buf.len() + part.len()) as u64 > limit {
                    return Err(too_large());
                }
                buf.extend_from_slice(&part);
            }
            Ok(bytes::Bytes::from(buf))
        })
        .await
    }

    /// Get a byte range of an object (retried, body included).
    pub async fn get_range(
        &self,
        path: &ObjPath,
        range: std::ops::Range<u64>,
    ) -> Result<bytes::Bytes> {
        self.retry(|| {
            let range = range.clone();
            async move {
                self.metrics.add_get();
                let want = range.end - range.start;
                let b = self
                    .inner
                    .get_range(path, range)
                    .await
                    .map_err(|e| Error::remote("get range", path, e))?;
                check_body_len(path, "get range", b.len() as u64, want)?;
                Ok(b)
            }
        })
        .await
    }

    /// Read and validate the manifest of `(run, step)`.
    pub async fn manifest(&self, run: &str, step: u64) -> Result<Manifest> {
        validate_run_name(run)?;
        let path = self.manifest_path(run, step);
        let bytes = match self.get_manifest_object(&path).await {
            Ok(b) => b,
            Err(Error::Remote {
                source: object_store::Error::NotFound { .. },
                ..
            }) => {
                return Err(Error::NotFound {
                    what: format!("checkpoint run {run} step {step} in {}", self.url),
                })
            }
            Err(e) => return Err(e),
        };
        let display = std::path::PathBuf::from(path.to_string());
        let m = decode_manifest_file(&bytes, &display)?;
        if m.run != run || m.step != step {
            return Err(Error::manifest(
                &display,
                format!("names run {} step {}, not its location", m.run, m.step),
            ));
        }
        // Where its packed chunks live, for the reads that follow: the map
        // named by the hash of these manifest bytes.
        self.learn_pack_map(run, step, &crate::chunk_id::ChunkId::of(&bytes))
            .await?;
        Ok(m)
    }

    async fn list_dirs(&self, path: &ObjPath) -> Result<Vec<String>> {
        let r = self
            .retry(|| async {
                self.inner
                    .list_with_delimiter(Some(path))
                    .await
                    .map_err(|e| Error::remote("list", path, e))
            })
            .await?;
        Ok(r.common_prefixes
            .iter()
            .filter_map(|p| p.filename().map(str::to_string))
            .collect())
    }

    /// Runs with at least one committed remote checkpoint.
    pub async fn runs(&self) -> Result<Vec<String>> {
        let mut out = Vec::new();
        for r in self.list_dirs(&self.prefix.child(RUNS_DIR)).await? {
            if validate_run_name(&r).is_ok() && !self.steps(&r).await?.is_empty() {
                out.push(r);
            }
        }
        out.sort();
        Ok(out)
    }

    /// Committed remote steps of `run`, ascending: those whose manifest
    /// object exists. A step prefix holding anything else (an empty
    /// directory left by a `file://` delete, a stray object) is not a
    /// checkpoint.
    pub async fn steps(&self, run: &str) -> Result<Vec<u64>> {
        validate_run_name(run)?;
        let base = self.run_path(run);
        let metas: Vec<ObjectMeta> = self
            .retry(|| async {
                self.inner
                    .list(Some(&base))
                    .try_collect()
                    .await
                    .map_err(|e| Error::remote("list", &base, e))
            })
            .await?;
        let mut out: Vec<u64> = metas
            .iter()
            .filter_map(|m| listed_manifest_step(&base, &m.location))
            .collect();
        out.sort_unstable();
        out.dedup();
        Ok(out)
    }

    /// Whether the manifest of `(run, step)` exists remotely (one HEAD).
    pub async fn has_manifest(&self, run: &str, step: u64) -> Result<bool> {
        validate_run_name(run)?;
        Ok(self
            .head_object("head manifest", &self.manifest_path(run, step))
            .await?
            .is_some())
    }

    /// Delete the remote manifest of `(run, step)` (its chunks, packs and
    /// pack map stay until garbage collection, which removes a pack map
    /// left without its manifest once it is older than the grace).
    pub async fn delete_checkpoint(&self, run: &str, step: u64) -> Result<()> {
        validate_run_name(run)?;
        let path = self.manifest_path(run, step);
        self.retry(|| async {
            self.inner
                .delete(&path)
                .await
                .map_err(|e| Error::remote("delete manifest", &path, e))
        })
        .await
    }

    /// Every chunk object: id, last-modified time (ms since the epoch) and
    /// size. Objects that are not at the path of a chunk id
    /// (`chunks/<2 hex>/<64 hex>`) are skipped.
    pub async fn list_chunks(&self) -> Result<Vec<(ChunkId, i64, u64)>> {
        let path = self.prefix.child(CHUNKS_DIR);
        let metas: Vec<ObjectMeta> = self
            .retry(|| async {
                self.inner
                    .list(Some(&path))
                    .try_collect()
                    .await
                    .map_err(|e| Error::remote("list chunks", &path, e))
            })
            .await?;
        Ok(metas
            .into_iter()
            .filter_map(|m| {
                let id = listed_chunk_id(&path, &m.location)?;
                Some((id, m.last_modified.timestamp_millis(), m.size))
            })
            .collect())
    }

    /// Delete chunk `id`.
    pub async fn delete_chunk(&self, id: &ChunkId) -> Result<()> {
        let path = self.chunk_path(id);
        self.retry(|| async {
            match self.inner.delete(&path).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                Err(e) => Err(Error::remote("delete chunk", &path, e)),
            }
        })
        .await
    }
}

/// object_store's `AmazonS3Builder::from_env`, except that a key id,
/// secret key or session token given in `options` replaces all three from
/// the environment (`AWS_SESSION_TOKEN` under either of its names): keys
/// given as options are not signed with a token (or a secret) that belongs
/// to the environment's keys, which S3 would refuse. A `token` option
/// without both keys as options is refused, as object_store would ignore it.
fn s3_builder_from_env(options: &[(String, String)]) -> Result<object_store::aws::AmazonS3Builder> {
    use object_store::aws::AmazonS3ConfigKey as K;
    let is_credential = |k: &K| matches!(k, K::AccessKeyId | K::SecretAccessKey | K::Token);
    if !names_any(options, is_credential) {
        return Ok(object_store::aws::AmazonS3Builder::from_env());
    }
    let keys = names_any(options, |k: &K| matches!(k, K::AccessKeyId))
        && names_any(options, |k: &K| matches!(k, K::SecretAccessKey));
    if names_any(options, |k: &K| matches!(k, K::Token)) && !keys {
        return Err(Error::invalid(
            "remote option token",
            "a session token is used with the keys it was issued with: give \
             access_key_id and secret_access_key as options too",
        ));
    }
    Ok(env_config("AWS_", is_credential)
        .into_iter()
        .fold(object_store::aws::AmazonS3Builder::new(), |b, (k, v)| {
            b.with_config(k, v)
        }))
}

/// object_store's `GoogleCloudStorageBuilder::from_env`, except that a
/// service-account file, key or application-credentials file given in
/// `options` replaces every one of those the environment names (object_store
/// refuses a file and a key together, so the option could not win
/// otherwise).
fn gcs_builder_from_env(
    options: &[(String, String)],
) -> object_store::gcp::GoogleCloudStorageBuilder {
    use object_store::gcp::GoogleConfigKey as K;
    let is_credential = |k: &K| {
        matches!(
            k,
            K::ServiceAccount | K::ServiceAccountKey | K::ApplicationCredentials
        )
    };
    if !names_any(options, is_credential) {
        return object_store::gcp::GoogleCloudStorageBuilder::from_env();
    }
    env_config("GOOGLE_", is_credential).into_iter().fold(
        object_store::gcp::GoogleCloudStorageBuilder::new(),
        |b, (k, v)| b.with_config(k, v),
    )
}

/// object_store's `MicrosoftAzureBuilder::from_env`, except that a
/// credential given in `options` (an account key, a SAS token, a bearer
/// token, a client secret, a federated token file, the Azure CLI)
/// replaces every one the environment names. object_store uses the first
/// credential it finds in a fixed order (a key before a SAS token), so a
/// `sas_key` option would otherwise be passed over for an
/// `AZURE_STORAGE_ACCOUNT_KEY` left in the environment.
fn azure_builder_from_env(
    options: &[(String, String)],
) -> object_store::azure::MicrosoftAzureBuilder {
    use object_store::azure::AzureConfigKey as K;
    let is_credential = |k: &K| {
        matches!(
            k,
            K::AccessKey
                | K::SasKey
                | K::Token
                | K::ClientSecret
                | K::FederatedTokenFile
                | K::UseAzureCli
                | K::FabricSessionToken
        )
    };
    if !names_any(options, is_credential) {
        return object_store::azure::MicrosoftAzureBuilder::from_env();
    }
    let b = env_config("AZURE_", is_credential).into_iter().fold(
        object_store::azure::MicrosoftAzureBuilder::new(),
        |b, (k, v)| b.with_config(k, v),
    );
    // As `from_env` does: the managed identity endpoint's own variable.
    match std::env::var("IDENTITY_ENDPOINT") {
        Ok(endpoint) => b.with_msi_endpoint(endpoint),
        Err(_) => b,
    }
}

/// Whether any of `options` is a key `K` that `pick` selects.
fn names_any<K: std::str::FromStr>(
    options: &[(String, String)],
    pick: impl Fn(&K) -> bool,
) -> bool {
    options
        .iter()
        .any(|(k, _)| k.parse::<K>().is_ok_and(|k| pick(&k)))
}

/// The environment variables starting with `prefix` that name a config key
/// `K` (as object_store's `from_env` reads them), except those `skip`
/// selects. Variables that are not UTF-8 are left out, as `from_env` does.
fn env_config<K: std::str::FromStr>(prefix: &str, skip: impl Fn(&K) -> bool) -> Vec<(K, String)> {
    std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .filter(|(k, _)| k.starts_with(prefix))
        .filter_map(|(k, v)| Some((k.to_ascii_lowercase().parse::<K>().ok()?, v)))
        .filter(|(k, _)| !skip(k))
        .collect()
}

/// Where the credentials of a `gs://` store come from, when the user set
/// them: a service-account file or key (variable or option).
fn gcs_credential_source(b: &object_store::gcp::GoogleCloudStorageBuilder) -> Option<String> {
    use object_store::gcp::GoogleConfigKey as K;
    if let Some(path) = b.get_config_value(&K::ServiceAccount) {
        return Some(format!(
            "service account file {path} (GOOGLE_SERVICE_ACCOUNT or --remote-option \
             service_account)"
        ));
    }
    if b.get_config_value(&K::ServiceAccountKey).is_some() {
        return Some(
            "service account key (GOOGLE_SERVICE_ACCOUNT_KEY or --remote-option \
             service_account_key)"
                .to_string(),
        );
    }
    b.get_config_value(&K::ApplicationCredentials).map(|path| {
        format!(
            "application credentials file {path} (GOOGLE_APPLICATION_CREDENTIALS or \
             --remote-option application_credentials)"
        )
    })
}

/// The service-account key that points object_store's GCS client at the
/// emulator named by `STORAGE_EMULATOR_HOST` (the variable Google's own
/// client libraries read; `host:port` or a URL), with OAuth off. `None`
/// when the variable is unset or empty.
fn gcs_emulator_key() -> Result<Option<String>> {
    let host = match std::env::var("STORAGE_EMULATOR_HOST") {
        Ok(h) if !h.trim().is_empty() => h.trim().trim_end_matches('/').to_string(),
        _ => return Ok(None),
    };
    let base = if host.contains("://") {
        host
    } else {
        format!("http://{host}")
    };
    if url::Url::parse(&base).is_err() {
        return Err(Error::invalid(
            "STORAGE_EMULATOR_HOST",
            format!("{base:?} is not a URL or host:port"),
        ));
    }
    let key = serde_json::json!({
        "gcs_base_url": base,
        "disable_oauth": true,
        "client_email": "",
        "private_key": "",
        "private_key_id": "",
    });
    Ok(Some(key.to_string()))
}

/// What to check when a store rejects the credentials, by URL scheme.
fn credential_hint(url: &str) -> &'static str {
    match url.split_once("://").map(|(s, _)| s) {
        Some("s3" | "s3a") => {
            "check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or --remote-option \
             access_key_id/secret_access_key)"
        }
        Some("gs") => {
            "check the service account: GOOGLE_SERVICE_ACCOUNT, GOOGLE_SERVICE_ACCOUNT_KEY or \
             GOOGLE_APPLICATION_CREDENTIALS (or --remote-option service_account/service_account_key)"
        }
        Some("az" | "azure" | "abfs" | "abfss") => {
            "check AZURE_STORAGE_ACCOUNT_NAME and AZURE_STORAGE_ACCOUNT_KEY or \
             AZURE_STORAGE_SAS_KEY (or --remote-option account_name/access_key/sas_key)"
        }
        _ => {
            "check the credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, \
             GOOGLE_SERVICE_ACCOUNT, AZURE_STORAGE_ACCOUNT_KEY or --remote-option)"
        }
    }
}

/// The text of an error and all its sources, for recognising a
/// backend's error codes (`NoSuchBucket`, ...).
fn error_chain_text(e: &object_store::Error) -> String {
    let mut out = String::new();
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        out.push_str(&err.to_string());
        out.push('\n');
        cur = err.source();
    }
    out
}

/// A body shorter or longer than the bytes asked for (a connection cut
/// mid-body behind a proxy, a misbehaving server): a transient error, so
/// the request is retried, never data handed to the decoder as the object.
pub(crate) fn check_body_len(path: &ObjPath, op: &'static str, got: u64, want: u64) -> Result<()> {
    if got == want {
        return Ok(());
    }
    Err(Error::remote(
        op,
        path,
        object_store::Error::Generic {
            store: "cairn",
            source: format!("body is {got} bytes, expected {want}").into(),
        },
    ))
}

/// The step committed by a listed object: `Some(step)` when `location` is
/// the manifest object `<run_prefix>/<step:020>/manifest.cairn` of the run
/// whose prefix is `run_prefix`, `None` for anything else.
#[doc(hidden)]
pub fn listed_manifest_step(run_prefix: &ObjPath, location: &ObjPath) -> Option<u64> {
    let parts: Vec<_> = location.prefix_match(run_prefix)?.collect();
    match parts.as_slice() {
        [step, file] if file.as_ref() == MANIFEST_FILE => parse_step_dir_name(step.as_ref()),
        _ => None,
    }
}

/// The chunk a listed object holds: `Some(id)` when `location` is the
/// chunk object `<chunks_prefix>/<2 hex>/<64 hex>` of `id`, in its own
/// fan-out directory; `None` for anything else, such as a stray copy of a
/// chunk's name at another path, which is neither listed nor collected.
#[doc(hidden)]
pub fn listed_chunk_id(chunks_prefix: &ObjPath, location: &ObjPath) -> Option<ChunkId> {
    let parts: Vec<_> = location.prefix_match(chunks_prefix)?.collect();
    match parts.as_slice() {
        [fan_out, name] => {
            let id: ChunkId = name.as_ref().parse().ok()?;
            (fan_out.as_ref() == id.prefix()).then_some(id)
        }
        _ => None,
    }
}

/// Whether `root` can be read as a `file://` store: a directory that is
/// empty or holds `runs` or `chunks`.
fn is_local_store_dir(root: &std::path::Path) -> bool {
    let Ok(mut entries) = std::fs::read_dir(root) else {
        return false;
    };
    entries.next().is_none() || root.join(RUNS_DIR).is_dir() || root.join(CHUNKS_DIR).is_dir()
}
