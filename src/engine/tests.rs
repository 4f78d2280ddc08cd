//! The core without Node: policy, single flight, eviction, error mapping.
//! (Unit tests, not tests/: an integration test binary would have to link
//! the napi symbols that only Node provides.)

use std::sync::{Arc, Barrier};

use crate::engine::table::EVICT_PER_CALL;
use crate::engine::{
    Engine, EngineError, ErrorCode, Failure, Issued, Plan, Policy, PolicyOptions, Presented,
    Refreshed, SecretString,
};

const NOW: i64 = 1_800_000_000_000;
const MIN: i64 = 60_000;

fn engine() -> Engine {
    Engine::new(Policy::default())
}

fn token(access: &str, expires_at: i64) -> Presented {
    Presented {
        access: SecretString::from(access),
        refresh: None,
        expires_at,
    }
}

fn with_refresh(access: &str, refresh: &str, expires_at: i64) -> Presented {
    Presented {
        access: access.into(),
        refresh: Some(refresh.into()),
        expires_at,
    }
}

fn refreshed(access: &str, expires_at: i64) -> Refreshed {
    Refreshed {
        access: Some(access.into()),
        expires_at: Some(expires_at as f64),
        ..Default::default()
    }
}

/// The engine's entry points called exactly as the binding calls them
/// (`src/binding/protocol.rs`), with whole tokens for readable tests.
pub(super) trait AsTheBindingCalls {
    /// `begin` with the access token read lazily, as the binding reads it.
    fn begin_with(&self, user: &str, p: &Presented, now: i64) -> Result<Plan, EngineError>;
    /// `complete`, and the token the caller then holds (lib/protocol.js
    /// rebuilds it from the same answer).
    fn complete_with(
        &self,
        user: &str,
        id: u32,
        r: Refreshed,
        now: i64,
    ) -> Result<Issued, EngineError>;
}

impl AsTheBindingCalls for Engine {
    fn begin_with(&self, user: &str, p: &Presented, now: i64) -> Result<Plan, EngineError> {
        self.begin(
            user,
            p.access.is_empty(),
            p.refresh.as_ref(),
            p.expires_at,
            || Ok(p.access.fingerprint()),
            now,
        )
    }

    fn complete_with(
        &self,
        user: &str,
        id: u32,
        r: Refreshed,
        now: i64,
    ) -> Result<Issued, EngineError> {
        let (access, refresh) = (r.access.clone(), r.refresh.clone());
        let brief = self.complete(user, id, r, now)?;
        Ok(Issued {
            access: access.expect("a completed refresh had an access token"),
            refresh: refresh.filter(|_| brief.hands_refresh),
            expires_at: brief.expires_at,
            should_update: true,
        })
    }
}

fn lead(e: &Engine, user: &str, p: &Presented, now: i64) -> (u32, Option<SecretString>) {
    match e.begin_with(user, p, now).unwrap() {
        Plan::Lead { id, refresh_token } => (id, refresh_token),
        other => panic!("expected to lead, got {other:?}"),
    }
}

#[test]
fn a_token_beyond_the_buffer_is_used_as_it_is() {
    let e = engine();
    assert!(e.policy().is_fresh(NOW + 6 * MIN, NOW));
    assert!(!e.policy().is_fresh(NOW + 4 * MIN, NOW));
    assert!(matches!(
        e.begin_with("u", &token("a", NOW + 6 * MIN), NOW).unwrap(),
        Plan::UsePresented
    ));
    let s = e.stats(NOW);
    assert_eq!((s.hits, s.refreshes, s.in_flight), (1, 0, 0));
}

#[test]
fn concurrent_callers_share_one_refresh_and_only_the_leader_updates() {
    let e = engine();
    let stale = with_refresh("old", "rt1", NOW + MIN);
    let (id, rt) = lead(&e, "u", &stale, NOW);
    assert_eq!(rt.unwrap().expose(), "rt1");
    for _ in 0..3 {
        assert!(matches!(e.begin_with("u", &stale, NOW).unwrap(), Plan::Join(j) if j == id));
    }
    // Another user is not held up.
    assert!(matches!(
        e.begin_with("v", &stale, NOW).unwrap(),
        Plan::Lead { .. }
    ));
    let issued = e
        .complete_with(
            "u",
            id,
            Refreshed {
                refresh: Some("rt2".into()),
                ..refreshed("new", NOW + 60 * MIN)
            },
            NOW,
        )
        .unwrap();
    assert_eq!(issued.access.expose(), "new");
    assert!(issued.should_update);
    assert_eq!(issued.refresh.unwrap().expose(), "rt2");
    let s = e.stats(NOW);
    assert_eq!((s.refreshes, s.coalesced, s.in_flight), (1, 3, 1));
}

