//! Opening the store a command names: a path or an object-store URL.

use cairn::Tier;

/// Parse `KEY=VALUE` remote options.
pub fn remote_options(raw: &[String]) -> cairn::Result<Vec<(String, String)>> {
    raw.iter()
        .map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| cairn::Error::InvalidInput {
                    what: "--remote-option".into(),
                    reason: format!("{kv:?} is not KEY=VALUE"),
                })
        })
        .collect()
}

/// Open an existing store for reading.
pub fn open(location: &str, raw_options: &[String]) -> cairn::Result<Tier> {
    Tier::open(location, &remote_options(raw_options)?)
}

/// Open (creating a local one if needed) a store for writing.
pub fn open_for_write(location: &str, raw_options: &[String]) -> cairn::Result<Tier> {
    Tier::open_for_write(location, &remote_options(raw_options)?)
}

/// A progress bar on stderr, drawn only when stderr is a terminal.
pub fn progress(total: u64, what: &str) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let pb = indicatif::ProgressBar::new(total);
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:30}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb
}

/// Print a serializable value as pretty JSON.
pub fn print_json<T: serde::Serialize>(v: &T) -> cairn::Result<()> {
    let text =
        serde_json::to_string_pretty(v).map_err(|e| cairn::Error::Internal(e.to_string()))?;
    outln!("{text}");
    Ok(())
}
