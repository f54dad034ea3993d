//! `cairn daemon`.

use cairn::{DaemonConfig, FlushDaemon};
use clap::Args;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Args)]
pub struct DaemonArgs {
    /// Local store to drain (or `local` in the config file).
    local: Option<PathBuf>,
    /// Remote store URL: s3://bucket/prefix, gs://..., az://..., file:///path.
    #[arg(long)]
    remote: Option<String>,
    /// TOML config file; flags override it (see docs/cairn-daemon.toml).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Loopback address for /status and /metrics.
    #[arg(long, value_parser = parse_loopback)]
    listen: Option<std::net::SocketAddr>,
    /// How often to scan for new checkpoints (e.g. 2s; more than zero).
    #[arg(long, value_parser = parse_positive_duration)]
    poll_interval: Option<Duration>,
    /// Keep this many newest checkpoints per run locally (at least 1).
    #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    local_keep_last: Option<usize>,
    /// Keep this many newest checkpoints per run remotely (at least 1).
    #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    remote_keep_last: Option<usize>,
    /// Also keep remotely every step divisible by this.
    #[arg(long)]
    remote_keep_every: Option<u64>,
    /// Garbage-collection interval (0s: never).
    #[arg(long, value_parser = humantime::parse_duration)]
    gc_interval: Option<Duration>,
    /// Grace period for remote garbage collection (at least 1m).
    #[arg(long, value_parser = humantime::parse_duration)]
    remote_gc_grace: Option<Duration>,
    /// Answer 503 on /healthz once work has been pending this long with no
    /// checkpoint becoming durable remotely (e.g. 30m; more than zero).
    #[arg(long, value_parser = parse_positive_duration)]
    unhealthy_after: Option<Duration>,
    /// Longest wait before retrying a checkpoint whose upload failed
    /// (e.g. 5m; more than zero); the wait starts at the poll interval and
    /// doubles per failure.
    #[arg(long, value_parser = parse_positive_duration)]
    max_retry_backoff: Option<Duration>,
    /// Log format.
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
}

/// `--listen`: a socket address on loopback.
fn parse_loopback(s: &str) -> Result<std::net::SocketAddr, String> {
    let a: std::net::SocketAddr = s
        .parse()
        .map_err(|e| format!("{s:?} is not an address such as 127.0.0.1:9464: {e}"))?;
    if !a.ip().is_loopback() {
        return Err(format!("{a} is not a loopback address"));
    }
    Ok(a)
}

/// A duration greater than zero.
fn parse_positive_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e}"))?;
    if d.is_zero() {
        return Err(format!("{s:?} must be more than zero"));
    }
    Ok(d)
}

impl DaemonArgs {
    /// Checks across arguments: without --config, LOCAL and --remote are
    /// both needed.
    pub fn check(&self) -> Result<(), String> {
        if self.config.is_none() && (self.local.is_none() || self.remote.is_none()) {
            return Err("give LOCAL and --remote, or --config FILE".into());
        }
        Ok(())
    }
}

fn config(a: &DaemonArgs, remote_options: &[String]) -> cairn::Result<DaemonConfig> {
    let mut cfg = match &a.config {
        Some(path) => DaemonConfig::load(path)?,
        None => {
            let (Some(local), Some(remote)) = (&a.local, &a.remote) else {
                return Err(cairn::Error::InvalidInput {
                    what: "arguments".into(),
                    reason: "give LOCAL and --remote, or --config".into(),
                });
            };
            DaemonConfig::new(local.clone(), remote.clone())
        }
    };
    if let Some(l) = &a.local {
        cfg.local = l.clone();
    }
    if let Some(r) = &a.remote {
        cfg.remote = r.clone();
    }
    for kv in remote_options {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| cairn::Error::InvalidInput {
                what: "--remote-option".into(),
                reason: format!("{kv:?} is not KEY=VALUE"),
            })?;
        cfg.remote_options.insert(k.to_string(), v.to_string());
    }
    if let Some(l) = a.listen {
        cfg.listen = l;
    }
    if let Some(p) = a.poll_interval {
        cfg.poll_interval = p;
    }
    if a.local_keep_last.is_some() {
        cfg.retention.local_keep_last = a.local_keep_last;
    }
    if a.remote_keep_last.is_some() {
        cfg.retention.remote_keep_last = a.remote_keep_last;
    }
    if a.remote_keep_every.is_some() {
        cfg.retention.remote_keep_every = a.remote_keep_every;
    }
    if let Some(i) = a.gc_interval {
        cfg.gc.interval = Some(i);
    }
    if let Some(u) = a.unhealthy_after {
        cfg.unhealthy_after = u;
    }
    if let Some(b) = a.max_retry_backoff {
        cfg.max_retry_backoff = b;
    }
    if let Some(g) = a.remote_gc_grace {
        cfg.remote_tuning.gc_grace = g;
    }
    Ok(cfg)
}

pub fn run(a: DaemonArgs, remote_options: &[String]) -> cairn::Result<i32> {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CAIRN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if a.log_format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
    let cfg = config(&a, remote_options)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| cairn::Error::Internal(format!("runtime: {e}")))?;
    let result = rt.block_on(async move {
        let daemon = FlushDaemon::new(cfg)?;
        let (tx, rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            use tokio::signal::unix::{signal, SignalKind};
            let mut term = signal(SignalKind::terminate()).ok();
            let term_fut = async {
                match term.as_mut() {
                    Some(t) => {
                        t.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                _ = term_fut => tracing::info!("SIGTERM received"),
                _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
            }
            let _ = tx.send(true);
        });
        daemon.run(rx).await
    });
    // `run` returns once the work in flight has returned (or it gave up
    // waiting for it); whatever is left is not waited for.
    rt.shutdown_timeout(Duration::from_secs(1));
    result?;
    Ok(0)
}
