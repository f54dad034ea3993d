//! Sharded checkpoints (format v2): ranks save parts, one commit makes the
//! step visible, any world size restores any region of it. Real stores on
//! disk, real child processes, and the loopback S3 server.

use cairn::{
    DType, Error, ErrorKind, ManualClock, RemoteOptions, RemoteStore, SaveState, ShardInfo,
    StepSel, Store, StoreOptions, TensorFilter,
};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

const CHILD_ENV: &str = "CAIRN_SHARDED_CHILD";

fn opts() -> StoreOptions {
    StoreOptions {
        chunk_size: 64 << 10,
        staging_bytes: 4 << 20,
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

/// The row-major bytes of the box `offsets`/`shape` of a global array.
fn slice(global: &[u8], gshape: &[u64], esize: usize, offsets: &[u64], shape: &[u64]) -> Vec<u8> {
    let n = gshape.len();
    let count: u64 = shape.iter().product();
    let mut out = Vec::with_capacity(count as usize * esize);
    if count == 0 {
        return out;
    }
    let mut strides = vec![1u64; n];
    for i in (0..n.saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * gshape[i + 1];
    }
    let mut idx = vec![0u64; n];
    for _ in 0..count {
        let e: u64 = (0..n).map(|i| (offsets[i] + idx[i]) * strides[i]).sum();
        let b = e as usize * esize;
        out.extend_from_slice(&global[b..b + esize]);
        for d in (0..n).rev() {
            idx[d] += 1;
            if idx[d] < shape[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    out
}

/// How a rank saves a tensor: `None` (not at all), `Some(None)` (whole,
/// without shard info), `Some(Some((offsets, shape)))`.
type RankLayout = fn(u32, &[u64]) -> Option<Option<(Vec<u64>, Vec<u64>)>>;

/// A tensor as a rank saves it: name, dtype, shape, bytes, shard info.
type SavedTensor = (String, DType, Vec<u64>, Vec<u8>, Option<ShardInfo>);

/// One global tensor of the synthetic model and how 8 ranks shard it.
struct Global {
    name: &'static str,
    dtype: DType,
    shape: Vec<u64>,
    data: Vec<u8>,
    /// Per rank: `None` (not saved), `Some(None)` (whole, no shard info),
    /// `Some(Some(offsets, shape))`.
    layout: RankLayout,
}

fn split(n: u64, parts: u64, i: u64) -> (u64, u64) {
    let a = i * n / parts;
    let b = (i + 1) * n / parts;
    (a, b - a)
}

fn model() -> Vec<Global> {
    let mk = |name: &'static str, dtype: DType, shape: Vec<u64>, layout: RankLayout| {
        let len = shape.iter().product::<u64>() as usize * dtype.size();
        Global {
            name,
            dtype,
            data: gen_bytes(name, len),
            shape,
            layout,
        }
    };
    vec![
        // Tensor parallel (columns, 2) x FSDP (rows, 4).
        mk("tp_fsdp.w", DType::F32, vec![64, 48], |r, g| {
            let (tp, fsdp) = (r as u64 % 2, r as u64 / 2);
            let (r0, rn) = split(g[0], 4, fsdp);
            let (c0, cn) = split(g[1], 2, tp);
            Some(Some((vec![r0, c0], vec![rn, cn])))
        }),
        // Big enough that shards span several chunks.
        mk("big.w", DType::F32, vec![1024, 256], |r, g| {
            let (tp, fsdp) = (r as u64 % 2, r as u64 / 2);
            let (r0, rn) = split(g[0], 4, fsdp);
            let (c0, cn) = split(g[1], 2, tp);
            Some(Some((vec![r0, c0], vec![rn, cn])))
        }),
        // Column shards.
        mk("col.w", DType::BF16, vec![40, 96], |r, g| {
            let (c0, cn) = split(g[1], 8, r as u64);
            Some(Some((vec![0, c0], vec![g[0], cn])))
        }),
        // Uneven row shards, two of them empty.
        mk("row.w", DType::F16, vec![100, 7], |r, g| {
            let b = [0u64, 20, 40, 40, 55, 70, 85, 100, 100];
            let (a, e) = (b[r as usize], b[r as usize + 1]);
            Some(Some((vec![a, 0], vec![e - a, g[1]])))
        }),
        // 1-D FSDP flat parameter.
        mk("fsdp.flat", DType::F32, vec![1000], |r, g| {
            let (a, n) = split(g[0], 8, r as u64);
            Some(Some((vec![a], vec![n])))
        }),
        // Replicated on every rank, without shard info.
        mk("replicated.bias", DType::F32, vec![33], |_, _| Some(None)),
        // 0-dim tensors: replicated, and on rank 0 only.
        mk("scalar", DType::F64, vec![], |_, _| Some(None)),
        mk("only0", DType::I64, vec![], |r, _| (r == 0).then_some(None)),
    ]
}

/// The tensors (and their bytes) rank `rank` of 8 saves.
struct RankState {
    tensors: Vec<SavedTensor>,
    blobs: Vec<(String, Vec<u8>)>,
    rank: u32,
}

fn rank_state(model: &[Global], rank: u32) -> RankState {
    let mut tensors = Vec::new();
    for g in model {
        match (g.layout)(rank, &g.shape) {
            None => {}
            Some(None) => tensors.push((
                g.name.to_string(),
                g.dtype,
                g.shape.clone(),
                g.data.clone(),
                None,
            )),
            Some(Some((off, shape))) => {
                let bytes = slice(&g.data, &g.shape, g.dtype.size(), &off, &shape);
                tensors.push((
                    g.name.to_string(),
                    g.dtype,
                    shape,
                    bytes,
                    Some(ShardInfo {
                        global_shape: g.shape.clone(),
                        offsets: off,
                    }),
                ));
            }
        }
    }
    RankState {
        tensors,
        blobs: vec![
            ("config".into(), b"{\"layers\": 2}".to_vec()),
            (
                format!("rng/rank{rank}"),
                gen_bytes(&format!("rng{rank}"), 100 + rank as usize),
            ),
        ],
        rank,
    }
}

impl RankState {
    fn view(&self) -> SaveState<'_> {
        let mut s = SaveState::new().metadata(serde_json::json!({ "rank": self.rank }));
        for (name, dtype, shape, data, shard) in &self.tensors {
            s = match shard {
                Some(info) => s.shard(name.clone(), *dtype, shape, data, info.clone()),
                None => s.tensor(name.clone(), *dtype, shape, data),
            };
        }
        for (name, data) in &self.blobs {
            s = s.blob(name.clone(), data);
        }
        s
    }
}

fn save_ranks(store: &Store, run: &str, step: u64, world: u32, model: &[Global]) {
    for r in 0..world {
        let st = rank_state(model, r);
        store
            .save_part(run, step, r, world, &st.view())
            .unwrap()
            .wait()
            .unwrap();
    }
}

/// A region request: offsets and shape.
type Req = (Vec<u64>, Vec<u64>);

/// The regions `world` ranks would restore of a tensor of `shape`: rows,
/// columns, and for 16 ranks a 4 x 4 block grid.
fn regions(shape: &[u64], world: u64) -> Vec<Req> {
    let mut out = Vec::new();
    if shape.is_empty() {
        return vec![(vec![], vec![])];
    }
    for i in 0..world {
        let (a, n) = split(shape[0], world, i);
        let mut off = vec![0; shape.len()];
        off[0] = a;
        let mut sh = shape.to_vec();
        sh[0] = n;
        out.push((off, sh));
    }
    if shape.len() >= 2 {
        for i in 0..world {
            let (a, n) = split(shape[1], world, i);
            let mut off = vec![0; shape.len()];
            off[1] = a;
            let mut sh = shape.to_vec();
            sh[1] = n;
            out.push((off, sh));
        }
        if world == 16 {
            for i in 0..4 {
                for j in 0..4 {
                    let (a, n) = split(shape[0], 4, i);
                    let (b, m) = split(shape[1], 4, j);
                    out.push((vec![a, b], vec![n, m]));
                }
            }
        }
    }
    out
}

fn new_store(dir: &Path) -> Store {
    Store::open(dir, opts()).unwrap()
}

#[test]
fn resharding_8_ranks_into_1_3_and_16() {
    let dir = tempfile::tempdir().unwrap();
    let store = new_store(dir.path());
    let model = model();
    save_ranks(&store, "r", 10, 8, &model);
    // Parts alone do not make the step visible.
    assert!(store.steps("r").unwrap().is_empty());
    assert_eq!(store.pending_steps("r").unwrap(), vec![10]);
    assert_eq!(
        store
            .restore("r", StepSel::Latest, &TensorFilter::All)
            .unwrap_err()
            .kind(),
        ErrorKind::NotFound
    );
    let report = store.commit("r", 10, 8).unwrap();
    assert!(report.created);
    assert_eq!(report.parts, 8);
    assert_eq!(report.tensors, model.len());
    // 8 replicas of bias and scalar, stored once; the 4 column shards of
    // col.w are distinct; two row.w shards are empty.
    assert_eq!(report.replicas, 7 + 7);
    assert_eq!(store.steps("r").unwrap(), vec![10]);
    assert!(store.pending_steps("r").unwrap().is_empty());
    let m = store.manifest("r", 10).unwrap();
    assert_eq!(m.format_version, 2);
    assert_eq!(m.world_size, Some(8));
    assert_eq!(m.metadata, serde_json::json!({"rank": 0}));
    let row = m.sharded.iter().find(|t| t.name == "row.w").unwrap();
    assert_eq!(row.shards.len(), 6, "empty shards are not recorded");
    let bias = m
        .sharded
        .iter()
        .find(|t| t.name == "replicated.bias")
        .unwrap();
    assert_eq!(bias.shards.len(), 1);
    assert_eq!(bias.shards[0].rank, 0);

    let mut regions_read = 0;
    for world in [1u64, 3, 16] {
        for g in &model {
            for (off, shape) in regions(&g.shape, world) {
                let want = slice(&g.data, &g.shape, g.dtype.size(), &off, &shape);
                let mut out = vec![0xAAu8; want.len()];
                store
                    .restore_region("r", StepSel::Latest, g.name, &off, &shape, &mut out)
                    .unwrap_or_else(|e| panic!("{} {off:?}+{shape:?}: {e}", g.name));
                assert!(
                    out == want,
                    "world {world}: {} {off:?}+{shape:?} differs",
                    g.name
                );
                regions_read += 1;
            }
        }
    }
    assert!(regions_read > 100);
    // Only the overlapping chunks are read: one row of big.w (1 KiB) is
    // inside one chunk of one shard.
    let mut row = vec![0u8; 256 * 4];
    let r = store
        .restore_region(
            "r",
            StepSel::Latest,
            "big.w",
            &[700, 0],
            &[1, 256],
            &mut row,
        )
        .unwrap();
    assert_eq!(r.chunks_read, 2, "one chunk per column shard");
    // Whole restore assembles the global tensors.
    let all = store
        .restore("r", StepSel::Latest, &TensorFilter::All)
        .unwrap();
    for g in &model {
        let t = all.tensor(g.name).unwrap();
        assert_eq!(t.shape, g.shape, "{}", g.name);
        assert!(t.data == g.data, "{} assembled differs", g.name);
    }
    assert_eq!(all.blob("config").unwrap(), b"{\"layers\": 2}");
    // restore_into fills caller buffers with assembled global tensors.
    let mut wbuf = vec![0u8; model[0].data.len()];
    let mut sbuf = vec![0u8; 8];
    store
        .restore_into(
            "r",
            StepSel::Latest,
            &mut [("tp_fsdp.w", &mut wbuf[..]), ("scalar", &mut sbuf[..])],
        )
        .unwrap();
    assert!(wbuf == model[0].data);
    assert!(sbuf == model[6].data);
    for r in 0..8 {
        assert_eq!(
            all.blob(&format!("rng/rank{r}")).unwrap(),
            &gen_bytes(&format!("rng{r}"), 100 + r)[..]
        );
    }
    // Verification covers every shard's chunks.
    let v = store.verify(None, None).unwrap();
    assert!(v.problems.is_empty(), "{:?}", v.problems);
    // Bad requests are errors, not panics.
    let mut small = vec![0u8; 3];
    let e = store
        .restore_region(
            "r",
            StepSel::Latest,
            "tp_fsdp.w",
            &[0, 0],
            &[1, 1],
            &mut small,
        )
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Invalid, "{e}");
    let mut one = vec![0u8; 4];
    let e = store
        .restore_region(
            "r",
            StepSel::Latest,
            "tp_fsdp.w",
            &[64, 0],
            &[1, 1],
            &mut one,
        )
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Invalid, "{e}");
    let e = store
        .restore_region("r", StepSel::Latest, "nope", &[0], &[1], &mut one)
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
}

fn part(name: &str, dtype: DType, global: &[u64], offsets: &[u64], shape: &[u64]) -> SavedTensor {
    let len = shape.iter().product::<u64>() as usize * dtype.size();
    (
        name.to_string(),
        dtype,
        shape.to_vec(),
        gen_bytes(&format!("{name}{offsets:?}"), len),
        Some(ShardInfo {
            global_shape: global.to_vec(),
            offsets: offsets.to_vec(),
        }),
    )
}

fn save_one(store: &Store, step: u64, rank: u32, world: u32, t: Vec<SavedTensor>) {
    let st = RankState {
        tensors: t,
        blobs: vec![],
        rank,
    };
    store
        .save_part("r", step, rank, world, &st.view())
        .unwrap()
        .wait()
        .unwrap();
}

#[test]
fn commit_refuses_bad_layouts_naming_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let store = new_store(dir.path());
    let g = [8u64, 4];
    // Overlap: rows 0..5 and 4..8.
    save_one(
        &store,
        1,
        0,
        2,
        vec![part("w", DType::F32, &g, &[0, 0], &[5, 4])],
    );
    save_one(
        &store,
        1,
        1,
        2,
        vec![part("w", DType::F32, &g, &[4, 0], &[4, 4])],
    );
    match store.commit("r", 1, 2).unwrap_err() {
        Error::ShardOverlap {
            tensor,
            first,
            second,
        } => {
            assert_eq!(tensor, "w");
            assert_eq!(
                (first.rank, first.offsets, first.shape),
                (0, vec![0, 0], vec![5, 4])
            );
            assert_eq!(
                (second.rank, second.offsets, second.shape),
                (1, vec![4, 0], vec![4, 4])
            );
        }
        e => panic!("expected an overlap, got {e}"),
    }
    // Gap: rows 0..4 and 5..8 (row 4 uncovered), and a missing column.
    save_one(
        &store,
        2,
        0,
        2,
        vec![part("w", DType::F32, &g, &[0, 0], &[4, 4])],
    );
    save_one(
        &store,
        2,
        1,
        2,
        vec![part("w", DType::F32, &g, &[5, 0], &[3, 4])],
    );
    match store.commit("r", 2, 2).unwrap_err() {
        e @ Error::ShardGap { .. } => {
            assert_eq!(e.kind(), ErrorKind::Invalid);
            let Error::ShardGap {
                tensor,
                point,
                global_shape,
            } = e
            else {
                unreachable!()
            };
            assert_eq!(
                (tensor.as_str(), point, global_shape),
                ("w", vec![4, 0], vec![8, 4])
            );
        }
        e => panic!("expected a gap, got {e}"),
    }
    save_one(
        &store,
        3,
        0,
        2,
        vec![part("w", DType::F32, &g, &[0, 0], &[8, 2])],
    );
    save_one(
        &store,
        3,
        1,
        2,
        vec![part("w", DType::F32, &g, &[0, 2], &[7, 2])],
    );
    match store.commit("r", 3, 2).unwrap_err() {
        Error::ShardGap { point, .. } => assert_eq!(point, vec![7, 2]),
        e => panic!("expected a gap, got {e}"),
    }
    // Missing rank.
    save_one(
        &store,
        4,
        0,
        3,
        vec![part("w", DType::F32, &g, &[0, 0], &[4, 4])],
    );
    save_one(
        &store,
        4,
        2,
        3,
        vec![part("w", DType::F32, &g, &[4, 0], &[4, 4])],
    );
    match store.commit("r", 4, 3).unwrap_err() {
        e @ Error::MissingRank { .. } => {
            assert_eq!(e.kind(), ErrorKind::NotFound);
            assert!(e.to_string().contains("rank 1 of world size 3"), "{e}");
        }
        e => panic!("expected a missing rank, got {e}"),
    }
    // Disagreeing dtype.
    save_one(
        &store,
        5,
        0,
        2,
        vec![part("w", DType::F32, &g, &[0, 0], &[4, 4])],
    );
    save_one(
        &store,
        5,
        1,
        2,
        vec![part("w", DType::I32, &g, &[4, 0], &[4, 4])],
    );
    match store.commit("r", 5, 2).unwrap_err() {
        Error::PartsDisagree {
            name,
            what,
            first_rank,
            first,
            other_rank,
            other,
            hint,
        } => {
            assert_eq!((name.as_str(), what), ("w", "dtype"));
            assert_eq!(hint, "", "only two attempts of one rank get a hint");
            assert_eq!(
                (first_rank, first.as_str(), other_rank, other.as_str()),
                (0, "F32", 1, "I32")
            );
        }
        e => panic!("expected a dtype disagreement, got {e}"),
    }
    // Disagreeing global shape.
    save_one(
        &store,
        6,
        0,
        2,
        vec![part("w", DType::F32, &g, &[0, 0], &[4, 4])],
    );
    save_one(
        &store,
        6,
        1,
        2,
        vec![part("w", DType::F32, &[9, 4], &[4, 0], &[4, 4])],
    );
    match store.commit("r", 6, 2).unwrap_err() {
        Error::PartsDisagree {
            name,
            what,
            first,
            other,
            ..
        } => {
            assert_eq!((name.as_str(), what), ("w", "global shape"));
            assert_eq!((first.as_str(), other.as_str()), ("[8, 4]", "[9, 4]"));
        }
        e => panic!("expected a shape disagreement, got {e}"),
    }
    // Different bytes under one blob name.
    for r in 0..2u32 {
        let data = vec![r as u8; 10];
        let s = SaveState::new().blob("rng", &data);
        store.save_part("r", 7, r, 2, &s).unwrap().wait().unwrap();
    }
    match store.commit("r", 7, 2).unwrap_err() {
        Error::PartsDisagree { name, what, .. } => {
            assert_eq!((name.as_str(), what), ("rng", "blob bytes"))
        }
        e => panic!("expected a blob disagreement, got {e}"),
    }
    // None of them became visible.
    assert!(store.steps("r").unwrap().is_empty());
    assert_eq!(
        store.pending_steps("r").unwrap(),
        (1..=7).collect::<Vec<_>>()
    );
    // A fixed layout commits (a re-save of the bad rank is a new part;
    // commit then sees two different attempts of rank 1 and refuses
    // that too, naming the rank).
    save_one(
        &store,
        1,
        1,
        2,
        vec![part("w", DType::F32, &g, &[5, 0], &[3, 4])],
    );
    match store.commit("r", 1, 2).unwrap_err() {
        e @ Error::PartsDisagree {
            what: "part",
            first_rank: 1,
            other_rank: 1,
            ..
        } => {
            // The message says how to go on: which directory holds the
            // attempts, and that one of them was abandoned.
            let msg = e.to_string();
            let dir = store.root().join("runs/r/00000000000000000001/parts");
            assert!(msg.contains("was abandoned"), "{msg}");
            assert!(msg.contains(&dir.display().to_string()), "{msg}");
        }
        e => panic!("expected two attempts of rank 1 to disagree, got {e}"),
    }
    // Same layout for another world size in a fresh step commits.
    save_one(
        &store,
        8,
        0,
        1,
        vec![part("w", DType::F32, &g, &[0, 0], &[8, 4])],
    );
    store.commit("r", 8, 1).unwrap();
    assert_eq!(store.steps("r").unwrap(), vec![8]);
    // Invalid arguments.
    assert_eq!(
        store.commit("r", 9, 0).unwrap_err().kind(),
        ErrorKind::Invalid
    );
    let s = SaveState::new();
    assert_eq!(
        store.save_part("r", 9, 2, 2, &s).unwrap_err().kind(),
        ErrorKind::Invalid
    );
}

