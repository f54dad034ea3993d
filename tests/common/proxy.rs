//! A counting HTTP proxy on loopback, in front of the S3-compatible test
//! server: it parses every request and response on each connection and
//! counts, per object key, the PUTs the server answered with success or
//! refused and the successful GETs, and records the distinct values of
//! each request header.
#![allow(dead_code)]

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// What the proxy saw.
#[derive(Default, Debug)]
pub struct Counts {
    /// Successful (2xx) PUTs per key (path without the query).
    pub ok_puts: HashMap<String, u64>,
    /// Refused PUTs per key.
    pub refused_puts: HashMap<String, u64>,
    /// Successful (2xx) GETs per key (path without the query).
    pub ok_gets: HashMap<String, u64>,
    /// Requests seen.
    pub requests: u64,
    /// The distinct values each request header (by lowercase name) had.
    pub headers: HashMap<String, BTreeSet<String>>,
}

/// The counts, shared with the proxy's tasks.
pub type Shared = Arc<Mutex<Counts>>;

/// Read one HTTP head (up to the blank line); `None` at a clean EOF.
async fn read_head<R: tokio::io::AsyncBufRead + Unpin>(r: &mut R) -> Option<Vec<u8>> {
    let mut head = Vec::new();
    loop {
        let mut line = Vec::new();
        let n = r.read_until(b'\n', &mut line).await.ok()?;
        if n == 0 {
            return None;
        }
        head.extend_from_slice(&line);
        if line == b"\r\n" {
            return Some(head);
        }
    }
}

fn header(head: &str, name: &str) -> Option<String> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().to_string())
    })
}

/// Forward exactly `n` bytes.
async fn copy_n<R, W>(r: &mut R, w: &mut W, mut n: u64) -> Option<()>
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 64 << 10];
    while n > 0 {
        let want = n.min(buf.len() as u64) as usize;
        let k = r.read(&mut buf[..want]).await.ok()?;
        if k == 0 {
            return None;
        }
        w.write_all(&buf[..k]).await.ok()?;
        n -= k as u64;
    }
    Some(())
}

/// Forward a body: by Content-Length, or chunked framing.
async fn copy_body<R, W>(r: &mut R, w: &mut W, head: &str) -> Option<()>
where
    R: tokio::io::AsyncBufRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    if header(head, "transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        loop {
            let mut line = Vec::new();
            r.read_until(b'\n', &mut line).await.ok()?;
            w.write_all(&line).await.ok()?;
            let s = String::from_utf8_lossy(&line);
            let size = u64::from_str_radix(s.trim().split(';').next()?, 16).ok()?;
            if size == 0 {
                // Trailers, up to the blank line.
                loop {
                    let mut t = Vec::new();
                    r.read_until(b'\n', &mut t).await.ok()?;
                    w.write_all(&t).await.ok()?;
                    if t == b"\r\n" || t.is_empty() {
                        return Some(());
                    }
                }
            }
            copy_n(r, w, size + 2).await?;
        }
    }
    let n = header(head, "content-length").map_or(0, |v| v.parse().unwrap_or(0));
    copy_n(r, w, n).await
}

async fn serve(client: TcpStream, upstream: String, counts: Shared) {
    let Ok(server) = TcpStream::connect(&upstream).await else {
        return;
    };
    let (cr, mut cw) = client.into_split();
    let (sr, mut sw) = server.into_split();
    let (mut cr, mut sr) = (BufReader::new(cr), BufReader::new(sr));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(String, String)>();
    let c2 = counts.clone();
    let up = tokio::spawn(async move {
        while let Some(head) = read_head(&mut cr).await {
            let h = String::from_utf8_lossy(&head).into_owned();
            let mut first = h.split_whitespace();
            let method = first.next().unwrap_or("").to_string();
            let target = first.next().unwrap_or("").to_string();
            {
                let mut c = c2.lock().unwrap();
                c.requests += 1;
                for line in h.lines().skip(1) {
                    if let Some((k, v)) = line.split_once(':') {
                        c.headers
                            .entry(k.trim().to_ascii_lowercase())
                            .or_default()
                            .insert(v.trim().to_string());
                    }
                }
            }
            if tx.send((method, target)).is_err() || sw.write_all(&head).await.is_err() {
                return;
            }
            if copy_body(&mut cr, &mut sw, &h).await.is_none() {
                return;
            }
        }
    });
    while let Some(head) = read_head(&mut sr).await {
        let h = String::from_utf8_lossy(&head).into_owned();
        let status: u16 = h
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        if status == 100 {
            if cw.write_all(&head).await.is_err() {
                break;
            }
            continue;
        }
        let Some((method, target)) = rx.recv().await else {
            break;
        };
        if method == "GET" && (200..300).contains(&status) {
            let key = target.split('?').next().unwrap_or("").to_string();
            *counts.lock().unwrap().ok_gets.entry(key).or_insert(0) += 1;
        }
        if method == "PUT" {
            let key = target.split('?').next().unwrap_or("").to_string();
            let mut c = counts.lock().unwrap();
            let m = if (200..300).contains(&status) {
                &mut c.ok_puts
            } else {
                &mut c.refused_puts
            };
            *m.entry(key).or_insert(0) += 1;
        }
        if cw.write_all(&head).await.is_err() {
            break;
        }
        let no_body = method == "HEAD" || status == 204 || status == 304;
        if !no_body && copy_body(&mut sr, &mut cw, &h).await.is_none() {
            break;
        }
    }
    up.abort();
}

/// A counting proxy running on its own runtime; it stops when dropped.
pub struct Proxy {
    /// The runtime serving the proxy's connections.
    pub rt: tokio::runtime::Runtime,
    /// The proxy's address (host:port).
    pub addr: String,
    /// What it saw.
    pub counts: Shared,
}

/// Start a counting proxy in front of `endpoint` (`http://host:port`).
pub fn start(endpoint: &str) -> Proxy {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let counts = Shared::default();
    let upstream = endpoint.trim_start_matches("http://").to_string();
    let addr = start_proxy(&rt, upstream, counts.clone());
    Proxy { rt, addr, counts }
}

/// Start the counting proxy in front of `upstream` (host:port) on `rt`;
/// returns its address.
pub fn start_proxy(rt: &tokio::runtime::Runtime, upstream: String, counts: Shared) -> String {
    let listener = rt.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    rt.spawn(async move {
        loop {
            let Ok((c, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(serve(c, upstream.clone(), counts.clone()));
        }
    });
    addr
}
