//! Eviction when no call comes: a background task per engine that returns
//! idle users' memory soon after `idleTtlMs`, in bounded slices (the rules
//! are in `table.rs`). It walks the shards in turn, one slice each, holding
//! one shard's lock at a time; callers on the other shards never wait for
//! it. It never touches the hot path, which does not lock.
//!
//! Where it runs: every engine's task shares one thread, `ttm-evictor`,
//! started on first use at the lowest priority the OS gives a normal
//! thread (nice 19 on Linux). Eviction is housekeeping: the kernel gives
//! it a CPU nothing else wants and preempts it when the JS thread (or a
//! refresh on napi's runtime) wakes wanting one, so a burst falling due
//! leaves the CPU to the event loop.
//!
//! Clock: there is no caller to say what time it is, so the task uses the
//! callers' clock as last seen ([`Engine::app_now`]: the wall clock in
//! production, a test's fake clock moving at real speed from its last call;
//! `time.rs`, "Clocks"). Callers' slices use the `now` they are given.

use std::sync::{Arc, Weak};
use std::time::Duration;

use once_cell::sync::Lazy;
use tokio::runtime::{Builder, Handle};
use tokio::task::JoinHandle;

use super::{Engine, EpochMs};

/// Starts `engine`'s background eviction on the shared low-priority
/// thread. The task holds the engine weakly: it ends once the engine is
/// dropped, and keeps no process alive. `None` if the thread could not be
/// started; callers' slices of eviction still bound the table then.
pub fn start(engine: &Arc<Engine>) -> Option<JoinHandle<()>> {
    BACKGROUND
        .as_ref()
        .map(|handle| handle.spawn(run(Arc::downgrade(engine))))
}

/// The name of the thread every engine's eviction runs on.
pub const THREAD_NAME: &str = "ttm-evictor";

/// A single-threaded runtime (timers only) driven by a thread of its own.
static BACKGROUND: Lazy<Option<Handle>> = Lazy::new(|| {
    let runtime = Builder::new_current_thread().enable_time().build().ok()?;
    let handle = runtime.handle().clone();
    std::thread::Builder::new()
        .name(THREAD_NAME.into())
        .spawn(move || {
            // Where the OS refuses (a sandbox), the thread runs at normal
            // priority: eviction still works, it just competes fairly.
            let _ =
                thread_priority::set_current_thread_priority(thread_priority::ThreadPriority::Min);
            runtime.block_on(std::future::pending::<()>());
        })
        .ok()?;
    Some(handle)
});

/// Entries one background slice visits in one shard at most. The shard's
/// lock is held only to unlink them (a few µs); they are freed after it is
/// released. A round over the 256 shards visits up to 8,192.
pub const SLICE: usize = 32;

/// The longest the task sleeps without looking: new entries go idle no
/// sooner than `idleTtlMs` after they come, so this bounds how late an
/// entry is evicted when the table was empty (or nothing was due) when
/// the task last looked.
const MAX_NAP: Duration = Duration::from_secs(1);

/// Evicts `engine`'s idle entries until the engine is dropped: a round of
/// one slice per shard, then after [`PAUSE`] another while any shard has
/// more due, else a sleep until the next entry goes idle or revocation
/// lapses (at most [`MAX_NAP`]).
pub async fn run(engine: Weak<Engine>) {
    let mut freed = 0;
    loop {
        let nap = {
            let Some(engine) = engine.upgrade() else {
                return;
            };
            let now = engine.app_now();
            let cap = MAX_NAP.min(Duration::from_millis(engine.policy().idle_ttl_ms.max(10)));
            let mut next_due: Option<EpochMs> = None;
            for shard in 0..engine.shards() {
                // A shard with nothing due is not locked.
                let due = match engine.due(shard) {
                    Some(due) if due <= now => {
                        let slice = engine.evict(shard, now, SLICE);
                        freed += slice.evicted;
                        slice.next_due
                    }
                    due => due,
                };
                next_due = next_due.into_iter().chain(due).min();
            }
            let nap = match next_due {
                Some(due) if due <= now => PAUSE,
                Some(due) => cap.min(Duration::from_millis((due - now) as u64)),
                None => cap,
            };
            if quiet(&engine, now) && nap > PAUSE && freed >= TRIM_AFTER {
                release_free_memory();
                freed = 0;
            }
            nap
        };
        tokio::time::sleep(nap).await;
    }
}

/// Between rounds while there is more due: leaves the CPU to the callers'
/// thread on a busy machine, while eviction still runs at up to a round
/// (256 × [`SLICE`] entries) a millisecond or two.
const PAUSE: Duration = Duration::from_millis(1);

/// Entries evicted before the allocator is asked to return free pages.
const TRIM_AFTER: usize = 16_384;

/// How long no call may have come before free pages are returned.
const QUIET_MS: i64 = 1_000;

/// Whether no call used the table for [`QUIET_MS`]. Hot-path calls never
/// reach the core and allocate nothing from its heap, so a trim cannot
/// stall them.
fn quiet(engine: &Engine, now: EpochMs) -> bool {
    engine
        .last_use()
        .is_none_or(|t| now.saturating_sub(t) >= QUIET_MS)
}

/// glibc keeps what is freed for reuse and returns only the top of its
/// heap to the OS. `malloc_trim` returns the rest, but walks the whole heap
/// holding the allocator's lock (tens of ms at a million users), stalling
/// any thread that allocates meanwhile: so it runs once after a burst was
/// evicted, and only when no call has come for [`QUIET_MS`]. Under steady
/// traffic the freed memory is reused by new users instead.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn release_free_memory() {
    // SAFETY: malloc_trim has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn release_free_memory() {}
