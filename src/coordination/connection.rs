//! One multiplexed RESP3 connection per coordinator (a `ConnectionManager`,
//! which reconnects by itself), carrying both commands and the pub/sub
//! channel, plus a breaker: after a connection-level failure, calls fail
//! fast (no Redis round trip, no waiting) while a background probe
//! reconnects. What counts as such a failure, and the restart guard, are
//! `health.rs`'s.

use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::Mutex;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, IntoConnectionInfo, ProtocolVersion, PushKind, RedisError, RedisResult};
use tokio::task::AbortHandle;

use super::health::{self, Breaker, Epoch, Fault};
use super::pubsub::Waiters;
use crate::engine::SecretString;

/// Longest a single Redis call may take before Redis counts as unavailable.
/// Every call is in-memory work on the server: a second is an outage.
pub const OP_TIMEOUT: Duration = Duration::from_millis(1_000);

/// Why a call could not use Redis. Messages name a category, never the URL.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unavailable {
    #[error("the coordinator is closed")]
    Closed,
    #[error("Redis is unreachable (reconnecting in the background)")]
    Down,
    #[error("Redis did not answer in time")]
    TimedOut,
    #[error("Redis call failed ({0})")]
    Failed(String),
    /// An odd reply to this one call: the breaker stays closed.
    #[error("Redis refused the call ({0})")]
    Rejected(String),
    /// The restart guard (`health.rs`): this server may have lost locks.
    #[error("Redis restarted, failed over or is new to this fleet: refreshes that spend a refresh token wait {resumes_in_ms} ms more for locks it may have lost")]
    NewServer { resumes_in_ms: u64 },
}

impl Unavailable {
    /// Worth another try shortly (a write that must land).
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Down | Self::TimedOut | Self::Failed(_))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    #[error(
        "is not a valid Redis URL (redis://[user:password@]host[:port][/db] or redis+unix:///path)"
    )]
    Invalid,
    #[error("uses TLS (rediss://), which this build does not support")]
    Tls,
}

pub struct Connection {
    client: Client,
    channel: String,
    waiters: Arc<Waiters>,
    manager: Mutex<Option<ConnectionManager>>,
    subscribed: AtomicBool,
    breaker: Breaker,
    epoch: Epoch,
    closed: AtomicBool,
    probe: Mutex<Option<AbortHandle>>,
}

impl std::fmt::Debug for Connection {
    // The client holds the URL, which may carry a password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("channel", &self.channel)
            .field("breaker", &self.breaker)
            .field("closed", &self.closed)
            .finish_non_exhaustive()
    }
}

impl Connection {
    /// Parses the URL; connects lazily, on the first call.
    pub fn open(url: &SecretString, channel: String) -> Result<Self, UrlError> {
        let url = url.expose();
        if url.starts_with("rediss:") || url.starts_with("valkeys:") {
            return Err(UrlError::Tls);
        }
        let info = url.into_connection_info().map_err(|_| UrlError::Invalid)?;
        // RESP3: subscriptions and commands share the one connection.
        let settings = info
            .redis_settings()
            .clone()
            .set_protocol(ProtocolVersion::RESP3);
        let client =
            Client::open(info.set_redis_settings(settings)).map_err(|_| UrlError::Invalid)?;
        Ok(Self {
            client,
            channel,
            waiters: Arc::default(),
            manager: Mutex::new(None),
            subscribed: AtomicBool::new(false),
            breaker: Breaker::default(),
            epoch: Epoch::default(),
            closed: AtomicBool::new(false),
            probe: Mutex::new(None),
        })
    }

    pub fn waiters(&self) -> &Arc<Waiters> {
        &self.waiters
    }

    pub fn channel(&self) -> &str {
        &self.channel
    }

    /// Whether calls are failing fast until the probe reconnects.
    pub fn is_down(&self) -> bool {
        self.breaker.is_open()
    }

    /// Which server this connection last used (the restart guard).
    pub fn epoch(&self) -> &Epoch {
        &self.epoch
    }

