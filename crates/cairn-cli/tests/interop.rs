//! Interoperability with the Python `safetensors` and `numpy` packages
//! (installed by scripts/test; CAIRN_TEST_PYTHON names that interpreter).

#[path = "../../../tests/common/mod.rs"]
mod common;

use cairn::{DType, StepSel, Store, TensorFilter};
use common::*;
use std::path::Path;
use std::process::Command;

fn python() -> String {
    std::env::var("CAIRN_TEST_PYTHON").expect(
        "CAIRN_TEST_PYTHON is not set: run the suite with scripts/test, which installs \
         safetensors and numpy",
    )
}

fn run_py(script: &str, args: &[&str]) -> String {
    let o = Command::new(python())
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .expect("run python");
    assert!(
        o.status.success(),
        "python failed:\n{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn cairn(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(args)
        .output()
        .unwrap()
}

/// Tensors of every dtype the issue names, with bytes valid for each.
fn mixed_state() -> OwnedState {
    let mut r = Rng(2024);
    let mut s = OwnedState::default();
    for (i, (dtype, shape)) in [
        (DType::BF16, vec![64, 33]),
        (DType::F16, vec![17, 5]),
        (DType::F32, vec![300, 700]),
        (DType::I64, vec![1000]),
        (DType::Bool, vec![7, 9]),
        (DType::F32, vec![]),
        (DType::U8, vec![0]),
    ]
    .into_iter()
    .enumerate()
    {
        let n = shape.iter().product::<u64>() as usize * dtype.size();
        let mut data = r.bytes(n);
        if dtype == DType::Bool {
            data.iter_mut().for_each(|b| *b &= 1);
        }
        s.tensors.push(OwnedTensor {
            name: format!("layer{i}.{}", dtype.name().to_lowercase()),
            dtype,
            shape,
            data,
        });
    }
    s
}

const CHECK_EXPORT: &str = r#"
import json, os, sys
import numpy as np, ml_dtypes
from safetensors.numpy import load_file
out, expected_dir = sys.argv[1], sys.argv[2]
if out.endswith(".json"):
    idx = json.load(open(out))
    files = sorted(set(idx["weight_map"].values()))
    tensors = {}
    for f in files:
        part = load_file(os.path.join(os.path.dirname(out), f))
        for k in part:
            assert idx["weight_map"][k] == f, k
        tensors.update(part)
    assert idx["metadata"]["total_size"] == sum(t.nbytes for t in tensors.values())
else:
    tensors = load_file(out)
names = {"bfloat16": "BF16", "float16": "F16", "float32": "F32", "int64": "I64", "bool": "BOOL", "uint8": "U8"}
for name, t in sorted(tensors.items()):
    want = json.load(open(os.path.join(expected_dir, name + ".json")))
    raw = open(os.path.join(expected_dir, name + ".bin"), "rb").read()
    assert names[str(t.dtype)] == want["dtype"], (name, t.dtype)
    assert list(t.shape) == want["shape"], (name, t.shape)
    assert t.tobytes() == raw, name
    print("ok", name)
"#;

fn write_expected(dir: &Path, s: &OwnedState) {
    std::fs::create_dir_all(dir).unwrap();
    for t in &s.tensors {
        std::fs::write(dir.join(format!("{}.bin", t.name)), &t.data).unwrap();
        std::fs::write(
            dir.join(format!("{}.json", t.name)),
            serde_json::json!({"dtype": t.dtype.name(), "shape": t.shape}).to_string(),
        )
        .unwrap();
    }
}

#[test]
fn cairn_exports_load_bit_exact_in_python() {
    let dir = tempfile::tempdir().unwrap();
    let store_dir = dir.path().join("store");
    let store = Store::open(&store_dir, small_opts()).unwrap();
    let s = mixed_state();
    store.save("x", 3, &s.view()).unwrap().wait().unwrap();
    drop(store);
    let expected = dir.path().join("expected");
    write_expected(&expected, &s);
    let st = store_dir.to_str().unwrap();

    let single = dir.path().join("model.safetensors");
    let o = cairn(&[
        "export",
        st,
        "--run",
        "x",
        "--step",
        "3",
        "--format",
        "safetensors",
        "--out",
        single.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let py = run_py(
        CHECK_EXPORT,
        &[single.to_str().unwrap(), expected.to_str().unwrap()],
    );
    assert_eq!(
        py.lines().filter(|l| l.starts_with("ok ")).count(),
        s.tensors.len(),
        "{py}"
    );

    let sharded = dir.path().join("sharded");
    let o = cairn(&[
        "export",
        st,
        "--run",
        "x",
        "--step",
        "latest",
        "--out",
        sharded.to_str().unwrap(),
        "--max-shard-size",
        "100KiB",
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rep: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(rep["files"].as_array().unwrap().len() >= 3, "{rep}");
    let index = sharded.join("model.safetensors.index.json");
    let py = run_py(
        CHECK_EXPORT,
        &[index.to_str().unwrap(), expected.to_str().unwrap()],
    );
    assert_eq!(
        py.lines().filter(|l| l.starts_with("ok ")).count(),
        s.tensors.len(),
        "{py}"
    );
}

const WRITE_PY: &str = r#"
import json, os, sys
import numpy as np, ml_dtypes
from safetensors.numpy import save_file
out = sys.argv[1]
rng = np.random.default_rng(7)
t = {
    "w.bf16": rng.standard_normal((32, 48)).astype(ml_dtypes.bfloat16),
    "w.f16": rng.standard_normal((9, 11)).astype(np.float16),
    "w.f32": rng.standard_normal((256, 300)).astype(np.float32),
    "ids.i64": rng.integers(-2**40, 2**40, size=(777,), dtype=np.int64),
    "mask.bool": rng.integers(0, 2, size=(13, 3)).astype(bool),
    "w.big": rng.standard_normal((512, 1024)).astype(np.float32),
}
os.makedirs(out, exist_ok=True)
save_file(t, os.path.join(out, "single.safetensors"), metadata={"format": "np"})
names = sorted(t)
shards = [names[:2], names[2:]]
wm = {}
for i, part in enumerate(shards):
    f = "model-%05d-of-%05d.safetensors" % (i + 1, len(shards))
    save_file({k: t[k] for k in part}, os.path.join(out, f))
    wm.update({k: f for k in part})
json.dump({"metadata": {"total_size": sum(a.nbytes for a in t.values())}, "weight_map": wm},
          open(os.path.join(out, "model.safetensors.index.json"), "w"))
codes = {"bfloat16": "BF16", "float16": "F16", "float32": "F32", "int64": "I64", "bool": "BOOL"}
for k, a in t.items():
    open(os.path.join(out, k + ".bin"), "wb").write(a.tobytes())
    json.dump({"dtype": codes[str(a.dtype)], "shape": list(a.shape)}, open(os.path.join(out, k + ".json"), "w"))
"#;

#[test]
fn python_written_files_import_bit_exact() {
    let dir = tempfile::tempdir().unwrap();
    let py_out = dir.path().join("py");
    run_py(WRITE_PY, &[py_out.to_str().unwrap()]);
    let store_dir = dir.path().join("store");
    let st = store_dir.to_str().unwrap();
    for (step, input) in [
        (1, "single.safetensors"),
        (2, "model.safetensors.index.json"),
    ] {
        let o = cairn(&[
            "import",
            st,
            "--run",
            "hf",
            "--step",
            &step.to_string(),
            py_out.join(input).to_str().unwrap(),
            "--json",
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let rep: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(rep["tensors"], 6);
        if step == 2 {
            // The same large tensor again is not written again (small
            // ones are packed in file order, which differs here).
            assert!(rep["bytes_deduped"].as_u64().unwrap() >= 2 << 20, "{rep}");
        }
    }
    let store = Store::open_read_only(&store_dir, small_opts()).unwrap();
    for step in [1, 2] {
        let r = store
            .restore("hf", StepSel::Step(step), &TensorFilter::All)
            .unwrap();
        assert_eq!(r.tensors.len(), 6);
        for t in &r.tensors {
            let raw = std::fs::read(py_out.join(format!("{}.bin", t.name))).unwrap();
            let meta: serde_json::Value = serde_json::from_slice(
                &std::fs::read(py_out.join(format!("{}.json", t.name))).unwrap(),
            )
            .unwrap();
            assert_eq!(t.data, raw, "{}", t.name);
            assert_eq!(t.dtype.name(), meta["dtype"], "{}", t.name);
            assert_eq!(serde_json::json!(t.shape), meta["shape"], "{}", t.name);
        }
    }
    // Round trip: export what was imported and load it in Python again.
    let expected = dir.path().join("expected");
    std::fs::create_dir_all(&expected).unwrap();
    for f in std::fs::read_dir(&py_out).unwrap().flatten() {
        let p = f.path();
        if p.extension().is_some_and(|e| e == "bin" || e == "json")
            && !p.ends_with("model.safetensors.index.json")
        {
            std::fs::copy(&p, expected.join(p.file_name().unwrap())).unwrap();
        }
    }
    let back = dir.path().join("back.safetensors");
    let o = cairn(&[
        "export",
        st,
        "--run",
        "hf",
        "--step",
        "2",
        "--out",
        back.to_str().unwrap(),
    ]);
    assert!(o.status.success());
    let py = run_py(
        CHECK_EXPORT,
        &[back.to_str().unwrap(), expected.to_str().unwrap()],
    );
    assert_eq!(
        py.lines().filter(|l| l.starts_with("ok ")).count(),
        6,
        "{py}"
    );
}

#[test]
fn malformed_safetensors_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let st = dir.path().join("store");
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("short", vec![1, 2, 3]),
        ("huge header", u64::MAX.to_le_bytes().to_vec()),
        ("not json", {
            let mut v = 5u64.to_le_bytes().to_vec();
            v.extend_from_slice(b"{{{{{");
            v
        }),
        ("overrun", {
            let h = br#"{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#;
            let mut v = (h.len() as u64).to_le_bytes().to_vec();
            v.extend_from_slice(h);
            v.extend_from_slice(&[0; 8]);
            v
        }),
        ("hostile name", {
            let h = br#"{"../../x":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}"#;
            let mut v = (h.len() as u64).to_le_bytes().to_vec();
            v.extend_from_slice(h);
            v.push(0);
            v
        }),
    ];
    for (what, bytes) in cases {
        let f = dir
            .path()
            .join(format!("{}.safetensors", what.replace(' ', "_")));
        std::fs::write(&f, bytes).unwrap();
        let o = cairn(&[
            "import",
            st.to_str().unwrap(),
            "--run",
            "bad",
            "--step",
            "1",
            f.to_str().unwrap(),
        ]);
        assert_eq!(o.status.code(), Some(1), "{what}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.starts_with("error:"), "{what}: {err}");
    }
}
