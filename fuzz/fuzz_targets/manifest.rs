//! Any bytes given as a manifest file: an error or a manifest that passes
//! validation, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = std::path::Path::new("fuzz.manifest");
    if let Ok(m) = cairn::format::manifest::decode_manifest_file(data, path) {
        m.validate(path).expect("decoded manifests are valid");
    }
    // Also feed the bytes as a body behind a valid envelope.
    let wrapped = cairn::format::manifest::encode_envelope(data);
    let _ = cairn::format::manifest::decode_manifest_file(&wrapped, path);
});