    /// Runs one Redis call within `budget`. A connection-level failure
    /// opens the breaker (while it is open this returns at once); an odd
    /// reply is this call's alone (`health::classify`). A call unanswered
    /// after [`OP_TIMEOUT`] has a ping decide: if the ping goes unanswered
    /// too, the breaker opens and the call gives up at once; otherwise it
    /// keeps waiting, up to `budget` (a loaded server is slow, not gone).
    pub async fn run<T, F, Fut>(self: &Arc<Self>, budget: Duration, f: F) -> Result<T, Unavailable>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        self.call(budget, f, true).await
    }

    /// [`Connection::run`] even while the breaker is open: for a call that
    /// must follow one already sent (giving back a lock granted to a call
    /// that gave up), which a stalled server will run, breaker or not.
    pub async fn run_anyway<T, F, Fut>(
        self: &Arc<Self>,
        budget: Duration,
        f: F,
    ) -> Result<T, Unavailable>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        self.call(budget, f, false).await
    }

    async fn call<T, F, Fut>(
        self: &Arc<Self>,
        budget: Duration,
        f: F,
        gated: bool,
    ) -> Result<T, Unavailable>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        if self.closed.load(Relaxed) {
            return Err(Unavailable::Closed);
        }
        // Armed before the check, so a trip in between is not missed.
        let opened = self.breaker.opened();
        tokio::pin!(opened);
        opened.as_mut().enable();
        if gated && self.is_down() {
            return Err(Unavailable::Down);
        }
        let manager = self.manager()?;
        let call = async {
            self.subscribe(&manager).await?;
            f(manager).await
        };
        tokio::pin!(call);
        let first = budget.min(OP_TIMEOUT);
        let answered = match tokio::time::timeout(first, &mut call).await {
            Ok(answered) => answered,
            Err(_) if budget <= OP_TIMEOUT => {
                // A short budget (the caller's deadline is near) says nothing
                // about Redis; a full one may.
                if budget == OP_TIMEOUT {
                    self.check();
                }
                return Err(Unavailable::TimedOut);
            }
            Err(_) => {
                self.check();
                // Sent and unanswered either way: `TimedOut`, not `Down`.
                tokio::select! {
                    answered = &mut call => answered,
                    _ = tokio::time::sleep(budget - first) => return Err(Unavailable::TimedOut),
                    _ = &mut opened => return Err(Unavailable::TimedOut),
                }
            }
        };
        answered.map_err(|e| self.fault(&e))
    }

    fn fault(self: &Arc<Self>, e: &RedisError) -> Unavailable {
        match health::classify(e) {
            Fault::Connection => {
                self.mark_down();
                Unavailable::Failed(e.category().to_owned())
            }
            Fault::Slow => {
                self.check();
                Unavailable::TimedOut
            }
            Fault::Reply => Unavailable::Rejected(e.category().to_owned()),
        }
    }

    /// Drops the connection; every later call fails with `Closed`.
    pub fn close(&self) {
        self.closed.store(true, Relaxed);
        if let Some(p) = self.probe.lock().take() {
            p.abort();
        }
        self.manager.lock().take();
    }

    fn manager(self: &Arc<Self>) -> Result<ConnectionManager, Unavailable> {
        let mut slot = self.manager.lock();
        if let Some(m) = &*slot {
            return Ok(m.clone());
        }
        let waiters = Arc::downgrade(&self.waiters);
        let conn = Arc::downgrade(self);
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(OP_TIMEOUT))
            // Every call has its own budget (`run`).
            .set_response_timeout(None)
            // Few, quick retries: the breaker and its probe handle outages.
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_millis(200))
            .set_push_sender(move |info: redis::PushInfo| {
                // A dropped connection: have a ping say whether Redis is
                // gone (the probe then reconnects promptly and touches the
                // restart marker) rather than wait for a call to fail.
                if info.kind == PushKind::Disconnection {
                    if let Some(c) = conn.upgrade() {
                        c.check();
                    }
                }
                if let Some(w) = waiters.upgrade() {
                    w.on_push(info);
                }
                Ok::<(), Infallible>(())
            })
            .set_automatic_resubscription();
        let m = ConnectionManager::new_lazy_with_config(self.client.clone(), config)
            .map_err(|e| Unavailable::Failed(e.category().to_owned()))?;
        *slot = Some(m.clone());
        Ok(m)
    }

    /// Subscribes once; the manager resubscribes after reconnecting.
    async fn subscribe(&self, manager: &ConnectionManager) -> RedisResult<()> {
        if !self.subscribed.load(Relaxed) {
            manager.clone().subscribe(&self.channel).await?;
            self.subscribed.store(true, Relaxed);
        }
        Ok(())
    }

    fn mark_down(self: &Arc<Self>) {
        if !self.breaker.trip() || self.closed.load(Relaxed) {
            return;
        }
        let weak = Arc::downgrade(self);
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            *self.probe.lock() = Some(handle.spawn(probe(weak)).abort_handle());
        }
    }

    /// One unanswered call is not an outage: ping once (in the background)
    /// and open the breaker only if that goes unanswered too.
    fn check(self: &Arc<Self>) {
        if self.closed.load(Relaxed) || !self.breaker.begin_check() {
            return;
        }
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            self.breaker.end_check();
            return;
        };
        let weak = Arc::downgrade(self);
        handle.spawn(async move {
            let Some(c) = weak.upgrade() else { return };
            let alive = c.ping().await;
            c.breaker.end_check();
            if !alive {
                c.mark_down();
            }
        });
    }

    /// Pings, and touches the restart marker (`health::touch`) so a grace
    /// starts as soon as this instance is back on a new server.
    async fn ping(self: &Arc<Self>) -> bool {
        let Ok(manager) = self.manager() else {
            return false;
        };
        let ping = async {
            self.subscribe(&manager).await?;
            redis::cmd("PING")
                .query_async::<()>(&mut manager.clone())
                .await
        };
        if !matches!(tokio::time::timeout(OP_TIMEOUT, ping).await, Ok(Ok(()))) {
            return false;
        }
        if let Some(marker) = self.epoch.marker() {
            let (mut m, known) = (manager.clone(), self.epoch.known());
            let touched = health::touch(&mut m, marker, &known);
            // Redis answered: a failed touch (an ACL refusing scripts) only
            // means the next acquire does the detection itself.
            if let Ok(Ok(run)) = tokio::time::timeout(OP_TIMEOUT, touched).await {
                self.epoch.saw(&run);
            }
        }
        true
    }
}

/// Pings with a growing pause (`health::retry_pause`) until Redis answers,
/// then closes the breaker.
async fn probe(conn: Weak<Connection>) {
    for n in 0.. {
        tokio::time::sleep(health::retry_pause(n)).await;
        let Some(c) = conn.upgrade() else { return };
        if c.closed.load(Relaxed) {
            return;
        }
        if c.ping().await {
            c.breaker.reset();
            c.probe.lock().take();
            return;
        }
    }
}
