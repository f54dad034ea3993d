//! Any text given as a daemon config file: an error or settings that can
//! be checked and that survive a write and re-read, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = std::path::Path::new("fuzz.toml");
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(cfg) = cairn::DaemonConfig::from_toml(text, path) {
        let _ = cfg.check();
        let written = toml::to_string(&cfg).expect("parsed settings serialize");
        let again =
            cairn::DaemonConfig::from_toml(&written, path).expect("written settings parse again");
        assert_eq!(again, cfg);
    }
});
