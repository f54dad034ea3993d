//! Scale-out of a sharded checkpoint on one machine: RANKS rank processes
//! on NODES simulated nodes (one local store each) save one step of a
//! sharded synthetic model (column- and row-sharded matrices plus
//! replicated tensors); each node uploads its parts to an S3-compatible
//! server, the last one commits the record; then RESTORERS processes
//! restore their regions from S3 only and check them bit for bit against
//! the generator.
//!
//! ```sh
//! CAIRN_TEST_S3_ENDPOINT=http://127.0.0.1:9000 \
//!   cargo run --release --example sharded_scaleout -- 64 4 48
//! ```

use cairn::{
    DType, RemoteOptions, RemoteStore, SaveState, ShardInfo, StepSel, Store, StoreOptions,
};
use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::Instant;

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

fn restorer(url: &str, i: u64, n: u64) {
    let remote = RemoteStore::open(url, &s3_options(), RemoteOptions::default()).unwrap();
    let mut bytes = 0;
    for (name, t, shape, col) in tensors() {
        // The new layout transposes the old one: column-sharded tensors
        // are read by rows and row-sharded ones by columns.
        let (off, sh) = if name.ends_with("norm") {
            ([0, 0], shape)
        } else if col {
            let (a, k) = split(shape[0], n, i);
            ([a, 0], [k, shape[1]])
        } else {
            let (a, k) = split(shape[1], n, i);
            ([0, a], [shape[0], k])
        };
        let mut out = vec![0u8; (sh[0] * sh[1] * 4) as usize];
        remote
            .restore_region("model", StepSel::Step(1), &name, &off, &sh, &mut out)
            .unwrap();
        assert!(out == region(t, shape[1], off, sh), "{name} differs");
        bytes += out.len() as u64;
    }
    let m = remote.metrics().snapshot();
    println!(
        "restored {bytes} {} {}",
        m.bytes_downloaded, m.chunks_downloaded
    );
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

    let t = Instant::now();
    let remote = RemoteStore::open(&url, &s3_options(), RemoteOptions::default()).unwrap();
    let reports: Vec<_> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..nodes)
            .map(|n| {
                let remote = &remote;
                let d = node_dir(n);
                sc.spawn(move || {
                    let store = Store::open(&d, StoreOptions::default()).unwrap();
                    store
                        .upload_parts(remote, "model", 1, ranks as u32)
                        .unwrap()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let upload = t.elapsed();
    let committed = reports.iter().filter(|r| r.committed.is_some()).count();
    if committed == 0 {
        // Nodes raced: each saw another's parts missing. Commit now.
        remote.commit("model", 1, ranks as u32).unwrap();
    }
    let up = remote.metrics().snapshot();

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
    for o in outs {
        let line = o.lines().find(|l| l.starts_with("restored ")).unwrap();
        let v: Vec<u64> = line[9..].split(' ').map(|x| x.parse().unwrap()).collect();
        placed += v[0];
        down += v[1];
        chunks += v[2];
    }
    println!("{ranks} ranks on {nodes} nodes, {restorers} restorers; model {logical} bytes");
    println!("save (all ranks, local): {save:.2?}");
    println!(
        "upload + commit: {upload:.2?}; {} chunk objects, {} bytes uploaded ({:.2}x logical), {} manifests; committed by {} node(s) during upload",
        up.chunks_uploaded,
        up.bytes_uploaded,
        up.bytes_uploaded as f64 / logical as f64,
        up.manifests_uploaded,
        committed
    );
    println!(
        "restore from S3 only: {restore:.2?}; {placed} bytes placed, {down} bytes downloaded in {chunks} chunk reads; all regions bit-exact"
    );
}
