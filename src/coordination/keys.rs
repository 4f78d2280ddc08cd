//! Redis names. A key carries a SHA-256 of the user id, never the id itself
//! nor any token, so a SCAN of the keyspace shows no one's identity.

use std::collections::HashMap;

use once_cell::sync::Lazy;
use redis::cluster_routing::Slot;
use sha2::{Digest, Sha256};

pub const DEFAULT_PREFIX: &str = "ttm:";
/// Longest `keyPrefix` accepted, in bytes: a prefix is a namespace, not data.
pub const MAX_PREFIX_BYTES: usize = 128;

/// The names every instance sharing a prefix agrees on.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
    marker_per_slot: bool,
}

/// One user's names. The hash is in braces (a Redis Cluster hash tag) so the
/// record and the lock always live together, as the scripts touching both need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserKeys {
    /// Hex SHA-256 of the user id: how pub/sub messages name the user.
    pub id: String,
    /// Hash holding the sealed token, its expiry and fences (see `cache.rs`).
    pub record: String,
    /// The per-user refresh lock (see `lock.rs`).
    pub lock: String,
}

impl Keys {
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
            marker_per_slot: false,
        }
    }

    /// On a Redis Cluster: one restart marker per hash slot (see
    /// [`Keys::epoch_marker`]).
    pub fn with_marker_per_slot(mut self, per_slot: bool) -> Self {
        self.marker_per_slot = per_slot;
        self
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn user(&self, user_id: &str) -> UserKeys {
        let id = hex(&Sha256::digest(user_id.as_bytes()));
        UserKeys {
            record: format!("{}tok:{{{id}}}", self.prefix),
            lock: format!("{}lock:{{{id}}}", self.prefix),
            id,
        }
    }

    /// The one channel refreshed tokens are announced on.
    pub fn channel(&self) -> String {
        format!("{}refreshed", self.prefix)
    }

    /// The restart guard's marker (`health.rs`) for `user`'s keys: one per
    /// prefix on a single node; on a cluster, where a script may only touch
    /// keys of one hash slot, one per slot, named with a hash tag of the
    /// user's slot (so a node's restart or failover guards exactly the slots
    /// it serves).
    pub fn epoch_marker(&self, user: &UserKeys) -> String {
        if !self.marker_per_slot {
            return format!("{}epoch", self.prefix);
        }
        let tag = SLOT_TAGS
            .get(&Slot::for_key(&user.lock))
            .map_or("", String::as_str);
        format!("{}epoch:{{{tag}}}", self.prefix)
    }
}

/// A short hash tag for every cluster slot: `{n}` lands in the slot of the
/// decimal `n`. Built once, on a cluster's first refresh (about 170,000
/// CRC16s of short strings: milliseconds).
static SLOT_TAGS: Lazy<HashMap<Slot, String>> = Lazy::new(|| {
    const SLOTS: usize = 16_384;
    let mut tags = HashMap::with_capacity(SLOTS);
    for n in 0u32.. {
        let tag = n.to_string();
        tags.entry(Slot::for_key(&tag)).or_insert(tag);
        if tags.len() == SLOTS {
            break;
        }
    }
    tags
});

pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_hash_the_user_id() {
        let k = Keys::new("ttm:").user("user-42@example.com");
        assert_eq!(k.id.len(), 64);
        assert_eq!(k.id, hex(&Sha256::digest(b"user-42@example.com")));
        assert!(!k.record.contains("user-42") && !k.lock.contains("user-42"));
        assert_eq!(k.record, format!("ttm:tok:{{{}}}", k.id));
        assert_eq!(k.lock, format!("ttm:lock:{{{}}}", k.id));
        assert_ne!(
            Keys::new("ttm:").user("a").id,
            Keys::new("ttm:").user("b").id
        );
    }

    #[test]
    fn a_cluster_marker_shares_the_user_slot() {
        let node = Keys::new("ttm:");
        let cluster = Keys::new("ttm:").with_marker_per_slot(true);
        for user in ["a", "b", "customer-8842@example.com"] {
            let k = cluster.user(user);
            assert_eq!(node.epoch_marker(&k), "ttm:epoch");
            let marker = cluster.epoch_marker(&k);
            assert!(marker.starts_with("ttm:epoch:{") && !marker.contains(user));
            assert_eq!(Slot::for_key(&marker), Slot::for_key(&k.lock));
            assert_eq!(Slot::for_key(&k.record), Slot::for_key(&k.lock));
        }
        assert_eq!(SLOT_TAGS.len(), 16_384);
    }

    #[test]
    fn hex_is_lowercase_and_complete() {
        assert_eq!(hex(&[0x00, 0x0f, 0xa0, 0xff]), "000fa0ff");
    }
}
