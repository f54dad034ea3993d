//! `cairn export` and `cairn import`: safetensors files in and out.

use super::open::{open, print_json, progress};
use super::size::human;
use cairn::glob_match;
use cairn::safetensors::{
    check_output_path, open_regular, parse_header, write_pending, MAX_HEADER,
};
use cairn::{DType, Error, SaveState, StepSel, Store, StoreOptions, TensorFilter};
use serde::Serialize;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Serialize)]
struct ExportReport {
    run: String,
    step: u64,
    files: Vec<PathBuf>,
    index: Option<PathBuf>,
    tensors: usize,
    bytes: u64,
    /// An older single-file export removed from the output directory.
    removed: Option<PathBuf>,
}

/// Most bytes of tensors held at once while a shard is written: its
/// tensors are restored in batches of at most this many bytes (a larger
/// tensor is a batch of its own), so an export's memory follows the batch
/// and the largest tensor, not `--max-shard-size`.
const EXPORT_BATCH: u64 = 32 << 20;

/// A tensor to export: a plain one, or a sharded one at its global shape.
struct Exported {
    name: String,
    dtype: DType,
    shape: Vec<u64>,
    len: u64,
}

#[allow(clippy::too_many_arguments)]
pub fn export(
    location: &str,
    run: &str,
    step: StepSel,
    out: &Path,
    max_shard: u64,
    glob: Option<&str>,
    json: bool,
    raw_opts: &[String],
) -> cairn::Result<i32> {
    check_outside_stores(out)?;
    let tier = open(location, raw_opts)?;
    let step = tier.resolve(run, step)?;
    let m = tier.manifest(run, step)?;
    // Plain tensors, and the global tensors of a sharded step (restore
    // assembles them from their shards).
    let tensors: Vec<Exported> = m
        .tensors
        .iter()
        .map(|t| Exported {
            name: t.name.clone(),
            dtype: t.dtype,
            shape: t.shape.clone(),
            len: t.len,
        })
        .chain(m.sharded.iter().map(|t| Exported {
            name: t.name.clone(),
            dtype: t.dtype,
            shape: t.shape.clone(),
            len: t.shape.iter().product::<u64>() * t.dtype.size() as u64,
        }))
        .filter(|t| glob.is_none_or(|g| glob_match(g, &t.name)))
        .collect();
    if tensors.is_empty() {
        return Err(Error::NotFound {
            what: format!("tensors to export in run {run} step {step}"),
        });
    }
    // Refused before anything is written, sharded exports included.
    if let Some(t) = tensors
        .iter()
        .find(|t| t.name == cairn::safetensors::METADATA_KEY)
    {
        return Err(Error::invalid(
            format!("tensor {:?} of run {run} step {step}", t.name),
            "safetensors reserves that name for the file's metadata; export the other tensors with --tensor GLOB",
        ));
    }
    // Greedy shards of at most max_shard bytes (a larger tensor gets its own).
    let mut shards: Vec<Vec<usize>> = vec![Vec::new()];
    let mut fill = 0u64;
    for (i, t) in tensors.iter().enumerate() {
        if fill > 0 && fill + t.len > max_shard {
            shards.push(Vec::new());
            fill = 0;
        }
        if let Some(s) = shards.last_mut() {
            s.push(i);
        }
        fill += t.len;
    }
    let total: u64 = tensors.iter().map(|t| t.len).sum();
    let metadata = BTreeMap::from([
        ("format".to_string(), "pt".to_string()),
        ("cairn_run".to_string(), run.to_string()),
        ("cairn_step".to_string(), step.to_string()),
    ]);
    let sharded = shards.len() > 1;
    // `--out new/` names a directory to make, as an existing one would.
    let names_dir = std::os::unix::ffi::OsStrExt::as_bytes(out.as_os_str()).ends_with(b"/");
    let (dir, single) = if sharded || names_dir || out.is_dir() {
        std::fs::create_dir_all(out).map_err(|e| Error::io("create directory", out, e))?;
        (out.to_path_buf(), out.join("model.safetensors"))
    } else {
        (parent_dir(out).to_path_buf(), out.to_path_buf())
    };
    let paths: Vec<PathBuf> = (0..shards.len())
        .map(|k| {
            if sharded {
                dir.join(format!(
                    "model-{:05}-of-{:05}.safetensors",
                    k + 1,
                    shards.len()
                ))
            } else {
                single.clone()
            }
        })
        .collect();
    let index_path = dir.join("model.safetensors.index.json");
    // Refuse before writing anything if an output path is not a regular
    // file (a device, FIFO, directory or symbolic link is never replaced).
    for p in &paths {
        check_output_path(p)?;
    }
    let stale = if sharded {
        check_output_path(&index_path)?;
        stale_single_file(&single)?
    } else {
        None
    };
    if sharded {
        // Each shard is held open until all are written.
        ensure_open_files(paths.len() as u64 + 64, max_shard)?;
    }
    let mut tensors_only = m;
    tensors_only.blobs.clear();
    let pb = progress(total, &format!("export {run}/{step}"));
    // Every shard is written and fsynced before any is put in place, so an
    // export that fails part-way leaves an earlier export in the directory
    // whole, not shards of two steps under one index.
    let mut written = Vec::new();
    let mut weight_map = BTreeMap::new();
    for (shard, path) in shards.iter().zip(&paths) {
        let path = path.clone();
        let names: Vec<String> = shard.iter().map(|&i| tensors[i].name.clone()).collect();
        let header: Vec<(String, DType, Vec<u64>)> = shard
            .iter()
            .map(|&i| {
                (
                    tensors[i].name.clone(),
                    tensors[i].dtype,
                    tensors[i].shape.clone(),
                )
            })
            .collect();
        // The shard's tensors are restored in batches as the file is
        // written, each tensor dropped once written, from the manifest read
        // above (blobs left out: a safetensors file holds none).
        let mut batch: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        let pending = write_pending(&path, &header, &metadata, |i, w: &mut dyn Write| {
            let name = &header[i].0;
            if !batch.contains_key(name) {
                let mut picked = vec![name.clone()];
                let mut bytes = tensors[shard[i]].len;
                for &k in &shard[i + 1..] {
                    if bytes + tensors[k].len > EXPORT_BATCH {
                        break;
                    }
                    picked.push(tensors[k].name.clone());
                    bytes += tensors[k].len;
                }
                let want = TensorFilter::names(picked);
                batch = tier
                    .restore_from_manifest(tensors_only.clone(), &want)?
                    .tensors
                    .into_iter()
                    .map(|t| (t.name, t.data))
                    .collect();
            }
            let data = batch.remove(name).ok_or_else(|| {
                Error::Internal(format!("tensor {name} was not restored for export"))
            })?;
            pb.inc(data.len() as u64);
            w.write_all(&data)
                .map_err(|e| Error::io("write safetensors", &path, e))
        })?;
        for n in names {
            weight_map.insert(
                n,
                path.file_name()
                    .map(|f| f.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            );
        }
        written.push(pending);
    }
    pb.finish_and_clear();
    if let Some(old) = &stale {
        // Loaders prefer model.safetensors over an index: remove the older
        // single-file export before the new index is published.
        cairn::safetensors::remove_durably(old)?;
    }
    if sharded && std::fs::symlink_metadata(&index_path).is_ok_and(|m| m.is_file()) {
        // The older index goes before its shards are replaced: a crash
        // while they are renamed leaves shards without an index, which no
        // loader takes for a model, rather than an index over two steps.
        cairn::safetensors::remove_durably(&index_path)?;
    }
    let mut files = Vec::with_capacity(written.len());
    for w in written {
        files.push(w.path().to_path_buf());
        w.publish()?;
    }
    let index = if sharded {
        let idx = index_path;
        let body = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        let bytes = serde_json::to_vec_pretty(&body).map_err(|e| Error::Internal(e.to_string()))?;
        cairn::safetensors::publish_index(&dir, &idx, &bytes)?;
        Some(idx)
    } else {
        None
    };
    let report = ExportReport {
        run: run.to_string(),
        step,
        files,
        index,
        tensors: tensors.len(),
        bytes: total,
        removed: stale,
    };
    if json {
        print_json(&report)?;
    } else {
        outln!(
            "exported {} tensors ({}) of run {run} step {step} to {} file(s){}",
            report.tensors,
            human(total),
            report.files.len(),
            report
                .index
                .as_ref()
                .map(|i| format!(", index {}", i.display()))
                .unwrap_or_default()
        );
    }
    Ok(0)
}

/// Make room for `need` open files in this process (a sharded export
/// holds every shard open until all are written): the soft limit is raised
/// towards the hard one where it is lower; where even that is too low the
/// export is refused before anything is written.
fn ensure_open_files(need: u64, max_shard: u64) -> cairn::Result<()> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 || lim.rlim_cur >= need {
        return Ok(());
    }
    if lim.rlim_max >= need {
        let raised = libc::rlimit {
            rlim_cur: need,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit reads the struct it is given.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            return Ok(());
        }
    }
    Err(Error::invalid(
        "--max-shard-size",
        format!(
            "{max_shard} bytes makes {} shards, more files than this process may hold open \
             (limit {}); raise --max-shard-size or the open-file limit (ulimit -n)",
            need - 64,
            lim.rlim_max
        ),
    ))
}

