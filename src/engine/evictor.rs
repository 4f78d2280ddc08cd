//! Eviction when no call comes: a background task per engine that returns
//! idle users' memory soon after `idleTtlMs`, in bounded slices (the rules
//! are in `table.rs`). It never touches the hot path, which does not lock.
//!
//! Clock: there is no caller to say what time it is, so the task reads the
//! wall clock ([`time::now_ms`], the clock `Date.now()` reads). Callers'
//! slices use the `now` they are given.

use std::sync::Weak;
use std::time::Duration;

use super::{time, Engine};

/// Entries one background slice visits at most. The lock is held only to
/// unlink them (tens of µs); they are freed after it is released.
pub const SLICE: usize = 256;

/// The longest the task sleeps without looking: new entries go idle no
/// sooner than `idleTtlMs` after they come, so this bounds how late an
/// entry is evicted when the table was empty (or nothing was due) when
/// the task last looked.
const MAX_NAP: Duration = Duration::from_secs(1);

/// Evicts `engine`'s idle entries until the engine is dropped: a slice,
/// then at once another while there is more due, else a sleep until the
/// next entry goes idle or revocation lapses (at most [`MAX_NAP`]).
pub async fn run(engine: Weak<Engine>) {
    loop {
        let nap = {
            let Some(engine) = engine.upgrade() else {
                return;
            };
            let now = time::now_ms();
            let cap = MAX_NAP.min(Duration::from_millis(engine.policy().idle_ttl_ms.max(10)));
            match engine.evict(now, SLICE).next_due {
                Some(due) if due <= now => None,
                Some(due) => Some(cap.min(Duration::from_millis((due - now) as u64))),
                None => Some(cap),
            }
        };
        match nap {
            // Between slices the lock is free for callers.
            None => tokio::task::yield_now().await,
            Some(d) => tokio::time::sleep(d).await,
        }
    }
}
