//! Retry of object-store calls: one policy, one layer, one time budget per
//! operation.
//!
//! object_store's own HTTP retry is switched off ([`RetryPolicy::client_retry`]
//! asks for no retries), so a failed request reaches this layer at once and
//! the two layers never multiply. Here every `RemoteStore` call runs as a
//! whole operation (a request and the reading of its body, or a multipart
//! upload, which object_store could not replay anyway) and is repeated only
//! when the error may go away ([`is_transient`]): connection failures,
//! timeouts, interrupted bodies, 5xx, 408 and 429. Definite answers — not
//! found, already exists, a precondition, access denied, bad credentials, a
//! 4xx, an invalid configuration, no credential set where the instance
//! metadata service cannot give one — fail on the first attempt.
//!
//! Backoff is exponential with jitter (the `backon` crate), bounded by
//! [`RetryPolicy::max_attempts`] and by [`RetryPolicy::budget`], the total
//! time one operation may take: no retry starts, and no backoff sleeps, past
//! it. An operation that runs out of either fails with
//! [`Error::RetriesExhausted`], which names the operation and carries its
//! last error.

use super::metrics::RemoteMetrics;
use crate::error::{Error, Result};
use backon::{BackoffBuilder, ExponentialBuilder, Retryable};
use serde::{Deserialize, Serialize};
use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// How remote operations are retried.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryPolicy {
    /// Attempts per operation, the first included.
    pub max_attempts: u32,
    /// First backoff (before jitter, which adds up to as much again).
    #[serde(with = "humantime_serde")]
    pub initial_backoff: Duration,
    /// Largest backoff (before jitter).
    #[serde(with = "humantime_serde")]
    pub max_backoff: Duration,
    /// Total time one operation may take, its attempts and backoffs
    /// together: no attempt starts after it has passed. An attempt already
    /// running is bounded by `request_timeout` per request.
    #[serde(with = "humantime_serde")]
    pub budget: Duration,
    /// Timeout of one HTTP request (unless the `timeout` client option is
    /// set in the environment or the remote options).
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 8,
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(5),
            budget: Duration::from_secs(60),
            request_timeout: Duration::from_secs(120),
        }
    }
}

impl RetryPolicy {
    /// The configuration for `object_store`'s HTTP client: no retries of
    /// its own, so that only this module retries and the attempts of the
    /// two layers never multiply.
    pub fn client_retry(&self) -> object_store::RetryConfig {
        object_store::RetryConfig {
            backoff: object_store::BackoffConfig::default(),
            max_retries: 0,
            retry_timeout: self.budget,
        }
    }

    fn backoff(&self) -> impl Iterator<Item = Duration> {
        ExponentialBuilder::default()
            .with_min_delay(self.initial_backoff)
            .with_max_delay(self.max_backoff.max(self.initial_backoff))
            .with_factor(2.0)
            .with_jitter()
            .with_max_times(self.max_attempts.saturating_sub(1) as usize)
            .build()
    }
}

/// The HTTP status of an object-store error, where the server answered.
///
/// object_store 0.12 keeps its request error type private; its text is
/// `Server returned non-2xx status code: <code> <reason>: <body>`, found
/// by walking the error's sources.
pub fn http_status(e: &object_store::Error) -> Option<u16> {
    const MARK: &str = "status code: ";
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        let text = err.to_string();
        if let Some(i) = text.find(MARK) {
            let code = text[i + MARK.len()..].get(..3)?;
            return code.parse().ok();
        }
        cur = err.source();
    }
    None
}

/// The kind of the first `object_store` HTTP transport error among the
/// sources of `e`, if any.
fn http_error_kind(e: &object_store::Error) -> Option<object_store::client::HttpErrorKind> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(h) = err.downcast_ref::<object_store::client::HttpError>() {
            return Some(h.kind());
        }
        cur = err.source();
    }
    None
}

/// Whether `e` is a failed request for a credential to the instance
/// metadata service, where each client turns when no credential is set:
/// EC2's (`PUT /latest/api/token`, `GET
/// /latest/meta-data/iam/security-credentials/`), Compute Engine's
/// (`/computeMetadata/v1/instance/service-accounts/`) and Azure's managed
/// identity endpoint (`/metadata/identity/oauth2/token`).
pub fn is_metadata_credential_failure(e: &object_store::Error) -> bool {
    const PATHS: [&str; 4] = [
        "/latest/api/token in ",
        "/latest/meta-data/iam/security-credentials",
        "/computeMetadata/v1/instance/service-accounts/",
        "/metadata/identity/oauth2/token",
    ];
    let text = super::error_chain_text(e);
    PATHS.iter().any(|p| text.contains(p))
}

