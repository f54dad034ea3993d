//! Any bytes given as a chunk header: an error or a header that re-encodes
//! to the same bytes, never a panic; checking it against any expectation
//! never panics either, nor does decoding the payload that follows it.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = std::path::Path::new("fuzz.chunk");
    if let Ok(h) = cairn::format::chunk::ChunkHeader::decode(data, path) {
        assert_eq!(&h.encode()[..], &data[..64]);
        // The bytes after the header: the expected length and file length.
        let rest = &data[64..];
        let word = |i: usize| {
            let mut b = [0u8; 8];
            for (j, x) in rest.iter().skip(i * 8).take(8).enumerate() {
                b[j] = *x;
            }
            u64::from_le_bytes(b)
        };
        let _ = h.check(&h.id, word(0), word(1), path);
        let _ = h.check(&h.id, h.uncompressed_len, data.len() as u64, path);
        // The payload, decoded as a reader would (small chunks only).
        let start = h.payload_offset as usize;
        if h.uncompressed_len <= 1 << 20 && start <= data.len() {
            let mut out = vec![0u8; h.uncompressed_len as usize];
            let mut decoder = cairn::Decoder::new().expect("a decoder");
            let _ = decoder.decode(h.codec, h.filter, &data[start..], &mut out, path);
        }
    }
});
