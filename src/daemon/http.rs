//! A minimal HTTP/1.1 endpoint on loopback: `GET /status` (JSON),
//! `GET /metrics` (Prometheus text format), `GET /healthz` (200 `ok`, or 503 with
//! the reason once uploads have stalled; see [`SharedStatus::health`]).

use super::status::SharedStatus;
use std::net::SocketAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Serve until `shutdown` turns true. Returns the bound address through
/// `bound`.
pub async fn serve(
    listener: TcpListener,
    status: SharedStatus,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.changed() => return,
        };
        let Ok((mut sock, _)) = accepted else {
            continue;
        };
        let status = status.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 8192];
            let mut n = 0;
            while n < buf.len() {
                match tokio::time::timeout(
                    std::time::Duration::from_secs(5),
                    sock.read(&mut buf[n..]),
                )
                .await
                {
                    Ok(Ok(0)) | Err(_) | Ok(Err(_)) => break,
                    Ok(Ok(k)) => {
                        n += k;
                        if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                            break;
                        }
                    }
                }
            }
            let req = String::from_utf8_lossy(&buf[..n]);
            let path = req
                .lines()
                .next()
                .and_then(|l| {
                    let mut it = l.split_whitespace();
                    (it.next() == Some("GET")).then(|| it.next()).flatten()
                })
                .unwrap_or("");
            let (code, ctype, body) = match path {
                "/status" => (
                    "200 OK",
                    "application/json",
                    serde_json::to_string_pretty(&status.snapshot()).unwrap_or_default(),
                ),
                "/metrics" => ("200 OK", "text/plain; version=0.0.4", status.prometheus()),
                "/healthz" => match status.health() {
                    Ok(()) => ("200 OK", "text/plain", "ok\n".to_string()),
                    Err(reason) => (
                        "503 Service Unavailable",
                        "text/plain",
                        format!("unhealthy: {reason}\n"),
                    ),
                },
                _ => ("404 Not Found", "text/plain", "not found\n".to_string()),
            };
            let head = format!(
                "HTTP/1.1 {code}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = sock.write_all(head.as_bytes()).await;
            let _ = sock.write_all(body.as_bytes()).await;
            let _ = sock.shutdown().await;
        });
    }
}

/// Bind the endpoint.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}
