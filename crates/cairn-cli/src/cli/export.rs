//! `cairn export` and `cairn import`: safetensors files in and out.

use super::open::{open, print_json, progress};
use super::size::human;
use cairn::glob_match;
use cairn::safetensors::{parse_header, write_file};
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
    let tier = open(location, raw_opts)?;
    let step = tier.resolve(run, step)?;
    let m = tier.manifest(run, step)?;
    let tensors: Vec<_> = m
        .tensors
        .iter()
        .filter(|t| glob.is_none_or(|g| glob_match(g, &t.name)))
        .collect();
    if tensors.is_empty() {
        return Err(Error::NotFound {
            what: format!("tensors to export in run {run} step {step}"),
        });
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
    let (dir, single) = if sharded || out.is_dir() {
        std::fs::create_dir_all(out).map_err(|e| Error::io("create directory", out, e))?;
        (out.to_path_buf(), out.join("model.safetensors"))
    } else {
        (parent_dir(out).to_path_buf(), out.to_path_buf())
    };
    let pb = progress(total, &format!("export {run}/{step}"));
    let mut files = Vec::new();
    let mut weight_map = BTreeMap::new();
    for (k, shard) in shards.iter().enumerate() {
        let path = if sharded {
            dir.join(format!(
                "model-{:05}-of-{:05}.safetensors",
                k + 1,
                shards.len()
            ))
        } else {
            single.clone()
        };
        let names: Vec<String> = shard.iter().map(|&i| tensors[i].name.clone()).collect();
        let restored = tier.restore(
            run,
            StepSel::Step(step),
            &TensorFilter::names(names.iter().cloned()),
        )?;
        let by_name: BTreeMap<&str, &cairn::RestoredTensor> = restored
            .tensors
            .iter()
            .map(|t| (t.name.as_str(), t))
            .collect();
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
        write_file(&path, &header, &metadata, |i, w: &mut dyn Write| {
            let t = by_name[header[i].0.as_str()];
            pb.inc(t.data.len() as u64);
            w.write_all(&t.data)
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
        files.push(path);
    }
    pb.finish_and_clear();
    let index = if sharded {
        let idx = dir.join("model.safetensors.index.json");
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

/// Files named by an import argument: one safetensors file, or every shard
/// of an index.
fn import_files(input: &Path) -> cairn::Result<Vec<PathBuf>> {
    if input.extension().is_some_and(|e| e == "json") {
        let text = std::fs::read_to_string(input).map_err(|e| Error::io("read index", input, e))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::invalid(format!("index {}", input.display()), e.to_string()))?;
        let map = v["weight_map"].as_object().ok_or_else(|| {
            Error::invalid(format!("index {}", input.display()), "no weight_map object")
        })?;
        let dir = parent_dir(input);
        let mut files: Vec<PathBuf> = Vec::new();
        for f in map.values() {
            let name = f.as_str().unwrap_or("");
            if name.is_empty() || name.contains('/') || name.contains("..") {
                return Err(Error::invalid(
                    format!("index {}", input.display()),
                    format!("shard file name {f} must be a plain file name"),
                ));
            }
            let p = dir.join(name);
            if !files.contains(&p) {
                files.push(p);
            }
        }
        files.sort();
        Ok(files)
    } else {
        Ok(vec![input.to_path_buf()])
    }
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
    let store = Store::open(location, StoreOptions::default())?;
    let files = import_files(input)?;
    let mut maps = Vec::new();
    for f in &files {
        let file = std::fs::File::open(f).map_err(|e| Error::io("open safetensors", f, e))?;
        // SAFETY: read-only mapping of a file we only read; a concurrent
        // writer could change bytes under us, which the hash of what we
        // store would then reflect.
        let map =
            unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io("map safetensors", f, e))?;
        let header = parse_header(&map, map.len() as u64, f)?;
        maps.push((map, header));
    }
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
    let meta: BTreeMap<String, String> =
        maps.iter().flat_map(|(_, h)| h.metadata.clone()).collect();
    state = state.metadata(serde_json::json!({ "imported_from": input.display().to_string(), "safetensors_metadata": meta }));
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