/// Refuse an output among a cairn store's own files (the source's or any
/// other's): its marker, lock, `runs/`, `chunks/`, `tmp/` and the remote
/// layout's entries. An export there could replace a manifest, a chunk or
/// the marker. Elsewhere in a store's directory (beside those entries, or
/// the directory itself) is allowed. Resolved from the output's nearest
/// existing ancestor, so relative paths and symbolic links are seen
/// through.
fn check_outside_stores(out: &Path) -> cairn::Result<()> {
    match cairn::enclosing_store(out)? {
        Some(store) => Err(Error::invalid(
            format!("output {}", out.display()),
            format!(
                "is inside the cairn store at {}, among its own files; an export there could replace them, so write it elsewhere",
                store.display()
            ),
        )),
        None => Ok(()),
    }
}

/// Before a sharded export into `single`'s directory: an older
/// `model.safetensors` there, which loaders would prefer over the new index.
/// A regular file that cairn wrote (its metadata names a `cairn_run`) is
/// returned, to be removed once the shards are written; anything else there
/// is refused, untouched.
fn stale_single_file(single: &Path) -> cairn::Result<Option<PathBuf>> {
    use std::io::Read;
    match std::fs::symlink_metadata(single) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io("stat", single, e)),
        Ok(_) => {}
    }
    let refuse = |why: &str| {
        Error::invalid(
            format!("output directory entry {}", single.display()),
            format!(
                "{why}; loaders would prefer it over the sharded export's index, so remove it first"
            ),
        )
    };
    check_output_path(single).map_err(|_| refuse("is not a regular file"))?;
    let f = open_regular(single, "safetensors file")?;
    let file_len = f
        .metadata()
        .map_err(|e| Error::io("stat", single, e))?
        .len();
    let mut head = Vec::new();
    f.take(8 + MAX_HEADER)
        .read_to_end(&mut head)
        .map_err(|e| Error::io("read", single, e))?;
    let n = head
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()))
        .unwrap_or(0);
    head.truncate((8 + n.min(MAX_HEADER)) as usize);
    match parse_header(&head, file_len, single) {
        Ok(h) if h.metadata.contains_key("cairn_run") => Ok(Some(single.to_path_buf())),
        _ => Err(refuse("was not written by cairn export")),
    }
}

