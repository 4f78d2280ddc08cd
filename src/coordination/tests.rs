//! Against a real `redis-server`, started on a random loopback port per test
//! and killed when the test ends. (CI installs the Debian package.)

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use redis::AsyncCommands;
use tokio::time::Instant;

use super::lock::{self, Acquire, Guard, Want};
use super::*;
use crate::engine::time::{self, CallerNow};
use crate::engine::{Policy, Presented};

pub(super) const KEY_A: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
const KEY_B: &str = "HxwdHhsaGRgXFhUUExIREA8ODQwLCgkIBwYFBAMCAQA=";

pub(super) struct Server {
    child: Child,
    pub(super) port: u16,
}

impl Server {
    pub(super) fn start() -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        Self::start_on(port)
    }

    /// Kills the server (like a crash) and starts an empty one on its port.
    pub(super) fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let fresh = Self::start_on(self.port);
        *self = fresh;
    }

    pub(super) fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub(super) fn start_on(port: u16) -> Self {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (apt-get install redis-server)");
        let s = Self { child, port };
        let until = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < until,
                "redis-server did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        s
    }

    pub(super) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub(super) async fn con(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }

    /// Stalls every client of the server for `ms` (`CLIENT PAUSE ms ALL`).
    pub(super) async fn pause_all(&self, ms: u64) {
        let _: () = redis::cmd("CLIENT")
            .arg("PAUSE")
            .arg(ms)
            .arg("ALL")
            .query_async(&mut self.con().await)
            .await
            .unwrap();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(super) fn policy() -> Policy {
    Policy {
        buffer_ms: 1_000,
        double_check_window_ms: 0,
        ..Policy::default()
    }
}

pub(super) fn coordinator_with(url: &str, key: &str, lock_ttl_ms: f64) -> Coordinator {
    coordinator_keys(url, &[key], lock_ttl_ms)
}

fn coordinator_keys(url: &str, keys: &[&str], lock_ttl_ms: f64) -> Coordinator {
    coordinator(
        CoordinationOptions {
            endpoint: Endpoint::Node(url.into()),
            tls_ca: None,
            key_prefix: Some("t:".into()),
            lock_ttl_ms: Some(lock_ttl_ms),
            encryption_keys: keys.iter().map(|k| (*k).into()).collect(),
            user_id_key: None,
            upgrading: false,
        },
        &policy(),
    )
    .unwrap()
}

/// Stores `access` for `user` through `c` (lock, then commit).
async fn store(c: &Coordinator, user: &str, access: &str) {
    let Outcome::Lead { lease, .. } = acquire(c, user, soon(5_000)).await.outcome else {
        panic!("lead")
    };
    assert!(c
        .commit(user, &lease, &token(access, "r", 60_000), time::now_ms())
        .await
        .unwrap());
}

pub(super) fn token(access: &str, refresh: &str, ttl_ms: i64) -> SharedToken {
    SharedToken {
        access: access.into(),
        refresh: Some(refresh.into()),
        expires_at: time::now_ms() + ttl_ms,
    }
}

pub(super) fn old() -> Presented {
    Presented {
        access: "old-access".into(),
        refresh: None,
        expires_at: time::now_ms() - 1,
    }
}

pub(super) fn soon(ms: u64) -> Instant {
    Instant::now() + Duration::from_millis(ms)
}

async fn acquire(c: &Coordinator, user: &str, deadline: Instant) -> Acquired {
    c.acquire(
        user,
        &old(),
        |_, _| true,
        deadline,
        CallerNow::new(time::now_ms()),
        RefreshTokenUse::Never,
    )
    .await
}

#[tokio::test]
async fn lock_is_exclusive_and_released_only_by_its_owner() {
    let s = Server::start();
    let mut con = s.con().await;
    let keys = keys::Keys::new("t:").user("alice");
    let want = Want {
        presented: "",
        min_expires_at: 0,
        fresh_after: 0,
        recent_after: 0,
        now: 0,
        skip_fence: 0,
    };
    let guard = Guard {
        marker: "t:epoch",
        ..Guard::default()
    };
    let Acquire::Locked { lease, stale: None } =
        lock::acquire(&mut con, &keys, "ch", "a", 5_000, 60_000, want, guard, b"r")
            .await
            .unwrap()
            .found
    else {
        panic!("first caller locks")
    };
    assert_eq!(lease.fence, 1);
    let Acquire::Busy { lock_ttl_ms, fence } =
        lock::acquire(&mut con, &keys, "ch", "b", 5_000, 60_000, want, guard, b"r")
            .await
            .unwrap()
            .found
    else {
        panic!("second caller waits")
    };
    assert!(lock_ttl_ms > 0 && lock_ttl_ms <= 5_000);
    // The holder's fence: a waiter tells that holder's failure from an old one.
    assert_eq!(fence, 1);
    let intruder = record::Lease {
        owner: "b".into(),
        fence: 9,
        unkeyed_fence: None,
    };
    assert!(!lock::release(&mut con, &keys, "ch", &intruder, b"r")
        .await
        .unwrap());
    assert_eq!(
        lock::extend(&mut con, &keys, &lease, 5_000, 60_000)
            .await
            .unwrap(),
        lock::Extended::Held
    );
    assert_eq!(
        lock::extend(&mut con, &keys, &intruder, 5_000, 60_000)
            .await
            .unwrap(),
        lock::Extended::Lost
    );
    assert!(lock::release(&mut con, &keys, "ch", &lease, b"r")
        .await
        .unwrap());
    let Acquire::Locked { lease, .. } =
        lock::acquire(&mut con, &keys, "ch", "b", 5_000, 60_000, want, guard, b"r")
            .await
            .unwrap()
            .found
    else {
        panic!("free again")
    };
    assert_eq!(lease.fence, 2, "every grant draws a new fence");
}

#[tokio::test]
async fn a_holder_whose_lock_expired_cannot_overwrite_a_newer_token() {
    let s = Server::start();
    let c = coordinator_with(&s.url(), KEY_A, 100.0);
    let Outcome::Lead { lease: slow, .. } = acquire(&c, "u", soon(60)).await.outcome else {
        panic!("lead")
    };
    // The watchdog stops at the (short) deadline, so the lock lapses.
    tokio::time::sleep(Duration::from_millis(250)).await;
    let Outcome::Lead { lease: fast, .. } = acquire(&c, "u", soon(5_000)).await.outcome else {
        panic!("lapsed lock retaken")
    };
    assert!(fast.fence > slow.fence);
    assert!(c
        .commit("u", &fast, &token("new", "r-new", 60_000), time::now_ms())
        .await
        .unwrap());
    assert!(
        !c.commit(
            "u",
            &slow,
            &token("stale", "r-stale", 90_000),
            time::now_ms()
        )
        .await
        .unwrap(),
        "fenced out"
    );
    let Outcome::Shared { token: t, waited } = acquire(&c, "u", soon(1_000)).await.outcome else {
        panic!("cached")
    };
    assert_eq!((t.access.expose(), waited), ("new", false));
}

#[tokio::test]
async fn a_late_result_with_nobody_after_it_is_still_kept() {
    // With rotating refresh tokens it may hold the only live one.
    let s = Server::start();
    let c = coordinator_with(&s.url(), KEY_A, 100.0);
    let Outcome::Lead { lease, .. } = acquire(&c, "u", soon(50)).await.outcome else {
        panic!("lead")
    };
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert!(c
        .commit(
            "u",
            &lease,
            &token("late", "r-late", 60_000),
            time::now_ms()
        )
        .await
        .unwrap());
}

#[tokio::test]
async fn waiters_in_other_instances_take_the_published_token() {
    let s = Server::start();
    let a = coordinator_with(&s.url(), KEY_A, 5_000.0);
    let b = std::sync::Arc::new(coordinator_with(&s.url(), KEY_A, 5_000.0));
    let Outcome::Lead {
        lease,
        refresh: None,
    } = acquire(&a, "u", soon(10_000)).await.outcome
    else {
        panic!("lead")
    };
    let waiter = {
        let b = b.clone();
        tokio::spawn(async move { acquire(&b, "u", soon(10_000)).await })
    };
    // Let the waiter find the lock held before the holder commits.
    let until = Instant::now() + Duration::from_secs(5);
    while b.conn_waiters() == 0 {
        assert!(Instant::now() < until);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(a.watchdogs(), 1);
    let committed = Instant::now();
    assert!(a
        .commit("u", &lease, &token("fresh", "r1", 60_000), time::now_ms())
        .await
        .unwrap());
    assert_eq!(a.watchdogs(), 0);
    let Outcome::Shared {
        token: t,
        waited: true,
    } = waiter.await.unwrap().outcome
    else {
        panic!("published token")
    };
    // Woken by the announcement, not by the lock's 5 s TTL running out.
    assert!(committed.elapsed() < Duration::from_secs(4));
    assert_eq!(t.access.expose(), "fresh");
    assert_eq!(t.refresh.as_ref().map(SecretString::expose), Some("r1"));
    // A later call elsewhere finds it cached: written before it asked.
    let Outcome::Shared { waited: false, .. } = acquire(&b, "u", soon(1_000)).await.outcome else {
        panic!("cached")
    };
}

#[tokio::test]
async fn a_dead_holder_delays_the_others_by_at_most_the_lock_ttl() {
    let s = Server::start();
    let holder = coordinator_with(&s.url(), KEY_A, 300.0);
    let other = coordinator_with(&s.url(), KEY_A, 300.0);
    let Outcome::Lead { .. } = acquire(&holder, "u", soon(10_000)).await.outcome else {
        panic!("lead")
    };
    holder.close(); // dies: no release, no more extensions
    let Outcome::Lead { .. } = acquire(&other, "u", soon(10_000)).await.outcome else {
        panic!("taken over")
    };
}

#[tokio::test]
async fn a_failed_refresh_fails_its_waiters_and_a_released_lock_is_retaken() {
    let s = Server::start();
    let a = coordinator_with(&s.url(), KEY_A, 10_000.0);
    let b = std::sync::Arc::new(coordinator_with(&s.url(), KEY_A, 10_000.0));
    for failed in [true, false] {
        let Outcome::Lead { lease, .. } = acquire(&a, "u", soon(10_000)).await.outcome else {
            panic!("lead")
        };
        let waiter = {
            let b = b.clone();
            tokio::spawn(async move { acquire(&b, "u", soon(10_000)).await })
        };
        while b.conn_waiters() == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(a.release("u", &lease, failed).await.unwrap());
        match (failed, waiter.await.unwrap().outcome) {
            (true, Outcome::Failed) => {}
            (false, Outcome::Lead { lease, .. }) => {
                assert!(b.release("u", &lease, false).await.unwrap())
            }
            (_, o) => panic!("unexpected {o:?}"),
        }
    }
}

#[tokio::test]
async fn nothing_waits_past_the_deadline() {
    let s = Server::start();
    let a = coordinator_with(&s.url(), KEY_A, 10_000.0);
    let Outcome::Lead { .. } = acquire(&a, "u", soon(10_000)).await.outcome else {
        panic!("lead")
    };
    let started = Instant::now();
    let Outcome::TimedOut = acquire(&a, "u", soon(200)).await.outcome else {
        panic!("timed out")
    };
    assert!(started.elapsed() < Duration::from_secs(5));
}

/// Bytes the server has sent to clients so far (`INFO stats`).
async fn net_output(con: &mut redis::aio::MultiplexedConnection) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("stats")
        .query_async(con)
        .await
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("total_net_output_bytes:"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap()
}

#[tokio::test]
async fn an_oversized_record_is_a_miss_that_never_crosses_the_network() {
    let s = Server::start();
    let mut con = s.con().await;
    let c = coordinator_with(&s.url(), KEY_A, 5_000.0);
    let keys = keys::Keys::new("t:").user("u");
    let far = time::now_ms() + 3_600_000;
    // 10 MB where the sealed token goes, with fields that make it look fresh.
    let _: () = redis::cmd("HSET")
        .arg(&keys.record)
        .arg("t")
        .arg(vec![b'x'; 10 << 20])
        .arg("f")
        .arg(5)
        .arg("e")
        .arg(far)
        .arg("w")
        .arg(far)
        .query_async(&mut con)
        .await
        .unwrap();
    c.connect().await.unwrap();
    let before = net_output(&mut con).await;
    let got = acquire(&c, "u", soon(5_000)).await;
    let Outcome::Lead { refresh: None, .. } = got.outcome else {
        panic!("a miss, then the lock")
    };
    assert!(!got.undecryptable, "never tried");
    assert!(net_output(&mut con).await - before < 64 * 1024);
}

#[tokio::test]
async fn a_record_whose_clear_fields_were_changed_does_not_open() {
    let s = Server::start();
    let mut con = s.con().await;
    let c = coordinator_with(&s.url(), KEY_A, 5_000.0);
    let Outcome::Lead { lease, .. } = acquire(&c, "u", soon(5_000)).await.outcome else {
        panic!("lead")
    };
    let written = time::now_ms() - 60_000;
    assert!(c
        .commit("u", &lease, &token("bound", "r", 3_600_000), written)
        .await
        .unwrap());
    let record = keys::Keys::new("t:").user("u").record;
    // Put back as if written just now (or with another fence, or expiry).
    for (field, value) in [
        ("w", time::now_ms()),
        ("f", 1_000),
        ("e", time::now_ms() + 7_200_000),
    ] {
        let before: i64 = con.hget(&record, field).await.unwrap();
        let _: () = con.hset(&record, field, value).await.unwrap();
        let got = acquire(&c, "u", soon(5_000)).await;
        assert!(got.undecryptable, "{field}");
        let Outcome::Lead {
            lease,
            refresh: None,
        } = got.outcome
        else {
            panic!("a miss, then the lock ({field})")
        };
        assert!(c.release("u", &lease, false).await.unwrap());
        let _: () = con.hset(&record, field, before).await.unwrap();
    }
    let Outcome::Shared { token: t, .. } = acquire(&c, "u", soon(5_000)).await.outcome else {
        panic!("opens again as written")
    };
    assert_eq!(t.access.expose(), "bound");
}

/// A fence Redis cannot hand back as it is (negative, fractional, beyond
/// an integer reply, infinite) is garbage: a miss at once. Taken for a
/// cached token, it came back clamped or truncated, so skipping it skipped
/// another fence and the call asked again and again until its deadline.
#[tokio::test]
async fn a_record_with_a_fence_no_reply_can_carry_is_a_miss_at_once() {
    let s = Server::start();
    let mut con = s.con().await;
    let c = coordinator_with(&s.url(), KEY_A, 5_000.0);
    let Outcome::Lead { lease, .. } = acquire(&c, "u", soon(5_000)).await.outcome else {
        panic!("lead")
    };
    assert!(c
        .commit("u", &lease, &token("t", "r", 3_600_000), time::now_ms())
        .await
        .unwrap());
    let record = keys::Keys::new("t:").user("u").record;
    for fence in ["-3", "1.5", "1e20", "1e999", "-1e999"] {
        let _: () = con.hset(&record, "f", fence).await.unwrap();
        let started = Instant::now();
        let Outcome::Lead { lease, .. } = acquire(&c, "u", soon(3_000)).await.outcome else {
            panic!("a miss, then the lock ({fence})")
        };
        assert!(started.elapsed() < Duration::from_millis(500), "{fence}");
        assert!(c.release("u", &lease, false).await.unwrap());
    }
    // So is a fence counter: the next grant draws a fence a reply carries.
    for counter in ["1e20", "-1e999", "2.5"] {
        let _: () = con.hset(&record, "n", counter).await.unwrap();
        let Outcome::Lead { lease, .. } = acquire(&c, "u", soon(3_000)).await.outcome else {
            panic!("the lock ({counter})")
        };
        assert!(
            (1..1 << 53).contains(&lease.fence),
            "{counter}: {}",
            lease.fence
        );
        assert!(c.release("u", &lease, false).await.unwrap());
    }
}

#[tokio::test]
async fn a_value_sealed_with_another_key_is_a_miss() {
    let s = Server::start();
    let a = coordinator_with(&s.url(), KEY_A, 5_000.0);
    let b = coordinator_with(&s.url(), KEY_B, 5_000.0);
    let Outcome::Lead { lease, .. } = acquire(&a, "u", soon(5_000)).await.outcome else {
        panic!("lead")
    };
    assert!(a
        .commit(
            "u",
            &lease,
            &token("sealed-with-a", "r", 60_000),
            time::now_ms()
        )
        .await
        .unwrap());
    let got = acquire(&b, "u", soon(5_000)).await;
    assert!(got.undecryptable);
    let Outcome::Lead {
        lease,
        refresh: None,
    } = got.outcome
    else {
        panic!("miss, then lock")
    };
    assert!(b
        .commit(
            "u",
            &lease,
            &token("sealed-with-b", "r", 60_000),
            time::now_ms()
        )
        .await
        .unwrap());
    let Outcome::Shared { token: t, .. } = acquire(&b, "u", soon(5_000)).await.outcome else {
        panic!("b reads its own")
    };
    assert_eq!(t.access.expose(), "sealed-with-b");
}

#[tokio::test]
async fn unusable_cached_tokens_are_refreshed_and_newer_refresh_tokens_handed_over() {
    let s = Server::start();
    let c = coordinator_with(&s.url(), KEY_A, 5_000.0);
    let Outcome::Lead { lease, .. } = acquire(&c, "u", soon(5_000)).await.outcome else {
        panic!("lead")
    };
    assert!(c
        .commit(
            "u",
            &lease,
            &token("revoked", "r-rotated", 60_000),
            time::now_ms()
        )
        .await
        .unwrap());
    // The caller's veto (e.g. it got a 401 with this token) forces a refresh,
    // which gets the newest refresh token from the cache.
    let got = c
        .acquire(
            "u",
            &old(),
            |t, _| t.access.expose() != "revoked",
            soon(5_000),
            CallerNow::new(time::now_ms()),
            RefreshTokenUse::Never,
        )
        .await;
    let Outcome::Lead {
        lease,
        refresh: Some(r),
    } = got.outcome
    else {
        panic!("lead")
    };
    assert_eq!(r.expose(), "r-rotated");
    // Due (inside the buffer, and past half its lifetime: written 1 s
    // ago, 0.5 s left): not handed out either.
    assert!(c
        .commit(
            "u",
            &lease,
            &token("due", "r2", 500),
            time::now_ms() - 1_000
        )
        .await
        .unwrap());
    let Outcome::Lead { .. } = acquire(&c, "v-other", soon(5_000)).await.outcome else {
        panic!("other user")
    };
    let Outcome::Lead { .. } = acquire(&c, "u", soon(5_000)).await.outcome else {
        panic!("due token refreshed")
    };
}

#[tokio::test]
async fn no_plaintext_token_or_user_id_at_rest_or_on_the_wire() {
    let s = Server::start();
    let mut sub = redis::Client::open(s.url())
        .unwrap()
        .get_async_pubsub()
        .await
        .unwrap();
    sub.subscribe("t:refreshed").await.unwrap();
    let c = coordinator_with(&s.url(), KEY_A, 5_000.0);
    let user = "customer-8842@example.com";
    let Outcome::Lead { lease, .. } = acquire(&c, user, soon(5_000)).await.outcome else {
        panic!("lead")
    };
    assert!(c
        .commit(
            user,
            &lease,
            &token("eyJ-secret-access", "secret-refresh", 60_000),
            time::now_ms()
        )
        .await
        .unwrap());
    let Outcome::Lead { lease, .. } = acquire(&c, "second-user", soon(5_000)).await.outcome else {
        panic!("lead")
    };
    assert!(c.release("second-user", &lease, true).await.unwrap());

    let mut con = s.con().await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut con)
        .await
        .unwrap();
    assert!(!keys.is_empty());
    let mut everything = keys.join("\n").into_bytes();
    for k in &keys {
        let kind: String = redis::cmd("TYPE")
            .arg(k)
            .query_async(&mut con)
            .await
            .unwrap();
        match kind.as_str() {
            "hash" => {
                let h: Vec<Vec<u8>> = con.hgetall(k).await.unwrap();
                h.into_iter().for_each(|v| everything.extend(v));
            }
            "string" => everything.extend(con.get::<_, Vec<u8>>(k).await.unwrap()),
            other => panic!("unexpected key type {other}"),
        }
    }
    use futures::StreamExt;
    let mut messages = sub.on_message();
    for _ in 0..2 {
        let m = tokio::time::timeout(Duration::from_secs(5), messages.next())
            .await
            .unwrap()
            .unwrap();
        everything.extend(m.get_payload_bytes());
    }
    let text = String::from_utf8_lossy(&everything);
    for secret in [
        "eyJ-secret-access",
        "secret-refresh",
        user,
        "customer-8842",
        "second-user",
    ] {
        assert!(!text.contains(secret), "{secret} found in Redis");
    }
}

#[tokio::test]
async fn invalidate_marks_the_stored_token_and_reaches_the_other_instances() {
    let s = Server::start();
    let a = coordinator_with(&s.url(), KEY_A, 5_000.0);
    let b = coordinator_with(&s.url(), KEY_A, 5_000.0);
    let heard = std::sync::Arc::new(parking_lot::Mutex::new(Vec::new()));
    for c in [&a, &b] {
        let heard = heard.clone();
        let me = std::ptr::from_ref(c) as usize;
        c.on_invalidated(move |user, token| {
            heard
                .lock()
                .push((me, user.to_owned(), token.map(|t| t.expose().to_owned())));
        });
    }
    for c in [&a, &b] {
        c.connect().await.unwrap(); // subscribed before anyone invalidates
    }
    store(&a, "u", "t1").await;
    // Another token than the stored one: nothing marked, still shared.
    assert!(!a.invalidate("u", Some(&"other".into())).await.unwrap());
    let Outcome::Shared { token: t, .. } = acquire(&b, "u", soon(1_000)).await.outcome else {
        panic!("still shared")
    };
    assert_eq!(t.access.expose(), "t1");
    // The stored one: marked, so no instance hands it out again.
    let sent = Instant::now();
    assert!(a.invalidate("u", Some(&"t1".into())).await.unwrap());
    let Outcome::Lead { lease, refresh } = acquire(&b, "u", soon(1_000)).await.outcome else {
        panic!("refreshed, not shared")
    };
    // Its refresh token is still the one to refresh with.
    assert_eq!(refresh.as_ref().map(SecretString::expose), Some("r"));
    assert!(b
        .commit("u", &lease, &token("t2", "r2", 60_000), time::now_ms())
        .await
        .unwrap());
    let Outcome::Shared { token: t, .. } = acquire(&a, "u", soon(1_000)).await.outcome else {
        panic!("the new token is shared")
    };
    assert_eq!(t.access.expose(), "t2");
    // Without a token: whatever is stored.
    assert!(b.invalidate("u", None).await.unwrap());
    let Outcome::Lead { lease, .. } = acquire(&a, "u", soon(1_000)).await.outcome else {
        panic!("refreshed")
    };
    a.release("u", &lease, false).await.unwrap();
    // Each announcement reached the other instance (not its sender), in order.
    while heard.lock().len() < 3 {
        assert!(
            sent.elapsed() < Duration::from_secs(5),
            "not heard: {:?}",
            heard.lock()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (pa, pb) = (
        std::ptr::from_ref(&a) as usize,
        std::ptr::from_ref(&b) as usize,
    );
    assert_eq!(
        *heard.lock(),
        vec![
            (pb, "u".to_owned(), Some("other".to_owned())),
            (pb, "u".to_owned(), Some("t1".to_owned())),
            (pa, "u".to_owned(), None),
        ]
    );
    // An instance on other keys cannot read them: it hears nothing.
    let stranger = coordinator_with(&s.url(), KEY_B, 5_000.0);
    let strange = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = strange.clone();
    stranger.on_invalidated(move |_, _| flag.store(true, std::sync::atomic::Ordering::Relaxed));
    stranger.connect().await.unwrap();
    a.invalidate("u", None).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!strange.load(std::sync::atomic::Ordering::Relaxed));
}

#[tokio::test]
async fn a_rotation_leaves_no_token_unreadable() {
    let s = Server::start();
    // Mid-rotation: some instances seal with the old key, some with the new.
    let old_first = coordinator_keys(&s.url(), &[KEY_A, KEY_B], 5_000.0);
    let new_first = coordinator_keys(&s.url(), &[KEY_B, KEY_A], 5_000.0);
    let new_only = coordinator_keys(&s.url(), &[KEY_B], 5_000.0);
    store(&old_first, "u", "by-old").await;
    store(&new_first, "v", "by-new").await;
    for (c, user, access) in [
        (&new_first, "u", "by-old"),
        (&old_first, "v", "by-new"),
        (&new_only, "v", "by-new"),
    ] {
        let got = acquire(c, user, soon(1_000)).await;
        let Outcome::Shared { token: t, .. } = got.outcome else {
            panic!("shared")
        };
        assert_eq!(t.access.expose(), access);
        assert!(!got.undecryptable);
    }
    // Dropping the old key early costs a refresh, never an error.
    let got = acquire(&new_only, "u", soon(1_000)).await;
    assert!(matches!(got.outcome, Outcome::Lead { .. }) && got.undecryptable);
}

#[tokio::test]
async fn an_unreachable_redis_fails_fast_and_recovers() {
    let s = Server::start();
    let port = s.port;
    let c = coordinator_with(&s.url(), KEY_A, 5_000.0);
    let Outcome::Lead { lease, .. } = acquire(&c, "u", soon(5_000)).await.outcome else {
        panic!("lead")
    };
    assert!(c.release("u", &lease, false).await.unwrap());
    drop(s);
    let started = Instant::now();
    let Outcome::Unavailable(first) = acquire(&c, "u", soon(20_000)).await.outcome else {
        panic!("unavailable")
    };
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(c.is_down());
    let Outcome::Unavailable(Unavailable::Down(why)) = acquire(&c, "u", soon(20_000)).await.outcome
    else {
        panic!("breaker open: no round trip")
    };
    // Failing fast still says why.
    assert_eq!(why, first.to_string());
    // Back on the same port: the probe closes the breaker by itself.
    let child = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let _s = Server { child, port };
    let until = Instant::now() + Duration::from_secs(15);
    while c.is_down() {
        assert!(Instant::now() < until, "did not reconnect");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let Outcome::Lead { .. } = acquire(&c, "u", soon(5_000)).await.outcome else {
        panic!("coordinating again")
    };
}

#[test]
fn options_are_validated_without_echoing_secrets() {
    let p = Policy::default();
    let ok = || CoordinationOptions {
        endpoint: Endpoint::Node("redis://:hunter2@127.0.0.1:6379/0".into()),
        tls_ca: None,
        key_prefix: None,
        lock_ttl_ms: None,
        encryption_keys: vec![KEY_A.into()],
        user_id_key: None,
        upgrading: false,
    };
    let c = coordinator(ok(), &p).unwrap();
    assert_eq!(c.timing().lock_ttl_ms, DEFAULT_LOCK_TTL_MS);
    assert!(!format!("{c:?}").contains("hunter2") && !format!("{c:?}").contains(KEY_A));
    let err = |o: CoordinationOptions| coordinator(o, &p).unwrap_err().to_string();
    assert!(err(CoordinationOptions {
        encryption_keys: vec!["c2hvcnQ=".into()],
        ..ok()
    })
    .contains("32 bytes"));
    assert!(err(CoordinationOptions {
        encryption_keys: vec!["%%%".into()],
        ..ok()
    })
    .contains("base64"));
    assert!(err(CoordinationOptions {
        endpoint: Endpoint::Node("".into()),
        ..ok()
    })
    .starts_with("options.redis.url"));
    let bad_url = err(CoordinationOptions {
        endpoint: Endpoint::Node("http://:hunter2@x".into()),
        ..ok()
    });
    assert!(
        bad_url.starts_with("options.redis.url") && !bad_url.contains("hunter2"),
        "{bad_url}"
    );
    // TLS parses (and connects lazily); #insecure does not, nor a CA for plaintext.
    assert!(coordinator(
        CoordinationOptions {
            endpoint: Endpoint::Node("rediss://:hunter2@h:6380".into()),
            ..ok()
        },
        &p
    )
    .is_ok());
    let insecure = err(CoordinationOptions {
        endpoint: Endpoint::Node("rediss://:hunter2@h:6380/#insecure".into()),
        ..ok()
    });
    assert!(
        insecure.contains("#insecure") && !insecure.contains("hunter2"),
        "{insecure}"
    );
    assert!(err(CoordinationOptions {
        tls_ca: Some(b"-----BEGIN CERTIFICATE-----".to_vec()),
        ..ok()
    })
    .starts_with("options.redis.tls"));
    assert!(err(CoordinationOptions {
        endpoint: Endpoint::Node("rediss://h".into()),
        tls_ca: Some(b"not pem".to_vec()),
        ..ok()
    })
    .starts_with("options.redis.tls.ca"));
    // A cluster: TCP nodes agreeing on credentials.
    let cluster = |urls: &[&str]| CoordinationOptions {
        endpoint: Endpoint::Cluster(urls.iter().map(|u| (*u).into()).collect()),
        ..ok()
    };
    assert!(coordinator(
        cluster(&["redis://:hunter2@a:7000", "redis://:hunter2@b:7001"]),
        &p
    )
    .is_ok());
    for bad in [
        &[][..],
        &["redis+unix:///tmp/r.sock"][..],
        &["redis://:hunter2@a:7000", "redis://:other@b:7001"][..],
        &["redis://:hunter2@a:7000", "nope://:hunter2@b"][..],
    ] {
        let e = err(cluster(bad));
        assert!(
            e.starts_with("options.redis.cluster") && !e.contains("hunter2"),
            "{e}"
        );
    }
    // Several keys: each is checked, and named by position.
    let e = err(CoordinationOptions {
        encryption_keys: vec![KEY_A.into(), "c2hvcnQ=".into()],
        ..ok()
    });
    assert!(e.contains("entry 1") && !e.contains(KEY_A), "{e}");
    assert!(err(CoordinationOptions {
        encryption_keys: vec![],
        ..ok()
    })
    .starts_with("options.redis.encryptionKey"));
    for bad in [0.0, 99.0, 1.5, f64::NAN, 1e12] {
        assert!(err(CoordinationOptions {
            lock_ttl_ms: Some(bad),
            ..ok()
        })
        .starts_with("options.redis.lockTtlMs"));
    }
    assert!(err(CoordinationOptions {
        key_prefix: Some("x".repeat(200)),
        ..ok()
    })
    .starts_with("options.redis.keyPrefix"));
}

#[tokio::test]
async fn shared_tokens_are_judged_and_kept_on_the_callers_clock() {
    // A test's fake clock, years away from the machine's.
    const FAKE: i64 = 1_893_456_000_000; // 2030-01-01T00:00:00Z
    let s = Server::start();
    let c = coordinator_with(&s.url(), KEY_A, 5_000.0);
    let presented = Presented {
        access: "old".into(),
        refresh: None,
        expires_at: FAKE - 1,
    };
    let Outcome::Lead { lease, .. } = c
        .acquire(
            "u",
            &presented,
            |_, _| true,
            soon(5_000),
            CallerNow::new(FAKE),
            RefreshTokenUse::Never,
        )
        .await
        .outcome
    else {
        panic!("lead")
    };
    let token = SharedToken {
        access: "new".into(),
        refresh: Some("r1".into()),
        expires_at: FAKE + 60_000,
    };
    assert!(c.commit("u", &lease, &token, FAKE).await.unwrap());
    // Redis keeps it for its life on that clock plus retention, not for years.
    let mut con = s.con().await;
    let record = keys::Keys::new("t:").user("u").record;
    let ttl: i64 = con.pttl(&record).await.unwrap();
    let retention = policy().idle_ttl_ms as i64;
    assert!(ttl > 0 && ttl <= 60_000 + retention, "PTTL {ttl}");
    // Fresh at 30 s on the caller's clock, and the veto is asked at that time...
    let seen = std::cell::Cell::new(0);
    let usable = |_: &SharedToken, now| {
        seen.set(now);
        true
    };
    let Outcome::Shared { token: t, .. } = c
        .acquire(
            "u",
            &presented,
            usable,
            soon(5_000),
            CallerNow::new(FAKE + 30_000),
            RefreshTokenUse::Never,
        )
        .await
        .outcome
    else {
        panic!("fresh on the caller's clock")
    };
    assert_eq!(t.access.expose(), "new");
    assert!((FAKE + 30_000..FAKE + 35_000).contains(&seen.get()));
    // ...and due at 59.5 s (inside the 1 s buffer), though by the machine's
    // clock it expires years from now.
    let Outcome::Lead { lease, .. } = c
        .acquire(
            "u",
            &presented,
            |_, _| true,
            soon(5_000),
            CallerNow::new(FAKE + 59_500),
            RefreshTokenUse::Never,
        )
        .await
        .outcome
    else {
        panic!("due on the caller's clock")
    };
    assert!(c.release("u", &lease, false).await.unwrap());
}

#[tokio::test]
async fn the_callers_clock_advances_with_the_real_time_waited() {
    let clock = CallerNow::new(1_000);
    assert!((1_000..1_050).contains(&clock.now()));
    tokio::time::sleep(Duration::from_millis(60)).await;
    let now = clock.now();
    assert!((1_060..6_000).contains(&now), "{now}");
}

#[test]
fn on_error_decides_the_guard_and_what_an_uncoordinated_refresh_does() {
    use super::{OnError, RefreshTokenUse as Use, WhenUnavailable};
    // (onError, may the refresh send a refresh token, does the caller have
    // one) -> what the restart guard weighs, and whether the refresh still
    // runs in-process while Redis is unavailable.
    for (on_error, may_use, presented, uses, runs) in [
        (OnError::Auto, true, true, Use::Sends, false),
        (OnError::Auto, true, false, Use::IfHandedOver, true),
        (OnError::Auto, false, true, Use::Never, true),
        (OnError::Local, true, true, Use::Never, true),
        (OnError::Local, false, false, Use::Never, true),
        (OnError::Fail, true, true, Use::Sends, false),
        (OnError::Fail, false, false, Use::Never, false),
    ] {
        let got = on_error.refresh_token_use(may_use, presented);
        assert_eq!(got, uses, "{on_error:?} {may_use} {presented}");
        let fallback = on_error.when_unavailable(got) == WhenUnavailable::Fallback;
        assert_eq!(fallback, runs, "{on_error:?} {may_use} {presented}");
    }
    assert_eq!(OnError::parse("auto"), Some(OnError::Auto));
    assert_eq!(OnError::parse("local"), Some(OnError::Local));
    assert_eq!(OnError::parse("fail"), Some(OnError::Fail));
    assert_eq!(OnError::parse("Auto"), None);
}

#[tokio::test]
async fn a_stashed_token_survives_its_holder_and_a_commit_after_it_lands() {
    let s = Server::start();
    let a = coordinator_with(&s.url(), KEY_A, 600.0);
    let b = coordinator_with(&s.url(), KEY_A, 600.0);
    // Stash, then commit with the same lease: the commit writes and frees.
    let Outcome::Lead { lease, .. } = acquire(&a, "u", soon(10_000)).await.outcome else {
        panic!("lead")
    };
    assert!(a
        .stash("u", &lease, &token("kept", "r1", 60_000), time::now_ms())
        .await
        .unwrap());
    assert!(a
        .commit("u", &lease, &token("kept", "r1", 60_000), time::now_ms())
        .await
        .unwrap());
    let Outcome::Shared { token: t, .. } = acquire(&b, "u", soon(10_000)).await.outcome else {
        panic!("committed")
    };
    assert_eq!(t.access.expose(), "kept");

    // A holder that stashes and then dies (its app was saving): the next
    // holder finds the token in Redis once the lock lapses, instead of
    // refreshing with a refresh token already spent.
    let c = coordinator_with(&s.url(), KEY_A, 600.0);
    let Outcome::Lead { lease, .. } = acquire(&c, "v", soon(10_000)).await.outcome else {
        panic!("lead")
    };
    assert!(c
        .stash(
            "v",
            &lease,
            &token("only-copy", "r-new", 60_000),
            time::now_ms()
        )
        .await
        .unwrap());
    drop(c);
    let Outcome::Shared { token: t, .. } = acquire(&b, "v", soon(10_000)).await.outcome else {
        panic!("the stashed token")
    };
    assert_eq!(t.access.expose(), "only-copy");
    assert_eq!(t.refresh.as_ref().map(SecretString::expose), Some("r-new"));
}

#[tokio::test]
async fn a_short_lived_token_in_redis_is_fresh_for_half_its_lifetime() {
    // Two-minute tokens under the default five-minute buffer: another
    // instance takes the cached one rather than refresh again.
    let s = Server::start();
    let with_default_buffer = || {
        coordinator(
            CoordinationOptions {
                endpoint: Endpoint::Node(s.url().into()),
                tls_ca: None,
                key_prefix: Some("t:".into()),
                lock_ttl_ms: Some(5_000.0),
                encryption_keys: vec![KEY_A.into()],
                user_id_key: None,
                upgrading: false,
            },
            &Policy::default(),
        )
        .unwrap()
    };
    let (a, b) = (with_default_buffer(), with_default_buffer());
    let Outcome::Lead { lease, .. } = acquire(&a, "u", soon(10_000)).await.outcome else {
        panic!("lead")
    };
    assert!(a
        .commit(
            "u",
            &lease,
            &token("two-minutes", "r1", 120_000),
            time::now_ms()
        )
        .await
        .unwrap());
    let Outcome::Shared { token: t, .. } = acquire(&b, "u", soon(10_000)).await.outcome else {
        panic!("the cached token is fresh for its lifetime")
    };
    assert_eq!(t.access.expose(), "two-minutes");
    // A caller presenting that very token (from its database, not knowing
    // its lifetime) is handed it back rather than refreshing.
    let presented = Presented {
        access: "two-minutes".into(),
        refresh: None,
        expires_at: t.expires_at,
    };
    let again = b
        .acquire(
            "u",
            &presented,
            |_, _| true,
            soon(10_000),
            CallerNow::new(time::now_ms()),
            RefreshTokenUse::Never,
        )
        .await;
    let Outcome::Shared { token: same, .. } = again.outcome else {
        panic!("the presented token, fresh for its lifetime")
    };
    assert_eq!(same.access.expose(), "two-minutes");
    // Past half its lifetime it is due: 50 s left of 120 s.
    let Outcome::Lead { lease, .. } = acquire(&a, "v", soon(10_000)).await.outcome else {
        panic!("lead")
    };
    let written = time::now_ms() - 70_000;
    assert!(a
        .commit("v", &lease, &token("half-gone", "r1", 50_000), written)
        .await
        .unwrap());
    assert!(matches!(
        acquire(&b, "v", soon(10_000)).await.outcome,
        Outcome::Lead { .. }
    ));
}

/// A coordinator naming users by `user_id_key` (None: unkeyed), `upgrading` or not.
fn coordinator_named(url: &str, user_id_key: Option<&str>, upgrading: bool) -> Coordinator {
    coordinator(
        CoordinationOptions {
            endpoint: Endpoint::Node(url.into()),
            tls_ca: None,
            key_prefix: Some("t:".into()),
            lock_ttl_ms: Some(10_000.0),
            encryption_keys: vec![KEY_A.into()],
            user_id_key: user_id_key.map(Into::into),
            upgrading,
        },
        &policy(),
    )
    .unwrap()
}

#[tokio::test]
async fn an_upgrading_instance_holds_and_writes_under_both_names() {
    let s = Server::start();
    let mut con = s.con().await;
    let upgrading = coordinator_named(&s.url(), Some(KEY_B), true);
    let unkeyed = coordinator_named(&s.url(), None, false);
    let keyed = coordinator_named(&s.url(), Some(KEY_B), false);
    let names = keys::Keys::new("t:").with_user_id_key(Some(keys::UserIdKey::new(&{
        let mut b = [0u8; 32];
        b.copy_from_slice(&seal::key_bytes(KEY_B).unwrap());
        b
    })));
    let (plain, hashed) = (names.unkeyed_user("u"), names.user("u"));
    let Outcome::Lead { lease, .. } = acquire(&upgrading, "u", soon(5_000)).await.outcome else {
        panic!("lead")
    };
    assert!(lease.unkeyed_fence.is_some());
    // Both locks held, by one owner: neither kind of instance gets in.
    for lock in [&plain.lock, &hashed.lock] {
        let owner: Option<String> = redis::cmd("GET")
            .arg(lock)
            .query_async(&mut con)
            .await
            .unwrap();
        assert_eq!(owner.as_deref(), Some(lease.owner.as_str()));
    }
    for other in [&unkeyed, &keyed] {
        let Outcome::TimedOut = acquire(other, "u", soon(200)).await.outcome else {
            panic!("the lock is held")
        };
    }
    assert!(upgrading
        .commit("u", &lease, &token("at-1", "rt-1", 60_000), time::now_ms())
        .await
        .unwrap());
    // Both records written, both locks free: each kind of instance shares it.
    for other in [&unkeyed, &keyed] {
        let Outcome::Shared { token, .. } = acquire(other, "u", soon(2_000)).await.outcome else {
            panic!("shared")
        };
        assert_eq!(token.access.expose(), "at-1");
    }
    for lock in [&plain.lock, &hashed.lock] {
        let owner: Option<String> = redis::cmd("GET")
            .arg(lock)
            .query_async(&mut con)
            .await
            .unwrap();
        assert_eq!(owner, None);
    }
    // A failed refresh frees both locks too.
    let Outcome::Lead { lease, .. } = acquire(&upgrading, "v", soon(5_000)).await.outcome else {
        panic!("lead")
    };
    assert!(upgrading.release("v", &lease, true).await.unwrap());
    assert_eq!(upgrading.watchdogs(), 0);
    for other in [&unkeyed, &keyed] {
        let Outcome::Lead { lease, .. } = acquire(other, "v", soon(2_000)).await.outcome else {
            panic!("free")
        };
        other.release("v", &lease, false).await.unwrap();
    }
}
