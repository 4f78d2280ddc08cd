//! Redis names. A key carries a SHA-256 of the user id, never the id itself
//! nor any token, so a SCAN of the keyspace shows no one's identity.

use sha2::{Digest, Sha256};

pub const DEFAULT_PREFIX: &str = "ttm:";
/// Longest `keyPrefix` accepted, in bytes: a prefix is a namespace, not data.
pub const MAX_PREFIX_BYTES: usize = 128;

/// The names every instance sharing a prefix agrees on.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
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
        }
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
}

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
    fn hex_is_lowercase_and_complete() {
        assert_eq!(hex(&[0x00, 0x0f, 0xa0, 0xff]), "000fa0ff");
    }
}
