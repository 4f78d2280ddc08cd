//! Cross-instance coordination on Redis: one refresh per user across every
//! process sharing a Redis (`TokenManager({ redis })`). Pure Rust, no napi
//! types; `src/binding/coordination.rs` exposes it to JavaScript.
//!
//! - [`keys`]: key names (a SHA-256 of the user id, never the id);
//! - `codec`: the length-prefixed layout of every sealed plaintext;
//! - [`seal`]: AES-256-GCM for every value at rest or on the wire, under
//!   one or more keys (rotation);
//! - [`record`]: the shared values (record, lease, notices) and their encoding;
//! - [`lock`]: the per-user lock (`SET NX PX`, compare-and-delete);
//! - [`cache`]: the shared token record and its fenced write;
//! - [`pubsub`]: announcements and the local waiters they wake;
//! - [`link`]: where Redis is (a node or a cluster, TCP or TLS) and the
//!   connection to it;
//! - [`connection`]: that connection with a breaker and reconnect probe;
//! - [`health`]: the breaker's policy and the restart guard (a new server
//!   may have lost the locks: refresh-token refreshes wait);
//! - [`coordinator`]: the flow tying them together.
//!
//! The hot path never gets here: only a refresh that is due does.

pub mod cache;
mod codec;
pub mod connection;
pub mod coordinator;
pub mod health;
pub mod keys;
pub mod link;
pub mod lock;
pub mod pubsub;
pub mod record;
pub mod seal;
pub mod tls;

pub use connection::{Connection, Unavailable};
pub use coordinator::{
    Acquired, Coordinator, OnError, Outcome, RefreshTokenUse, Timing, WhenUnavailable,
};
pub use link::Endpoint;
pub use seal::{SealKeys, SharedToken};

use crate::engine::policy::whole_ms;
use crate::engine::{EngineError, Policy, SecretString};

pub const DEFAULT_LOCK_TTL_MS: u64 = 15_000;
const MIN_LOCK_TTL_MS: u64 = 100;
const MAX_LOCK_TTL_MS: u64 = 3_600_000;

/// `redis` options as they arrive from JavaScript. `lib/coordination.js`
/// checks types and presence; the values are checked here.
#[derive(Debug)]
pub struct CoordinationOptions {
    /// `url` or `cluster`.
    pub endpoint: Endpoint,
    /// `tls.ca`: PEM certificates trusted instead of the system's roots.
    pub tls_ca: Option<Vec<u8>>,
    pub key_prefix: Option<String>,
    pub lock_ttl_ms: Option<f64>,
    /// `encryptionKey`, one or several: the first seals, each opens.
    pub encryption_keys: Vec<SecretString>,
    /// `userIdKey`: the secret users are named by in Redis (`keys.rs`).
    pub user_id_key: Option<SecretString>,
    /// `upgrading`: earlier releases share the Redis; write what they read
    /// (and, with `userIdKey`, lock and write under the unkeyed names too).
    pub upgrading: bool,
}

/// Validates the options and builds a coordinator. Connects lazily: a
/// Redis that is down at start-up is an outage, not a construction error.
pub fn coordinator(o: CoordinationOptions, policy: &Policy) -> Result<Coordinator, EngineError> {
    let prefix = o
        .key_prefix
        .unwrap_or_else(|| keys::DEFAULT_PREFIX.to_owned());
    if prefix.len() > keys::MAX_PREFIX_BYTES {
        return Err(EngineError::invalid_argument(
            "options.redis.keyPrefix",
            format!("must be at most {} bytes long", keys::MAX_PREFIX_BYTES),
        ));
    }
    let lock_ttl_ms = match o.lock_ttl_ms {
        None => DEFAULT_LOCK_TTL_MS,
        Some(v) => whole_ms(
            "options.redis.lockTtlMs",
            v,
            MIN_LOCK_TTL_MS,
            MAX_LOCK_TTL_MS,
        )?,
    };
    let name = "options.redis.encryptionKey";
    let n = o.encryption_keys.len();
    if n == 0 || n > seal::MAX_KEYS {
        return Err(EngineError::invalid_argument(
            name,
            format!("must hold 1 to {} keys", seal::MAX_KEYS),
        ));
    }
    let encoded: Vec<&str> = o.encryption_keys.iter().map(SecretString::expose).collect();
    let seal = SealKeys::from_base64_list(&encoded).map_err(|(i, e)| {
        let at = if n > 1 {
            format!("entry {i} ")
        } else {
            String::new()
        };
        let what = match e {
            seal::KeyError::Hex => String::new(),
            _ => " (32 random bytes, base64)".to_owned(),
        };
        EngineError::invalid_argument(name, format!("{at}{e}{what}"))
    })?;
    let user_id_key = o
        .user_id_key
        .as_ref()
        .map(|k| user_id_key(k, &encoded))
        .transpose()?;
    // A cluster script touches one hash slot: one restart marker per slot.
    let k = keys::Keys::new(prefix)
        .with_marker_per_slot(matches!(o.endpoint, Endpoint::Cluster(_)))
        .with_user_id_key(user_id_key);
    let conn = Connection::open(&o.endpoint, o.tls_ca.as_deref(), k.channel())?;
    let timing = Timing {
        lock_ttl_ms,
        buffer_ms: policy.buffer_ms,
        double_check_window_ms: policy.double_check_window_ms,
        retention_ms: policy.idle_ttl_ms,
        refresh_timeout_ms: policy.refresh_timeout_ms,
    };
    Ok(Coordinator::new(conn, k, seal, timing, o.upgrading))
}

/// `userIdKey`: 32 bytes as one `encryptionKey` entry is written, and not
/// one of them (a secret used for two things, and one a rotation retires).
fn user_id_key(key: &SecretString, encryption: &[&str]) -> Result<keys::UserIdKey, EngineError> {
    let name = "options.redis.userIdKey";
    let bytes = seal::key_bytes(key.expose()).map_err(|e| {
        let what = match e {
            seal::KeyError::Hex => "",
            _ => " (32 random bytes, base64)",
        };
        EngineError::invalid_argument(name, format!("{e}{what}"))
    })?;
    if encryption
        .iter()
        .any(|k| seal::key_bytes(k).is_ok_and(|b| b.as_slice() == bytes.as_slice()))
    {
        return Err(EngineError::invalid_argument(
            name,
            "must not be one of encryptionKey (a separate secret, kept across key rotations)",
        ));
    }
    let mut raw = zeroize::Zeroizing::new([0u8; 32]);
    raw.copy_from_slice(&bytes);
    Ok(keys::UserIdKey::new(&raw))
}

#[cfg(test)]
mod outage_tests;
#[cfg(test)]
mod tests;
