//! Redis faults: odd records, stalls, restarts (`health.rs`). Against real
//! `redis-server`s on random loopback ports, like `tests.rs`.

use std::time::Duration;

use redis::AsyncCommands;
use tokio::time::Instant;

use super::tests::{old, policy, soon, token, Server, KEY_A};
use super::*;
use crate::engine::time::CallerNow;
use crate::engine::{time, Policy, SecretString};

/// A coordinator whose refreshes time out after `refresh_timeout_ms`, so
/// the restart guard's grace (that plus `health::SETTLE_MS`) is short.
fn coordinator_timed(url: &str, lock_ttl_ms: f64, refresh_timeout_ms: u64) -> Coordinator {
    coordinator(
        CoordinationOptions {
            endpoint: Endpoint::Node(url.into()),
            tls_ca: None,
            key_prefix: Some("t:".into()),
            lock_ttl_ms: Some(lock_ttl_ms),
            encryption_keys: vec![KEY_A.into()],
            user_id_key: None,
            upgrading: false,
        },
        &Policy {
            refresh_timeout_ms,
            ..policy()
        },
    )
    .unwrap()
}

async fn ask(c: &Coordinator, user: &str, deadline: Instant, use_: RefreshTokenUse) -> Outcome {
    c.acquire(
        user,
        &old(),
        |_, _| true,
        deadline,
        CallerNow::new(time::now_ms()),
        use_,
    )
    .await
    .outcome
}

async fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    started.elapsed()
}

fn keys_of(user: &str) -> keys::UserKeys {
    keys::Keys::new("t:").user(user)
}

#[tokio::test]
async fn a_garbled_record_is_a_miss_for_its_user_alone() {
    let s = Server::start();
    let c = coordinator_timed(&s.url(), 5_000.0, 30_000);
    let mut con = s.con().await;
    let far = (time::now_ms() + 3_600_000).to_string();
    // A fence that is not a number next to a fresh expiry, and a fence
    // counter that is not one either.
    let garbled = keys_of("garbled");
    let _: () = con
        .hset_multiple(
            &garbled.record,
            &[
                ("f", "x"),
                ("e", &far),
                ("w", "1"),
                ("t", "junk"),
                ("n", "abc"),
            ],
        )
        .await
        .unwrap();
    // A record that is not a hash at all.
    let wrong = keys_of("wrong-type");
    let _: () = con.set(&wrong.record, "not a hash").await.unwrap();

    for user in ["garbled", "wrong-type"] {
        let got = ask(&c, user, soon(5_000), RefreshTokenUse::Never).await;
        let Outcome::Lead {
            lease,
            refresh: None,
        } = got
        else {
            panic!("{user}: a miss, so the lock: {got:?}")
        };
        assert!(lease.fence >= 1);
        assert!(
            !c.is_down(),
            "{user}: one user's record tripped the breaker"
        );
        assert!(c
            .commit(
                user,
                &lease,
                &token(&format!("new-{user}"), "r", 60_000),
                time::now_ms()
            )
            .await
            .unwrap());
        let Outcome::Shared { token: t, .. } =
            ask(&c, user, soon(5_000), RefreshTokenUse::Never).await
        else {
            panic!("{user}: the record is whole again")
        };
        assert_eq!(t.access.expose(), format!("new-{user}"));
    }
    let Outcome::Lead { .. } = ask(&c, "bystander", soon(5_000), RefreshTokenUse::Never).await
    else {
        panic!("other users are unaffected")
    };
}

#[tokio::test]
async fn a_lock_without_a_ttl_blocks_its_user_at_most_one_lock_ttl() {
    let s = Server::start();
    let c = coordinator_timed(&s.url(), 300.0, 30_000);
    let mut con = s.con().await;
    let _: () = con
        .set(keys_of("stuck").lock, "not-a-holder")
        .await
        .unwrap();
    let started = Instant::now();
    let Outcome::Lead { .. } = ask(&c, "stuck", soon(10_000), RefreshTokenUse::Never).await else {
        panic!("the stray lock lapsed")
    };
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert!(!c.is_down());
}

