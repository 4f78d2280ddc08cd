//! Secrets (access and refresh tokens) in types that never print themselves
//! and wipe their bytes when dropped.

use std::fmt;
use std::hash::{BuildHasher, Hasher};

use once_cell::sync::Lazy;
use zeroize::Zeroize;

/// A token or client secret. `Debug` and `Display` print a redaction; the
/// bytes are zeroed on drop. Read it with [`SecretString::expose`] only where
/// it leaves the process (the caller, an HTTP request, an encrypted cache).
#[derive(Clone, PartialEq, Eq)]
pub struct SecretString(String);

impl SecretString {
    pub fn new(value: String) -> Self {
        Self(value)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// A process-local fingerprint: enough to tell two tokens apart without
    /// keeping (or comparing) the token itself.
    pub fn fingerprint(&self) -> Fingerprint {
        Fingerprint::of(&self.0)
    }
}

impl From<String> for SecretString {
    fn from(value: String) -> Self {
        Self(value)
    }
}

impl From<&str> for SecretString {
    fn from(value: &str) -> Self {
        Self(value.to_owned())
    }
}

impl Drop for SecretString {
    fn drop(&mut self) {
        // `zeroize` wipes the whole buffer, spare capacity included.
        self.0.zeroize();
    }
}

impl fmt::Debug for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretString(<redacted>)")
    }
}

impl fmt::Display for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

// Keyed per process, so a fingerprint is useless outside it.
static FINGERPRINT_KEY: Lazy<std::collections::hash_map::RandomState> =
    Lazy::new(std::collections::hash_map::RandomState::new);

/// A keyed 64-bit hash of a token. Collisions only cost an extra refresh.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(u64);

impl Fingerprint {
    pub fn of(token: &str) -> Self {
        let mut h = FINGERPRINT_KEY.build_hasher();
        h.write(token.as_bytes());
        Self(h.finish())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Fingerprint(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_redact() {
        let s = SecretString::from("eyJhbGciOi.secret-token");
        assert_eq!(format!("{s:?}"), "SecretString(<redacted>)");
        assert_eq!(format!("{s}"), "<redacted>");
        assert!(!format!("{:?}", Some(&s)).contains("secret"));
    }

    #[test]
    fn fingerprint_tells_tokens_apart() {
        assert_eq!(Fingerprint::of("a"), Fingerprint::of("a"));
        assert_ne!(Fingerprint::of("a"), Fingerprint::of("b"));
        assert!(!format!("{:?}", Fingerprint::of("abc")).contains("abc"));
    }
}
