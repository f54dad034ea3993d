//! Every dtype beyond the common float ones through the real Python
//! `safetensors` and `numpy` (with `ml_dtypes` for the 8-bit floats), both
//! ways: I8, I16, U16, I32, U32, U64, F64, F8_E4M3, F8_E5M2.
//!
//! Planted bug this catches: the two 8-bit float names swapped in
//! `safetensors::dtype_name` (Python's parser then reads `F8_E5M2` where
//! an e4m3 tensor was exported).

#[path = "../../../tests/common/mod.rs"]
mod common;

use cairn::{DType, StepSel, Store, TensorFilter};
use common::*;
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

fn cairn(args: &[&str]) {
    let o = Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "cairn {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// The dtypes under test, with their safetensors names and the numpy
/// dtype name each loads as.
const DTYPES: [(DType, &str, &str); 9] = [
    (DType::I8, "I8", "int8"),
    (DType::I16, "I16", "int16"),
    (DType::U16, "U16", "uint16"),
    (DType::I32, "I32", "int32"),
    (DType::U32, "U32", "uint32"),
    (DType::U64, "U64", "uint64"),
    (DType::F64, "F64", "float64"),
    (DType::F8E4M3, "F8_E4M3", "float8_e4m3fn"),
    (DType::F8E5M2, "F8_E5M2", "float8_e5m2"),
];

/// Checks an exported file with the `safetensors` package: its own parser
/// (`deserialize`: dtype names, shapes, bytes) for every tensor, and numpy
/// loading (`load_file`) for those its numpy mapping covers (this
/// safetensors has no numpy mapping for the 8-bit floats; their bytes are
/// viewed through `ml_dtypes` instead).
const CHECK: &str = r#"
import json, sys
import numpy as np, ml_dtypes, safetensors
from safetensors.numpy import load_file
path, want_path = sys.argv[1], sys.argv[2]
want = json.load(open(want_path))
raw = dict(safetensors.deserialize(open(path, "rb").read()))
assert sorted(raw) == sorted(want), (sorted(raw), sorted(want))
f8 = {"F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2}
for name, w in want.items():
    t = raw[name]
    assert t["dtype"] == w["st"], (name, t["dtype"], w["st"])
    assert list(t["shape"]) == w["shape"], (name, t["shape"], w["shape"])
    assert bytes(t["data"]).hex() == w["hex"], name
    if w["st"] in f8:
        a = np.frombuffer(bytes(t["data"]), dtype=f8[w["st"]]).reshape(w["shape"])
        assert str(a.dtype) == w["numpy"], (name, str(a.dtype))
plain = {k: v for k, v in want.items() if v["st"] not in f8}
got = {}
from safetensors import safe_open
with safe_open(path, framework="numpy") as f:
    for k in plain:
        got[k] = f.get_tensor(k)
for name, w in plain.items():
    a = got[name]
    assert str(a.dtype) == w["numpy"], (name, str(a.dtype), w["numpy"])
    assert list(a.shape) == w["shape"], (name, a.shape)
    assert a.tobytes().hex() == w["hex"], name
print("ok", len(want))
"#;

const WRITE: &str = r#"
import json, sys
import numpy as np, ml_dtypes
from safetensors.numpy import save_file
out, meta = sys.argv[1], sys.argv[2]
rng = np.random.default_rng(7)
kinds = {"int8": np.int8, "int16": np.int16, "uint16": np.uint16, "int32": np.int32,
         "uint32": np.uint32, "uint64": np.uint64, "float64": np.float64,
         "float8_e4m3fn": ml_dtypes.float8_e4m3fn, "float8_e5m2": ml_dtypes.float8_e5m2}
tensors, info = {}, {}
for i, (k, t) in enumerate(kinds.items()):
    shape = (3 + i, 5)
    n = int(np.prod(shape)) * np.dtype(t).itemsize
    a = np.frombuffer(rng.bytes(n), dtype=t).reshape(shape)
    name = "python." + k
    tensors[name] = a
    info[name] = {"numpy": k, "shape": list(shape), "hex": a.tobytes().hex()}
save_file(tensors, out)
json.dump(info, open(meta, "w"))
"#;

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// cairn export → Python load: names, numpy dtypes, shapes and bytes.
#[test]
fn cairn_exports_every_dtype_to_python() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    let mut r = Rng(11);
    let mut s = OwnedState::default();
    let mut want = serde_json::Map::new();
    for (i, (dtype, st, numpy)) in DTYPES.iter().enumerate() {
        let shape = vec![2 + i as u64, 7];
        let data = r.bytes(shape.iter().product::<u64>() as usize * dtype.size());
        let name = format!("cairn.{}", dtype.name().to_lowercase());
        want.insert(
            name.clone(),
            serde_json::json!({
                "numpy": numpy,
                "st": st,
                "shape": shape,
                "hex": hex(&data),
            }),
        );
        s.tensors.push(OwnedTensor {
            name,
            dtype: *dtype,
            shape,
            data,
        });
    }
    {
        let store = Store::open(&root, small_opts()).unwrap();
        store.save("d", 1, &s.view()).unwrap().wait().unwrap();
    }
    let out = dir.path().join("out.safetensors");
    let want_path = dir.path().join("want.json");
    std::fs::write(&want_path, serde_json::Value::Object(want).to_string()).unwrap();
    cairn(&[
        "export",
        root.to_str().unwrap(),
        "--run",
        "d",
        "--step",
        "1",
        "--format",
        "safetensors",
        "--out",
        out.to_str().unwrap(),
    ]);
    let said = run_py(CHECK, &[out.to_str().unwrap(), want_path.to_str().unwrap()]);
    assert_eq!(said.trim(), format!("ok {}", DTYPES.len()));
}

/// Python save → cairn import → restore: dtypes and bytes.
#[test]
fn python_files_of_every_dtype_import() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    Store::open(&root, small_opts()).unwrap();
    let file = dir.path().join("py.safetensors");
    let meta = dir.path().join("py.json");
    run_py(WRITE, &[file.to_str().unwrap(), meta.to_str().unwrap()]);
    cairn(&[
        "import",
        root.to_str().unwrap(),
        "--run",
        "p",
        "--step",
        "3",
        file.to_str().unwrap(),
    ]);
    let info: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&meta).unwrap()).unwrap();
    let store = Store::open_read_only(&root, small_opts()).unwrap();
    let got = store
        .restore("p", StepSel::Step(3), &TensorFilter::All)
        .unwrap();
    assert_eq!(got.tensors.len(), DTYPES.len());
    for (dtype, _, numpy) in DTYPES {
        let name = format!("python.{numpy}");
        let t = got
            .tensor(&name)
            .unwrap_or_else(|| panic!("{name} missing"));
        let w = &info[&name];
        assert_eq!(t.dtype, dtype, "{name}");
        let shape: Vec<u64> = w["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        assert_eq!(t.shape, shape, "{name}");
        assert_eq!(hex(&t.data), w["hex"].as_str().unwrap(), "{name}");
    }
}