#[tokio::test]
async fn one_slow_reply_does_not_open_the_breaker() {
    let s = Server::start();
    let c = coordinator_timed(&s.url(), 5_000.0, 30_000);
    // (A commit, not a release: the give-back below must work on a server
    // that has not seen the release script yet.)
    let Outcome::Lead { lease, .. } = ask(&c, "warm", soon(5_000), RefreshTokenUse::Never).await
    else {
        panic!("lead")
    };
    assert!(c
        .commit("warm", &lease, &token("w", "r", 60_000), time::now_ms())
        .await
        .unwrap());
    // The server stalls for 1.3 s: a call unanswered after 1 s has a ping
    // decide, the ping is answered, so the call waits on and gets its answer.
    s.pause_all(1_300).await;
    let started = Instant::now();
    let c = std::sync::Arc::new(c);
    let slow = {
        let c = c.clone();
        tokio::spawn(async move { ask(&c, "slow", soon(10_000), RefreshTokenUse::Never).await })
    };
    // A call whose caller cannot wait that long gives up...
    let Outcome::Unavailable(Unavailable::TimedOut) =
        ask(&c, "hasty", soon(600), RefreshTokenUse::Never).await
    else {
        panic!("timed out")
    };
    let got = slow.await.unwrap();
    assert!(matches!(got, Outcome::Lead { .. }), "{got:?}");
    assert!(started.elapsed() >= Duration::from_millis(1_200));
    assert!(!c.is_down(), "one slow reply opened the breaker");
    let Outcome::Lead { .. } = ask(&c, "other", soon(5_000), RefreshTokenUse::Never).await else {
        panic!("other users still coordinate")
    };
    // ...and the lock the stalled server granted it later was given back.
    let started = Instant::now();
    let Outcome::Lead { .. } = ask(&c, "hasty", soon(3_000), RefreshTokenUse::Never).await else {
        panic!("not left locked")
    };
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn a_stall_opens_the_breaker_and_it_closes_promptly_after() {
    let s = Server::start();
    let c = coordinator_timed(&s.url(), 5_000.0, 30_000);
    let Outcome::Lead { .. } = ask(&c, "warm", soon(5_000), RefreshTokenUse::Never).await else {
        panic!("lead")
    };
    s.pause_all(2_600).await;
    let paused = Instant::now();
    let Outcome::Unavailable(_) = ask(&c, "u", soon(10_000), RefreshTokenUse::Never).await else {
        panic!("unavailable")
    };
    wait_until("breaker open", Duration::from_secs(3), || c.is_down()).await;
    let Outcome::Unavailable(Unavailable::Down(_)) =
        ask(&c, "u", soon(10_000), RefreshTokenUse::Never).await
    else {
        panic!("fails fast while open")
    };
    let resumed = wait_until("breaker closed", Duration::from_secs(6), || !c.is_down()).await;
    let after_pause = (paused.elapsed()).saturating_sub(Duration::from_millis(2_600));
    assert!(
        after_pause < Duration::from_secs(1),
        "closed {after_pause:?} after the stall ({resumed:?})"
    );
    let Outcome::Lead { .. } = ask(&c, "v", soon(5_000), RefreshTokenUse::Never).await else {
        panic!("coordinating again")
    };
}

#[tokio::test]
async fn the_holder_keeps_its_lock_through_failed_extensions() {
    let s = Server::start();
    let holder = coordinator_timed(&s.url(), 600.0, 30_000);
    let other = coordinator_timed(&s.url(), 600.0, 30_000);
    let Outcome::Lead { .. } = ask(&holder, "u", soon(8_000), RefreshTokenUse::Never).await else {
        panic!("lead")
    };
    // The first extension (after 200 ms) meets a stalled server and times out.
    s.pause_all(500).await;
    // Well past the lock's TTL: still held, since the refresh may still run.
    tokio::time::sleep(Duration::from_millis(2_000)).await;
    let got = ask(&other, "u", soon(400), RefreshTokenUse::Never).await;
    assert!(
        matches!(got, Outcome::TimedOut),
        "a second instance got {got:?}"
    );
    assert_eq!(holder.watchdogs(), 1);
}

#[tokio::test]
async fn a_lock_lost_under_its_holder_is_taken_back() {
    let s = Server::start();
    let holder = coordinator_timed(&s.url(), 300.0, 30_000);
    let Outcome::Lead { lease, .. } = ask(&holder, "u", soon(8_000), RefreshTokenUse::Never).await
    else {
        panic!("lead")
    };
    let mut con = s.con().await;
    let lock = keys_of("u").lock;
    let _: () = con.del(&lock).await.unwrap();
    tokio::time::sleep(Duration::from_millis(250)).await;
    let owner: Option<String> = con.get(&lock).await.unwrap();
    assert_eq!(owner.as_deref(), Some(lease.owner.as_str()));
    // A later grant draws a newer fence than the holder's, even if the counter was lost.
    let _: () = con.hdel(keys_of("u").record, "n").await.unwrap();
    let _: () = con.del(&lock).await.unwrap();
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert!(holder.release("u", &lease, false).await.unwrap());
    let Outcome::Lead { lease: next, .. } =
        ask(&holder, "u", soon(5_000), RefreshTokenUse::Never).await
    else {
        panic!("lead")
    };
    assert!(next.fence > lease.fence);
}

#[tokio::test]
async fn a_dropped_connection_wakes_the_instances_waiting_on_a_lock() {
    let mut s = Server::start();
    let holder = coordinator_timed(&s.url(), 10_000.0, 30_000);
    let waiter = std::sync::Arc::new(coordinator_timed(&s.url(), 10_000.0, 30_000));
    let Outcome::Lead { .. } = ask(&holder, "u", soon(20_000), RefreshTokenUse::Never).await else {
        panic!("lead")
    };
    let waiting = {
        let w = waiter.clone();
        tokio::spawn(async move { ask(&w, "u", soon(8_000), RefreshTokenUse::Never).await })
    };
    wait_until("waiting", Duration::from_secs(5), || {
        waiter.conn_waiters() > 0
    })
    .await;
    let killed = Instant::now();
    s.kill();
    let got = waiting.await.unwrap();
    assert!(matches!(got, Outcome::Unavailable(_)), "{got:?}");
    // Not the lock's 10 s TTL: the announcement it waited for cannot come.
    assert!(
        killed.elapsed() < Duration::from_secs(3),
        "{:?}",
        killed.elapsed()
    );
}

#[tokio::test]
async fn a_fresh_server_holds_refresh_token_locks_back_only_briefly() {
    let s = Server::start();
    let c = coordinator_timed(&s.url(), 5_000.0, 2_000);
    let started = Instant::now();
    let Outcome::Lead { .. } = ask(&c, "cc", soon(5_000), RefreshTokenUse::Never).await else {
        panic!("client credentials: no guard")
    };
    assert!(started.elapsed() < Duration::from_millis(500));
    let Outcome::Lead { .. } = ask(&c, "rt", soon(5_000), RefreshTokenUse::Sends).await else {
        panic!("the settle is waited out")
    };
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_millis(health::SETTLE_MS + 1_000),
        "{waited:?}"
    );
    // Once settled, no wait.
    let again = Instant::now();
    let Outcome::Lead { .. } = ask(&c, "rt2", soon(5_000), RefreshTokenUse::Sends).await else {
        panic!("lead")
    };
    assert!(again.elapsed() < Duration::from_millis(500));
}

