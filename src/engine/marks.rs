//! Users another instance's `invalidate` marked, waiting for the binding.
//!
//! The hot path (`Engine::is_fresh`) knows no users, so the binding keeps
//! its own list of marked users and sends only their calls to `begin`
//! (`Engine::invalidate` returns until when a mark holds). A mark made here
//! by another instance (Redis pub/sub, on another thread) must reach that
//! list too: it waits in [`RemoteMarks`], and while anything waits the hot
//! path answers "not fresh" for everyone, so every call goes to `begin`
//! (which knows the revocation) and the first one takes the marks over
//! (`Engine::take_remote_marks`). One relaxed load on the hot path.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

use parking_lot::Mutex;

use super::policy::EpochMs;

#[derive(Debug, Default)]
pub(crate) struct RemoteMarks {
    waiting: Mutex<VecDeque<(Box<str>, EpochMs)>>,
    /// `waiting` is not empty. Written under its lock, read without.
    pending: AtomicBool,
}

impl RemoteMarks {
    #[inline]
    pub fn pending(&self) -> bool {
        self.pending.load(Relaxed)
    }

    /// `user` is marked until `until`. Marks that lapsed while nobody took
    /// them are dropped, so what waits is bounded by one idle TTL of marks.
    pub fn push(&self, user: &str, until: EpochMs, now: EpochMs) {
        let mut w = self.waiting.lock();
        while w.front().is_some_and(|(_, u)| *u <= now) {
            w.pop_front();
        }
        w.push_back((user.into(), until));
        self.pending.store(true, Relaxed);
    }

    /// Everything waiting, oldest first; nothing waits afterwards.
    pub fn take(&self) -> Vec<(Box<str>, EpochMs)> {
        let mut w = self.waiting.lock();
        self.pending.store(false, Relaxed);
        w.drain(..).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_wait_until_taken_and_lapsed_ones_are_dropped() {
        let m = RemoteMarks::default();
        assert!(!m.pending());
        m.push("a", 100, 0);
        m.push("b", 200, 50);
        assert!(m.pending());
        // "a" lapsed before anyone took it.
        m.push("c", 300, 150);
        let taken: Vec<(Box<str>, EpochMs)> = vec![("b".into(), 200), ("c".into(), 300)];
        assert_eq!(m.take(), taken);
        assert!(!m.pending() && m.take().is_empty());
    }
}
