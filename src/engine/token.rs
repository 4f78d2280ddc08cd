//! The tokens the engine passes around: what a caller presents, what a
//! refresh returns, what the engine holds and what it issues. Every token
//! string is a [`SecretString`] (the held ones a [`HeldTokens`]): redacted in
//! `Debug`, wiped on drop.

use std::fmt;

use zeroize::Zeroize;

use super::policy::EpochMs;
use super::secret::{Fingerprint, SecretString};

/// The token a caller has (read from its database).
#[derive(Debug, Clone)]
pub struct Presented {
    pub access: SecretString,
    pub refresh: Option<SecretString>,
    pub expires_at: EpochMs,
}

/// What a refresh returned, before validation.
#[derive(Debug, Clone, Default)]
pub struct Refreshed {
    pub access: Option<SecretString>,
    pub refresh: Option<SecretString>,
    /// Epoch ms as JavaScript gave them (`expiresAt` already turned into a
    /// number); the range is checked when the result is validated.
    pub expires_at: Option<f64>,
    /// Seconds from now.
    pub expires_in: Option<f64>,
}

/// A token handed to a caller.
#[derive(Debug, Clone)]
pub struct Issued {
    pub access: SecretString,
    /// Present when the caller should store a (new) refresh token.
    pub refresh: Option<SecretString>,
    pub expires_at: EpochMs,
    /// The caller must persist this token: its copy is stale.
    pub should_update: bool,
}

/// What [`Engine::complete`](super::Engine::complete) tells a caller that has the tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IssuedBrief {
    pub expires_at: EpochMs,
    /// The caller is handed the refresh token it passed (it rotated).
    pub hands_refresh: bool,
}

/// A token a refresh in this process produced: one per user the engine
/// holds, so kept small (see `table.rs`, `Entry`).
#[derive(Debug)]
pub(crate) struct Held {
    pub tokens: HeldTokens,
    pub expires_at: EpochMs,
    pub fingerprint: Fingerprint,
    /// When the refresh that produced it completed here.
    pub refreshed_at: EpochMs,
}

impl Held {
    /// How long the token was good for when it came: the lifetime the
    /// buffer is measured against ([`Policy::buffer_for`](super::Policy::buffer_for)).
    pub(crate) fn lifetime(&self) -> i64 {
        self.expires_at.saturating_sub(self.refreshed_at)
    }

    /// Whether a caller issued this token is handed its refresh token too:
    /// only a rotated refresh token is news to the caller.
    pub(crate) fn hands_refresh(&self, should_update: bool) -> bool {
        should_update && self.tokens.refresh_is_new
    }

    pub(crate) fn issue(&self, should_update: bool) -> Issued {
        Issued {
            access: self.tokens.access().into(),
            refresh: if self.hands_refresh(should_update) {
                self.tokens.refresh().map(SecretString::from)
            } else {
                None
            },
            expires_at: self.expires_at,
            should_update,
        }
    }
}

/// A held access token and its refresh token (if any), in one heap
/// allocation of exactly their size: two strings read from JavaScript would
/// take two, each rounded up by the allocator. Like [`SecretString`], it
/// prints a redaction and wipes its bytes when dropped.
pub(crate) struct HeldTokens {
    /// The access token, then the refresh token.
    bytes: Box<str>,
    /// Where the access token ends (a char boundary: tokens are at most
    /// `MAX_TOKEN_BYTES` long, so it fits).
    access_len: u32,
    /// Whether the refresh that produced them returned the refresh token
    /// (rotation), as opposed to keeping the one it was called with.
    pub refresh_is_new: bool,
}

impl HeldTokens {
    /// `None` if the access token is longer than a `u32` counts (never,
    /// for a validated token).
    pub fn new(access: &str, refresh: Option<&str>, refresh_is_new: bool) -> Option<Self> {
        let access_len = u32::try_from(access.len()).ok()?;
        let refresh = refresh.unwrap_or("");
        // Exactly this capacity (`Vec::with_capacity` promises it), so
        // `into_boxed_str` keeps the buffer: no copy is left unwiped.
        let mut s = String::with_capacity(access.len() + refresh.len());
        s.push_str(access);
        s.push_str(refresh);
        debug_assert_eq!(s.capacity(), s.len());
        Some(Self {
            bytes: s.into_boxed_str(),
            access_len,
            refresh_is_new,
        })
    }

    pub fn access(&self) -> &str {
        &self.bytes[..self.access_len as usize]
    }

    /// `None` when there is none (an empty refresh token is none: see
    /// `flight::validate_refreshed`).
    pub fn refresh(&self) -> Option<&str> {
        Some(&self.bytes[self.access_len as usize..]).filter(|r| !r.is_empty())
    }
}

impl Drop for HeldTokens {
    fn drop(&mut self) {
        self.bytes.zeroize();
    }
}

impl fmt::Debug for HeldTokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("HeldTokens(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_tokens_split_back_and_redact() {
        let t = HeldTokens::new("aé", Some("rü"), true).unwrap();
        assert_eq!((t.access(), t.refresh()), ("aé", Some("rü")));
        assert_eq!(t.bytes.len(), "aérü".len(), "one buffer of their size");
        assert_eq!(format!("{t:?}"), "HeldTokens(<redacted>)");
        let t = HeldTokens::new("a", None, false).unwrap();
        assert_eq!((t.access(), t.refresh()), ("a", None));
    }

    #[test]
    fn held_is_small() {
        // The tokens' buffer, its split and flag, and three numbers: an
        // `Entry` holds it inline (see `table.rs`).
        assert!(std::mem::size_of::<Held>() <= 48);
    }
}