/// Largest index file read (an index lists names only).
const MAX_INDEX: u64 = 100_000_000;

/// Files named by an import argument, with the tensors each must hold: one
/// safetensors file (`None`: whatever it holds), or every shard of an index
/// with the names its `weight_map` gives it.
#[allow(clippy::type_complexity)]
fn import_files(input: &Path) -> cairn::Result<Vec<(PathBuf, Option<Vec<String>>)>> {
    use std::io::Read;
    if input.extension().is_some_and(|e| e == "json") {
        let mut text = String::new();
        open_regular(input, "index")?
            .take(MAX_INDEX + 1)
            .read_to_string(&mut text)
            .map_err(|e| Error::io("read index", input, e))?;
        if text.len() as u64 > MAX_INDEX {
            return Err(Error::invalid(
                format!("index {}", input.display()),
                format!("larger than {MAX_INDEX} bytes"),
            ));
        }
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::invalid(format!("index {}", input.display()), e.to_string()))?;
        let map = v["weight_map"].as_object().ok_or_else(|| {
            Error::invalid(format!("index {}", input.display()), "no weight_map object")
        })?;
        let dir = parent_dir(input);
        let mut files: Vec<PathBuf> = Vec::new();
        let mut names: BTreeMap<PathBuf, Vec<String>> = BTreeMap::new();
        for (tensor, f) in map {
            let name = f.as_str().unwrap_or("");
            if name.is_empty() || name.contains('/') || name.contains("..") {
                return Err(Error::invalid(
                    format!("index {}", input.display()),
                    format!("shard file name {f} must be a plain file name"),
                ));
            }
            let p = dir.join(name);
            names.entry(p.clone()).or_default().push(tensor.clone());
        }
        files.extend(names.keys().cloned());
        Ok(files
            .into_iter()
            .map(|f| {
                let n = names.remove(&f);
                (f, n)
            })
            .collect())
    } else {
        Ok(vec![(input.to_path_buf(), None)])
    }
}

