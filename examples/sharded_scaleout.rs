//! Scale-out of a sharded checkpoint on one machine: RANKS rank processes
//! on NODES simulated nodes (one local store and one `cairn daemon`
//! process each) save one step of a sharded synthetic model (column- and
//! row-sharded matrices plus replicated tensors); each node's daemon
//! uploads its parts to an S3-compatible server and the first to find
//! every part there publishes the record; then RESTORERS processes restore
//! their regions from S3 only, each in one `RemoteStore::restore_regions`
//! call, and check them bit for bit against the generator. `scripts/scale-out`
//! builds and runs it.
//!
//! ```sh
//! CAIRN_TEST_S3_ENDPOINT=http://127.0.0.1:9000 CAIRN_BIN=target/release/cairn \
//!   target/release/examples/sharded_scaleout 64 4 48
//! ```

use cairn::{
    ChunkTier, DType, RegionTarget, RemoteOptions, RemoteStore, SaveState, ShardInfo, StepSel,
    Store, StoreOptions,
};
use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const LAYERS: usize = 8;
/// Hidden size and feed-forward size of the synthetic model.
const H: u64 = 512;
const F: u64 = 4096;

/// Element `i` of tensor `t`: a cheap hash, as 4 bytes.
fn elem(t: u64, i: u64) -> [u8; 4] {
    let mut x = t.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ i.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 31;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    ((x >> 16) as u32).to_le_bytes()
}

/// The row-major bytes of region `off`+`shape` of 2-D tensor `t` with
/// `cols` columns.
fn region(t: u64, cols: u64, off: [u64; 2], shape: [u64; 2]) -> Vec<u8> {
    let mut v = Vec::with_capacity((shape[0] * shape[1] * 4) as usize);
    for r in off[0]..off[0] + shape[0] {
        for c in off[1]..off[1] + shape[1] {
            v.extend_from_slice(&elem(t, r * cols + c));
        }
    }
    v
}

fn split(n: u64, parts: u64, i: u64) -> (u64, u64) {
    let (a, b) = (i * n / parts, (i + 1) * n / parts);
    (a, b - a)
}

/// Tensors: per layer `up` [H, F] column-sharded, `down` [F, H]
/// row-sharded, `norm` [1, H] replicated; all F32.
fn tensors() -> Vec<(String, u64, [u64; 2], bool)> {
    let mut out = Vec::new();
    for l in 0..LAYERS {
        out.push((format!("layers.{l}.up"), 3 * l as u64, [H, F], true));
        out.push((format!("layers.{l}.down"), 3 * l as u64 + 1, [F, H], false));
        out.push((format!("layers.{l}.norm"), 3 * l as u64 + 2, [1, H], false));
    }
    out
}

