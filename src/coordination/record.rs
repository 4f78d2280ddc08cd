//! The values every Redis file shares, and their wire encoding: the token
//! record (one hash per user, see `cache.rs` for its fields), the lease a
//! lock grant hands out, and the notices announced on the channel. A leaf:
//! it depends on nothing else in this module, so `lock`, `cache` and
//! `pubsub` read in one direction.

use crate::engine::EpochMs;

/// A record as read from Redis or from an announcement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub fence: u64,
    pub written_at: EpochMs,
    /// The token, sealed (`seal.rs`): opaque here.
    pub sealed: Vec<u8>,
}

/// A granted lock: who holds it and the fence its write must carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub owner: String,
    pub fence: u64,
}

/// An announcement about one user's refresh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// The holder wrote this record: take it.
    Committed(Record),
    /// The holder's refresh failed: waiters fail too, as in-process joiners
    /// do, rather than each retrying a refresh that just failed.
    Failed,
    /// The holder gave the lock up without refreshing: try again now.
    Released,
}

const SEP: u8 = b'|';

/// `id|C|fence|written_at|sealed`, `id|F` or `id|R`.
pub fn encode_notice(id: &str, notice: &Notice) -> Vec<u8> {
    let mut m = Vec::with_capacity(id.len() + 3);
    m.extend_from_slice(id.as_bytes());
    m.push(SEP);
    match notice {
        Notice::Committed(r) => {
            m.extend_from_slice(format!("C|{}|{}|", r.fence, r.written_at).as_bytes());
            m.extend_from_slice(&r.sealed);
        }
        Notice::Failed => m.push(b'F'),
        Notice::Released => m.push(b'R'),
    }
    m
}

pub fn decode_notice(m: &[u8]) -> Option<(&str, Notice)> {
    let mut parts = m.splitn(5, |b| *b == SEP);
    let id = std::str::from_utf8(parts.next()?).ok()?;
    let notice = match parts.next()? {
        b"C" => {
            let fence = std::str::from_utf8(parts.next()?).ok()?.parse().ok()?;
            let written_at = std::str::from_utf8(parts.next()?).ok()?.parse().ok()?;
            Notice::Committed(Record {
                fence,
                written_at,
                sealed: parts.next()?.to_vec(),
            })
        }
        b"F" => Notice::Failed,
        b"R" => Notice::Released,
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
            sealed: b"\x01|bin|\xff".to_vec(),
        });
        for n in [committed, Notice::Failed, Notice::Released] {
            let m = encode_notice(&id, &n);
            assert_eq!(decode_notice(&m), Some((id.as_str(), n)));
        }
        assert_eq!(decode_notice(b"id|X"), None);
        assert_eq!(decode_notice(b"id|C|x|1|"), None);
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

            #[test]
            fn committed_notices_round_trip(
                id in "[0-9a-f]{1,64}",
                fence in any::<u64>(),
                written_at in any::<i64>(),
                sealed in proptest::collection::vec(any::<u8>(), 0..64),
            ) {
                let n = Notice::Committed(Record { fence, written_at, sealed });
                let m = encode_notice(&id, &n);
                prop_assert_eq!(decode_notice(&m), Some((id.as_str(), n)));
            }
        }
    }
}
