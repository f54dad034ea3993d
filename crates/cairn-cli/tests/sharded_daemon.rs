//! Sharded steps across nodes with the flush daemon as users run it: each
//! simulated node has its own local store and its own `cairn daemon`
//! process; the ranks of one step save their parts on different nodes;
//! the daemons upload them to the loopback S3 server, and one of them, or
//! the job's committer racing them, publishes the remote record. Also: a daemon killed (SIGKILL) at the
//! record put, stopped there by a fail point.

use cairn::{
    ChunkTier, DType, ErrorKind, ManualClock, RegionTarget, RemoteOptions, RemoteStore, SaveState,
    ShardInfo, StepSel, Store, StoreOptions, TensorFilter,
};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn opts() -> StoreOptions {
    StoreOptions {
        chunk_size: 64 << 10,
        staging_bytes: 8 << 20,
        ..StoreOptions::default()
    }
}

/// Deterministic bytes for `name`.
fn gen_bytes(name: &str, len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15 ^ name.bytes().fold(7u64, |h, b| h * 131 + b as u64);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// A global tensor of the synthetic model (F32) and how ranks hold it.
struct Global {
    name: &'static str,
    shape: [u64; 2],
    /// `Some(dim)`: sharded along `dim`; `None`: replicated on every rank.
    split: Option<usize>,
    data: Vec<u8>,
}

fn model() -> Vec<Global> {
    let g = |name: &'static str, shape: [u64; 2], split| Global {
        name,
        shape,
        split,
        data: gen_bytes(name, (shape[0] * shape[1] * 4) as usize),
    };
    vec![
        g("up", [96, 256], Some(1)),
        g("down", [256, 96], Some(0)),
        g("norm", [1, 96], None),
    ]
}

fn split(n: u64, parts: u64, i: u64) -> (u64, u64) {
    let (a, b) = (i * n / parts, (i + 1) * n / parts);
    (a, b - a)
}

/// Region `off`+`shape` of `g`, row-major.
fn slice(g: &Global, off: [u64; 2], shape: [u64; 2]) -> Vec<u8> {
    let row = (g.shape[1] * 4) as usize;
    let mut v = Vec::new();
    for r in off[0]..off[0] + shape[0] {
        let s = r as usize * row + off[1] as usize * 4;
        v.extend_from_slice(&g.data[s..s + shape[1] as usize * 4]);
    }
    v
}

/// Where rank `rank` of `world` holds `g`.
fn place(g: &Global, rank: u64, world: u64) -> ([u64; 2], [u64; 2]) {
    match g.split {
        None => ([0, 0], g.shape),
        Some(d) => {
            let (a, n) = split(g.shape[d], world, rank);
            let mut off = [0, 0];
            let mut shape = g.shape;
            off[d] = a;
            shape[d] = n;
            (off, shape)
        }
    }
}

/// Save rank `rank`'s part of `(m, step)` into `store`.
fn save_rank(store: &Store, step: u64, rank: u32, world: u32, model: &[Global]) {
    let places: Vec<([u64; 2], [u64; 2])> = model
        .iter()
        .map(|g| place(g, rank as u64, world as u64))
        .collect();
    let datas: Vec<Vec<u8>> = model
        .iter()
        .zip(&places)
        .map(|(g, (off, shape))| slice(g, *off, *shape))
        .collect();
    let mut s = SaveState::new();
    for ((g, (off, shape)), data) in model.iter().zip(&places).zip(&datas) {
        s = s.shard(
            g.name,
            DType::F32,
            shape,
            data,
            ShardInfo {
                global_shape: g.shape.to_vec(),
                offsets: off.to_vec(),
            },
        );
    }
    store
        .save_part("m", step, rank, world, &s)
        .unwrap()
        .wait()
        .unwrap();
}