/// Rank `rank` of 2 saves its half (rows `4 * rank..`) of an `[8, 4]` F32
/// tensor `w` into step `step`, every byte `fill + rank`, as part of
/// `attempt`.
fn save_half(store: &Store, step: u64, rank: u32, attempt: Option<&str>, fill: u8) {
    let st = RankState {
        tensors: vec![(
            "w".to_string(),
            DType::F32,
            vec![4, 4],
            vec![fill + rank as u8; 64],
            Some(ShardInfo {
                global_shape: vec![8, 4],
                offsets: vec![4 * rank as u64, 0],
            }),
        )],
        blobs: vec![],
        rank,
    };
    let mut view = st.view();
    if let Some(a) = attempt {
        view = view.attempt(a);
    }
    store
        .save_part("r", step, rank, 2, &view)
        .unwrap()
        .wait()
        .unwrap();
}

/// The bytes of `w` at `step` as the two ranks of [`save_half`] saved it.
fn halves(fill: u8) -> Vec<u8> {
    [vec![fill; 64], vec![fill + 1; 64]].concat()
}

/// A job dies before its commit, restarts from an earlier step and saves
/// the step again with other contents: the commit of the new attempt
/// takes its parts, the abandoned ones are left aside (not mixed in, not
/// a reason to refuse), and collection removes them once the step is
/// committed and they are past the grace.
#[test]
fn an_abandoned_attempt_is_left_aside_by_the_next() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = new_store(dir.path());
    let clock = ManualClock::new();
    store.set_clock(Arc::new(clock.clone()));
    let w = |store: &Store, step: u64| {
        store
            .restore("r", StepSel::Step(step), &TensorFilter::All)
            .unwrap()
            .tensor("w")
            .unwrap()
            .data
            .clone()
    };

    // Step 1: attempt "a1" died after rank 0 saved; "a2" is saved whole.
    save_half(&store, 1, 0, Some("a1"), 10);
    save_half(&store, 1, 0, Some("a2"), 20);
    save_half(&store, 1, 1, Some("a2"), 20);
    let r = store.commit_attempt("r", 1, 2, Some("a2")).unwrap();
    assert_eq!((r.parts, r.created), (2, true));
    assert_eq!(w(&store, 1), halves(20));
    assert_eq!(
        store.manifest("r", 1).unwrap().attempt.as_deref(),
        Some("a2")
    );

    // Step 2: the same, committed without naming the attempt: the one
    // attempt every rank saved is taken.
    save_half(&store, 2, 0, Some("a1"), 30);
    save_half(&store, 2, 0, Some("a2"), 40);
    save_half(&store, 2, 1, Some("a2"), 40);
    store.commit("r", 2, 2).unwrap();
    assert_eq!(w(&store, 2), halves(40));

    // Step 3: both attempts saved by every rank, with different contents:
    // a commit that names neither is refused, naming both; naming one
    // commits it.
    for rank in 0..2 {
        save_half(&store, 3, rank, Some("x1"), 50);
        save_half(&store, 3, rank, Some("x2"), 60);
    }
    match store.commit("r", 3, 2).unwrap_err() {
        e @ Error::PartsDisagree {
            what: "attempt", ..
        } => {
            let msg = e.to_string();
            assert!(msg.contains("\"x1\"") && msg.contains("\"x2\""), "{msg}");
        }
        e => panic!("expected two complete attempts to be refused, got {e}"),
    }
    assert!(store.steps("r").unwrap() == vec![1, 2]);
    store.commit_attempt("r", 3, 2, Some("x2")).unwrap();
    assert_eq!(w(&store, 3), halves(60));

    // An attempt no rank saved waits for rank 0; a bad name is refused;
    // only a part names an attempt.
    save_half(&store, 4, 1, Some("b1"), 70);
    match store.commit_attempt("r", 4, 2, Some("b1")).unwrap_err() {
        Error::MissingRank { rank: 0, .. } => {}
        e => panic!("expected rank 0 missing, got {e}"),
    }
    match store.commit_attempt("r", 4, 2, Some("nobody")).unwrap_err() {
        Error::MissingRank { rank: 0, .. } => {}
        e => panic!("expected rank 0 missing, got {e}"),
    }
    for bad in ["", "a/b", "../x", &"a".repeat(65)] {
        let e = store.commit_attempt("r", 4, 2, Some(bad)).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Invalid, "{bad:?}: {e}");
        let e = store
            .save_part("r", 5, 0, 2, &SaveState::new().attempt(bad))
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Invalid, "{bad:?}: {e}");
    }
    let e = store
        .save("r", 5, &SaveState::new().attempt("a1"))
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Invalid, "{e}");
    assert!(e.to_string().contains("only a part"), "{e}");

    // Step 6: every rank of "c1" saved, its commit never ran, and the
    // flush daemon committed c1 on the remote from the uploaded parts
    // (recorded by its upload marker). Committing another attempt here
    // would make the tiers disagree: refused, naming the remote.
    save_half(&store, 6, 0, Some("c1"), 80);
    save_half(&store, 6, 1, Some("c1"), 80);
    store.mark_uploaded("r", 6, "s3://bkt/p").unwrap();
    save_half(&store, 6, 0, Some("c2"), 90);
    save_half(&store, 6, 1, Some("c2"), 90);
    match store.commit_attempt("r", 6, 2, Some("c2")).unwrap_err() {
        e @ Error::CommittedRemotely { .. } => {
            assert_eq!(e.kind(), ErrorKind::AlreadyExists);
            assert!(e.to_string().contains("s3://bkt/p"), "{e}");
        }
        e => panic!("expected the remote record to stand, got {e}"),
    }
    assert!(!store.steps("r").unwrap().contains(&6));

    // Collection: the abandoned attempts' parts of the committed steps go
    // once past the grace, with the chunks only they held; the committed
    // steps read as before and verify.
    let grace = Duration::from_secs(2 * 3600);
    let g = store.gc(grace, false).unwrap();
    assert_eq!(g.parts_removed, 0, "younger than the grace: {g:?}");
    clock.advance(Duration::from_secs(3 * 3600));
    let g = store.gc(grace, false).unwrap();
    // a1 of step 1 and 2, x1's two parts of step 3; and whole pending
    // steps: step 6 (its upload marker says the remote holds it) and the
    // one part of step 4, which step 6 supersedes.
    assert_eq!(g.parts_removed, 4 + 4 + 1, "{g:?}");
    assert!(store.pending_steps("r").unwrap().is_empty());
    assert!(g.chunks_deleted >= 1, "{g:?}");
    assert_eq!(store.parts("r", 1).unwrap().len(), 2);
    assert_eq!(store.parts("r", 3).unwrap().len(), 2);
    assert_eq!(w(&store, 1), halves(20));
    assert_eq!(w(&store, 2), halves(40));
    assert_eq!(w(&store, 3), halves(60));
    let v = store.verify(None, None).unwrap();
    assert!(v.problems.is_empty(), "{:?}", v.problems);
}

