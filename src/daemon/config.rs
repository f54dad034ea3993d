//! Settings of the flush daemon: from a TOML file, overridden by flags.

use crate::error::{Error, Result};
use crate::remote::RemoteOptions;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Retention settings.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetentionConfig {
    /// Keep this many newest checkpoints per run on local disk. An older
    /// one is deleted only while the remote still holds it (checked just
    /// before the delete), and never the newest one the remote holds; so
    /// this may not exceed `remote_keep_last`, or checkpoints the remote
    /// retired would pile up locally. Unset: keep all.
    pub local_keep_last: Option<usize>,
    /// Keep this many newest checkpoints per run remotely. Unset: keep all.
    pub remote_keep_last: Option<usize>,
    /// Also keep remotely every step divisible by this.
    pub remote_keep_every: Option<u64>,
}

/// Garbage-collection settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GcConfig {
    /// How often to collect; unset or zero: never.
    #[serde(with = "humantime_serde")]
    pub interval: Option<Duration>,
    /// Local chunks and leftovers younger than this are kept.
    #[serde(with = "humantime_serde")]
    pub local_grace: Duration,
}

impl Default for GcConfig {
    fn default() -> Self {
        GcConfig {
            interval: Some(Duration::from_secs(600)),
            local_grace: Duration::from_secs(3600),
        }
    }
}

/// Largest daemon config file accepted.
pub const MAX_CONFIG_LEN: u64 = 1 << 20;

/// Everything the daemon needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DaemonConfig {
    /// The local store to drain.
    pub local: PathBuf,
    /// The remote store URL (`s3://bucket/prefix`, `gs://`, `az://`,
    /// `file:///path`).
    pub remote: String,
    /// object_store configuration keys for the remote (endpoint, region,
    /// credentials, allow_http, ...), on top of the environment.
    #[serde(default)]
    pub remote_options: BTreeMap<String, String>,
    /// Upload concurrency, part size, retries, remote gc grace.
    #[serde(default)]
    pub remote_tuning: RemoteOptions,
    /// How often to look for new checkpoints.
    #[serde(default = "default_poll", with = "humantime_serde")]
    pub poll_interval: Duration,
    /// Loopback address of the status and metrics endpoint.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Retention.
    #[serde(default)]
    pub retention: RetentionConfig,
    /// Garbage collection.
    #[serde(default)]
    pub gc: GcConfig,
    /// `/healthz` answers 503 once work has been pending this long without
    /// a checkpoint becoming durable remotely. Set it above the longest
    /// upload you expect.
    #[serde(default = "default_unhealthy_after", with = "humantime_serde")]
    pub unhealthy_after: Duration,
    /// Longest wait before retrying a checkpoint whose upload failed; the
    /// wait starts at `poll_interval` and doubles with each failure.
    #[serde(default = "default_max_retry_backoff", with = "humantime_serde")]
    pub max_retry_backoff: Duration,
}

fn default_unhealthy_after() -> Duration {
    Duration::from_secs(30 * 60)
}

fn default_max_retry_backoff() -> Duration {
    Duration::from_secs(5 * 60)
}

fn default_poll() -> Duration {
    Duration::from_secs(2)
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9464))
}

impl DaemonConfig {
    /// Settings with defaults for everything but the two stores.
    pub fn new(local: PathBuf, remote: String) -> Self {
        DaemonConfig {
            local,
            remote,
            remote_options: BTreeMap::new(),
            remote_tuning: RemoteOptions::default(),
            poll_interval: default_poll(),
            listen: default_listen(),
            retention: RetentionConfig::default(),
            gc: GcConfig::default(),
            unhealthy_after: default_unhealthy_after(),
            max_retry_backoff: default_max_retry_backoff(),
        }
    }

    /// Read and parse a TOML config file of at most [`MAX_CONFIG_LEN`]
    /// bytes. A file that is not a regular file (a FIFO, `/dev/zero`) or
    /// is larger is refused before anything is read.
    pub fn load(path: &std::path::Path) -> Result<Self> {
        let bytes =
            crate::local::durable::read_limited(path, MAX_CONFIG_LEN).map_err(|e| match e {
                crate::Error::InvalidInput { reason, .. } => {
                    crate::Error::invalid(format!("config {}", path.display()), reason)
                }
                e => e,
            })?;
        let text = String::from_utf8(bytes).map_err(|e| {
            crate::Error::invalid(format!("config {}", path.display()), e.to_string())
        })?;
        Self::from_toml(&text, path)
    }