#[tokio::test]
async fn after_a_restart_no_refresh_token_lock_until_the_old_refreshes_are_over() {
    let mut s = Server::start();
    let refresh_timeout = 2_000;
    let grace = Duration::from_millis(health::grace_ms(refresh_timeout));
    let a = coordinator_timed(&s.url(), 5_000.0, refresh_timeout);
    // A used the first server: a refresh-token refresh whose token then
    // went to Redis (so the cache has a refresh token to hand over).
    let Outcome::Lead { lease, .. } = ask(&a, "u", soon(5_000), RefreshTokenUse::Sends).await
    else {
        panic!("lead")
    };
    assert!(a
        .commit("u", &lease, &token("a1", "r1", 500), time::now_ms())
        .await
        .unwrap());

    s.restart();
    let back = Instant::now();
    // A's reconnect probe finds the new server and starts the grace.
    wait_until("reconnected", Duration::from_secs(3), || !a.is_down()).await;
    let resumed = {
        let started = Instant::now();
        loop {
            match ask(&a, "cc", soon(5_000), RefreshTokenUse::Never).await {
                Outcome::Lead { .. } => break started.elapsed(),
                _ => {
                    assert!(started.elapsed() < Duration::from_secs(3));
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    };
    assert!(
        resumed < Duration::from_secs(1),
        "client credentials resumed after {resumed:?}"
    );
    let Outcome::Unavailable(Unavailable::NewServer { resumes_in_ms }) =
        ask(&a, "v", soon(1_000), RefreshTokenUse::Sends).await
    else {
        panic!("refresh-token lock held back")
    };
    assert!(resumes_in_ms > 1_000 && resumes_in_ms <= grace.as_millis() as u64);
    // An instance that never saw the old server is held back just the same:
    // the guard lives in Redis, not in the instances.
    let fresh = coordinator_timed(&s.url(), 5_000.0, refresh_timeout);
    let Outcome::Unavailable(Unavailable::NewServer { .. }) =
        ask(&fresh, "w", soon(1_000), RefreshTokenUse::Sends).await
    else {
        panic!("held back for a fresh instance too")
    };
    // A refresh that would send only a handed-over refresh token gets the
    // lock, but no refresh token.
    let Outcome::Lead { lease: l2, .. } =
        ask(&fresh, "x", soon(1_000), RefreshTokenUse::Never).await
    else {
        panic!("lead")
    };
    // Due: past half its lifetime (written 1 s ago, 0.5 s left).
    assert!(fresh
        .commit("x", &l2, &token("x1", "rx", 500), time::now_ms() - 1_000)
        .await
        .unwrap());
    let Outcome::Lead {
        refresh: None,
        lease: l3,
    } = ask(&fresh, "x", soon(1_000), RefreshTokenUse::IfHandedOver).await
    else {
        panic!("lead without a handed-over refresh token")
    };
    assert!(fresh.release("x", &l3, false).await.unwrap());
    // It resumes by itself once the grace is over: a caller with time left waits.
    let Outcome::Lead { .. } = ask(&a, "v", soon(10_000), RefreshTokenUse::Sends).await else {
        panic!("resumed after the grace")
    };
    let elapsed = back.elapsed();
    assert!(elapsed >= grace - Duration::from_millis(300), "{elapsed:?}");
    assert!(elapsed < grace + Duration::from_secs(2), "{elapsed:?}");
    let Outcome::Lead { lease: l4, .. } =
        ask(&fresh, "y", soon(1_000), RefreshTokenUse::Never).await
    else {
        panic!("lead")
    };
    assert!(fresh
        .commit("y", &l4, &token("y1", "ry", 500), time::now_ms() - 1_000)
        .await
        .unwrap());
    let Outcome::Lead {
        refresh: Some(r), ..
    } = ask(&a, "y", soon(1_000), RefreshTokenUse::IfHandedOver).await
    else {
        panic!("handed over again")
    };
    assert_eq!(r.expose(), "ry");
}

#[tokio::test]
async fn a_token_refreshed_during_the_outage_reaches_the_new_server() {
    let mut s = Server::start();
    let a = coordinator_timed(&s.url(), 5_000.0, 2_000);
    let Outcome::Lead { lease, .. } = ask(&a, "u", soon(5_000), RefreshTokenUse::Sends).await
    else {
        panic!("lead")
    };
    let port = s.port;
    s.kill();
    // The refresh finishes while Redis is away: its write fails...
    let err = a
        .commit("u", &lease, &token("a1", "r1", 60_000), time::now_ms())
        .await;
    assert!(err.is_err());
    s = Server::start_on(port);
    // ...and is retried in the background, well within the grace, so the
    // next instance is handed that token instead of refreshing with the
    // refresh token it already spent.
    let b = coordinator_timed(&s.url(), 5_000.0, 2_000);
    let started = Instant::now();
    let got = ask(&b, "u", soon(8_000), RefreshTokenUse::Sends).await;
    let Outcome::Shared { token: t, .. } = got else {
        panic!("the rewritten token, not a lock: {got:?}")
    };
    assert_eq!(t.refresh.as_ref().map(SecretString::expose), Some("r1"));
    assert!(started.elapsed() < Duration::from_secs(4));
}

#[tokio::test]
async fn a_lock_granted_after_its_caller_gave_up_is_given_back() {
    let s = Server::start();
    let c = coordinator_timed(&s.url(), 5_000.0, 30_000);
    let other = coordinator_timed(&s.url(), 5_000.0, 30_000);
    let Outcome::Lead { lease, .. } = ask(&c, "warm", soon(5_000), RefreshTokenUse::Never).await
    else {
        panic!("lead")
    };
    assert!(c
        .commit("warm", &lease, &token("w", "r", 60_000), time::now_ms())
        .await
        .unwrap());
    // A stall longer than a call's budget and than the ping after it: the
    // grant happens well after the caller stopped waiting.
    s.pause_all(2_300).await;
    let Outcome::Unavailable(_) = ask(&c, "u", soon(10_000), RefreshTokenUse::Never).await else {
        panic!("gave up")
    };
    tokio::time::sleep(Duration::from_millis(1_600)).await;
    // Not held for the lock's 5 s TTL by a grant nobody uses.
    let got = ask(&other, "u", soon(1_500), RefreshTokenUse::Never).await;
    assert!(matches!(got, Outcome::Lead { .. }), "{got:?}");
}

#[tokio::test]
async fn after_a_long_outage_coordination_resumes_within_a_second() {
    let mut s = Server::start();
    let port = s.port;
    let c = coordinator_timed(&s.url(), 5_000.0, 30_000);
    let Outcome::Lead { .. } = ask(&c, "warm", soon(5_000), RefreshTokenUse::Never).await else {
        panic!("lead")
    };
    s.kill();
    let Outcome::Unavailable(_) = ask(&c, "u", soon(5_000), RefreshTokenUse::Never).await else {
        panic!("unavailable")
    };
    // Long enough for a probe that backs off further to be asleep for long.
    tokio::time::sleep(Duration::from_millis(3_200)).await;
    s = Server::start_on(port);
    let back = wait_until("reconnected", Duration::from_secs(5), || !c.is_down()).await;
    assert!(back < Duration::from_secs(1), "{back:?}");
    let Outcome::Lead { .. } = ask(&c, "v", soon(5_000), RefreshTokenUse::Never).await else {
        panic!("coordinating again")
    };
    drop(s);
}

#[tokio::test]
async fn a_flushed_keyspace_loses_the_locks_too() {
    let s = Server::start();
    let a = coordinator_timed(&s.url(), 5_000.0, 2_000);
    let Outcome::Lead { .. } = ask(&a, "u", soon(5_000), RefreshTokenUse::Sends).await else {
        panic!("lead")
    };
    let mut admin = s.con().await;
    let _: () = redis::cmd("FLUSHALL")
        .query_async(&mut admin)
        .await
        .unwrap();
    // An instance that never saw the old keys gets in first: only a settle...
    let fresh = coordinator_timed(&s.url(), 5_000.0, 2_000);
    let Outcome::Unavailable(Unavailable::NewServer { resumes_in_ms }) =
        ask(&fresh, "v", soon(1_000), RefreshTokenUse::Sends).await
    else {
        panic!("settling")
    };
    assert!(resumes_in_ms <= health::SETTLE_MS);
    // ...until the instance that held a lock there comes by: a grace.
    let Outcome::Unavailable(Unavailable::NewServer { resumes_in_ms }) =
        ask(&a, "w", soon(1_000), RefreshTokenUse::Sends).await
    else {
        panic!("held back")
    };
    assert!(resumes_in_ms > health::SETTLE_MS, "{resumes_in_ms}");
    let Outcome::Unavailable(Unavailable::NewServer { .. }) =
        ask(&fresh, "v", soon(1_000), RefreshTokenUse::Sends).await
    else {
        panic!("held back for everyone")
    };
}

#[tokio::test]
async fn the_first_caller_keeps_its_place_while_a_guard_is_waited_out() {
    let s = Server::start();
    let a = std::sync::Arc::new(coordinator_timed(&s.url(), 5_000.0, 2_000));
    let b = coordinator_timed(&s.url(), 5_000.0, 2_000);
    // A fresh server: the first refresh-token lock waits the settle out...
    let first = {
        let a = a.clone();
        tokio::spawn(async move { ask(&a, "u", soon(8_000), RefreshTokenUse::Sends).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let second = tokio::spawn(async move {
        let got = ask(&b, "u", soon(8_000), RefreshTokenUse::Sends).await;
        (got, b)
    });
    // ...holding the lock meanwhile, so the caller after it queues behind it.
    let Outcome::Lead { lease, .. } = first.await.unwrap() else {
        panic!("the first caller leads")
    };
    assert!(a
        .commit("u", &lease, &token("a1", "r1", 60_000), time::now_ms())
        .await
        .unwrap());
    let (got, _b) = second.await.unwrap();
    let Outcome::Shared {
        token: t,
        waited: true,
    } = got
    else {
        panic!("the second waited on the first: {got:?}")
    };
    assert_eq!(t.access.expose(), "a1");
}