#[test]
fn retried_identical_part_and_v1_checkpoints_still_read() {
    let dir = tempfile::tempdir().unwrap();
    let store = new_store(dir.path());
    let model = model();
    // Rank 3 saves twice with the same contents: two files, one part.
    save_ranks(&store, "r", 1, 8, &model);
    let st = rank_state(&model, 3);
    std::thread::sleep(Duration::from_millis(5));
    store
        .save_part("r", 1, 3, 8, &st.view())
        .unwrap()
        .wait()
        .unwrap();
    let parts = store.parts("r", 1).unwrap();
    assert_eq!(parts.iter().filter(|p| p.rank == 3).count(), 2, "{parts:?}");
    let rep = store.commit("r", 1, 8).unwrap();
    assert_eq!(rep.parts, 9);
    // A single-process save still writes format v1, readable as before,
    // and its tensors serve regions too.
    let g = &model[0];
    let s = SaveState::new().tensor(g.name, g.dtype, &g.shape, &g.data);
    store.save("r", 2, &s).unwrap().wait().unwrap();
    let raw = std::fs::read(
        dir.path()
            .join("runs/r/00000000000000000002/manifest.cairn"),
    )
    .unwrap();
    assert_eq!(&raw[8..10], &1u16.to_le_bytes());
    let m = store.manifest("r", 2).unwrap();
    assert_eq!((m.format_version, m.world_size), (1, None));
    let (off, shape) = (vec![10, 5], vec![20, 30]);
    let mut out = vec![0u8; 20 * 30 * 4];
    store
        .restore_region("r", StepSel::Step(2), g.name, &off, &shape, &mut out)
        .unwrap();
    assert!(out == slice(&g.data, &g.shape, 4, &off, &shape));
    assert_eq!(store.steps("r").unwrap(), vec![1, 2]);
    // Saving a committed step as a part is refused.
    assert_eq!(
        store
            .save_part("r", 2, 0, 1, &st.view())
            .unwrap_err()
            .kind(),
        ErrorKind::AlreadyExists
    );
}

