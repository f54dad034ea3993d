//! Human sizes: parsing `1GiB` and printing `1.0 GiB`.

/// Parse a size such as `1GiB`, `512MiB`, `64KiB`, `2G`, `1000` (bytes).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (try 1GiB, 512MiB, 4096)"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" | "kb" => 1 << 10,
        "m" | "mib" | "mb" => 1 << 20,
        "g" | "gib" | "gb" => 1 << 30,
        "t" | "tib" | "tb" => 1 << 40,
        u => return Err(format!("unknown size unit {u:?} in {s:?}")),
    };
    let v = n * mult as f64;
    if !v.is_finite() || v < 0.0 || v > u64::MAX as f64 {
        return Err(format!("{s:?} is out of range"));
    }
    Ok(v as u64)
}

/// Parse a size as [`parse_size`] does, refusing zero: for limits such as
/// export's largest shard, where zero bytes would mean nothing fits.
pub fn parse_nonzero_size(s: &str) -> Result<u64, String> {
    match parse_size(s)? {
        0 => Err(format!(
            "{:?} is zero: give a size above 0 (e.g. 5GiB)",
            s.trim()
        )),
        v => Ok(v),
    }
}

/// Format bytes with a binary unit.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("1.5G").unwrap(), 3 << 29);
        assert!(parse_size("lots").is_err());
        assert!(parse_size("3parsecs").is_err());
        assert_eq!(human(1 << 30), "1.0 GiB");
    }

    #[test]
    fn a_zero_limit_is_refused_by_name() {
        for zero in ["0", "0GiB", " 0.0 MiB"] {
            let e = parse_nonzero_size(zero).unwrap_err();
            assert!(e.contains("is zero"), "{zero}: {e}");
            assert!(e.contains(zero.trim()), "{zero}: {e}");
        }
        assert_eq!(parse_nonzero_size("5GiB").unwrap(), 5 << 30);
        assert_eq!(parse_nonzero_size("1").unwrap(), 1);
        assert!(parse_nonzero_size("lots")
            .unwrap_err()
            .contains("not a size"));
    }
}
