//! Retry with exponential backoff for object-store calls.
//!
//! The HTTP backends already retry 5xx, timeouts and throttling inside
//! `object_store` (configured through [`RetryPolicy::client_retry`]); this
//! layer retries whole operations — including reading a response body and
//! multipart uploads, which `object_store` cannot replay — on any error that
//! is not a definite answer (not found, already exists, precondition,
//! invalid path, ...).

use super::metrics::RemoteMetrics;
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::future::Future;
use std::time::Duration;

/// How remote operations are retried.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryPolicy {
    /// Attempts per operation, the first included.
    pub max_attempts: u32,
    /// First backoff.
    #[serde(with = "humantime_serde")]
    pub initial_backoff: Duration,
    /// Largest backoff.
    #[serde(with = "humantime_serde")]
    pub max_backoff: Duration,
    /// Timeout of one HTTP request.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 8,
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(5),
            request_timeout: Duration::from_secs(120),
        }
    }
}

impl RetryPolicy {
    /// The matching configuration for `object_store`'s HTTP client.
    pub fn client_retry(&self) -> object_store::RetryConfig {
        object_store::RetryConfig {
            backoff: object_store::BackoffConfig {
                init_backoff: self.initial_backoff,
                max_backoff: self.max_backoff,
                base: 2.0,
            },
            max_retries: self.max_attempts.saturating_sub(1) as usize,
            retry_timeout: self.request_timeout * 2,
        }
    }

    fn backoff(&self, attempt: u32) -> Duration {
        let exp = self.initial_backoff.saturating_mul(1u32 << attempt.min(16));
        exp.min(self.max_backoff)
    }
}

/// Whether an error may go away if the operation is repeated.
pub fn is_transient(e: &Error) -> bool {
    match e {
        Error::Remote { source, .. } => !matches!(
            source,
            object_store::Error::NotFound { .. }
                | object_store::Error::AlreadyExists { .. }
                | object_store::Error::Precondition { .. }
                | object_store::Error::NotModified { .. }
                | object_store::Error::NotImplemented
                | object_store::Error::NotSupported { .. }
                | object_store::Error::InvalidPath { .. }
                | object_store::Error::UnknownConfigurationKey { .. }
        ),
        Error::Io { .. } => true,
        _ => false,
    }
}

/// Run `op` until it succeeds, fails with a definite error, or the attempts
/// run out. Counts retries and final errors in `metrics`.
pub async fn retry<T, F, Fut>(policy: &RetryPolicy, metrics: &RemoteMetrics, mut op: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let mut attempt = 0;
    loop {
        match op().await {
            Ok(v) => return Ok(v),
            Err(e) if is_transient(&e) && attempt + 1 < policy.max_attempts => {
                metrics.add_retry();
                tracing::debug!(error = %e, attempt, "retrying object store operation");
                tokio::time::sleep(policy.backoff(attempt)).await;
                attempt += 1;
            }
            Err(e) => {
                metrics.add_error();
                return Err(e);
            }
        }
    }
}
