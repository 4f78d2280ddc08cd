//! The one binary layout of the plaintexts sealed for Redis and the channel
//! (a token: `seal.rs`; an invalidation: `record.rs`). A leaf.
//!
//! `head (N bytes) | len u32 BE | first | has second u8 | [len u32 BE | second]`
//!
//! Each text is UTF-8 of at most [`MAX_TOKEN_BYTES`]: the decoder refuses
//! a longer one (so a corrupt length allocates nothing), and encoders are
//! handed only what the engine accepted.

use zeroize::Zeroizing;

use crate::engine::MAX_TOKEN_BYTES;

/// Wiped on drop: the texts are tokens.
pub fn encode<const N: usize>(
    head: [u8; N],
    first: &str,
    second: Option<&str>,
) -> Zeroizing<Vec<u8>> {
    // Exact capacity: a reallocation would leave a copy behind, unwiped.
    let len = N + 5 + first.len() + second.map_or(0, |s| 4 + s.len());
    let mut v = Zeroizing::new(Vec::with_capacity(len));
    v.extend_from_slice(&head);
    put(&mut v, first);
    match second {
        Some(s) => {
            v.push(1);
            put(&mut v, s);
        }
        None => v.push(0),
    }
    v
}

/// The head and the texts, borrowed; `None` for anything [`encode`] does not
/// make (short, trailing bytes, a bad flag, invalid UTF-8, a text too long).
pub fn decode<const N: usize>(mut b: &[u8]) -> Option<([u8; N], &str, Option<&str>)> {
    let head = take(&mut b, N)?.try_into().ok()?;
    let first = text(&mut b)?;
    let second = match take(&mut b, 1)?[0] {
        0 => None,
        1 => Some(text(&mut b)?),
        _ => return None,
    };
    b.is_empty().then_some((head, first, second))
}

fn put(v: &mut Vec<u8>, s: &str) {
    v.extend_from_slice(&(s.len() as u32).to_be_bytes());
    v.extend_from_slice(s.as_bytes());
}

fn take<'a>(b: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if b.len() < n {
        return None;
    }
    let (head, rest) = b.split_at(n);
    *b = rest;
    Some(head)
}

fn text<'a>(b: &mut &'a [u8]) -> Option<&'a str> {
    let len = u32::from_be_bytes(take(b, 4)?.try_into().ok()?) as usize;
    if len > MAX_TOKEN_BYTES {
        return None;
    }
    std::str::from_utf8(take(b, len)?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn refuses_what_it_does_not_make() {
        let good = encode([7], "a", Some("b"));
        assert_eq!(good.as_slice(), b"\x07\0\0\0\x01a\x01\0\0\0\x01b");
        assert_eq!(decode::<1>(&good), Some(([7], "a", Some("b"))));
        for n in 0..good.len() {
            assert_eq!(decode::<1>(&good[..n]), None);
        }
        let mut trailing = good.to_vec();
        trailing.push(0);
        assert_eq!(decode::<1>(&trailing), None);
        assert_eq!(decode::<1>(b"\x07\0\0\0\x01a\x02"), None);
        assert_eq!(decode::<1>(b"\x07\0\0\0\x01\xff\0"), None);
        let at_limit = "a".repeat(MAX_TOKEN_BYTES);
        assert!(decode::<0>(&encode([], &at_limit, None)).is_some());
        let over = "a".repeat(MAX_TOKEN_BYTES + 1);
        assert_eq!(decode::<0>(&encode([], &over, None)), None);
    }

    proptest! {
        /// Any bytes (a garbled record, a hostile writer, a length claiming
        /// more than there is) decode or are refused, never a panic.
        #[test]
        fn any_bytes_decode_or_are_refused(b in proptest::collection::vec(any::<u8>(), 0..128)) {
            let _ = decode::<8>(&b);
        }

        #[test]
        fn what_is_encoded_decodes_to_itself(
            head in any::<[u8; 8]>(),
            first in ".{0,32}",
            second in proptest::option::of(".{0,32}"),
        ) {
            let b = encode(head, &first, second.as_deref());
            prop_assert_eq!(b.capacity(), b.len());
            prop_assert_eq!(decode::<8>(&b), Some((head, first.as_str(), second.as_deref())));
        }
    }
}
