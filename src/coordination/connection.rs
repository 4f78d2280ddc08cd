//! One multiplexed RESP3 connection per coordinator (a `ConnectionManager`,
//! which reconnects by itself), carrying both commands and the pub/sub
//! channel, plus a breaker: after a failure, calls fail fast (no Redis
//! round trip, no waiting) while a background probe reconnects.

use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::Mutex;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, IntoConnectionInfo, ProtocolVersion, RedisResult};
use tokio::task::AbortHandle;

use super::pubsub::Waiters;
use crate::engine::SecretString;

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
    #[error("Redis is unreachable (reconnecting in the background)")]
    Down,
    #[error("Redis did not answer in time")]
    TimedOut,
    #[error("Redis call failed ({0})")]
    Failed(String),
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
    down: AtomicBool,
    closed: AtomicBool,
    probe: Mutex<Option<AbortHandle>>,
}

impl std::fmt::Debug for Connection {
    // The client holds the URL, which may carry a password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("channel", &self.channel)
            .field("down", &self.down)
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
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        if self.closed.load(Relaxed) {
            return Err(Unavailable::Closed);
        }
        if self.is_down() {
            return Err(Unavailable::Down);
        }
        let budget = budget.min(OP_TIMEOUT);
        let manager = self.manager()?;
        let call = async {
            self.subscribe(&manager).await?;
            f(manager).await
        };
        match tokio::time::timeout(budget, call).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                self.mark_down();
                Err(Unavailable::Failed(e.category().to_owned()))
            }
            Err(_) => {
                // A short budget (the caller's deadline is near) says nothing
                // about Redis; a full one does.
                if budget == OP_TIMEOUT {
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

    fn manager(&self) -> Result<ConnectionManager, Unavailable> {
        let mut slot = self.manager.lock();
        if let Some(m) = &*slot {
            return Ok(m.clone());
        }
        let waiters = Arc::downgrade(&self.waiters);
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(OP_TIMEOUT))
            .set_response_timeout(Some(OP_TIMEOUT))
            // Few, quick retries: the breaker and its probe handle outages.
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_millis(200))
            .set_push_sender(move |info| {
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
        let Ok(manager) = c.manager() else { continue };
        let ping = async {
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
