//! Bounded parallel work that stops at the first error: the one loop
//! behind restore, copy and verify.

use crate::error::Error;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// Run `work` on every item of `items` with up to `threads` scoped threads
/// (at least one). Each thread keeps its own state, made by `init` (a
/// decoder, scratch buffers). Items are handed out in order; after the
/// first error no new item starts, and that error is returned.
pub(crate) fn try_for_each<I, S>(
    items: I,
    threads: usize,
    init: impl Fn() -> Result<S, Error> + Sync,
    work: impl Fn(&mut S, I::Item) -> Result<(), Error> + Sync,
) -> Result<(), Error>
where
    I: Iterator + Send,
    I::Item: Send,
{
    let (lower, upper) = items.size_hint();
    let threads = threads.clamp(1, upper.unwrap_or(lower).max(1));
    let queue = Mutex::new(items);
    let failed = AtomicBool::new(false);
    let first_err: Mutex<Option<Error>> = Mutex::new(None);
    let fail = |e: Error| {
        failed.store(true, Ordering::Relaxed);
        let mut g = first_err.lock().unwrap_or_else(|p| p.into_inner());
        if g.is_none() {
            *g = Some(e);
        }
    };
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                let mut state = match init() {
                    Ok(st) => st,
                    Err(e) => return fail(e),
                };
                while !failed.load(Ordering::Relaxed) {
                    let next = queue.lock().unwrap_or_else(|p| p.into_inner()).next();
                    let Some(item) = next else {
                        return;
                    };
                    if let Err(e) = work(&mut state, item) {
                        return fail(e);
                    }
                }
            });
        }
    });
    match first_err.into_inner().unwrap_or_else(|p| p.into_inner()) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    #[test]
    fn runs_every_item_once() {
        let sum = AtomicU64::new(0);
        try_for_each(
            1..=1000u64,
            4,
            || Ok(()),
            |_, i| {
                sum.fetch_add(i, Ordering::Relaxed);
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(sum.into_inner(), 500_500);
    }

    #[test]
    fn stops_at_the_first_error() {
        let done = AtomicU64::new(0);
        let r = try_for_each(
            0..10_000u64,
            2,
            || Ok(()),
            |_, i| {
                if i == 10 {
                    return Err(Error::Internal(format!("item {i}")));
                }
                done.fetch_add(1, Ordering::Relaxed);
                Ok(())
            },
        );
        assert!(matches!(r, Err(Error::Internal(m)) if m == "item 10"));
        assert!(done.into_inner() < 10_000);
    }

    #[test]
    fn a_failing_init_is_the_error() {
        let r = try_for_each(0..3u8, 2, || Err::<(), _>(Error::Closed), |_, _| Ok(()));
        assert!(matches!(r, Err(Error::Closed)));
    }
}
