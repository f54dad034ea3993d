//! Any bytes given as a chunk header: an error or a header that re-encodes
//! to the same bytes, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = std::path::Path::new("fuzz.chunk");
    if let Ok(h) = cairn::format::chunk::ChunkHeader::decode(data, path) {
        assert_eq!(&h.encode()[..], &data[..64]);
    }
});
