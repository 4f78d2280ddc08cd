//! One RESP3 link per coordinator (`link.rs`: a node's `ConnectionManager`
//! or a cluster connection, both reconnecting by themselves), carrying both
//! commands and the pub/sub channel, plus a breaker: after a failure, calls
//! fail fast (no Redis round trip, no waiting) while a background probe
//! reconnects.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::Mutex;
use redis::aio::ConnectionManagerConfig;
use redis::RedisResult;
use tokio::task::AbortHandle;

use super::link::{self, Endpoint, Link, Target};
use super::pubsub::Waiters;
use crate::engine::EngineError;

/// Longest a single Redis call may take before Redis counts as unavailable.
/// Every call is in-memory work on the server: a second is an outage.
pub const OP_TIMEOUT: Duration = Duration::from_millis(1_000);
const PROBE_FIRST: Duration = Duration::from_millis(100);
const PROBE_MAX: Duration = Duration::from_millis(2_000);

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
}

pub struct Connection {
    target: Target,
    channel: String,
    waiters: Arc<Waiters>,
    manager: Mutex<Option<Link>>,
    /// Held while a link is being made, so concurrent calls make one.
    connecting: tokio::sync::Mutex<()>,
    /// What the last failure was, in words: what `Unavailable::Down` says.
    failure: Mutex<String>,
    subscribed: AtomicBool,
    down: AtomicBool,
    closed: AtomicBool,
    probe: Mutex<Option<AbortHandle>>,
}

impl std::fmt::Debug for Connection {
    // The target holds the URL, which may carry a password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("channel", &self.channel)
            .field("down", &self.down)
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
        let push: link::PushHandler = Arc::new(move |info| {
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
            connecting: tokio::sync::Mutex::new(()),
            failure: Mutex::new("Redis is unreachable".to_owned()),
            subscribed: AtomicBool::new(false),
            down: AtomicBool::new(false),
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
        self.down.load(Relaxed)
    }

    /// Runs one Redis call within `budget` (at most [`OP_TIMEOUT`]).
    /// A failure opens the breaker; while it is open this returns at once.
    pub async fn run<T, F, Fut>(self: &Arc<Self>, budget: Duration, f: F) -> Result<T, Unavailable>
    where
        F: FnOnce(Link) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        if self.closed.load(Relaxed) {
            return Err(Unavailable::Closed);
        }
        if self.is_down() {
            return Err(Unavailable::Down(self.failure.lock().clone()));
        }
        let budget = budget.min(OP_TIMEOUT);
        let call = async {
            let manager = self.manager().await?;
            self.subscribe(&manager).await?;
            f(manager).await
        };
        match tokio::time::timeout(budget, call).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                let failure = link::describe(&e);
                *self.failure.lock() = failure.clone();
                self.mark_down();
                Err(Unavailable::Failed(failure))
            }
            Err(_) => {
                // A short budget (the caller's deadline is near) says nothing
                // about Redis; a full one does.
                if budget == OP_TIMEOUT {
                    *self.failure.lock() = Unavailable::TimedOut.to_string();
                    self.mark_down();
                }
                Err(Unavailable::TimedOut)
            }
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

    async fn manager(&self) -> RedisResult<Link> {
        if let Some(m) = &*self.manager.lock() {
            return Ok(m.clone());
        }
        let _one = self.connecting.lock().await;
        if let Some(m) = &*self.manager.lock() {
            return Ok(m.clone());
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(OP_TIMEOUT))
            .set_response_timeout(Some(OP_TIMEOUT))
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
        *self.manager.lock() = Some(m.clone());
        Ok(m)
    }

    /// Subscribes once; the link resubscribes after reconnecting.
    async fn subscribe(&self, manager: &Link) -> RedisResult<()> {
        if !self.subscribed.load(Relaxed) {
            manager.subscribe(&self.channel).await?;
            self.subscribed.store(true, Relaxed);
        }
        Ok(())
    }

    fn mark_down(self: &Arc<Self>) {
        if self.down.swap(true, Relaxed) || self.closed.load(Relaxed) {
            return;
        }
        let weak = Arc::downgrade(self);
        *self.probe.lock() = Some(tokio::spawn(probe(weak)).abort_handle());
    }
}

/// Pings with a growing pause until Redis answers, then closes the breaker.
async fn probe(conn: Weak<Connection>) {
    let mut pause = PROBE_FIRST;
    loop {
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(PROBE_MAX);
        let Some(c) = conn.upgrade() else { return };
        if c.closed.load(Relaxed) {
            return;
        }
        let ping = async {
            let manager = c.manager().await?;
            c.subscribe(&manager).await?;
            redis::cmd("PING")
                .query_async::<()>(&mut manager.clone())
                .await
        };
        if let Ok(Ok(())) = tokio::time::timeout(OP_TIMEOUT, ping).await {
            c.down.store(false, Relaxed);
            c.probe.lock().take();
            return;
        }
    }
}
