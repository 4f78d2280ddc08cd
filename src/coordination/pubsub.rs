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
//!
//! Anyone who can reach Redis can publish on the channel, so a message is
//! taken only if it is at most `MAX_NOTICE_BYTES` (checked first), its MAC
//! verifies under one of the encryption keys (`seal.rs`), it was sent
//! within `NOTICE_LIFETIME_MS`, and (an invalidation) its random id was not
//! seen before in that time. Everything else is dropped and counted
//! (`dropped`).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;
use redis::{PushInfo, PushKind, Value};
use tokio::sync::oneshot;

use super::record::{decode_notice, Notice, MAX_NOTICE_BYTES, NOTICE_LIFETIME_MS};
use super::seal::SealKeys;
use crate::engine::EpochMs;

type Slot = (u64, oneshot::Sender<Notice>);
/// Hears `Notice::Invalidated`: the hashed user id and the sealed payload.
pub type Listener = Box<dyn Fn(&str, &[u8]) + Send + Sync>;

/// Refreshes waiting for an announcement, by hashed user id.
#[derive(Default)]
pub struct Waiters {
    map: Mutex<HashMap<String, Vec<Slot>>>,
    next: AtomicU64,
    invalidated: OnceLock<Listener>,
    /// What notices are verified with, and the channel they must have been
    /// signed for; none taken until it is set.
    keys: OnceLock<(Arc<SealKeys>, String)>,
    seen: Mutex<Seen>,
    dropped: AtomicU64,
}

/// Most invalidation ids remembered (those of the last
/// `NOTICE_LIFETIME_MS`): past it, new ones are dropped rather than
/// memory grow (about 4,000 invalidations a second, fleet-wide).
const MAX_SEEN: usize = 1 << 18;

/// The random ids of the invalidations taken within their lifetime, so a
/// replayed one is dropped.
#[derive(Default)]
struct Seen {
    ids: HashSet<u64>,
    order: VecDeque<(EpochMs, u64)>,
}

impl Seen {
    /// Whether `id` (sent at `sent_at`) is new; remembers it.
    fn first(&mut self, id: u64, sent_at: EpochMs, now: EpochMs) -> bool {
        while let Some(&(at, old)) = self.order.front() {
            if at >= now.saturating_sub(NOTICE_LIFETIME_MS) {
                break;
            }
            self.order.pop_front();
            self.ids.remove(&old);
        }
        if self.ids.len() >= MAX_SEEN || !self.ids.insert(id) {
            return false;
        }
        // Ordered by arrival; a send time later than the front only makes
        // an id live a little longer.
        self.order
            .push_back((sent_at.max(now.saturating_sub(NOTICE_LIFETIME_MS)), id));
        true
    }
}

