//! Any object path listed by a remote store: it is the commit of a step or
//! a chunk object exactly when it is the path cairn writes for that step
//! or chunk, and reading it never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use object_store::path::Path as ObjPath;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // The first line picks the store prefix, the rest is the listed path.
    let (prefix, listed) = text.split_once('\n').unwrap_or(("", text));
    let Ok(prefix) = ObjPath::parse(prefix) else {
        return;
    };
    let Ok(location) = ObjPath::parse(listed) else {
        return;
    };
    let run_prefix = prefix.child("runs").child("run-1");
    if let Some(step) = cairn::listed_manifest_step(&run_prefix, &location) {
        let want = run_prefix
            .child(format!("{step:020}"))
            .child("manifest.cairn");
        assert_eq!(location, want, "a listed manifest is the path of its step");
    }
    let chunks = prefix.child("chunks");
    if let Some(id) = cairn::listed_chunk_id(&chunks, &location) {
        let want = chunks.child(id.prefix()).child(id.to_hex());
        assert_eq!(location, want, "a listed chunk is the path of its id");
    }
});