/// Write a part manifest by hand (as `save_part` would publish it).
fn write_part(dir: &Path, run: &str, step: u64, m: &cairn::Manifest) {
    let bytes = cairn::format::manifest::encode_manifest(m).unwrap();
    let p = m.part.clone().unwrap();
    let parts = dir.join(format!("runs/{run}/{step:020}/parts"));
    std::fs::create_dir_all(&parts).unwrap();
    let name = format!(
        "{}-of-{}.{}.cairn",
        p.rank,
        p.world_size,
        blake3_hex(&bytes)
    );
    std::fs::write(parts.join(name), bytes).unwrap();
}

fn blake3_hex(b: &[u8]) -> String {
    // The file name only needs to be unique and 64 hex digits.
    let mut h: [u64; 4] = [
        0xcbf29ce484222325,
        0x100000001b3,
        0x9e3779b97f4a7c15,
        0x7f4a7c159e3779b9,
    ];
    for (i, &x) in b.iter().enumerate() {
        let k = i % 4;
        h[k] = (h[k] ^ x as u64).wrapping_mul(0x100000001b3).rotate_left(7);
    }
    h.iter().map(|v| format!("{v:016x}")).collect()
}

/// Save one `[n, cols]` U8 tensor in one chunk (a checkpoint of run
/// `base`, which keeps the chunk stored), then write `n` part manifests by
/// hand, rank `r` holding row `r` as a slice of that chunk. Returns the
/// tensor's bytes.
fn write_row_parts(store: &Store, dir: &Path, run: &str, step: u64, n: u64, cols: u64) -> Vec<u8> {
    let data = gen_bytes("rows", (n * cols) as usize);
    let s = SaveState::new().tensor("all", DType::U8, &[n, cols], &data);
    store.save("base", step, &s).unwrap().wait().unwrap();
    let base = store.manifest("base", step).unwrap();
    let c = base.tensors[0].chunks[0];
    assert_eq!(base.tensors[0].chunks.len(), 1);
    for r in 0..n {
        let m = cairn::Manifest {
            format_version: 2,
            run: run.into(),
            step,
            created_unix_ms: 0,
            chunk_size: 1 << 20,
            tensors: vec![cairn::TensorEntry {
                name: "w".into(),
                dtype: DType::U8,
                shape: vec![1, cols],
                len: cols,
                shard: Some(ShardInfo {
                    global_shape: vec![n, cols],
                    offsets: vec![r, 0],
                }),
                chunks: vec![cairn::ChunkRef {
                    id: c.id,
                    chunk_len: c.chunk_len,
                    offset: r * cols,
                    len: cols,
                }],
            }],
            blobs: vec![],
            metadata: serde_json::Value::Null,
            metrics: Default::default(),
            part: Some(cairn::PartInfo {
                rank: r as u32,
                world_size: n as u32,
                attempt: None,
            }),
            world_size: None,
            sharded: vec![],
            attempt: None,
        };
        write_part(dir, run, step, &m);
    }
    data
}

