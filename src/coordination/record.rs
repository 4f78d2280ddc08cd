//! The values every Redis file shares, and their wire encoding: the token
//! record (one hash per user, see `cache.rs` for its fields), the lease a
//! lock grant hands out, and the notices announced on the channel. Depends
//! on nothing else in this module but `codec`, so `lock`, `cache` and
//! `pubsub` read in one direction.

use zeroize::Zeroizing;

use super::codec;
use crate::engine::{EpochMs, SecretString};

/// A record as read from Redis or from an announcement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub fence: u64,
    pub written_at: EpochMs,
    /// The expiry the record shows in clear (the sealed token is bound to it).
    pub expires_at: EpochMs,
    /// The token, sealed (`seal.rs`): opaque here.
    pub sealed: Vec<u8>,
}

/// A granted lock: who holds it and the fence its write must carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub owner: String,
    pub fence: u64,
    /// While instances without `userIdKey` share the Redis (`upgrading`
    /// with `userIdKey`): the same owner also holds the user's lock under
    /// its unkeyed name, with this fence.
    pub unkeyed_fence: Option<u64>,
}

/// An announcement about one user's refresh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// The holder wrote this record: take it.
    Committed(Record),
    /// The holder's refresh, under the lock fenced `fence`, failed: waiters
    /// of that holder fail too, as in-process joiners do, rather than each
    /// retrying a refresh that just failed.
    Failed { fence: u64 },
    /// The holder gave the lock up without refreshing: try again now.
    Released,
    /// `invalidate` in some instance: the sealed user id, access token (if
    /// any) and sender (see `Coordinator::invalidate`). Not for waiters.
    Invalidated(Vec<u8>),
}

/// What an `invalidate` announcement carries, sealed (`Notice::Invalidated`):
/// who sent it (so the sender skips its own), the user id (receivers key
/// their tables by it, not by its hash) and the access token, if one was named.
#[derive(Debug, PartialEq, Eq)]
pub struct Invalidation {
    pub origin: u128,
    pub user_id: String,
    pub access: Option<SecretString>,
}

/// `codec.rs` with the origin (`u128 BE`) as head, the user id, then the
/// access token if any.
pub fn encode_invalidation(i: &Invalidation) -> Zeroizing<Vec<u8>> {
    let access = i.access.as_ref().map(SecretString::expose);
    codec::encode(i.origin.to_be_bytes(), &i.user_id, access)
}

pub fn decode_invalidation(b: &[u8]) -> Option<Invalidation> {
    let (origin, user_id, access) = codec::decode(b)?;
    Some(Invalidation {
        origin: u128::from_be_bytes(origin),
        user_id: user_id.to_owned(),
        access: access.map(|a| SecretString::new(a.to_owned())),
    })
}

const SEP: u8 = b'|';

/// Longest notice read from the channel, in bytes: a commit of the longest
/// tokens (two of [`crate::engine::MAX_TOKEN_BYTES`], sealed) or an
/// invalidation, with room for the id, fields and MAC. Anything longer is
/// dropped before it is parsed or verified.
pub const MAX_NOTICE_BYTES: usize = 2 * crate::engine::MAX_TOKEN_BYTES + 4096;
/// How long a notice is taken after it was sent (by the sender's system
/// clock; clocks of a fleet agree far better than this): an older one, or
/// one from further in the future, is a replay or garbage and is dropped.
pub const NOTICE_LIFETIME_MS: i64 = 60_000;

/// The body of a notice (signed by `SealKeys::sign_notice` before it is
/// published): `id|C|fence|written_at|expires_at|sealed`, `id|F|fence`,
/// `id|R` or `id|I|sealed`.
pub fn encode_notice(id: &str, notice: &Notice) -> Vec<u8> {
    let mut m = Vec::with_capacity(id.len() + 3);
    m.extend_from_slice(id.as_bytes());
    m.push(SEP);
    match notice {
        Notice::Committed(r) => {
            m.extend_from_slice(
                format!("C|{}|{}|{}|", r.fence, r.written_at, r.expires_at).as_bytes(),
            );
            m.extend_from_slice(&r.sealed);
        }
        Notice::Failed { fence } => m.extend_from_slice(format!("F|{fence}").as_bytes()),
        Notice::Released => m.push(b'R'),
        Notice::Invalidated(sealed) => {
            m.extend_from_slice(b"I|");
            m.extend_from_slice(sealed);
        }
    }
    m
}

