//! Any bytes given as a manifest file: an error or a manifest that passes
//! validation and survives a re-encode, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

use cairn::format::manifest::{decode_manifest_file, encode_envelope, encode_manifest};

fn check(bytes: &[u8]) {
    let path = std::path::Path::new("fuzz.manifest");
    if let Ok(m) = decode_manifest_file(bytes, path) {
        m.validate(path).expect("decoded manifests are valid");
        let again = encode_manifest(&m).expect("a decoded manifest re-encodes");
        assert_eq!(
            decode_manifest_file(&again, path).expect("a re-encoded manifest decodes"),
            m
        );
    }
}

fuzz_target!(|data: &[u8]| {
    check(data);
    // Also feed the bytes as a body behind a valid envelope, so that the
    // JSON body is reached past the hash check.
    check(&encode_envelope(data));
});