#[test]
fn ten_thousand_shards_commit_and_plan() {
    const N: u64 = 10_000;
    const COLS: u64 = 64;
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(
        dir.path(),
        StoreOptions {
            chunk_size: 1 << 20,
            staging_bytes: 4 << 20,
            ..StoreOptions::default()
        },
    )
    .unwrap();
    // One stored chunk holds every row; 10,000 parts each reference one
    // row of it as their shard of a [10000, 64] tensor.
    let data = write_row_parts(&store, dir.path(), "big", 1, N, COLS);
    let t = Instant::now();
    let rep = store.commit("big", 1, N as u32).unwrap();
    let commit_time = t.elapsed();
    assert_eq!((rep.parts, rep.shards), (N as usize, N as usize));
    // 16 ranks' row regions and 16 column regions: each plan walks only
    // the shards it touches.
    let t = Instant::now();
    let mut reads = 0;
    let mut planned = Duration::ZERO;
    for (off, shape) in regions(&[N, COLS], 16) {
        let want = slice(&data, &[N, COLS], 1, &off, &shape);
        let mut out = vec![0u8; want.len()];
        let r = store
            .restore_region("big", StepSel::Step(1), "w", &off, &shape, &mut out)
            .unwrap();
        assert_eq!(r.chunks_read, 1);
        assert!(out == want, "{off:?}+{shape:?}");
        planned += r.planned;
        reads += 1;
    }
    let region_time = t.elapsed();
    // All 16 ranks' row regions in one call: one manifest read, one index,
    // the shared chunk read once.
    let reqs = regions(&[N, COLS], 16);
    let mut bufs: Vec<Vec<u8>> = reqs
        .iter()
        .map(|(_, s)| vec![0u8; (s[0] * s[1]) as usize])
        .collect();
    let mut targets: Vec<cairn::RegionTarget<'_>> = reqs
        .iter()
        .zip(bufs.iter_mut())
        .map(|((o, s), b)| cairn::RegionTarget {
            name: "w",
            offsets: o,
            shape: s,
            out: b,
        })
        .collect();
    let all = store
        .restore_regions("big", StepSel::Step(1), &mut targets)
        .unwrap();
    drop(targets);
    assert_eq!(all.chunks_read, 1);
    for ((o, s), b) in reqs.iter().zip(&bufs) {
        assert!(*b == slice(&data, &[N, COLS], 1, o, s));
    }
    // Small regions anywhere.
    let t = Instant::now();
    for i in 0..200u64 {
        let (off, shape) = (vec![(i * 7919) % (N - 5), i % 60], vec![5, 4]);
        let mut out = vec![0u8; 20];
        store
            .restore_region("big", StepSel::Step(1), "w", &off, &shape, &mut out)
            .unwrap();
        assert!(out == slice(&data, &[N, COLS], 1, &off, &shape));
    }
    let small_time = t.elapsed();
    let mut one = vec![0u8; 20];
    let r = store
        .restore_region("big", StepSel::Step(1), "w", &[5000, 8], &[5, 4], &mut one)
        .unwrap();
    let whole = store
        .restore("big", StepSel::Step(1), &TensorFilter::All)
        .unwrap();
    assert!(whole.tensor("w").unwrap().data == data);
    eprintln!(
        "10,000 shards: commit {commit_time:?}; {reads} regions of 1/16 (rows and columns) {region_time:?}, of which planning {planned:?}; all {} in one call {:?}, planning {:?}; 200 small regions {small_time:?}; one small region planned in {:?} (each call includes reading the manifest and one chunk)",
        reqs.len(),
        all.elapsed,
        all.planned,
        r.planned
    );
}