    /// Parse a TOML config file. An error names the file, the line and
    /// column, and what is wrong, but never echoes the file's text or a
    /// value from it: the file may hold credentials (`remote_options`).
    pub fn from_toml(text: &str, path: &std::path::Path) -> Result<Self> {
        toml::from_str(text).map_err(|e| {
            let at = e.span().map(|span| {
                let before = &text[..span.start.min(text.len())];
                let line = before.matches('\n').count() + 1;
                let column = before[before.rfind('\n').map_or(0, |i| i + 1)..]
                    .chars()
                    .count()
                    + 1;
                format!("line {line}, column {column}: ")
            });
            Error::invalid(
                format!("config {}", path.display()),
                format!(
                    "{}{}",
                    at.unwrap_or_default(),
                    without_values(e.message().trim())
                ),
            )
        })
    }

    /// Check the settings: a loopback listen address, positive intervals
    /// (poll, unhealthy-after, retry backoff)
    /// and keep counts, `local_keep_last` at most `remote_keep_last`, and a
    /// remote gc grace of at least [`crate::remote::MIN_REMOTE_GC_GRACE`].
    pub fn check(&self) -> Result<()> {
        if !self.listen.ip().is_loopback() {
            return Err(Error::invalid(
                "listen",
                format!("{} is not a loopback address", self.listen),
            ));
        }
        if self.retention.local_keep_last == Some(0) || self.retention.remote_keep_last == Some(0) {
            return Err(Error::invalid("retention", "keep_last must be at least 1"));
        }
        if let (Some(local), Some(remote)) = (
            self.retention.local_keep_last,
            self.retention.remote_keep_last,
        ) {
            if local > remote {
                return Err(Error::invalid(
                    "retention",
                    format!(
                        "local_keep_last ({local}) exceeds remote_keep_last ({remote}): local retention deletes only checkpoints the remote still holds"
                    ),
                ));
            }
        }
        if self.poll_interval.is_zero() {
            return Err(Error::invalid("poll_interval", "must be positive"));
        }
        if self.unhealthy_after.is_zero() {
            return Err(Error::invalid("unhealthy_after", "must be positive"));
        }
        if self.max_retry_backoff.is_zero() {
            return Err(Error::invalid("max_retry_backoff", "must be positive"));
        }
        crate::remote::check_remote_gc_grace(self.remote_tuning.gc_grace)?;
        Ok(())
    }
}

/// A TOML or serde error message with the offending value left out: in
/// `invalid type: string "...", expected ...` (or `invalid value`) the
/// value is replaced by its kind. Messages about keys (`unknown field`,
/// `missing field`) and syntax name no value and are kept.
fn without_values(message: &str) -> String {
    let message = message.replace('\n', "; ");
    for prefix in ["invalid type: ", "invalid value: "] {
        if let Some(rest) = message.strip_prefix(prefix) {
            let (unexpected, expected) = rest.split_once(", expected").unwrap_or((rest, ""));
            let kind = unexpected
                .split(['"', '`', '\''])
                .next()
                .unwrap_or("")
                .trim();
            let expected = if expected.is_empty() {
                String::new()
            } else {
                format!(", expected{expected}")
            };
            return format!("{prefix}{kind}{expected}");
        }
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example config parses and checks, with the health settings.
    #[test]
    fn example_config_parses() {
        let text = include_str!("../../docs/cairn-daemon.toml");
        let cfg = DaemonConfig::from_toml(text, std::path::Path::new("cairn-daemon.toml")).unwrap();
        cfg.check().unwrap();
        assert_eq!(cfg.unhealthy_after, Duration::from_secs(30 * 60));
        assert_eq!(cfg.max_retry_backoff, Duration::from_secs(5 * 60));
        let mut bad = cfg.clone();
        bad.unhealthy_after = Duration::ZERO;
        assert!(bad.check().is_err());
    }
}