/// Whether an object-store error may go away if the operation is repeated.
pub fn is_transient_remote(source: &object_store::Error) -> bool {
    use object_store::client::HttpErrorKind as K;
    if is_metadata_credential_failure(source) {
        // No credential is set and the metadata service gave none: off
        // the cloud's machines nothing answers there (or a proxy refuses),
        // which no retry changes. Only the service's own 5xx or
        // throttling is weather.
        return matches!(http_status(source), Some(s) if s >= 500 || s == 429);
    }
    match source {
        object_store::Error::NotFound { .. }
        | object_store::Error::AlreadyExists { .. }
        | object_store::Error::Precondition { .. }
        | object_store::Error::NotModified { .. }
        | object_store::Error::NotImplemented
        | object_store::Error::NotSupported { .. }
        | object_store::Error::InvalidPath { .. }
        | object_store::Error::PermissionDenied { .. }
        | object_store::Error::Unauthenticated { .. }
        | object_store::Error::UnknownConfigurationKey { .. } => false,
        other => {
            if let Some(status) = http_status(other) {
                return status >= 500 || status == 408 || status == 429;
            }
            match http_error_kind(other) {
                Some(K::Connect | K::Request | K::Timeout | K::Interrupted | K::Decode) => true,
                // A request that could not even be built (a bad URL, a
                // refused scheme): configuration, not weather.
                Some(_) => false,
                // No answer and no transport error: a join error, a
                // local file system error, a wrapper's own fault.
                None => true,
            }
        }
    }
}

/// Whether an error may go away if the operation is repeated.
pub fn is_transient(e: &Error) -> bool {
    match e {
        Error::Remote { source, .. } => is_transient_remote(source),
        Error::Io { .. } => true,
        _ => false,
    }
}

/// Run `op` until it succeeds, fails with a definite error, or its attempts
/// or time budget run out (then [`Error::RetriesExhausted`]). Counts
/// retries and final errors in `metrics`; a not-found answer is not
/// counted as an error: it answers a probe (is this chunk, pack map or
/// manifest there yet?), and where it is a failure the caller reports it.
pub async fn retry<T, F, Fut>(policy: &RetryPolicy, metrics: &RemoteMetrics, op: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let start = Instant::now();
    let deadline = start + policy.budget;
    let attempts = AtomicU32::new(1);
    let out = op
        .retry(policy.backoff())
        .sleep(tokio::time::sleep)
        .when(is_transient)
        // Stop before a backoff that would end past the budget.
        .adjust(|_, delay| delay.filter(|d| Instant::now() + *d < deadline))
        .notify(|e, delay| {
            let attempt = attempts.fetch_add(1, Ordering::Relaxed);
            metrics.add_retry();
            tracing::debug!(error = %e, attempt, ?delay, "retrying object store operation");
        })
        .await;
    out.map_err(|e| {
        if !is_not_found(&e) {
            metrics.add_error();
        }
        if is_transient(&e) {
            Error::RetriesExhausted {
                op: op_name(&e),
                attempts: attempts.load(Ordering::Relaxed),
                elapsed: start.elapsed(),
                budget: policy.budget,
                source: Box::new(e),
            }
        } else {
            e
        }
    })
}

/// Whether `e` is the remote's answer that an object does not exist.
fn is_not_found(e: &Error) -> bool {
    matches!(
        e,
        Error::Remote {
            source: object_store::Error::NotFound { .. },
            ..
        }
    )
}

fn op_name(e: &Error) -> String {
    match e {
        Error::Remote { op, path, .. } => format!("{op} on {path}"),
        Error::Io { op, path, .. } => format!("{op} on {}", path.display()),
        _ => "remote operation".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn generic(msg: &str) -> object_store::Error {
        object_store::Error::Generic {
            store: "S3",
            source: msg.to_string().into(),
        }
    }

    #[test]
    fn statuses_decide() {
        let e = |s: &str| {
            generic(&format!("Error performing GET x in 1ms - Server returned non-2xx status code: {s}: <Error/>"))
        };
        assert!(!is_transient_remote(&e("404 Not Found")));
        assert!(!is_transient_remote(&e("403 Forbidden")));
        assert!(!is_transient_remote(&e("400 Bad Request")));
        assert!(is_transient_remote(&e("503 Service Unavailable")));
        assert!(is_transient_remote(&e("429 Too Many Requests")));
        assert!(is_transient_remote(&generic("connection reset")));
    }

    #[test]
    fn budget_stops_retries() {
        let policy = RetryPolicy {
            max_attempts: 1000,
            initial_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(2),
            budget: Duration::from_millis(50),
            ..RetryPolicy::default()
        };
        let metrics = RemoteMetrics::default();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let r: Result<()> = rt.block_on(retry(&policy, &metrics, || async {
            Err(Error::remote("get thing", "a/b", generic("reset")))
        }));
        match r {
            Err(Error::RetriesExhausted { op, attempts, .. }) => {
                assert_eq!(op, "get thing on a/b");
                assert!(attempts > 1 && attempts < 1000, "{attempts}");
            }
            other => panic!("{other:?}"),
        }
    }
}
