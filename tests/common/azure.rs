//! The loopback Azure Blob emulator (Azurite) started by `scripts/test`,
//! reached through object_store's Azure client with Azurite's well-known
//! development account.
#![allow(dead_code)]

use cairn::{RemoteOptions, RemoteStore};
use std::io::{Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};

/// Azurite's development account and its published key.
pub const ACCOUNT: &str = "devstoreaccount1";
/// The published key of [`ACCOUNT`].
pub const KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// The emulator's endpoint (`http://127.0.0.1:PORT`).
pub fn endpoint() -> String {
    std::env::var("CAIRN_TEST_AZURE_ENDPOINT").expect(
        "CAIRN_TEST_AZURE_ENDPOINT is not set: run the suite with scripts/test, \
         which starts a loopback Azure Blob emulator (Azurite)",
    )
}

/// object_store options for the emulator, as for any account endpoint.
pub fn options() -> Vec<(String, String)> {
    [
        ("endpoint", format!("{}/{ACCOUNT}", endpoint())),
        ("allow_http", "true".into()),
        ("account_name", ACCOUNT.into()),
        ("access_key", KEY.into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// A fresh, unique container name (not created).
pub fn container_name(tag: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "cairn-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Create a fresh container (a Shared Key signed `Create Container`) and
/// return its name.
pub fn new_container(tag: &str) -> String {
    let name = container_name(tag);
    let date = http_date(std::time::SystemTime::now());
    let version = "2021-08-06";
    let to_sign = format!(
        "PUT\n\n\n\n\n\n\n\n\n\n\n\nx-ms-date:{date}\nx-ms-version:{version}\n/{ACCOUNT}/{ACCOUNT}/{name}\nrestype:container"
    );
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &b64_decode(KEY));
    let sig = b64_encode(ring::hmac::sign(&key, to_sign.as_bytes()).as_ref());
    let ep = endpoint();
    let hostport = ep.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(hostport).expect("connect to Azurite");
    write!(
        s,
        "PUT /{ACCOUNT}/{name}?restype=container HTTP/1.1\r\nHost: {hostport}\r\n\
         x-ms-date: {date}\r\nx-ms-version: {version}\r\n\
         Authorization: SharedKey {ACCOUNT}:{sig}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    assert!(
        resp.starts_with("HTTP/1.1 201"),
        "create container {name}: {resp}"
    );
    name
}

/// An account SAS token for [`ACCOUNT`] (Blob service, every resource
/// type, read/write/delete/list/add/create, HTTP or HTTPS, valid until
/// 2099), as the portal or `az storage account generate-sas` gives one:
/// query pairs with the signature percent-encoded.
pub fn account_sas() -> String {
    let (sv, ss, srt, sp, se, spr) = (
        "2019-12-12",
        "b",
        "sco",
        "rwdlac",
        "2099-01-01T00:00:00Z",
        "https,http",
    );
    // The account SAS string-to-sign of versions before 2020-12-06: no
    // start time, no IP range, a trailing newline.
    let to_sign = format!("{ACCOUNT}\n{sp}\n{ss}\n{srt}\n\n{se}\n\n{spr}\n{sv}\n");
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &b64_decode(KEY));
    let sig = b64_encode(ring::hmac::sign(&key, to_sign.as_bytes()).as_ref())
        .replace('+', "%2B")
        .replace('/', "%2F")
        .replace('=', "%3D");
    format!("sv={sv}&ss={ss}&srt={srt}&sp={sp}&se={se}&spr={spr}&sig={sig}")
}

/// A remote store on a fresh container.
pub fn remote(tag: &str, opts: RemoteOptions) -> RemoteStore {
    let container = new_container(tag);
    RemoteStore::open(&format!("az://{container}/ckpt"), &options(), opts).expect("open az remote")
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn b64_encode(data: &[u8]) -> String {
    let mut out = String::new();
    for c in data.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                out.push(B64[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn b64_decode(s: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for ch in s.bytes().filter(|&b| b != b'=') {
        let v = B64.iter().position(|&x| x == ch).expect("base64") as u32;
        acc = acc << 6 | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    out
}

/// RFC 1123 date, as `x-ms-date` wants it.
fn http_date(t: std::time::SystemTime) -> String {
    let secs = t.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let wd = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"][days.rem_euclid(7) as usize];
    let mon = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ][(m - 1) as usize];
    format!(
        "{wd}, {d:02} {mon} {y} {:02}:{:02}:{:02} GMT",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}