fn s3_options() -> Vec<(String, String)> {
    let ep = std::env::var("CAIRN_TEST_S3_ENDPOINT").expect("CAIRN_TEST_S3_ENDPOINT");
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

/// A fresh bucket; returns the remote URL.
fn s3_bucket(tag: &str) -> String {
    let ep = std::env::var("CAIRN_TEST_S3_ENDPOINT").expect("CAIRN_TEST_S3_ENDPOINT");
    let name = format!("cairn-{tag}-{}", std::process::id());
    let hostport = ep.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(hostport).expect("connect to S3 server");
    write!(
        s,
        "PUT /{name} HTTP/1.1\r\nHost: {hostport}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    assert!(
        resp.starts_with("HTTP/1.1 200"),
        "create bucket {name}: {resp}"
    );
    format!("s3://{name}/ckpt")
}

fn open_remote(url: &str) -> RemoteStore {
    RemoteStore::open(url, &s3_options(), RemoteOptions::default()).unwrap()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `cairn daemon` draining `local` to `url`, its log in `log`; paused
/// for good at fail point `pause`, if given.
fn spawn_daemon(local: &Path, url: &str, log: &Path, pause: Option<&str>) -> Child {
    let mut args = vec![
        "daemon".to_string(),
        local.display().to_string(),
        "--remote".into(),
        url.into(),
    ];
    for (k, v) in s3_options() {
        args.push("--remote-option".into());
        args.push(format!("{k}={v}"));
    }
    // Uploads rely on the one-minute grace the collections below use
    // (the first daemon records it at the remote).
    args.extend(
        [
            "--remote-gc-grace",
            "1m",
            "--poll-interval",
            "50ms",
            "--gc-interval",
            "0s",
            "--listen",
        ]
        .map(String::from),
    );
    args.push(format!("127.0.0.1:{}", free_port()));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cairn"));
    cmd.args(&args)
        .env("CAIRN_LOG", "cairn=info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap());
    if let Some(p) = pause {
        cmd.env("CAIRN_FAILPOINT_PAUSE", p);
    }
    cmd.spawn().expect("spawn cairn daemon")
}

fn sigterm(child: &mut Child) {
    // SAFETY: plain kill(2) on our child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let t = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            assert!(st.success(), "daemon exited with {st:?} on SIGTERM");
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "daemon ignored SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Wait up to 120 s for `cond`, naming `what` and the logs if it never holds.
fn wait_for(what: &str, logs: &[PathBuf], mut cond: impl FnMut() -> bool) {
    let t = Instant::now();
    while !cond() {
        if t.elapsed() > Duration::from_secs(120) {
            let text: Vec<String> = logs
                .iter()
                .map(|l| std::fs::read_to_string(l).unwrap_or_default())
                .collect();
            panic!(
                "timed out waiting for {what}; daemon logs:\n{}",
                text.join("\n---\n")
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn log_has(log: &Path, needle: &str) -> bool {
    std::fs::read_to_string(log).is_ok_and(|t| t.contains(needle))
}

fn remote_steps(remote: &RemoteStore) -> Vec<u64> {
    ChunkTier::steps(remote, "m").unwrap()
}

/// Everything of `(m, step)` restores bit-exact from `url` alone: whole
/// tensors, and the regions of a 3-rank layout (transposed: the
/// column-sharded tensor by rows, the row-sharded one by columns), read by
/// each rank in one call.
fn check_remote_step(url: &str, step: u64, model: &[Global]) {
    let remote = open_remote(url);
    let all = remote
        .restore("m", StepSel::Step(step), &TensorFilter::All)
        .unwrap();
    for g in model {
        assert!(all.tensor(g.name).unwrap().data == g.data, "{}", g.name);
    }
    for rank in 0..3u64 {
        let regions: Vec<([u64; 2], [u64; 2])> = model
            .iter()
            .map(|g| match g.split {
                None => ([0, 0], g.shape),
                Some(d) => {
                    let o = 1 - d;
                    let (a, n) = split(g.shape[o], 3, rank);
                    let mut off = [0, 0];
                    let mut shape = g.shape;
                    off[o] = a;
                    shape[o] = n;
                    (off, shape)
                }
            })
            .collect();
        let mut outs: Vec<Vec<u8>> = regions
            .iter()
            .map(|(_, s)| vec![0u8; (s[0] * s[1] * 4) as usize])
            .collect();
        let mut targets: Vec<RegionTarget<'_>> = outs
            .iter_mut()
            .zip(model.iter().zip(&regions))
            .map(|(out, (g, (off, shape)))| RegionTarget {
                name: g.name,
                offsets: off,
                shape,
                out,
            })
            .collect();
        remote
            .restore_regions("m", StepSel::Step(step), &mut targets)
            .unwrap();
        drop(targets);
        for ((g, (off, shape)), out) in model.iter().zip(&regions).zip(&outs) {
            assert!(
                *out == slice(g, *off, *shape),
                "{} {off:?}+{shape:?}",
                g.name
            );
        }
    }
}

#[test]
fn four_node_daemons_upload_their_parts_and_one_publishes_the_record() {
    const NODES: usize = 4;
    const WORLD: u32 = 8;
    let dir = tempfile::tempdir().unwrap();
    let url = s3_bucket("sharded-daemons");
    let remote = open_remote(&url);
    let model = model();
    let stores: Vec<Store> = (0..NODES)
        .map(|n| Store::open(dir.path().join(format!("node{n}")), opts()).unwrap())
        .collect();
    let logs: Vec<PathBuf> = (0..NODES)
        .map(|n| dir.path().join(format!("daemon{n}.log")))
        .collect();
    let mut daemons: Vec<Child> = (0..NODES)
        .map(|n| spawn_daemon(stores[n].root(), &url, &logs[n], None))
        .collect();
    // The job's committer (rank 0's trainer, on node 0) also tries to
    // publish the remote record, racing the daemons: whoever first finds
    // every part there creates it.
    let committer = {
        let url = url.clone();
        std::thread::spawn(move || {
            let remote = open_remote(&url);
            let t = Instant::now();
            loop {
                match remote.commit("m", 1, WORLD) {
                    Ok(r) => return r.created,
                    Err(cairn::Error::MissingRank { .. }) => {}
                    Err(e) => panic!("committer: {e}"),
                }
                assert!(t.elapsed() < Duration::from_secs(120), "committer gave up");
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    // The ranks save while the daemons run, node by node: the early
    // nodes' daemons upload their parts and wait for the others'.
    for (n, store) in stores.iter().enumerate() {
        for r in 0..WORLD {
            if r as usize * NODES / WORLD as usize == n {
                save_rank(store, 1, r, WORLD, &model);
            }
        }
        if n == 0 {
            wait_for("node 0's parts on the remote", &logs, || {
                remote.parts("m", 1).unwrap().len() == 2
            });
            assert!(
                remote_steps(&remote).is_empty(),
                "visible with 2 of 8 parts"
            );
        }
    }
    for s in &stores {
        assert!(s.steps("m").unwrap().is_empty(), "no node holds a record");
    }
    wait_for("the remote record", &logs, || {
        remote_steps(&remote) == vec![1]
    });
    wait_for("every node's upload marker", &logs, || {
        stores.iter().all(|s| s.is_uploaded("m", 1, &url))
    });
    for d in &mut daemons {
        sigterm(d);
    }
    let by_committer = committer.join().unwrap();
    let by_daemons = logs
        .iter()
        .filter(|l| log_has(l, "published remote record"))
        .count();
    assert_eq!(
        by_daemons + by_committer as usize,
        1,
        "exactly one creates the record (daemons: {by_daemons}, committer: {by_committer})"
    );
    eprintln!("record created by the committer: {by_committer}; by a daemon: {by_daemons}");
    let parts = remote.parts("m", 1).unwrap();
    assert_eq!(parts.len(), WORLD as usize);
    check_remote_step(&url, 1, &model);
    let record = remote.block_on(remote.manifest("m", 1)).unwrap().unwrap();
    assert_eq!(record.sharded.len(), model.len());
    // Replicas are stored once: one shard of the replicated tensor.
    let norm = record.sharded.iter().find(|t| t.name == "norm").unwrap();
    assert_eq!(norm.shards.len(), 1);
}

#[test]
fn a_daemon_killed_at_the_record_put_leaves_the_step_invisible_until_a_restart_publishes_it() {
    const WORLD: u32 = 4;
    let dir = tempfile::tempdir().unwrap();
    let url = s3_bucket("sharded-kill");
    let remote = open_remote(&url);
    let model = model();
    let (a, b) = (
        Store::open(dir.path().join("a"), opts()).unwrap(),
        Store::open(dir.path().join("b"), opts()).unwrap(),
    );
    let log = |name: &str| dir.path().join(format!("{name}.log"));
    // Ranks 0, 1 on node A; ranks 2, 3 on node B.
    for step in [1u64, 2] {
        for r in 0..WORLD {
            save_rank(if r < 2 { &a } else { &b }, step, r, WORLD, &model);
        }
    }
    // Node B's daemon uploads its parts of both steps, finds A's missing,
    // and is stopped.
    let mut db = spawn_daemon(b.root(), &url, &log("b"), None);
    wait_for("node B's parts", &[log("b")], || {
        remote.parts("m", 1).unwrap().len() == 2 && remote.parts("m", 2).unwrap().len() == 2
    });
    sigterm(&mut db);
    assert!(remote_steps(&remote).is_empty());

    // Node A's daemon uploads its parts, finds every rank, and is killed
    // with the record of step 1 checked and about to be put.
    let mut da = spawn_daemon(
        a.root(),
        &url,
        &log("a-1"),
        Some("remote_commit.before_record"),
    );
    wait_for("the pause before the record put", &[log("a-1")], || {
        log_has(
            &log("a-1"),
            "paused at fail point remote_commit.before_record",
        )
    });
    da.kill().unwrap(); // SIGKILL
    da.wait().unwrap();
    assert_eq!(remote.parts("m", 1).unwrap().len(), WORLD as usize);
    assert!(
        remote_steps(&remote).is_empty(),
        "step visible without a record"
    );
    let e = remote
        .restore("m", StepSel::Step(1), &TensorFilter::All)
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    assert!(!a.is_uploaded("m", 1, &url));
    // A remote collection now, its clock half an hour on, a 60 s grace:
    // the parts are roots, nothing they need goes.
    let clock = ManualClock::new();
    clock.advance(Duration::from_secs(1800));
    let gc_remote = open_remote(&url).with_clock(Arc::new(clock.clone()));
    let g = gc_remote.gc(Duration::from_secs(60), false).unwrap();
    assert_eq!((g.parts_removed, g.chunks_deleted), (0, 0), "{g:?}");

    // Killed again, this time after the record put of step 1 succeeded
    // and before the daemon learnt of it: the record is whole.
    let mut da = spawn_daemon(
        a.root(),
        &url,
        &log("a-2"),
        Some("remote.after_manifest_put"),
    );
    wait_for("the pause after the record put", &[log("a-2")], || {
        log_has(
            &log("a-2"),
            "paused at fail point remote.after_manifest_put",
        )
    });
    da.kill().unwrap(); // SIGKILL
    da.wait().unwrap();
    assert_eq!(remote_steps(&remote), vec![1]);
    check_remote_step(&url, 1, &model);
    assert!(
        !a.is_uploaded("m", 1, &url),
        "marker written before the put returned"
    );

    // Restarted without fail points, the daemon finds the record of step
    // 1 (identical: success) and publishes step 2's.
    let mut da = spawn_daemon(a.root(), &url, &log("a-3"), None);
    wait_for("step 2's record", &[log("a-3")], || {
        remote_steps(&remote) == vec![1, 2]
    });
    wait_for("node A's markers", &[log("a-3")], || {
        a.is_uploaded("m", 1, &url) && a.is_uploaded("m", 2, &url)
    });
    check_remote_step(&url, 2, &model);

    // Step 3: node B's ranks never save. Node A's parts go up and wait;
    // the step stays invisible, and a collection removes the orphaned
    // parts only once they are past the grace (at least an hour).
    for r in 0..2 {
        save_rank(&a, 3, r, WORLD, &model);
    }
    wait_for("node A's parts of step 3", &[log("a-3")], || {
        remote.parts("m", 3).unwrap().len() == 2
    });
    std::thread::sleep(Duration::from_millis(300));
    sigterm(&mut da);
    assert_eq!(remote_steps(&remote), vec![1, 2]);
    let g = gc_remote.gc(Duration::from_secs(60), false).unwrap();
    assert_eq!(g.parts_removed, 0, "{g:?}");
    assert_eq!(remote.parts("m", 3).unwrap().len(), 2);
    clock.advance(Duration::from_secs(2 * 3600));
    let g = gc_remote.gc(Duration::from_secs(60), false).unwrap();
    assert_eq!(g.parts_removed, 2, "{g:?}");
    assert!(remote.parts("m", 3).unwrap().is_empty());
    // What the committed steps need stayed.
    check_remote_step(&url, 1, &model);
    check_remote_step(&url, 2, &model);
}