#[test]
fn a_caller_with_an_older_token_gets_the_held_one_and_must_persist_it() {
    let e = engine();
    let stale = with_refresh("old", "rt1", NOW + MIN);
    let (id, _) = lead(&e, "u", &stale, NOW);
    e.complete_with(
        "u",
        id,
        Refreshed {
            refresh: Some("rt2".into()),
            ..refreshed("new", NOW + 60 * MIN)
        },
        NOW,
    )
    .unwrap();
    // Well past the double-check window (but within the idle TTL): an
    // identity check, not a timer.
    let later = NOW + 9 * MIN;
    match e
        .begin_with("u", &with_refresh("old", "rt1", NOW + MIN), later)
        .unwrap()
    {
        Plan::UseHeld(t) => {
            assert_eq!(t.access.expose(), "new");
            assert!(t.should_update, "its copy is stale: the lost write heals");
            assert_eq!(t.refresh.unwrap().expose(), "rt2");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn the_next_refresh_uses_the_rotated_refresh_token() {
    let e = Engine::new(Policy {
        double_check_window_ms: 0,
        ..Policy::default()
    });
    let (id, _) = lead(&e, "u", &with_refresh("a1", "rt1", NOW), NOW);
    e.complete_with(
        "u",
        id,
        Refreshed {
            refresh: Some("rt2".into()),
            ..refreshed("a2", NOW + 10 * MIN)
        },
        NOW,
    )
    .unwrap();
    // a2 is now inside the buffer; a caller still presenting a1/rt1 must not replay rt1.
    let later = NOW + 6 * MIN;
    let (_, rt) = lead(&e, "u", &with_refresh("a1", "rt1", NOW), later);
    assert_eq!(rt.unwrap().expose(), "rt2");
}

#[test]
fn a_refresh_that_keeps_the_refresh_token_keeps_it_for_the_next_one() {
    let e = Engine::new(Policy {
        double_check_window_ms: 0,
        ..Policy::default()
    });
    let (id, _) = lead(&e, "u", &with_refresh("a1", "rt1", NOW), NOW);
    let issued = e
        .complete_with("u", id, refreshed("a2", NOW + 10 * MIN), NOW)
        .unwrap();
    assert!(issued.refresh.is_none(), "nothing new to persist");
    let (_, rt) = lead(&e, "u", &token("a2", NOW + 10 * MIN), NOW + 6 * MIN);
    assert_eq!(rt.unwrap().expose(), "rt1");
}

#[test]
fn the_double_check_window_stops_a_second_refresh() {
    let e = engine(); // 10 s window, 5 min buffer
    let (id, _) = lead(&e, "u", &token("old", NOW), NOW);
    // The provider hands out a token living 15 s: past half its lifetime
    // (its buffer, Policy::buffer_for) after 7.5 s.
    e.complete_with("u", id, refreshed("short", NOW + 15_000), NOW)
        .unwrap();
    match e
        .begin_with("u", &token("short", NOW + 15_000), NOW + 8_000)
        .unwrap()
    {
        Plan::UseHeld(t) => {
            assert_eq!(t.access.expose(), "short");
            assert!(!t.should_update, "the caller already has it");
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        e.begin_with("u", &token("short", NOW + 15_000), NOW + 11_000)
            .unwrap(),
        Plan::Lead { .. }
    ));
    assert_eq!(e.stats(NOW + 11_000).refreshes, 1);
}

#[test]
fn a_failed_refresh_caches_nothing_and_the_next_call_retries() {
    let e = engine();
    let stale = token("old", NOW + MIN);
    let (id, _) = lead(&e, "u", &stale, NOW);
    assert!(matches!(
        e.begin_with("u", &stale, NOW).unwrap(),
        Plan::Join(_)
    ));
    e.fail("u", id, Failure::Rejected, NOW);
    // Still valid for a minute: the caller may keep it, after an outage.
    assert!(e.serve_stale("u", &stale, ErrorCode::RefreshFailed, NOW));
    assert!(
        !e.serve_stale("u", &token("old", NOW - 1), ErrorCode::RefreshTimeout, NOW),
        "an expired token is never served"
    );
    for verdict in [
        ErrorCode::ReauthRequired,
        ErrorCode::InvalidClient,
        ErrorCode::InvalidRefreshResult,
        ErrorCode::InvalidArgument,
        ErrorCode::Internal,
    ] {
        assert!(
            !e.serve_stale("u", &stale, verdict, NOW),
            "{verdict:?} is a verdict, not an outage: never ridden out"
        );
    }
    assert!(matches!(
        e.begin_with("u", &stale, NOW + 1).unwrap(),
        Plan::Lead { .. }
    ));
    let s = e.stats(NOW + 1);
    assert_eq!((s.failures, s.stale_served, s.refreshes), (1, 1, 0));
}

#[test]
fn a_timeout_is_counted_and_a_late_result_is_kept() {
    let e = engine();
    let stale = with_refresh("old", "rt1", NOW);
    let (id, _) = lead(&e, "u", &stale, NOW);
    e.fail("u", id, Failure::TimedOut, NOW + 30_000);
    assert_eq!(e.stats(NOW + 30_000).in_flight, 0);
    // The refresh answers after all: with rotation it holds the only live
    // refresh token, so it is kept for the next caller.
    e.complete_with(
        "u",
        id,
        Refreshed {
            refresh: Some("rt2".into()),
            ..refreshed("late", NOW + 60 * MIN)
        },
        NOW + 31_000,
    )
    .unwrap();
    match e.begin_with("u", &stale, NOW + 32_000).unwrap() {
        Plan::UseHeld(t) => assert_eq!((t.access.expose(), t.should_update), ("late", true)),
        other => panic!("{other:?}"),
    }
    assert_eq!(e.stats(NOW + 32_000).timeouts, 1);
}

#[test]
fn invalid_refresh_results_are_rejected_and_not_cached() {
    let e = engine();
    let cases: Vec<(Refreshed, &str)> = vec![
        (Refreshed::default(), "accessToken"),
        (refreshed("", NOW + MIN), "accessToken"),
        (
            Refreshed {
                access: Some("a".into()),
                ..Default::default()
            },
            "expiresAt nor expiresIn",
        ),
        (refreshed("a", NOW - 1), "past"),
        (
            Refreshed {
                access: Some("a".into()),
                expires_in: Some(0.0),
                ..Default::default()
            },
            "expiresIn",
        ),
        (
            Refreshed {
                access: Some("a".into()),
                expires_in: Some(f64::NAN),
                ..Default::default()
            },
            "expiresIn",
        ),
    ];
    for (r, says) in cases {
        let (id, _) = lead(&e, "u", &token("old", NOW), NOW);
        let err = e.complete_with("u", id, r, NOW).unwrap_err();
        assert_eq!(err.code(), ErrorCode::InvalidRefreshResult);
        assert_eq!(err.code().as_str(), "INVALID_REFRESH_RESULT");
        assert!(err.to_string().contains(says), "{err}");
    }
    let s = e.stats(NOW);
    assert_eq!((s.failures, s.refreshes, s.in_flight), (6, 0, 0));
}

#[test]
fn expiries_a_date_cannot_hold_are_invalid_results_on_every_path_in() {
    let e = engine();
    let expiry = |at: f64| Refreshed {
        access: Some("a".into()),
        expires_at: Some(at),
        ..Default::default()
    };
    for bad in [1e300, -1e300, 8.64e15 + 1.0, f64::INFINITY, f64::NAN] {
        let (id, _) = lead(&e, "u", &token("old", NOW), NOW);
        let err = e.complete_with("u", id, expiry(bad), NOW).unwrap_err();
        assert_eq!(err.code(), ErrorCode::InvalidRefreshResult, "{bad}");
        let (id, _) = lead(&e, "u", &token("old", NOW), NOW);
        let err = e.adopt("u", id, expiry(bad), true, NOW).unwrap_err();
        assert_eq!(err.code(), ErrorCode::InvalidRefreshResult, "{bad}");
    }
    // Nothing was kept: the next call still refreshes.
    lead(&e, "u", &token("old", NOW), NOW);
    // The largest a Date holds is fine, taken to live no longer than
    // maxTokenLifetimeMs.
    let (id, _) = lead(&e, "v", &token("old", NOW), NOW);
    let t = e.complete_with("v", id, expiry(8.64e15), NOW).unwrap();
    assert_eq!(
        t.expires_at,
        NOW + crate::engine::policy::DEFAULT_MAX_TOKEN_LIFETIME_MS as i64
    );
}

#[test]
fn tokens_over_the_limit_are_invalid_results() {
    use crate::engine::MAX_TOKEN_BYTES;
    let e = engine();
    let long = "x".repeat(MAX_TOKEN_BYTES + 1);
    for r in [
        refreshed(&long, NOW + 60 * MIN),
        Refreshed {
            refresh: Some(long.as_str().into()),
            ..refreshed("a", NOW + 60 * MIN)
        },
    ] {
        let (id, _) = lead(&e, "u", &token("old", NOW), NOW);
        let err = e.complete_with("u", id, r, NOW).unwrap_err();
        assert_eq!(err.code(), ErrorCode::InvalidRefreshResult);
        assert!(err.to_string().contains("65536 bytes"), "{err}");
    }
    let (id, _) = lead(&e, "u", &token("old", NOW), NOW);
    let at_limit = "x".repeat(MAX_TOKEN_BYTES);
    assert!(e
        .complete_with("u", id, refreshed(&at_limit, NOW + 60 * MIN), NOW)
        .is_ok());
}

#[test]
fn a_flight_its_caller_lost_is_closed_once_overdue() {
    use crate::engine::policy::FLIGHT_GRACE_MS;
    let e = engine();
    let stale = token("old", NOW);
    // The leader never reports (its caller threw before the refresh).
    let (lost, _) = lead(&e, "u", &stale, NOW);
    let overdue = Policy::default().refresh_timeout_ms as i64 + FLIGHT_GRACE_MS as i64;
    match e.begin_with("u", &stale, NOW + overdue).unwrap() {
        Plan::Join(id) => assert_eq!(id, lost, "within the grace: still joined"),
        other => panic!("{other:?}"),
    }
    let later = NOW + overdue + 1;
    let (id, _) = lead(&e, "u", &stale, later);
    assert_ne!(id, lost);
    let s = e.stats(later);
    assert_eq!((s.in_flight, s.timeouts), (1, 1));
    // The lost flight reporting after all changes nothing for the new one.
    e.fail("u", lost, Failure::Rejected, later);
    assert_eq!(e.stats(later).in_flight, 1);
    e.complete_with("u", id, refreshed("new", later + 60 * MIN), later)
        .unwrap();
    assert_eq!(e.stats(later).in_flight, 0);
}

#[test]
fn expires_in_counts_from_now() {
    let e = engine();
    let (id, _) = lead(&e, "u", &token("old", NOW), NOW);
    let t = e
        .complete_with(
            "u",
            id,
            Refreshed {
                access: Some("a".into()),
                expires_in: Some(3600.0),
                ..Default::default()
            },
            NOW,
        )
        .unwrap();
    assert_eq!(t.expires_at, NOW + 3_600_000);
}

#[test]
fn an_invalidated_token_is_refreshed_before_it_expires() {
    let e = engine();
    let good = token("t1", NOW + 50 * MIN);
    let until = e.invalidate("u", Some(&"t1".into()), NOW).unwrap();
    // The mark lasts one idle TTL: until then the caller sends u's calls to
    // begin, whatever the buffer rule says.
    assert_eq!(until, NOW + Policy::default().idle_ttl_ms as i64);
    let (id, _) = lead(&e, "u", &good, NOW);
    e.complete_with("u", id, refreshed("t2", NOW + 60 * MIN), NOW)
        .unwrap();
    // Other users' valid tokens are still fine, just looked up.
    assert!(matches!(
        e.begin_with("v", &token("x", NOW + 50 * MIN), NOW).unwrap(),
        Plan::UsePresented
    ));
    // A caller still holding t1 is handed t2 without another refresh.
    match e.begin_with("u", &good, NOW + 20_000).unwrap() {
        Plan::UseHeld(t) => assert_eq!((t.access.expose(), t.should_update), ("t2", true)),
        other => panic!("{other:?}"),
    }
    // The mark fades after one idle TTL: t1 is served again.
    let after = until + 1;
    assert!(matches!(
        e.begin_with("u", &token("t1", after + 50 * MIN), after)
            .unwrap(),
        Plan::UsePresented
    ));
}

#[test]
fn another_instances_invalidate_waits_for_the_manager_to_take_its_marks() {
    let e = engine();
    let good = token("t1", NOW + 50 * MIN);
    let first = e
        .invalidate_from_elsewhere("u", Some(&"t1".into()), NOW)
        .unwrap();
    assert!(
        first,
        "the first mark of a burst asks the binding to notify"
    );
    assert!(!e
        .invalidate_from_elsewhere("v", Some(&"t9".into()), NOW)
        .unwrap());
    // The core knows the revocation at once.
    assert!(matches!(
        e.begin_with("u", &good, NOW).unwrap(),
        Plan::Lead { .. }
    ));
    let until = NOW + Policy::default().idle_ttl_ms as i64;
    assert_eq!(
        e.take_remote_marks(),
        vec![("u".into(), until), ("v".into(), until)]
    );
    assert!(e.take_remote_marks().is_empty());
}

#[test]
fn invalidate_without_a_token_refreshes_whatever_comes_next() {
    let e = engine();
    e.invalidate("u", None, NOW).unwrap();
    assert!(matches!(
        e.begin_with("u", &token("any", NOW + 50 * MIN), NOW)
            .unwrap(),
        Plan::Lead { .. }
    ));
}

/// Runs rounds of one slice of `budget` per shard, as the background task
/// does, until no shard has more due at `now`: (slices, entries and lapses
/// visited). Bounded: panics rather than loop forever.
fn evict_all(e: &Engine, now: i64, budget: usize) -> (usize, usize) {
    let (mut slices, mut visited) = (0, 0);
    loop {
        let mut more = false;
        for shard in 0..e.shards() {
            let slice = e.evict(shard, now, budget);
            assert!(slice.visited <= budget, "{slice:?}");
            slices += 1;
            visited += slice.visited;
            more |= slice.next_due.is_some_and(|due| due <= now);
        }
        if !more {
            return (slices, visited);
        }
        assert!(slices < 1_000_000, "eviction never finished");
    }
}

/// The revocation count the shards keep, and the one a scan finds.
fn revoking(e: &Engine) -> (usize, usize) {
    let (mut kept, mut scanned) = (0, 0);
    for shard in e.shards.iter() {
        let t = shard.lock();
        kept += t.revoking;
        scanned += t.count_revoking();
    }
    (kept, scanned)
}

/// Entries held, counted shard by shard (not from the kept total).
fn held(e: &Engine) -> usize {
    e.shards.iter().map(|s| s.lock().len()).sum()
}

#[test]
fn idle_users_are_dropped_but_not_while_refreshing() {
    let e = Engine::new(Policy {
        idle_ttl_ms: 1_000,
        ..Policy::default()
    });
    for i in 0..100 {
        e.begin_with(&format!("u{i}"), &token("a", NOW + 60 * MIN), NOW)
            .unwrap();
    }
    let (_id, _) = lead(&e, "busy", &token("old", NOW), NOW);
    evict_all(&e, NOW + 999, 16);
    assert_eq!(e.stats(NOW + 999).users, 101);
    evict_all(&e, NOW + 1_000, 16);
    let s = e.stats(NOW + 1_000);
    assert_eq!(
        (s.users, s.in_flight),
        (1, 1),
        "only the user with a refresh in flight stays"
    );
    // A refresh running counts as a use: it is not looked at again for a TTL.
    let slice = e.evict(e.shard_of("busy"), NOW + 1_999, 16);
    assert_eq!((slice.visited, slice.next_due), (0, Some(NOW + 2_000)));
}

/// Entries and lapses visited by every slice of eviction so far.
fn visits(e: &Engine) -> usize {
    e.shards.iter().map(|s| s.lock().visits).sum()
}

#[test]
fn eviction_does_bounded_work_per_call_and_drops_every_idle_entry() {
    let ttl = 1_000;
    let e = Engine::new(Policy {
        idle_ttl_ms: ttl as u64,
        ..Policy::default()
    });
    let fresh = token("a", NOW + 60 * MIN);
    for i in 0..10_000 {
        e.begin_with(&format!("old{i}"), &fresh, NOW).unwrap();
    }
    let (_busy, _) = lead(&e, "busy", &token("old", NOW), NOW);
    assert_eq!((held(&e), e.stats(NOW).users), (10_001, 10_001));
    // Once they are idle, each slow-path call visits a small constant
    // number of them (in its user's shard), never the lot, and evicts
    // what it visits: calls alone drain the backlog.
    let idle = NOW + ttl;
    let held_before = held(&e);
    for i in 0..5_000 {
        let (before, visited) = (held(&e), visits(&e));
        e.begin_with(&format!("new{i}"), &fresh, idle).unwrap();
        let (after, visited) = (held(&e), visits(&e) - visited);
        assert!(visited <= EVICT_PER_CALL, "call {i} visited {visited}");
        assert!(before + 1 - after <= visited, "call {i}");
    }
    let by_calls = held_before + 5_000 - held(&e);
    assert!(by_calls > 5_000, "calls evicted only {by_calls}");
    // stats() looks at a few entries, then reads kept totals.
    let visited = visits(&e);
    let s = e.stats(idle);
    assert!(visits(&e) - visited <= 64);
    assert_eq!((s.users, s.in_flight), (held(&e), 1));
    // Without calls, slices evict everything idle, each visiting no more
    // than its budget, and each entry is visited once (busy moved aside).
    let later = idle + ttl;
    let left = held(&e);
    let (slices, visited) = evict_all(&e, later, 64);
    assert_eq!(visited, left, "every entry once");
    assert!(slices >= left / 64, "{slices} slices");
    let s = e.stats(later);
    assert_eq!((s.users, s.in_flight, held(&e)), (1, 1, 1));
    assert_eq!(revoking(&e), (0, 0));
}

#[test]
fn lapsed_revocations_are_pruned_with_no_call() {
    let ttl = 1_000;
    let e = Engine::new(Policy {
        idle_ttl_ms: ttl as u64,
        ..Policy::default()
    });
    let good = NOW + 60 * MIN;
    e.invalidate("u", Some(&"t1".into()), NOW).unwrap();
    e.invalidate("v", Some(&"t1".into()), NOW).unwrap();
    e.invalidate("v", Some(&"t2".into()), NOW + 500).unwrap();
    // Both users stay in use past their first mark's lapse.
    e.begin_with("u", &token("x", good), NOW + ttl - 1).unwrap();
    e.begin_with("v", &token("x", good), NOW + ttl - 1).unwrap();
    assert_eq!(revoking(&e), (2, 2));
    // u's mark lapses; v's later one still holds.
    evict_all(&e, NOW + ttl, 1);
    assert_eq!(revoking(&e), (1, 1));
    assert!(e.is_revoked("v", &"t2".into(), NOW + ttl));
    assert!(!e.is_revoked("u", &"t1".into(), NOW + ttl));
    evict_all(&e, NOW + 500 + ttl, 1);
    assert_eq!(revoking(&e), (0, 0));
    assert_eq!(
        e.stats(NOW + 500 + ttl).users,
        2,
        "revocations pruned, users kept"
    );
    // An evicted entry takes its revocation with it; the count stays exact.
    e.invalidate("w", None, NOW + 2 * ttl).unwrap();
    assert_eq!(revoking(&e), (1, 1));
    evict_all(&e, NOW + 4 * ttl, 8);
    assert_eq!(held(&e), 0);
    assert_eq!(revoking(&e), (0, 0));
    assert!(e.policy().is_fresh(good, NOW + 4 * ttl));
}

#[test]
fn state_is_bounded_by_eviction_during_normal_calls() {
    let e = Engine::new(Policy {
        idle_ttl_ms: 1_000,
        ..Policy::default()
    });
    // 10 waves of 1,000 new users, 1 s apart: no stats() call needed.
    for wave in 0..10i64 {
        for i in 0..1_000 {
            e.begin_with(
                &format!("w{wave}-{i}"),
                &token("a", NOW + 60 * MIN),
                NOW + wave * 1_000,
            )
            .unwrap();
        }
    }
    // Each wave's calls evicted the waves before it, which had gone idle:
    // a call evicts up to two in its user's shard for the one it adds, so
    // of the 9,000 idle users only a few are left (in shards the last wave
    // happened to visit less than the one before; the next calls there, or
    // the background task, take them).
    let n = held(&e);
    assert!((1_000..1_500).contains(&n), "{n} held");
}

#[tokio::test]
async fn the_background_task_evicts_with_no_call_and_ends_with_its_engine() {
    use crate::engine::{evictor, time};
    let e = Arc::new(Engine::new(Policy {
        idle_ttl_ms: 50,
        ..Policy::default()
    }));
    let now = time::now_ms();
    for i in 0..3_000 {
        e.begin_with(&format!("u{i}"), &token("a", now + 60 * MIN), now)
            .unwrap();
    }
    let task = evictor::start(&e).expect("the eviction thread starts");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while held(&e) > 0 {
        assert!(std::time::Instant::now() < deadline, "not evicted in 10 s");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    // It ran on the shared thread, at the lowest normal priority, which
    // leaves the CPU to the JS thread when a burst falls due.
    #[cfg(target_os = "linux")]
    assert_eq!(nice_of_thread(evictor::THREAD_NAME), Some(19));
    drop(e);
    tokio::time::timeout(std::time::Duration::from_secs(5), task)
        .await
        .expect("the task ends once the engine is gone")
        .unwrap();
}

/// The nice value of this process's thread named `name` (`/proc`).
#[cfg(target_os = "linux")]
fn nice_of_thread(name: &str) -> Option<i32> {
    std::fs::read_dir("/proc/self/task").ok()?.find_map(|t| {
        let dir = t.ok()?.path();
        let comm = std::fs::read_to_string(dir.join("comm")).ok()?;
        if comm.trim_end() != name {
            return None;
        }
        let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
        // Fields after "(comm) ": state is the 3rd of stat(5), nice the 19th.
        let rest = &stat[stat.rfind(')')? + 2..];
        rest.split(' ').nth(19 - 3)?.parse().ok()
    })
}

#[tokio::test]
async fn work_no_caller_asks_for_runs_on_the_callers_clock_as_last_seen() {
    use crate::engine::{evictor, time};
    // A test's fake clock, years before the machine's.
    const PAST: i64 = 1_577_836_800_000; // 2020-01-01T00:00:00Z
    let e = Arc::new(Engine::new(Policy {
        idle_ttl_ms: 60_000,
        ..Policy::default()
    }));
    let before = time::now_ms();
    assert!(
        (before..before + 5_000).contains(&e.app_now()),
        "no call yet: the system clock"
    );
    e.begin_with("u", &token("a", PAST + 60 * MIN), PAST)
        .unwrap();
    let seen = e.app_now();
    assert!((PAST..PAST + 5_000).contains(&seen), "{seen}");
    // The background task evicts nothing stamped a minute ago by that clock,
    // though by the machine's date the user is years idle.
    let task = tokio::spawn(evictor::run(Arc::downgrade(&e)));
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(held(&e), 1);
    // Another instance's invalidation is stamped the same way: it lasts one
    // TTL on the callers' clock.
    e.invalidate("u", None, e.app_now()).unwrap();
    assert!(e.is_revoked("u", &"a".into(), PAST + 1_000));
    assert!(!e.is_revoked("u", &"a".into(), PAST + 70_000));
    // Once the callers' clock passes the TTL, the next call's slice drops it.
    assert_eq!(e.stats(PAST + 200_000).users, 0);
    drop(e);
    task.await.unwrap();
}

#[test]
fn bad_arguments_are_typed_errors_and_leave_no_state() {
    let e = engine();
    let err = e.begin_with("", &token("a", NOW), NOW).unwrap_err();
    assert_eq!(
        err,
        EngineError::invalid_argument("userId", "must be a non-empty string")
    );
    assert_eq!(err.code().as_str(), "INVALID_ARGUMENT");
    let long = "x".repeat(513);
    assert!(e.begin_with(&long, &token("a", NOW), NOW).is_err());
    assert!(e.invalidate("", None, NOW).is_err());
    assert_eq!(e.stats(NOW).users, 0);
    assert!(Policy::from_options(&PolicyOptions {
        idle_ttl_ms: Some(-5.0),
        ..Default::default()
    })
    .is_err());
}

#[test]
fn errors_and_debug_output_never_show_tokens() {
    let e = engine();
    let (id, _) = lead(
        &e,
        "u",
        &with_refresh("secret-access", "secret-refresh", NOW),
        NOW,
    );
    let err = e
        .complete_with("u", id, refreshed("secret-new", NOW - 1), NOW)
        .unwrap_err();
    let plan = e
        .begin_with(
            "u",
            &with_refresh("secret-access", "secret-refresh", NOW),
            NOW,
        )
        .unwrap();
    let dumped = format!("{err} {err:?} {plan:?} {e:?}");
    assert!(!dumped.contains("secret"), "{dumped}");
}

#[test]
fn one_leader_across_threads() {
    let e = Arc::new(engine());
    let threads = 8;
    let barrier = Arc::new(Barrier::new(threads));
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (e, b) = (e.clone(), barrier.clone());
            std::thread::spawn(move || {
                b.wait();
                (0..1_000)
                    .filter(|_| {
                        matches!(
                            e.begin_with("u", &token("old", NOW), NOW).unwrap(),
                            Plan::Lead { .. }
                        )
                    })
                    .count()
            })
        })
        .collect();
    let leaders: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
    assert_eq!(leaders, 1);
    assert_eq!(e.stats(NOW).coalesced, 7_999);
}

#[test]
fn shards_take_shares_spanning_a_factor_of_two() {
    // Unequal on purpose, so shards do not all grow their maps at once.
    let e = engine();
    let mut counts = vec![0usize; e.shards()];
    for i in 0..256_000 {
        counts[e.shard_of(&format!("user-{i}"))] += 1;
    }
    let n = e.shards();
    let (first, last) = (
        counts[..n / 8].iter().sum::<usize>(),
        counts[n - n / 8..].iter().sum::<usize>(),
    );
    let ratio = last as f64 / first as f64;
    assert!((1.7..2.0).contains(&ratio), "{ratio}");
    assert!(counts.iter().all(|&c| c > 500), "every shard used");
}

#[test]
fn a_short_lived_token_this_engine_issued_is_not_due_at_once() {
    // Two-minute tokens under the default five-minute buffer: the engine
    // knows their lifetime, so it measures them against half of it.
    let e = engine();
    let (id, _) = lead(&e, "u", &with_refresh("old", "rt1", NOW - 1), NOW);
    let issued = e
        .complete_with("u", id, refreshed("new", NOW + 2 * MIN), NOW)
        .unwrap();
    let held = token(issued.access.expose(), issued.expires_at);
    for later in [0, 30_000, MIN - 1] {
        assert!(
            matches!(
                e.begin_with("u", &held, NOW + later).unwrap(),
                Plan::UsePresented
            ),
            "{later} ms after it came, the token is fresh for its lifetime"
        );
    }
    assert!(
        matches!(
            e.begin_with("u", &held, NOW + MIN).unwrap(),
            Plan::Lead { .. }
        ),
        "half its lifetime left: due"
    );
    // Another token with the same expiry, not the one issued: the plain rule.
    let e2 = engine();
    assert!(matches!(
        e2.begin_with("u", &token("other", NOW + 2 * MIN), NOW)
            .unwrap(),
        Plan::Lead { .. }
    ));
    assert_eq!(e.stats(NOW).refreshes, 1);
}

#[test]
fn a_refresh_ahead_leads_once_while_the_token_is_still_fresh() {
    let e = engine();
    let fresh = with_refresh("a", "rt1", NOW + 10 * MIN);
    let ahead = |p: &Presented, ahead_ms: i64| {
        e.begin_ahead(
            "u",
            false,
            p.refresh.as_ref(),
            p.expires_at,
            || Ok(p.access.fingerprint()),
            NOW,
            ahead_ms,
        )
        .unwrap()
    };
    assert!(
        matches!(ahead(&fresh, 4 * MIN), Plan::UsePresented),
        "not yet at the buffer as of then"
    );
    let Plan::Lead { id, refresh_token } = ahead(&fresh, 5 * MIN) else {
        panic!("as of the buffer's start, it is due");
    };
    assert_eq!(refresh_token.unwrap().expose(), "rt1");
    // A foreground call meanwhile is served its fresh token, not held up.
    assert!(matches!(
        e.begin_with("u", &fresh, NOW).unwrap(),
        Plan::UsePresented
    ));
    // A second refresh ahead joins the first.
    assert!(matches!(ahead(&fresh, 5 * MIN), Plan::Join(j) if j == id));
    e.complete_with("u", id, refreshed("b", NOW + 70 * MIN), NOW)
        .unwrap();
    // Once refreshed, the old token asking ahead is handed the new one.
    match ahead(&fresh, 5 * MIN) {
        Plan::UseHeld(t) => assert_eq!(t.access.expose(), "b"),
        other => panic!("expected the held token, got {other:?}"),
    }
    assert_eq!(e.stats(NOW).refreshes, 1);
}

#[test]
fn forget_drops_the_held_token_and_refuses_the_old_one() {
    let e = engine();
    let (id, _) = lead(&e, "u", &with_refresh("old", "rt1", NOW - 1), NOW);
    let issued = e
        .complete_with("u", id, refreshed("new", NOW + 60 * MIN), NOW)
        .unwrap();
    e.forget("u", NOW).unwrap();
    // Presenting the old (still valid) token does not get it served, nor
    // the held one handed out: the caller must refresh (or has no row).
    let p = token(issued.access.expose(), issued.expires_at);
    assert!(matches!(
        e.begin_with("u", &p, NOW).unwrap(),
        Plan::Lead {
            refresh_token: None,
            ..
        }
    ));
    assert!(matches!(
        e.forget("", NOW),
        Err(EngineError::InvalidArgument { .. })
    ));
}
