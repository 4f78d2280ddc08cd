//! Users another instance's `invalidate` marked, waiting for the binding.
//!
//! The hot path runs in JavaScript and knows no core state, so the manager
//! keeps its own list of marked users and sends only their calls to `begin`
//! (`Engine::invalidate` returns until when a mark holds). A mark made here
//! by another instance (Redis pub/sub, on another thread) must reach that
//! list too: it waits in [`RemoteMarks`] until the manager takes it
//! (`Engine::take_remote_marks`), which the binding asks it to do as soon
//! as the first mark of a burst arrives (a threadsafe function).

use std::collections::VecDeque;

use parking_lot::Mutex;

use super::policy::EpochMs;

#[derive(Debug, Default)]
pub(crate) struct RemoteMarks {
    waiting: Mutex<VecDeque<(Box<str>, EpochMs)>>,
}

impl RemoteMarks {
    /// `user` is marked until `until`. Marks that lapsed while nobody took
    /// them are dropped, so what waits is bounded by one idle TTL of marks.
    /// True when nothing was waiting before (the manager must be told).
    pub fn push(&self, user: &str, until: EpochMs, now: EpochMs) -> bool {
        let mut w = self.waiting.lock();
        while w.front().is_some_and(|(_, u)| *u <= now) {
            w.pop_front();
        }
        let first = w.is_empty();
        w.push_back((user.into(), until));
        first
    }

    /// Everything waiting, oldest first; nothing waits afterwards.
    pub fn take(&self) -> Vec<(Box<str>, EpochMs)> {
        self.waiting.lock().drain(..).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_wait_until_taken_and_lapsed_ones_are_dropped() {
        let m = RemoteMarks::default();
        assert!(m.push("a", 100, 0), "the first mark tells the manager");
        assert!(!m.push("b", 200, 50), "later ones wait with it");
        // "a" lapsed before anyone took it.
        assert!(!m.push("c", 300, 150));
        let taken: Vec<(Box<str>, EpochMs)> = vec![("b".into(), 200), ("c".into(), 300)];
        assert_eq!(m.take(), taken);
        assert!(m.take().is_empty());
        assert!(
            m.push("d", 400, 200),
            "after a take, the next mark tells again"
        );
    }
}
