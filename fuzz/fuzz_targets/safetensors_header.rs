//! Any bytes given as the start of a safetensors file: an error or a header
//! whose tensors tile the data section, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fn check(data: &[u8], file_len: u64) {
    let path = std::path::Path::new("fuzz.safetensors");
    if let Ok(h) = cairn::safetensors::parse_header(data, file_len, path) {
        assert!(h.data_start >= 8 && h.data_start <= file_len);
        let data_len = file_len - h.data_start;
        let mut at = 0;
        for t in &h.tensors {
            assert_eq!(t.begin, at, "tensors tile the data section");
            assert!(t.begin <= t.end && t.end <= data_len);
            at = t.end;
        }
        assert_eq!(at, data_len, "no trailing bytes");
    }
}

fuzz_target!(|data: &[u8]| {
    // As a whole file, and as the head of a file whose data section lies
    // beyond the bytes given (the length read from the last 8 bytes).
    check(data, data.len() as u64);
    if data.len() >= 16 {
        let (head, tail) = data.split_at(data.len() - 8);
        let extra = u64::from_le_bytes(tail.try_into().unwrap()) % (1 << 40);
        check(head, head.len() as u64 + extra);
    }
});