/// Check that shard `file` holds exactly the tensors the index maps to it.
fn check_against_index(
    index: &Path,
    file: &Path,
    expected: &[String],
    header: &cairn::safetensors::StHeader,
) -> cairn::Result<()> {
    let bad = |reason: String| Error::invalid(format!("index {}", index.display()), reason);
    let held: std::collections::HashSet<&str> =
        header.tensors.iter().map(|t| t.name.as_str()).collect();
    for n in expected {
        if !held.contains(n.as_str()) {
            return Err(bad(format!(
                "weight_map puts tensor {n:?} in {}, which does not hold it",
                file.display()
            )));
        }
    }
    let mapped: std::collections::HashSet<&str> = expected.iter().map(String::as_str).collect();
    if let Some(t) = header
        .tensors
        .iter()
        .find(|t| !mapped.contains(t.name.as_str()))
    {
        return Err(bad(format!(
            "{} holds tensor {:?}, which the weight_map does not map to it",
            file.display(),
            t.name
        )));
    }
    Ok(())
}

#[derive(Serialize)]
struct ImportReport {
    run: String,
    step: u64,
    files: usize,
    tensors: usize,
    logical_bytes: u64,
    bytes_written: u64,
    bytes_deduped: u64,
}

pub fn import(
    location: &str,
    run: &str,
    step: u64,
    input: &Path,
    json: bool,
) -> cairn::Result<i32> {
    if cairn::is_url(location) {
        return Err(Error::invalid(
            "import target",
            "import into a local store, then `cairn restore --to` the remote",
        ));
    }
    let files = import_files(input)?;
    let mut maps = Vec::new();
    let mut meta = serde_json::Map::new();
    for (f, expected) in &files {
        let map = ImportInput::open(f)?;
        let mut header = parse_header(&map, map.len() as u64, f)?;
        if let Some(expected) = expected {
            check_against_index(input, f, expected, &header)?;
        }
        for (k, v) in std::mem::take(&mut header.metadata) {
            meta.insert(k, serde_json::Value::String(v));
        }
        maps.push((map, header));
    }
    if maps.iter().all(|(_, h)| h.tensors.is_empty()) {
        return Err(Error::invalid(
            format!("import of {}", input.display()),
            "the input holds no tensors",
        ));
    }
    // Chunks already in the store are re-read and hashed before an import
    // reuses them (a bit-rotted chunk is written again instead). The input
    // is held in memory; the staging pool adds a modest, bounded amount.
    let store = Store::open(
        location,
        StoreOptions {
            verify_reused_chunks: true,
            staging_bytes: 128 << 20,
            ..StoreOptions::default()
        },
    )?;
    let mut state = SaveState::new();
    let mut seen = std::collections::HashSet::new();
    for (map, h) in &maps {
        for t in &h.tensors {
            if !seen.insert(t.name.clone()) {
                return Err(Error::invalid(
                    "import",
                    format!("tensor {} appears in two files", t.name),
                ));
            }
            let s = (h.data_start + t.begin) as usize;
            let e = (h.data_start + t.end) as usize;
            state = state.tensor(t.name.clone(), t.dtype, &t.shape, &map[s..e]);
        }
    }
    let mut top = serde_json::Map::new();
    top.insert("imported_from".into(), input.display().to_string().into());
    top.insert(
        "safetensors_metadata".into(),
        serde_json::Value::Object(meta),
    );
    state = state.metadata(serde_json::Value::Object(top));
    let tensors = state.tensors.len();
    let rep = store.save(run, step, &state)?.wait()?;
    let report = ImportReport {
        run: run.to_string(),
        step,
        files: files.len(),
        tensors,
        logical_bytes: rep.logical_bytes,
        bytes_written: rep.bytes_written,
        bytes_deduped: rep.bytes_deduped,
    };
    if json {
        print_json(&report)?;
    } else {
        outln!(
            "imported {} tensors ({}) from {} file(s) as run {run} step {step}: {} written, {} already stored",
            tensors,
            human(rep.logical_bytes),
            files.len(),
            human(rep.bytes_written),
            human(rep.bytes_deduped)
        );
    }
    Ok(0)
}