/// The system clock in ms since the epoch: notices cross processes, so
/// their freshness is judged on real time, not on any caller's clock.
pub fn system_now() -> EpochMs {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as EpochMs)
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

    /// Sets the keys notices are verified with, and the channel they come
    /// on (once; later calls are ignored).
    pub fn authenticate_with(&self, keys: Arc<SealKeys>, channel: &str) {
        let _ = self.keys.set((keys, channel.to_owned()));
    }

    /// Notices dropped so far: oversized, not verified by any key (forged,
    /// or signed with a key this instance does not hold), out of their
    /// lifetime, replayed, or unreadable.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Relaxed)
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
            if !self.take(m, system_now()) {
                self.dropped.fetch_add(1, Relaxed);
            }
        }
    }

    /// Verifies and hands on one channel message received at `now`
    /// (system clock); false if it was dropped.
    fn take(&self, m: &[u8], now: EpochMs) -> bool {
        if m.len() > MAX_NOTICE_BYTES {
            return false;
        }
        let Some(v) = self
            .keys
            .get()
            .and_then(|(k, channel)| k.verify_notice(channel, m))
        else {
            return false;
        };
        if v.sent_at.saturating_sub(now).unsigned_abs() > NOTICE_LIFETIME_MS as u64 {
            return false;
        }
        match decode_notice(v.body) {
            Some((id, Notice::Invalidated(sealed))) => {
                if !self.seen.lock().first(v.id, v.sent_at, now) {
                    return false;
                }
                if let Some(listen) = self.invalidated.get() {
                    listen(id, &sealed);
                }
            }
            Some((id, notice)) => self.dispatch(id, notice),
            None => return false,
        }
        true
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

    const KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    const CH: &str = "ttm:refreshed";

    fn authenticated() -> (Arc<Waiters>, Arc<SealKeys>) {
        let w = Arc::new(Waiters::default());
        let keys = Arc::new(SealKeys::from_base64(KEY).unwrap());
        w.authenticate_with(keys.clone(), CH);
        (w, keys)
    }

    #[tokio::test]
    async fn only_signed_fresh_notices_reach_waiters() {
        use crate::coordination::record::encode_notice;
        let (w, keys) = authenticated();
        let now = 1_700_000_000_000;
        let mut a = w.register("u");
        let failed = encode_notice("u", &Notice::Failed { fence: 1 });
        // Unsigned, signed by another key, stale, from the future, oversized: dropped.
        let other = SealKeys::from_base64("HxwdHhsaGRgXFhUUExIREA8ODQwLCgkIBwYFBAMCAQA=").unwrap();
        assert!(!w.take(&failed, now));
        assert!(!w.take(&other.sign_notice(CH, &failed, now, 1), now));
        assert!(!w.take(
            &keys.sign_notice(CH, &failed, now - NOTICE_LIFETIME_MS - 1, 2),
            now
        ));
        assert!(!w.take(
            &keys.sign_notice(CH, &failed, now + NOTICE_LIFETIME_MS + 1, 3),
            now
        ));
        assert!(!w.take(&vec![b'u'; MAX_NOTICE_BYTES + 1], now));
        assert!(!w.take(&keys.sign_notice(CH, b"u|X", now, 4), now));
        // Signed for another prefix's channel (same key): dropped.
        assert!(!w.take(&keys.sign_notice("other:refreshed", &failed, now, 6), now));
        assert!(a.rx.try_recv().is_err());
        // Signed and fresh: taken.
        assert!(w.take(&keys.sign_notice(CH, &failed, now - 1_000, 5), now));
        assert_eq!((&mut a.rx).await.unwrap(), Notice::Failed { fence: 1 });
    }

    #[test]
    fn a_replayed_invalidation_is_dropped_within_its_lifetime() {
        use crate::coordination::record::encode_notice;
        let (w, keys) = authenticated();
        let heard = Arc::new(AtomicU64::new(0));
        let h = heard.clone();
        w.on_invalidated(Box::new(move |_, _| {
            h.fetch_add(1, Relaxed);
        }));
        let now = 1_700_000_000_000;
        let m = keys.sign_notice(
            CH,
            &encode_notice("u", &Notice::Invalidated(b"s".to_vec())),
            now,
            9,
        );
        assert!(w.take(&m, now));
        assert!(!w.take(&m, now + 10));
        assert!(!w.take(&m, now + NOTICE_LIFETIME_MS));
        // Another id is another invalidation.
        let other = keys.sign_notice(
            CH,
            &encode_notice("u", &Notice::Invalidated(b"s".to_vec())),
            now,
            10,
        );
        assert!(w.take(&other, now + 20));
        assert_eq!(heard.load(Relaxed), 2);
    }

    #[test]
    fn the_memory_of_invalidation_ids_is_bounded() {
        let mut seen = Seen::default();
        let now = 1_000_000;
        for id in 0..MAX_SEEN as u64 {
            assert!(seen.first(id, now, now));
        }
        assert!(!seen.first(u64::MAX, now, now));
        // A lifetime later, the old ids are forgotten and new ones taken.
        assert!(seen.first(u64::MAX, now, now + NOTICE_LIFETIME_MS + 1));
        assert_eq!(seen.ids.len(), 1);
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