fn s3_options() -> Vec<(String, String)> {
    let ep = std::env::var("CAIRN_TEST_S3_ENDPOINT").expect("set CAIRN_TEST_S3_ENDPOINT");
    [
        ("endpoint", ep),
        ("allow_http", "true".into()),
        ("region", "us-east-1".into()),
        ("access_key_id", "cairn-test".into()),
        ("secret_access_key", "cairn-test-secret".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

fn rank(store_dir: &str, r: u64, world: u64) {
    let store = Store::open(
        store_dir,
        StoreOptions {
            chunk_size: 1 << 20,
            staging_bytes: 64 << 20,
            ..StoreOptions::default()
        },
    )
    .unwrap();
    let mut owned = Vec::new();
    for (name, t, shape, col) in tensors() {
        let (off, sh) = if name.ends_with("norm") {
            ([0, 0], shape)
        } else if col {
            let (a, n) = split(shape[1], world, r);
            ([0, a], [shape[0], n])
        } else {
            let (a, n) = split(shape[0], world, r);
            ([a, 0], [n, shape[1]])
        };
        owned.push((name, off, sh, shape, region(t, shape[1], off, sh)));
    }
    let mut s = SaveState::new();
    for (name, off, sh, g, data) in &owned {
        s = s.shard(
            name.clone(),
            DType::F32,
            sh,
            data,
            ShardInfo {
                global_shape: g.to_vec(),
                offsets: off.to_vec(),
            },
        );
    }
    store
        .save_part("model", 1, r as u32, world as u32, &s)
        .unwrap()
        .wait()
        .unwrap();
}

/// A region to restore: tensor name, generator id, columns, offsets,
/// shape.
type Want = (String, u64, u64, [u64; 2], [u64; 2]);

fn restorer(url: &str, i: u64, n: u64) {
    let remote = RemoteStore::open(url, &s3_options(), RemoteOptions::default()).unwrap();
    // The new layout transposes the old one: column-sharded tensors are
    // read by rows and row-sharded ones by columns.
    let regions: Vec<Want> = tensors()
        .into_iter()
        .map(|(name, t, shape, col)| {
            let (off, sh) = if name.ends_with("norm") {
                ([0, 0], shape)
            } else if col {
                let (a, k) = split(shape[0], n, i);
                ([a, 0], [k, shape[1]])
            } else {
                let (a, k) = split(shape[1], n, i);
                ([0, a], [shape[0], k])
            };
            (name, t, shape[1], off, sh)
        })
        .collect();
    let mut outs: Vec<Vec<u8>> = regions
        .iter()
        .map(|r| vec![0u8; (r.4[0] * r.4[1] * 4) as usize])
        .collect();
    let mut targets: Vec<RegionTarget<'_>> = outs
        .iter_mut()
        .zip(&regions)
        .map(|(out, r)| RegionTarget {
            name: &r.0,
            offsets: &r.3,
            shape: &r.4,
            out,
        })
        .collect();
    // All of this process's regions in one call: a chunk several regions
    // share is downloaded once.
    remote
        .restore_regions("model", StepSel::Step(1), &mut targets)
        .unwrap();
    drop(targets);
    let mut bytes = 0;
    for (r, out) in regions.iter().zip(&outs) {
        assert!(*out == region(r.1, r.2, r.3, r.4), "{} differs", r.0);
        bytes += out.len() as u64;
    }
    let m = remote.metrics().snapshot();
    println!(
        "restored {bytes} {} {}",
        m.bytes_downloaded, m.chunks_downloaded
    );
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One line of `GET path` from a daemon's loopback endpoint.
fn http_get(port: u16, path: &str) -> Option<String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.split_once("\r\n\r\n").map(|(_, b)| b.to_string())
}

/// Counter `name` of a daemon's Prometheus text.
fn prom(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0)
}

/// A `cairn daemon` draining `store` to `url`, answering on `port`.
fn spawn_daemon(bin: &str, store: &str, url: &str, port: u16, log: &std::path::Path) -> Child {
    let mut cmd = Command::new(bin);
    cmd.args(["daemon", store, "--remote", url]);
    for (k, v) in s3_options() {
        cmd.arg("--remote-option").arg(format!("{k}={v}"));
    }
    cmd.args([
        "--poll-interval",
        "100ms",
        "--gc-interval",
        "0s",
        "--listen",
    ])
    .arg(format!("127.0.0.1:{port}"))
    .env("CAIRN_LOG", "cairn=info")
    .stdout(Stdio::null())
    .stderr(std::fs::File::create(log).unwrap())
    .spawn()
    .unwrap_or_else(|e| panic!("spawn {bin} daemon: {e}"))
}

fn spawn_all(envs: Vec<Vec<(String, String)>>) -> Vec<String> {
    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = envs
        .into_iter()
        .map(|env| {
            Command::new(&exe)
                .envs(env)
                .stdout(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    children
        .into_iter()
        .map(|mut c| {
            let mut s = String::new();
            c.stdout.take().unwrap().read_to_string(&mut s).unwrap();
            assert!(c.wait().unwrap().success(), "a child failed: {s}");
            s
        })
        .collect()
}

fn main() {
    let role = std::env::var("SCALEOUT_ROLE").unwrap_or_default();
    let var = |k: &str| std::env::var(k).unwrap();
    let num = |k: &str| var(k).parse::<u64>().unwrap();
    match role.as_str() {
        "rank" => {
            return rank(
                &var("SCALEOUT_STORE"),
                num("SCALEOUT_RANK"),
                num("SCALEOUT_WORLD"),
            )
        }
        "restore" => {
            return restorer(
                &var("SCALEOUT_URL"),
                num("SCALEOUT_RANK"),
                num("SCALEOUT_WORLD"),
            )
        }
        _ => {}
    }
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .map(|a| a.parse().unwrap())
        .collect();
    let (ranks, nodes, restorers) = (
        *args.first().unwrap_or(&64),
        *args.get(1).unwrap_or(&4),
        *args.get(2).unwrap_or(&48),
    );
    let dir = tempfile::tempdir().unwrap();
    let ep = std::env::var("CAIRN_TEST_S3_ENDPOINT").expect("set CAIRN_TEST_S3_ENDPOINT");
    let bucket = format!("cairn-scaleout-{}", std::process::id());
    let hostport = ep.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(hostport).unwrap();
    write!(
        s,
        "PUT /{bucket} HTTP/1.1\r\nHost: {hostport}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let url = format!("s3://{bucket}/ckpt");
    let node_dir = |n: u64| dir.path().join(format!("node{n}")).display().to_string();
    let logical: u64 = tensors().iter().map(|t| t.2[0] * t.2[1] * 4).sum();

    // One store and one daemon per node; the daemons run from the start,
    // as they would on a cluster.
    let bin = std::env::var("CAIRN_BIN").unwrap_or_else(|_| {
        let exe = std::env::current_exe().unwrap();
        exe.parent()
            .and_then(|d| d.parent())
            .unwrap()
            .join("cairn")
            .display()
            .to_string()
    });
    let ports: Vec<u16> = (0..nodes).map(|_| free_port()).collect();
    let mut daemons: Vec<Child> = (0..nodes)
        .map(|n| {
            Store::open(node_dir(n), StoreOptions::default()).unwrap();
            let log = dir.path().join(format!("daemon{n}.log"));
            spawn_daemon(&bin, &node_dir(n), &url, ports[n as usize], &log)
        })
        .collect();

    let t = Instant::now();
    spawn_all(
        (0..ranks)
            .map(|r| {
                vec![
                    ("SCALEOUT_ROLE".into(), "rank".into()),
                    ("SCALEOUT_STORE".into(), node_dir(r * nodes / ranks)),
                    ("SCALEOUT_RANK".into(), r.to_string()),
                    ("SCALEOUT_WORLD".into(), ranks.to_string()),
                ]
            })
            .collect(),
    );
    let save = t.elapsed();

    // The daemons upload the parts and publish the record.
    let t = Instant::now();
    let remote = RemoteStore::open(&url, &s3_options(), RemoteOptions::default()).unwrap();
    while ChunkTier::steps(&remote, "model").unwrap() != vec![1] {
        assert!(
            t.elapsed() < Duration::from_secs(1800),
            "the daemons did not publish the record; logs in {}",
            dir.path().display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let upload = t.elapsed();
    // Every daemon done with the step (its marker written, its status
    // updated) before reading the counters.
    let texts: Vec<String> = loop {
        let texts: Vec<String> = ports
            .iter()
            .map(|&p| http_get(p, "/metrics").unwrap_or_default())
            .collect();
        let marked = (0..nodes).all(|n| {
            Store::open_read_only(node_dir(n), StoreOptions::default())
                .is_ok_and(|s| s.is_uploaded("model", 1, &url))
        });
        let settled = texts.iter().all(|t| {
            prom(t, "cairn_queue_depth") == 0 && prom(t, "cairn_sharded_steps_awaiting_ranks") == 0
        });
        if marked && settled {
            break texts;
        }
        assert!(
            t.elapsed() < Duration::from_secs(1800),
            "the daemons did not finish; logs in {}",
            dir.path().display()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    for d in &mut daemons {
        // SAFETY: plain kill(2) on our child's pid.
        unsafe { libc::kill(d.id() as i32, libc::SIGTERM) };
    }
    for d in &mut daemons {
        d.wait().unwrap();
    }
    let sum = |name: &str| texts.iter().map(|t| prom(t, name)).sum::<u64>();
    let (up_bytes, up_chunks, parts, published, record_puts) = (
        sum("cairn_bytes_uploaded_total"),
        sum("cairn_chunks_uploaded_total"),
        sum("cairn_parts_uploaded_total"),
        sum("cairn_records_published_total"),
        sum("cairn_manifests_uploaded_total"),
    );
    let stored: u64 = {
        let m = ChunkTier::manifest(&remote, "model", 1).unwrap();
        m.distinct_chunks().iter().map(|(_, len)| *len).sum()
    };

    let t = Instant::now();
    let outs = spawn_all(
        (0..restorers)
            .map(|i| {
                vec![
                    ("SCALEOUT_ROLE".into(), "restore".into()),
                    ("SCALEOUT_URL".into(), url.clone()),
                    ("SCALEOUT_RANK".into(), i.to_string()),
                    ("SCALEOUT_WORLD".into(), restorers.to_string()),
                    ("CAIRN_TEST_S3_ENDPOINT".into(), ep.clone()),
                ]
            })
            .collect(),
    );
    let restore = t.elapsed();
    let (mut placed, mut down, mut chunks) = (0u64, 0u64, 0u64);
    let mut per_process = Vec::new();
    for (i, o) in outs.iter().enumerate() {
        let line = o.lines().find(|l| l.starts_with("restored ")).unwrap();
        let v: Vec<u64> = line[9..].split(' ').map(|x| x.parse().unwrap()).collect();
        placed += v[0];
        down += v[1];
        chunks += v[2];
        per_process.push((i, v[0], v[1], v[2]));
    }
    println!("{ranks} ranks on {nodes} nodes (4 cairn daemons), {restorers} restorers; model {logical} bytes (logical)");
    println!("save (all ranks, local): {save:.2?}");
    println!(
        "upload + commit (daemons, from the end of the save to the record visible): {upload:.2?}"
    );
    println!(
        "  PUTs: {up_chunks} chunk objects ({up_bytes} bytes, {:.3}x logical), {parts} part manifests, {record_puts} record(s) ({published} created)",
        up_bytes as f64 / logical as f64,
    );
    println!(
        "  record: {stored} bytes of chunks referenced ({:.3}x logical; replicas stored once)",
        stored as f64 / logical as f64
    );
    println!(
        "restore from S3 only: {restore:.2?}; {placed} bytes placed, {down} bytes downloaded ({:.2}x placed) in {chunks} chunk GETs; all regions bit-exact",
        down as f64 / placed.max(1) as f64
    );
    println!("per restoring process: regions bytes, downloaded bytes, chunk GETs");
    for (i, p, d, c) in per_process {
        println!(
            "  restorer {i:>3}: {p:>10} {d:>10} ({:.2}x) {c:>5}",
            d as f64 / p.max(1) as f64
        );
    }
}