/// The directory holding `path`: its parent, or `.` for a bare file name.
fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Input files up to this size are read into memory; larger ones are
/// mapped, so importing a large model needs no memory of its size.
const READ_WHOLE_LIMIT: u64 = 256 << 20;

/// The bytes of one import file: read, or mapped when large.
enum ImportInput {
    Read(Vec<u8>),
    Mapped(memmap2::Mmap),
}

impl ImportInput {
    /// Read a small file whole: another process truncating it meanwhile
    /// gives a shorter read, which the header check rejects. Map a large
    /// one. A mapping of a file truncated meanwhile faults (SIGBUS) on the
    /// first access past the new end; the import then dies before its
    /// manifest is written, so nothing is committed (documented in
    /// docs/cli.md: don't modify input files during an import).
    fn open(path: &Path) -> cairn::Result<Self> {
        let mut file = open_regular(path, "safetensors file")?;
        let len = file
            .metadata()
            .map_err(|e| Error::io("stat safetensors", path, e))?
            .len();
        if len <= READ_WHOLE_LIMIT {
            let mut v = Vec::new();
            std::io::Read::read_to_end(&mut file, &mut v)
                .map_err(|e| Error::io("read safetensors", path, e))?;
            return Ok(ImportInput::Read(v));
        }
        // SAFETY: the mapping is read-only and private to this process; a
        // concurrent truncation by another process is the documented
        // hazard above and cannot corrupt the store (nothing commits
        // before the whole input has been staged and hashed).
        let m = unsafe { memmap2::Mmap::map(&file) }
            .map_err(|e| Error::io("map safetensors", path, e))?;
        Ok(ImportInput::Mapped(m))
    }
}

impl std::ops::Deref for ImportInput {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            ImportInput::Read(v) => v,
            ImportInput::Mapped(m) => m,
        }
    }
}