pub fn decode_notice(m: &[u8]) -> Option<(&str, Notice)> {
    let mut parts = m.splitn(6, |b| *b == SEP);
    let id = std::str::from_utf8(parts.next()?).ok()?;
    let notice = match parts.next()? {
        b"C" => {
            let fence = std::str::from_utf8(parts.next()?).ok()?.parse().ok()?;
            let written_at = std::str::from_utf8(parts.next()?).ok()?.parse().ok()?;
            let expires_at = std::str::from_utf8(parts.next()?).ok()?.parse().ok()?;
            Notice::Committed(Record {
                fence,
                written_at,
                expires_at,
                sealed: parts.next()?.to_vec(),
            })
        }
        b"F" => Notice::Failed {
            fence: std::str::from_utf8(parts.next()?).ok()?.parse().ok()?,
        },
        b"R" => Notice::Released,
        // The rest is one field: the sealed bytes may hold the separator.
        b"I" => Notice::Invalidated(m.get(id.len() + 3..)?.to_vec()),
        _ => return None,
    };
    Some((id, notice))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notices_round_trip() {
        let id = "ab".repeat(32);
        let committed = Notice::Committed(Record {
            fence: 7,
            written_at: 1_700_000_000_000,
            expires_at: 1_700_003_600_000,
            sealed: b"\x01|bin|\xff".to_vec(),
        });
        let invalidated = Notice::Invalidated(b"\x01|sealed|".to_vec());
        for n in [
            committed,
            Notice::Failed { fence: 9 },
            Notice::Released,
            invalidated,
        ] {
            let m = encode_notice(&id, &n);
            assert_eq!(decode_notice(&m), Some((id.as_str(), n)));
        }
        assert_eq!(decode_notice(b"id|X"), None);
        assert_eq!(decode_notice(b"id|I"), None);
        assert_eq!(decode_notice(b"id|C|x|1|2|"), None);
        assert_eq!(decode_notice(b"id|C|1|1|x|"), None);
        assert_eq!(decode_notice(b"id|F"), None);
        assert_eq!(decode_notice(b"id|F|x"), None);
    }

    #[test]
    fn invalidations_round_trip() {
        for access in [Some(SecretString::new("tok|en".into())), None] {
            let i = Invalidation {
                origin: u128::MAX - 7,
                user_id: "user@example.com".into(),
                access,
            };
            let b = encode_invalidation(&i);
            assert_eq!(decode_invalidation(&b), Some(i));
            for n in 0..b.len() {
                assert_eq!(decode_invalidation(&b[..n]), None);
            }
        }
    }

    /// The layout other instances (older versions included) read.
    #[test]
    fn the_invalidation_layout_is_unchanged() {
        let mut i = Invalidation {
            origin: 0x0102_0304_0506_0708_090a_0b0c_0d0e_0f10,
            user_id: "u1".into(),
            access: Some(SecretString::new("tok".into())),
        };
        let origin = b"\x01\x02\x03\x04\x05\x06\x07\x08\x09\x0a\x0b\x0c\x0d\x0e\x0f\x10";
        let mut expected = origin.to_vec();
        expected.extend_from_slice(b"\0\0\0\x02u1\x01\0\0\0\x03tok");
        assert_eq!(encode_invalidation(&i).as_slice(), expected);
        i.access = None;
        let mut expected = origin.to_vec();
        expected.extend_from_slice(b"\0\0\0\x02u1\0");
        assert_eq!(encode_invalidation(&i).as_slice(), expected);
        assert_eq!(decode_invalidation(&expected), Some(i));
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            /// A notice from the channel (any publisher can write there) is
            /// decoded or ignored, never a panic.
            #[test]
            fn any_message_decodes_or_is_ignored(m in proptest::collection::vec(any::<u8>(), 0..128)) {
                let _ = decode_notice(&m);
            }

            /// So is an invalidation once opened.
            #[test]
            fn any_invalidation_decodes_or_is_ignored(b in proptest::collection::vec(any::<u8>(), 0..128)) {
                let _ = decode_invalidation(&b);
            }

            #[test]
            fn committed_notices_round_trip(
                id in "[0-9a-f]{1,64}",
                fence in any::<u64>(),
                written_at in any::<i64>(),
                expires_at in any::<i64>(),
                sealed in proptest::collection::vec(any::<u8>(), 0..64),
            ) {
                let n = Notice::Committed(Record { fence, written_at, expires_at, sealed });
                let m = encode_notice(&id, &n);
                prop_assert_eq!(decode_notice(&m), Some((id.as_str(), n)));
            }
        }
    }
}
