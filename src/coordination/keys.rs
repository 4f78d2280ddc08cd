//! Redis names. A key carries a hash of the user id, never the id itself
//! nor any token, so a SCAN of the keyspace shows no one's identity. With
//! `redis.userIdKey` the hash is an HMAC-SHA256 under that secret, so a
//! guessable id (an email, a phone number) cannot be confirmed by hashing
//! a guess; without it, a plain SHA-256 (as earlier releases named users).

use std::collections::HashMap;
use std::sync::Arc;

use once_cell::sync::Lazy;
use redis::cluster_routing::Slot;
use ring::hmac;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

pub const DEFAULT_PREFIX: &str = "ttm:";
/// Longest `keyPrefix` accepted, in bytes: a prefix is a namespace, not data.
pub const MAX_PREFIX_BYTES: usize = 128;

/// The names every instance sharing a prefix agrees on.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
    marker_per_slot: bool,
    user_id_key: Option<Arc<UserIdKey>>,
}

/// `redis.userIdKey`: the secret users are named by in Redis. Kept apart
/// from `encryptionKey` so a key rotation renames no one (instances that
/// named a user differently would lock different keys). Never printed;
/// wiped on drop.
pub struct UserIdKey(Zeroizing<[u8; 32]>);

impl UserIdKey {
    pub fn new(bytes: &[u8; 32]) -> Self {
        Self(Zeroizing::new(*bytes))
    }

    fn name(&self, user_id: &str) -> String {
        let tag = hmac::sign(
            &hmac::Key::new(hmac::HMAC_SHA256, &self.0[..]),
            user_id.as_bytes(),
        );
        hex(tag.as_ref())
    }
}

impl std::fmt::Debug for UserIdKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UserIdKey(<redacted>)")
    }
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
            user_id_key: None,
        }
    }

    /// Names users by an HMAC under `key` instead of a plain SHA-256.
    pub fn with_user_id_key(mut self, key: Option<UserIdKey>) -> Self {
        self.user_id_key = key.map(Arc::new);
        self
    }

    /// Whether users are named by a keyed hash (`redis.userIdKey`).
    pub fn keyed(&self) -> bool {
        self.user_id_key.is_some()
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

    /// `user_id`'s names: keyed if this instance has a `userIdKey`.
    pub fn user(&self, user_id: &str) -> UserKeys {
        match &self.user_id_key {
            Some(key) => self.named(key.name(user_id)),
            None => self.unkeyed_user(user_id),
        }
    }

    /// `user_id`'s names as instances without a `userIdKey` (and earlier
    /// releases) have them: a plain SHA-256.
    pub fn unkeyed_user(&self, user_id: &str) -> UserKeys {
        self.named(hex(&Sha256::digest(user_id.as_bytes())))
    }

    fn named(&self, id: String) -> UserKeys {
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
    fn keyed_names_are_an_hmac_under_the_user_id_key() {
        let user = "user-42@example.com";
        let key = |b: u8| Some(UserIdKey::new(&[b; 32]));
        let plain = Keys::new("ttm:").user(user);
        let keyed = Keys::new("ttm:").with_user_id_key(key(7));
        let k = keyed.user(user);
        assert_eq!(k.id.len(), 64);
        // Not the SHA-256 a guess can be checked against, nor another key's.
        assert_ne!(k.id, plain.id);
        assert_ne!(
            k.id,
            Keys::new("ttm:").with_user_id_key(key(8)).user(user).id
        );
        assert_eq!(k.id, keyed.user(user).id);
        assert_ne!(k.id, keyed.user("user-43@example.com").id);
        // The unkeyed names are still at hand (an upgrade takes both locks).
        assert_eq!(keyed.unkeyed_user(user), plain);
        assert!(!k.record.contains("user-42") && !k.lock.contains("user-42"));
        assert!(!k.record.contains(&plain.id) && !k.lock.contains(&plain.id));
        assert_eq!(k.record, format!("ttm:tok:{{{}}}", k.id));
        assert_eq!(k.lock, format!("ttm:lock:{{{}}}", k.id));
        // The secret never shows.
        let shown = format!("{keyed:?}");
        assert!(shown.contains("redacted") && !shown.contains("7, 7"));
    }

    #[test]
    fn a_cluster_marker_shares_the_user_slot() {
        let node = Keys::new("ttm:");
        let cluster = Keys::new("ttm:").with_marker_per_slot(true);
        let keyed = Keys::new("ttm:")
            .with_marker_per_slot(true)
            .with_user_id_key(Some(UserIdKey::new(&[9; 32])));
        for user in ["a", "b", "customer-8842@example.com"] {
            let k = keyed.user(user);
            assert_eq!(
                Slot::for_key(keyed.epoch_marker(&k)),
                Slot::for_key(&k.lock)
            );
            assert_eq!(Slot::for_key(&k.record), Slot::for_key(&k.lock));
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
