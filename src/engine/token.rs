//! The tokens the engine passes around: what a caller presents, what a
//! refresh returns, what the engine holds and what it issues. Every token
//! string is a [`SecretString`]: redacted in `Debug`, wiped on drop.

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

/// A token a refresh in this process produced.
#[derive(Debug, Clone)]
pub(crate) struct Held {
    pub access: SecretString,
    pub refresh: Option<SecretString>,
    pub expires_at: EpochMs,
    pub fingerprint: Fingerprint,
    /// Whether the refresh itself returned `refresh` (rotation), as opposed
    /// to keeping the one it was called with.
    pub refresh_is_new: bool,
}

impl Held {
    /// Whether a caller issued this token is handed its refresh token too:
    /// only a rotated refresh token is news to the caller.
    pub(crate) fn hands_refresh(&self, should_update: bool) -> bool {
        should_update && self.refresh_is_new
    }

    pub(crate) fn issue(&self, should_update: bool) -> Issued {
        Issued {
            access: self.access.clone(),
            refresh: if self.hands_refresh(should_update) {
                self.refresh.clone()
            } else {
                None
            },
            expires_at: self.expires_at,
            should_update,
        }
    }
}
