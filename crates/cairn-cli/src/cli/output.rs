//! Command output: every line a command prints to stdout goes through
//! [`line`], which returns write errors instead of panicking.
//!
//! A reader that went away (`cairn ls | head -1`: EPIPE) is not an error:
//! the rest of the output is dropped and the command ends with its own exit
//! code. Any other write error (`> /dev/full`) fails the command.

use std::io::{ErrorKind, Write};
use std::sync::atomic::{AtomicBool, Ordering};

/// Set once a write found stdout's reader gone.
static CLOSED: AtomicBool = AtomicBool::new(false);

/// Write `bytes` to stdout and flush. After a closed pipe, nothing more is
/// written; other errors are an `Error::Io` on `<stdout>`.
pub fn write(bytes: &[u8]) -> cairn::Result<()> {
    if CLOSED.load(Ordering::Relaxed) {
        return Ok(());
    }
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::BrokenPipe => {
            CLOSED.store(true, Ordering::Relaxed);
            Ok(())
        }
        Err(e) => Err(cairn::Error::io("write output", "<stdout>", e)),
    }
}

/// Write one formatted line to stdout (see [`write`]).
pub fn line(args: std::fmt::Arguments<'_>) -> cairn::Result<()> {
    let mut s = args.to_string();
    s.push('\n');
    write(s.as_bytes())
}

/// `println!` for commands: writes through [`line`] and returns its error
/// from the enclosing function with `?`.
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::cli::output::line(format_args!($($arg)*))?
    };
}
