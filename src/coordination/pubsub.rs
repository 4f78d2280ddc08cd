//! What a lock holder announces on the channel, and the local registry that
//! hands announcements to the refreshes waiting for them.
//!
//! One channel per prefix carries every user's announcements: an instance
//! subscribes once (the connection manager resubscribes after a reconnect)
//! instead of paying a SUBSCRIBE round trip per wait, and a waiter registers
//! here *before* it asks Redis whether the lock is held, so an announcement
//! racing that answer is not missed. A message names the user by the hashed
//! id only and carries the token sealed, exactly as the cache holds it.
//!
//! The channel also carries `invalidate` from other instances: those go to
//! one listener (the coordinator's), not to waiters.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;
use redis::{PushInfo, PushKind, Value};
use tokio::sync::oneshot;

use super::record::{decode_notice, Notice};

type Slot = (u64, oneshot::Sender<Notice>);
/// Hears `Notice::Invalidated`: the hashed user id and the sealed payload.
pub type Listener = Box<dyn Fn(&str, &[u8]) + Send + Sync>;

/// Refreshes waiting for an announcement, by hashed user id.
#[derive(Default)]
pub struct Waiters {
    map: Mutex<HashMap<String, Vec<Slot>>>,
    next: AtomicU64,
    invalidated: OnceLock<Listener>,
}

impl std::fmt::Debug for Waiters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Waiters")
            .field("waiting", &self.waiting())
            .finish_non_exhaustive()
    }
}

/// One registration; dropping it unregisters.
pub struct Waiting {
    pub rx: oneshot::Receiver<Notice>,
    waiters: Arc<Waiters>,
    id: String,
    slot: u64,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        let mut map = self.waiters.map.lock();
        if let Some(v) = map.get_mut(&self.id) {
            v.retain(|(slot, _)| *slot != self.slot);
            if v.is_empty() {
                map.remove(&self.id);
            }
        }
    }
}

impl Waiters {
    pub fn register(self: &Arc<Self>, id: &str) -> Waiting {
        let (tx, rx) = oneshot::channel();
        let slot = self.next.fetch_add(1, Relaxed);
        self.map
            .lock()
            .entry(id.to_owned())
            .or_default()
            .push((slot, tx));
        Waiting {
            rx,
            waiters: self.clone(),
            id: id.to_owned(),
            slot,
        }
    }

    pub fn dispatch(&self, id: &str, notice: Notice) {
        let Some(slots) = self.map.lock().remove(id) else {
            return;
        };
        for (_, tx) in slots {
            let _ = tx.send(notice.clone());
        }
    }

    /// Sets who hears other instances' `invalidate` (once; later calls are ignored).
    pub fn on_invalidated(&self, listener: Listener) {
        let _ = self.invalidated.set(listener);
    }

    /// Registered waits, all users together.
    pub fn waiting(&self) -> usize {
        self.map.lock().values().map(Vec::len).sum()
    }

    /// Wakes every waiter as if its lock had been released: they ask again.
    pub fn wake_all(&self) {
        let all = std::mem::take(&mut *self.map.lock());
        for (_, tx) in all.into_values().flatten() {
            let _ = tx.send(Notice::Released);
        }
    }

    /// The connection's push handler: a channel message becomes a dispatch.
    /// A dropped connection wakes every waiter: an announcement sent while
    /// it was down is lost, so they ask again rather than sleep out the
    /// lock's TTL (and then get "unavailable" at once, or the new state).
    /// Anything else (subscribe confirmations) is ignored.
    pub fn on_push(&self, info: PushInfo) {
        if info.kind == PushKind::Disconnection {
            self.wake_all();
            return;
        }
        if info.kind != PushKind::Message {
            return;
        }
        if let Some(Value::BulkString(m)) = info.data.get(1) {
            match decode_notice(m) {
                Some((id, Notice::Invalidated(sealed))) => {
                    if let Some(listen) = self.invalidated.get() {
                        listen(id, &sealed);
                    }
                }
                Some((id, notice)) => self.dispatch(id, notice),
                None => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn dispatch_reaches_registered_waiters_once() {
        let w = Arc::new(Waiters::default());
        let mut a = w.register("u");
        let b = w.register("u");
        let other = w.register("v");
        drop(b);
        assert_eq!(w.waiting(), 2);
        w.dispatch("u", Notice::Released);
        assert_eq!((&mut a.rx).await.unwrap(), Notice::Released);
        drop(a);
        assert_eq!(w.waiting(), 1);
        drop(other);
        assert_eq!(w.waiting(), 0);
    }

    #[tokio::test]
    async fn a_dropped_connection_wakes_every_waiter() {
        let w = Arc::new(Waiters::default());
        let mut a = w.register("u");
        let mut b = w.register("v");
        w.on_push(PushInfo {
            kind: PushKind::Disconnection,
            data: vec![],
        });
        assert_eq!((&mut a.rx).await.unwrap(), Notice::Released);
        assert_eq!((&mut b.rx).await.unwrap(), Notice::Released);
        assert_eq!(w.waiting(), 0);
    }
}
