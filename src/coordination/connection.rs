//! Two RESP3 links per coordinator (`link.rs`: a node's `ConnectionManager`
//! or a cluster connection, both reconnecting by themselves): one for
//! commands, one subscribed to the pub/sub channel. Kept apart so that no
//! flood of channel messages (anyone who can reach Redis can publish) can
//! fill the command link's output buffer on the server, which then closes
//! it and fails the commands in flight; a flood that overruns the
//! subscriber's buffer closes only the subscriber, which reconnects and
//! resubscribes (its waiters ask again). Messages are verified as they are
//! read (`pubsub.rs`), so nothing queues behind the socket. Plus a breaker:
//! after a connection-level failure, calls fail fast (no Redis round trip,
//! no waiting) while a background probe reconnects. What counts as such a
//! failure, and the restart guard, are `health.rs`'s.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use parking_lot::Mutex;
use redis::aio::ConnectionManagerConfig;
use redis::{PushKind, RedisError, RedisResult};
use tokio::task::AbortHandle;

pub use super::health::OP_TIMEOUT;
use super::health::{self, Breaker, Epoch, Fault};
use super::link::{self, Endpoint, Link, Target};
use super::pubsub::Waiters;
use crate::engine::EngineError;

/// Why a call could not use Redis. Messages name a category, never the URL.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unavailable {
    #[error("the coordinator is closed")]
    Closed,
    /// The breaker is open: calls fail fast. Holds what failed last, so
    /// the first caller to hear of an outage hears why (a wrong password
    /// found by the background connect, say).
    #[error("{0}; reconnecting in the background")]
    Down(String),
    #[error("Redis did not answer in time")]
    TimedOut,
    /// What failed, in words (`link::describe`).
    #[error("{0}")]
    Failed(String),
    /// An odd reply to this one call (`link::describe`): the breaker stays
    /// closed.
    #[error("{0}")]
    Rejected(String),
    /// The restart guard (`health.rs`): this server may have lost locks.
    #[error("Redis restarted, failed over or lost its keys: refreshes that spend a refresh token wait {resumes_in_ms} ms more for locks it may have lost")]
    NewServer { resumes_in_ms: u64 },
}

impl Unavailable {
    /// Worth another try shortly (a write that must land).
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Down(_) | Self::TimedOut | Self::Failed(_))
    }
}

pub struct Connection {
    target: Target,
    channel: String,
    waiters: Arc<Waiters>,
    manager: Mutex<Option<Link>>,
    /// The link subscribed to the channel (commands never use it).
    subscriber: Mutex<Option<Link>>,
    /// Held while a link is being made, so concurrent calls make one.
    connecting: tokio::sync::Mutex<()>,
    /// What the last failure was, in words: what `Unavailable::Down` says.
    failure: Mutex<String>,
    subscribed: AtomicBool,
    breaker: Breaker,
    epoch: Epoch,
    closed: AtomicBool,
    probe: Mutex<Option<AbortHandle>>,
    /// This connection, for the push handler (set by `started`).
    me: Arc<OnceLock<Weak<Connection>>>,
}

impl std::fmt::Debug for Connection {
    // The target holds the URL, which may carry a password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("channel", &self.channel)
            .field("breaker", &self.breaker)
            .field("closed", &self.closed)
            .finish_non_exhaustive()
    }
}

impl Connection {
    /// Parses the endpoint (`ca`: PEM for TLS); connects lazily, on the
    /// first call.
    pub fn open(
        endpoint: &Endpoint,
        ca: Option<&[u8]>,
        channel: String,
    ) -> Result<Self, EngineError> {
        let waiters = Arc::<Waiters>::default();
        let weak = Arc::downgrade(&waiters);
        let me = Arc::<OnceLock<Weak<Connection>>>::default();
        let conn = me.clone();
        let push: link::PushHandler = Arc::new(move |info| {
            // A dropped connection: have a ping say whether Redis is gone
            // (the probe then reconnects promptly and touches the restart
            // markers) rather than wait for a call to fail.
            if info.kind == PushKind::Disconnection {
                if let Some(c) = conn.get().and_then(Weak::upgrade) {
                    c.resubscribe();
                    c.check();
                }
            }
            if let Some(w) = weak.upgrade() {
                w.on_push(info);
            }
        });
        let target = Target::new(endpoint, ca, OP_TIMEOUT, push)?;
        Ok(Self {
            target,
            channel,
            waiters,
            manager: Mutex::new(None),
            subscriber: Mutex::new(None),
            connecting: tokio::sync::Mutex::new(()),
            failure: Mutex::new("Redis is unreachable".to_owned()),
            subscribed: AtomicBool::new(false),
            breaker: Breaker::default(),
            epoch: Epoch::default(),
            closed: AtomicBool::new(false),
            probe: Mutex::new(None),
            me,
        })
    }