fn write_state_model(store: &Store, run: &str, step: u64, world: u32, model: &[Global]) {
    save_ranks(store, run, step, world, model);
}

#[test]
fn committers_race_exactly_one_record_wins() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(new_store(dir.path()));
    let model = model();
    write_state_model(&store, "r", 5, 8, &model);
    // Threads.
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let s = store.clone();
            std::thread::spawn(move || s.commit("r", 5, 8))
        })
        .collect();
    let results: Vec<_> = handles
        .into_iter()
        .map(|h| h.join().unwrap().unwrap())
        .collect();
    assert_eq!(results.iter().filter(|r| r.created).count(), 1);
    let record = store.manifest_bytes("r", 5).unwrap();
    // Processes.
    write_state_model(&store, "r", 6, 8, &model);
    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = (0..2)
        .map(|_| {
            Command::new(&exe)
                .args([
                    "sharded_child",
                    "--exact",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env(CHILD_ENV, format!("commit {} r 6 8", dir.path().display()))
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut created = Vec::new();
    for mut c in children {
        let mut out = String::new();
        c.stdout.take().unwrap().read_to_string(&mut out).unwrap();
        assert!(c.wait().unwrap().success(), "{out}");
        // libtest prints the test's name on the same line first.
        let line = out
            .lines()
            .find(|l| l.contains("created "))
            .unwrap_or_else(|| panic!("{out}"));
        created.push(line.ends_with("created true"));
    }
    assert_eq!(created.iter().filter(|c| **c).count(), 1, "{created:?}");
    assert_eq!(store.steps("r").unwrap(), vec![5, 6]);
    // A committer of different bytes for a committed step is refused:
    // rank parts of world size 1 exist too, but step 5 is taken.
    let st = rank_state(&model, 0);
    let one = SaveState::new().tensor("x", DType::U8, &[1], &[7]);
    let _ = st;
    store.save_part("r", 5, 0, 1, &one).unwrap_err();
    // (save_part refuses a committed step; plant a part of another world
    // size by hand to exercise the commit path.)
    let mut m = store
        .part_manifest("r", 5, &store.parts("r", 5).unwrap()[0].file)
        .unwrap();
    m.part = Some(cairn::PartInfo {
        rank: 0,
        world_size: 1,
        attempt: None,
    });
    m.tensors.retain(|t| t.shard.is_none());
    write_part(dir.path(), "r", 5, &m);
    let e = store.commit("r", 5, 1).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::AlreadyExists, "{e}");
    assert_eq!(store.manifest_bytes("r", 5).unwrap(), record);
}

/// Child process body: runs only when re-executed by a test above.
#[test]
fn sharded_child() {
    let Ok(cmd) = std::env::var(CHILD_ENV) else {
        return;
    };
    let args: Vec<&str> = cmd.split(' ').collect();
    match args[0] {
        "commit" => {
            let store = Store::open(args[1], opts()).unwrap();
            let rep = store
                .commit(args[2], args[3].parse().unwrap(), args[4].parse().unwrap())
                .unwrap();
            println!("created {}", rep.created);
        }
        "save" => {
            // Save rank 1 of 2 of a large state slowly (a small staging
            // pool), announcing the start; the parent kills it mid-save.
            let store = Store::open(
                args[1],
                StoreOptions {
                    chunk_size: 64 << 10,
                    staging_bytes: 256 << 10,
                    direct_io: false,
                    ..StoreOptions::default()
                },
            )
            .unwrap();
            let data = big_half(1);
            let s = SaveState::new().shard(
                "w",
                DType::U8,
                &[HALF, 1],
                &data,
                ShardInfo {
                    global_shape: vec![2 * HALF, 1],
                    offsets: vec![HALF, 0],
                },
            );
            println!("saving");
            std::io::stdout().flush().unwrap();
            let h = store.save_part("r", 3, 1, 2, &s).unwrap();
            h.wait().unwrap();
            println!("published");
        }
        other => panic!("unknown child command {other}"),
    }
}

const HALF: u64 = 192 << 20;

fn big_half(rank: u64) -> Vec<u8> {
    let mut v = gen_bytes(&format!("half{rank}"), 1 << 16);
    let n = v.len();
    v.resize(HALF as usize, 0);
    for i in n..HALF as usize {
        v[i] = v[i % n] ^ (i >> 16) as u8;
    }
    v
}

#[test]
fn a_rank_killed_before_publishing_leaves_the_step_invisible() {
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut child = Command::new(&exe)
        .args([
            "sharded_child",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, format!("save {}", dir.path().display()))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    loop {
        let l = lines.next().expect("child announces its save").unwrap();
        if l.ends_with("saving") {
            break;
        }
    }
    std::thread::sleep(Duration::from_millis(100));
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let rest: Vec<String> = lines.map_while(|l| l.ok()).collect();
    assert!(
        !rest.iter().any(|l| l.contains("published")),
        "the kill came too late: {rest:?}"
    );
    let store = Store::open(
        dir.path(),
        StoreOptions {
            chunk_size: 64 << 10,
            staging_bytes: 8 << 20,
            ..StoreOptions::default()
        },
    )
    .unwrap();
    // Rank 0 publishes; rank 1 died: nothing is visible, commit names it.
    let d0 = big_half(0);
    let info = |o| ShardInfo {
        global_shape: vec![2 * HALF, 1],
        offsets: vec![o, 0],
    };
    let s0 = SaveState::new().shard("w", DType::U8, &[HALF, 1], &d0, info(0));
    store.save_part("r", 3, 0, 2, &s0).unwrap().wait().unwrap();
    assert!(store.parts("r", 3).unwrap().iter().all(|p| p.rank == 0));
    assert!(store.steps("r").unwrap().is_empty());
    match store.commit("r", 3, 2).unwrap_err() {
        Error::MissingRank {
            rank: 1,
            world_size: 2,
            ..
        } => {}
        e => panic!("expected rank 1 missing, got {e}"),
    }
    // The re-save of rank 1 succeeds and the step commits whole.
    let d1 = big_half(1);
    let s1 = SaveState::new().shard("w", DType::U8, &[HALF, 1], &d1, info(HALF));
    store.save_part("r", 3, 1, 2, &s1).unwrap().wait().unwrap();
    store.commit("r", 3, 2).unwrap();
    let mut out = vec![0u8; 4 << 20];
    let off = HALF - (2 << 20);
    store
        .restore_region(
            "r",
            StepSel::Latest,
            "w",
            &[off, 0],
            &[4 << 20, 1],
            &mut out,
        )
        .unwrap();
    assert!(out[..2 << 20] == d0[off as usize..]);
    assert!(out[2 << 20..] == d1[..2 << 20]);
}

#[test]
fn a_committer_killed_mid_commit_leaves_all_or_nothing() {
    const N: u64 = 3000;
    const COLS: u64 = 64;
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(
        dir.path(),
        StoreOptions {
            chunk_size: 1 << 20,
            staging_bytes: 4 << 20,
            ..StoreOptions::default()
        },
    )
    .unwrap();
    let data = write_row_parts(&store, dir.path(), "c", 1, N, COLS);
    let exe = std::env::current_exe().unwrap();
    let mut invisible = 0;
    for delay_ms in [0u64, 10, 30, 60, 100, 150, 250, 400] {
        if store.steps("c").unwrap().contains(&1) {
            break;
        }
        let mut child = Command::new(&exe)
            .args([
                "sharded_child",
                "--exact",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(
                CHILD_ENV,
                format!("commit {} c 1 {N}", dir.path().display()),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        if store.steps("c").unwrap().contains(&1) {
            // Published whole.
            let mut out = vec![0u8; (COLS * 3) as usize];
            store
                .restore_region("c", StepSel::Step(1), "w", &[7, 0], &[3, COLS], &mut out)
                .unwrap();
            assert!(out == data[(7 * COLS) as usize..(10 * COLS) as usize]);
        } else {
            invisible += 1;
            let e = store
                .restore("c", StepSel::Step(1), &TensorFilter::All)
                .unwrap_err();
            assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
            assert_eq!(store.pending_steps("c").unwrap(), vec![1]);
        }
    }
    eprintln!("committer killed: step invisible after {invisible} kill(s)");
    // Whatever the kills left, committing again succeeds and the record is
    // whole.
    store.commit("c", 1, N as u32).unwrap();
    let all = store
        .restore("c", StepSel::Step(1), &TensorFilter::All)
        .unwrap();
    assert!(all.tensor("w").unwrap().data == data);
}

#[test]
fn gc_keeps_pending_parts_and_collects_orphans_after_the_grace() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = new_store(dir.path());
    let clock = ManualClock::new();
    store.set_clock(Arc::new(clock.clone()));
    let model = model();
    save_ranks(&store, "r", 1, 8, &model);
    // Collection with grace 0 between the parts and the record: nothing
    // the parts need goes.
    let g = store.gc(Duration::ZERO, false).unwrap();
    assert_eq!((g.chunks_deleted, g.parts_removed), (0, 0), "{g:?}");
    clock.advance(Duration::from_secs(1800));
    let g = store.gc(Duration::ZERO, false).unwrap();
    assert_eq!((g.chunks_deleted, g.parts_removed), (0, 0), "{g:?}");
    store.commit("r", 1, 8).unwrap();
    let all = store
        .restore("r", StepSel::Latest, &TensorFilter::All)
        .unwrap();
    for g in &model {
        assert!(all.tensor(g.name).unwrap().data == g.data, "{}", g.name);
    }
    // An orphan: step 2 saved by rank 0 of 2 only, never committed.
    let orphan = RankState {
        tensors: vec![part("o", DType::F32, &[64, 64], &[0, 0], &[32, 64])],
        blobs: vec![],
        rank: 0,
    };
    store
        .save_part("r", 2, 0, 2, &orphan.view())
        .unwrap()
        .wait()
        .unwrap();
    let grace = Duration::from_secs(2 * 3600);
    let g = store.gc(grace, false).unwrap();
    assert_eq!(g.parts_removed, 0);
    clock.advance(Duration::from_secs(3600));
    let g = store.gc(grace, false).unwrap();
    assert_eq!(g.parts_removed, 0, "younger than the grace");
    assert_eq!(store.pending_steps("r").unwrap(), vec![2]);
    clock.advance(Duration::from_secs(2 * 3600));
    // Past the grace, but the newest step of the run and not recorded as
    // uploaded: it may be a save still waiting to be drained, so it stays.
    let g = store.gc(grace, false).unwrap();
    assert_eq!((g.parts_removed, g.pending_parts_kept), (0, 1), "{g:?}");
    // Step 4 completes: the orphan is superseded.
    save_ranks(&store, "r", 4, 8, &model);
    store.commit("r", 4, 8).unwrap();
    let dry = store.gc(grace, true).unwrap();
    assert_eq!(dry.parts_removed, 1);
    assert_eq!(store.pending_steps("r").unwrap(), vec![2]);
    let g = store.gc(grace, false).unwrap();
    assert_eq!(g.parts_removed, 1, "{g:?}");
    assert!(
        g.chunks_deleted >= 1,
        "the orphan's chunk goes with it: {g:?}"
    );
    assert!(store.pending_steps("r").unwrap().is_empty());
    // A step directory whose rank died between creating `parts/` and
    // publishing its part holds no part: a leftover like any other.
    let empty = dir.path().join("runs/r/00000000000000000003/parts");
    std::fs::create_dir_all(&empty).unwrap();
    let g = store.gc(Duration::ZERO, false).unwrap();
    assert_eq!(g.leftovers_removed, 1, "{g:?}");
    assert!(!empty.exists());
    // The committed step is untouched and its parts stay (they are roots).
    assert_eq!(store.parts("r", 1).unwrap().len(), 8);
    let v = store.verify(None, None).unwrap();
    assert!(v.problems.is_empty(), "{:?}", v.problems);
    let again = store
        .restore("r", StepSel::Latest, &TensorFilter::All)
        .unwrap();
    assert!(again.tensor("big.w").unwrap().data == model[1].data);
}

// ---- the loopback S3 server (copied from tests/common/s3.rs) ----

/// A node saves its ranks' parts (ranks 0..4 of 8) and its daemon cannot
/// reach the object store: past the grace, those parts are still the only
/// copy of those ranks' state. A collection keeps them until the step is
/// recorded uploaded, or a newer step of the run is complete; then they
/// go, with the chunks only they referenced.
#[test]
fn gc_keeps_undrained_pending_parts_past_the_grace() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = new_store(dir.path());
    let clock = ManualClock::new();
    store.set_clock(Arc::new(clock.clone()));
    let model = model();
    let save_node_a = |step: u64| {
        for r in 0..4u32 {
            let st = rank_state(&model, r);
            store
                .save_part("r", step, r, 8, &st.view())
                .unwrap()
                .wait()
                .unwrap();
        }
    };
    save_node_a(5);
    save_node_a(6);
    let grace = Duration::from_secs(2 * 3600);
    clock.advance(Duration::from_secs(3 * 3600));
    let g = store.gc(grace, false).unwrap();
    assert_eq!((g.parts_removed, g.chunks_deleted), (0, 0), "{g:?}");
    assert_eq!(g.pending_parts_kept, 8, "{g:?}");
    assert_eq!(store.pending_steps("r").unwrap(), vec![5, 6]);
    // A dry run says the same.
    let dry = store.gc(grace, true).unwrap();
    assert_eq!((dry.parts_removed, dry.pending_parts_kept), (0, 8));

    // Step 5 recorded as uploaded (the remote holds its record): the
    // parts here are redundant and go once past the grace.
    store.mark_uploaded("r", 5, "s3://bucket/ckpt").unwrap();
    let g = store.gc(grace, false).unwrap();
    assert_eq!((g.parts_removed, g.pending_parts_kept), (4, 4), "{g:?}");
    assert_eq!(store.pending_steps("r").unwrap(), vec![6]);

    // Step 6 was kept whole: the other node's ranks arrive, the commit
    // succeeds, and every tensor restores bit-exact.
    for r in 4..8u32 {
        let st = rank_state(&model, r);
        store
            .save_part("r", 6, r, 8, &st.view())
            .unwrap()
            .wait()
            .unwrap();
    }
    store.commit("r", 6, 8).unwrap();
    let all = store
        .restore("r", StepSel::Step(6), &TensorFilter::All)
        .unwrap();
    for g in &model {
        assert!(all.tensor(g.name).unwrap().data == g.data, "{}", g.name);
    }

    // Step 7: node A's parts only, past the grace, the newest step: kept.
    save_node_a(7);
    clock.advance(Duration::from_secs(3 * 3600));
    let g = store.gc(grace, false).unwrap();
    assert_eq!((g.parts_removed, g.pending_parts_kept), (0, 4), "{g:?}");
    // Step 8 completes: step 7 is superseded and goes; 6 and 8 stay whole.
    save_ranks(&store, "r", 8, 8, &model);
    store.commit("r", 8, 8).unwrap();
    let g = store.gc(grace, false).unwrap();
    assert_eq!((g.parts_removed, g.pending_parts_kept), (4, 0), "{g:?}");
    assert!(store.pending_steps("r").unwrap().is_empty());
    let v = store.verify(None, None).unwrap();
    assert!(v.problems.is_empty(), "{:?}", v.problems);
    for step in [6, 8] {
        let all = store
            .restore("r", StepSel::Step(step), &TensorFilter::All)
            .unwrap();
        for g in &model {
            assert!(all.tensor(g.name).unwrap().data == g.data, "{}", g.name);
        }
    }
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

fn s3_remote(tag: &str) -> RemoteStore {
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
    RemoteStore::open(
        &format!("s3://{name}/ckpt"),
        &s3_options(),
        RemoteOptions::default(),
    )
    .unwrap()
}

#[test]
fn sharded_step_through_s3_and_the_tiered_source() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = new_store(dir.path());
    let remote = s3_remote("sharded");
    let model = model();
    save_ranks(&store, "r", 4, 8, &model);
    store.commit("r", 4, 8).unwrap();
    store.attach_remote(remote.clone());
    let up = store.upload("r", 4).unwrap();
    let m = store.manifest("r", 4).unwrap();
    assert!(up.chunks_uploaded as usize >= 1);
    // The remote alone serves regions.
    let big = &model[1];
    let (off, shape) = (vec![100, 50], vec![600, 150]);
    let want = slice(&big.data, &big.shape, 4, &off, &shape);
    let mut out = vec![0u8; want.len()];
    remote
        .restore_region("r", StepSel::Latest, big.name, &off, &shape, &mut out)
        .unwrap();
    assert!(out == want);
    // A node lacking chunks fetches them from the remote through the
    // tiered source, and repairs its local tier.
    let mut removed = 0;
    let mut ids: BTreeMap<String, ()> = BTreeMap::new();
    for t in &m.sharded {
        if t.name == big.name {
            for s in &t.shards {
                for c in &s.chunks {
                    ids.insert(c.id.to_string(), ());
                }
            }
        }
    }
    for id in ids.keys() {
        let p = store.chunk_path(&id.parse().unwrap());
        if std::fs::remove_file(p).is_ok() {
            removed += 1;
        }
    }
    assert!(removed > 1);
    let mut out = vec![0u8; want.len()];
    let r = store
        .restore_region("r", StepSel::Latest, big.name, &off, &shape, &mut out)
        .unwrap();
    assert!(out == want);
    assert!(r.repaired >= 1, "{r:?}");
    // The remote copy restores whole, assembled.
    let all = remote
        .restore("r", StepSel::Latest, &TensorFilter::All)
        .unwrap();
    for g in &model {
        assert!(all.tensor(g.name).unwrap().data == g.data, "{}", g.name);
    }
}

#[test]
fn nodes_upload_their_parts_and_the_last_commits_the_remote_record() {
    // Uploads and collections here use a one-minute grace (the first
    // upload records it at the remote).
    let remote = RemoteStore::open(
        s3_remote("nodes").url(),
        &s3_options(),
        RemoteOptions {
            gc_grace: Duration::from_secs(60),
            ..RemoteOptions::default()
        },
    )
    .unwrap();
    let model = model();
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (node_a, node_b) = (new_store(da.path()), new_store(db.path()));
    // Two nodes, four ranks each, each with its own local store.
    for r in 0..8u32 {
        let node = if r < 4 { &node_a } else { &node_b };
        let st = rank_state(&model, r);
        node.save_part("r", 7, r, 8, &st.view())
            .unwrap()
            .wait()
            .unwrap();
    }
    let up_a = node_a.upload_parts(&remote, "r", 7, 8).unwrap();
    assert_eq!(up_a.parts, 4);
    assert!(up_a.chunks_uploaded > 0);
    assert!(up_a.committed.is_none(), "ranks 4..8 are not uploaded yet");
    assert!(cairn::ChunkTier::steps(&remote, "r").unwrap().is_empty());
    assert_eq!(remote.parts("r", 7).unwrap().len(), 4);
    // A remote collection between the parts and the record, its clock 30
    // minutes on: the parts' chunks are past a 60 s grace but are roots.
    let clock = ManualClock::new();
    clock.advance(Duration::from_secs(1800));
    let gc_remote = remote.clone().with_clock(Arc::new(clock.clone()));
    let g = gc_remote.gc(Duration::from_secs(60), false).unwrap();
    assert_eq!((g.chunks_deleted, g.parts_removed), (0, 0), "{g:?}");
    // The last node to upload finds every part and commits the record.
    let up_b = node_b.upload_parts(&remote, "r", 7, 8).unwrap();
    let c = up_b.committed.expect("node B commits");
    assert!(c.created);
    assert_eq!(c.parts, 8);
    // Node A retrying finds the identical record: success, not created.
    let again = node_a.upload_parts(&remote, "r", 7, 8).unwrap();
    assert!(!again.committed.unwrap().created);
    assert_eq!(cairn::ChunkTier::steps(&remote, "r").unwrap(), vec![7]);
    // Any world size restores its regions from the remote alone.
    for g in &model {
        for (off, shape) in regions(&g.shape, 3) {
            let want = slice(&g.data, &g.shape, g.dtype.size(), &off, &shape);
            let mut out = vec![0u8; want.len()];
            remote
                .restore_region("r", StepSel::Step(7), g.name, &off, &shape, &mut out)
                .unwrap();
            assert!(out == want, "{} {off:?}+{shape:?}", g.name);
        }
    }
    // A step that never commits: node A's parts only. Its remote parts
    // go once older than the grace (at least an hour), not before.
    for r in 0..4u32 {
        let st = rank_state(&model, r);
        node_a
            .save_part("r", 8, r, 8, &st.view())
            .unwrap()
            .wait()
            .unwrap();
    }
    assert!(node_a
        .upload_parts(&remote, "r", 8, 8)
        .unwrap()
        .committed
        .is_none());
    let g = gc_remote.gc(Duration::from_secs(60), false).unwrap();
    assert_eq!(g.parts_removed, 0, "{g:?}");
    clock.advance(Duration::from_secs(2 * 3600));
    let g = gc_remote.gc(Duration::from_secs(60), false).unwrap();
    assert_eq!(g.parts_removed, 4, "{g:?}");
    assert!(remote.parts("r", 8).unwrap().is_empty());
    // The committed step still restores whole.
    let all = remote
        .restore("r", StepSel::Step(7), &TensorFilter::All)
        .unwrap();
    for g in &model {
        assert!(all.tensor(g.name).unwrap().data == g.data, "{}", g.name);
    }
}