    /// Called once the connection is shared: lets the push handler reach it.
    pub fn started(self: &Arc<Self>) {
        let _ = self.me.set(Arc::downgrade(self));
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

    /// Which servers this connection used (the restart guard).
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
        F: FnOnce(Link) -> Fut,
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
        F: FnOnce(Link) -> Fut,
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
        F: FnOnce(Link) -> Fut,
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
            return Err(Unavailable::Down(self.failure.lock().clone()));
        }
        let call = async {
            let manager = self.manager().await?;
            self.subscribe().await?;
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
                let failure = link::describe(e);
                *self.failure.lock() = failure.clone();
                self.mark_down();
                Unavailable::Failed(failure)
            }
            Fault::Slow => {
                self.check();
                Unavailable::TimedOut
            }
            Fault::Reply => Unavailable::Rejected(link::describe(e)),
        }
    }

    /// Drops the connection; every later call fails with `Closed`.
    pub fn close(&self) {
        self.closed.store(true, Relaxed);
        if let Some(p) = self.probe.lock().take() {
            p.abort();
        }
        self.manager.lock().take();
        self.subscriber.lock().take();
    }

    async fn manager(&self) -> RedisResult<Link> {
        if let Some(m) = &*self.manager.lock() {
            return Ok(m.clone());
        }
        let _one = self.connecting.lock().await;
        if let Some(m) = &*self.manager.lock() {
            return Ok(m.clone());
        }
        let m = self.connect().await?;
        *self.manager.lock() = Some(m.clone());
        Ok(m)
    }

    async fn connect(&self) -> RedisResult<Link> {
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(OP_TIMEOUT))
            // Every call has its own budget (`run`).
            .set_response_timeout(None)
            // Few, quick retries: the breaker and its probe handle outages.
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_millis(200))
            .set_automatic_resubscription();
        let m = self.target.connect(config).await?;
        if self.closed.load(Relaxed) {
            return Err(redis::RedisError::from((
                redis::ErrorKind::Client,
                "closed",
            )));
        }
        Ok(m)
    }

    /// A link dropped: the subscriber is made anew by the next call (or
    /// ping). A link that only listens sends nothing that would make it
    /// reconnect by itself, and the server closes a subscriber it had to
    /// drop messages for (a flood).
    fn resubscribe(&self) {
        self.subscribed.store(false, Relaxed);
    }

    /// Subscribes, on a link of its own, unless subscribed already; a
    /// previous subscriber is dropped once the new one is in place.
    async fn subscribe(&self) -> RedisResult<()> {
        if self.subscribed.load(Relaxed) {
            return Ok(());
        }
        let _one = self.connecting.lock().await;
        if self.subscribed.load(Relaxed) {
            return Ok(());
        }
        let link = self.connect().await?;
        link.subscribe(&self.channel).await?;
        let old = self.subscriber.lock().replace(link);
        self.subscribed.store(true, Relaxed);
        drop(old);
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

    /// Pings, and touches the restart markers this instance used recently
    /// (`health::touch`), so a grace starts as soon as it is back on a new
    /// server.
    async fn ping(self: &Arc<Self>) -> bool {
        let ping = async {
            let manager = self.manager().await?;
            self.subscribe().await?;
            redis::cmd("PING")
                .query_async::<()>(&mut manager.clone())
                .await?;
            Ok::<_, RedisError>(manager)
        };
        let manager = match tokio::time::timeout(OP_TIMEOUT, ping).await {
            Ok(Ok(m)) => m,
            Ok(Err(e)) => {
                *self.failure.lock() = link::describe(&e);
                return false;
            }
            Err(_) => {
                *self.failure.lock() = Unavailable::TimedOut.to_string();
                return false;
            }
        };
        for (marker, known) in self.epoch.recent() {
            let mut m = manager.clone();
            let touched = health::touch(&mut m, &marker, &known);
            // Redis answered: a failed touch (an ACL refusing scripts) only
            // means the next grant does the detection itself.
            if let Ok(Ok(identity)) = tokio::time::timeout(OP_TIMEOUT, touched).await {
                self.epoch.saw(&marker, &identity);
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
