//! Tokens at rest in Redis: AES-256-GCM with a random 96-bit nonce per value,
//! bound to the record it is in: the associated data holds the user's
//! hashed id, the fence, the write time and the expiry the record shows in
//! clear (`Binding`), so a value copied under another user's key, or put
//! back with other clear fields (an old record replayed as recent), does
//! not open.
//!
//! Sealed layout: `version (1) | nonce (12) | ciphertext + tag`. Version 2
//! is bound as above; version 1 (written by earlier releases, and by this
//! one with `redis.upgrading`) is bound to the hashed id only, and still
//! opens: such records expire with their tokens. The plaintext is a small
//! binary encoding of the token, wiped once sealed or parsed.
//!
//! Several keys make a rotation possible: the first seals, each one opens
//! (tried in order), so instances on `[new, old]` and on `[old, new]` read
//! each other's values while a deploy rolls from one key to the other.
//!
//! Notices on the channel are authenticated with the same list: an
//! HMAC-SHA256 under a key derived from each encryption key (the first
//! signs, each verifies), over the channel it is published on, the whole
//! notice, its send time and a random id (`sign_notice`, `verify_notice`). Anyone who can `PUBLISH`
//! but holds no key is ignored.

use aes_gcm::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine as _;
use ring::hmac;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::codec;
use super::keys::hex;
use crate::engine::{EpochMs, SecretString};

/// Bound to the hashed user id only (earlier releases).
const VERSION: u8 = 1;
/// Bound to the record's clear fields too (`Binding`).
const VERSION_BOUND: u8 = 2;
const NONCE_LEN: usize = 12;
/// Longest token sealed or opened, in bytes: the engine's limit on every
/// token it accepts, so whatever one instance holds, the others can open.
/// (A bound here also keeps a corrupt length from allocating gigabytes.)
pub use crate::engine::MAX_TOKEN_BYTES;

/// Longest sealed token: version, nonce and tag around the plaintext of
/// two tokens of [`MAX_TOKEN_BYTES`] and their expiry. A stored value
/// longer than this is refused before any decryption, and the acquire
/// script does not even send it (`lock.rs`).
pub const MAX_SEALED_BYTES: usize =
    1 + NONCE_LEN + 16 + 8 + 4 + MAX_TOKEN_BYTES + 1 + 4 + MAX_TOKEN_BYTES;

/// A token too long to seal (over [`MAX_TOKEN_BYTES`]): never written, so
/// nothing is stored that the decoder would refuse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a token longer than {MAX_TOKEN_BYTES} bytes is not shared")]
pub struct SealError;
/// Most encryption keys accepted at once: a rotation needs two.
pub const MAX_KEYS: usize = 8;

/// The encryption keys: the first seals, each opens; and the notice MAC
/// keys derived from them, in the same order. Never printed.
pub struct SealKeys {
    ciphers: Vec<Aes256Gcm>,
    macs: Vec<Zeroizing<[u8; 32]>>,
}

impl std::fmt::Debug for SealKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SealKeys(<{} redacted>)", self.ciphers.len())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("is not base64")]
    NotBase64,
    #[error("must decode to exactly 32 bytes")]
    WrongLength,
    /// 64 hex digits (`openssl rand -hex 32`): 32 bytes, in the wrong encoding.
    #[error("looks like hex (64 hex digits), not base64: convert it with Buffer.from(key, 'hex').toString('base64'), or make one with openssl rand -base64 32")]
    Hex,
    /// A placeholder, not a key.
    #[error("is all zero bytes (a placeholder, not a key)")]
    AllZero,
    /// The same key twice in the list: a rotation that went wrong.
    #[error("repeats an earlier key in the list")]
    Repeated,
}

/// Bytes a signed notice carries after its body: when it was sent (ms since
/// the epoch on the sender's system clock, `i64` BE), a random id (`u64`
/// BE) and the MAC.
pub const NOTICE_TRAILER_BYTES: usize = 8 + 8 + NOTICE_TAG_BYTES;
const NOTICE_TAG_BYTES: usize = 32;

/// What a notice's tag covers before the notice itself: the channel it is
/// published on (its length first, so no channel is a prefix of another's
/// context), with room for `more` bytes.
fn notice_context(channel: &str, more: usize) -> Vec<u8> {
    let mut c = Vec::with_capacity(12 + channel.len() + more);
    c.extend_from_slice(b"ttm-notice");
    c.extend_from_slice(&(channel.len() as u16).to_be_bytes());
    c.extend_from_slice(channel.as_bytes());
    c
}
/// What the notice MAC key is derived with: never the encryption key itself.
const NOTICE_KEY_LABEL: &[u8] = b"tarabut-token-manager notice mac v1";

/// A notice that verified: its body, send time and random id.
#[derive(Debug, PartialEq, Eq)]
pub struct Verified<'a> {
    pub body: &'a [u8],
    pub sent_at: EpochMs,
    pub id: u64,
}

/// A value did not open: wrong key (rotated), tampered, truncated, or
/// written by an incompatible version. Callers treat it as a cache miss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("sealed value does not open with this key")]
pub struct OpenError;

/// What a record's sealed token is bound to: the fields Redis shows in
/// clear next to it (`cache.rs`) and the user it belongs to.
#[derive(Debug, Clone, Copy)]
pub struct Binding<'a> {
    /// The hashed user id (`keys.rs`).
    pub id: &'a str,
    pub fence: u64,
    pub written_at: EpochMs,
    pub expires_at: EpochMs,
}

impl Binding<'_> {
    fn aad(&self) -> Vec<u8> {
        let mut a = Vec::with_capacity(16 + self.id.len() + 24);
        a.extend_from_slice(b"ttm-record-v2\0");
        a.extend_from_slice(self.id.as_bytes());
        a.push(0);
        a.extend_from_slice(&self.fence.to_be_bytes());
        a.extend_from_slice(&self.written_at.to_be_bytes());
        a.extend_from_slice(&self.expires_at.to_be_bytes());
        a
    }
}

/// A token as the shared cache holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedToken {
    pub access: SecretString,
    /// The refresh token to refresh with next (rotated or kept).
    pub refresh: Option<SecretString>,
    pub expires_at: EpochMs,
}

/// 32 bytes, standard base64 (`openssl rand -base64 32`). Surrounding
/// whitespace (a newline from an env file) is ignored. All zero bytes is
/// refused: a placeholder left in a config, not a key.
pub(crate) fn key_bytes(encoded: &str) -> Result<Zeroizing<Vec<u8>>, KeyError> {
    let encoded = encoded.trim();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .map(Zeroizing::new);
    let bytes = match bytes {
        Ok(bytes) if bytes.len() == 32 => bytes,
        // 64 hex digits also decode as base64 (to 48 bytes): say what it is.
        _ if encoded.len() == 64 && encoded.bytes().all(|b| b.is_ascii_hexdigit()) => {
            return Err(KeyError::Hex)
        }
        Ok(_) => return Err(KeyError::WrongLength),
        Err(_) => return Err(KeyError::NotBase64),
    };
    if bytes.iter().all(|b| *b == 0) {
        return Err(KeyError::AllZero);
    }
    Ok(bytes)
}

/// The notice MAC key for an encryption key: HMAC-SHA256 of a fixed label
/// under it, so the AES key is never used for anything but AES.
fn mac_key(key: &[u8]) -> Zeroizing<[u8; 32]> {
    let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), NOTICE_KEY_LABEL);
    let mut out = Zeroizing::new([0u8; 32]);
    out.copy_from_slice(tag.as_ref());
    out
}

impl SealKeys {
    /// One key (see [`SealKeys::from_base64_list`]).
    pub fn from_base64(encoded: &str) -> Result<Self, KeyError> {
        Self::from_base64_list(&[encoded]).map_err(|(_, e)| e)
    }

    /// The keys in order: the first seals. On error, the index of the bad
    /// one (a repeat: the later one).
    pub fn from_base64_list<S: AsRef<str>>(encoded: &[S]) -> Result<Self, (usize, KeyError)> {
        let mut raw: Vec<Zeroizing<Vec<u8>>> = Vec::with_capacity(encoded.len());
        for (i, k) in encoded.iter().enumerate() {
            let bytes = key_bytes(k.as_ref()).map_err(|e| (i, e))?;
            if raw.iter().any(|r| r.as_slice() == bytes.as_slice()) {
                return Err((i, KeyError::Repeated));
            }
            raw.push(bytes);
        }
        let ciphers = raw
            .iter()
            .map(|b| Aes256Gcm::new_from_slice(b).expect("32 bytes checked"))
            .collect();
        let macs = raw.iter().map(|b| mac_key(b)).collect();
        Ok(Self { ciphers, macs })
    }

    /// `body`, for `channel`, signed with the first key: `body | sent_at |
    /// id | tag` ([`NOTICE_TRAILER_BYTES`] added). The tag covers the
    /// channel too (not sent: the receiver knows it), so a notice copied to
    /// another prefix's channel under the same key does not verify there.
    pub fn sign_notice(&self, channel: &str, body: &[u8], sent_at: EpochMs, id: u64) -> Vec<u8> {
        let mut m = notice_context(channel, body.len() + NOTICE_TRAILER_BYTES);
        let start = m.len();
        m.extend_from_slice(body);
        m.extend_from_slice(&sent_at.to_be_bytes());
        m.extend_from_slice(&id.to_be_bytes());
        let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, &self.macs[0][..]), &m);
        m.extend_from_slice(tag.as_ref());
        m.drain(..start);
        m
    }

    /// A notice whose MAC verifies under one of the keys (in constant time
    /// for each), split into its parts; None otherwise.
    pub fn verify_notice<'a>(&self, channel: &str, m: &'a [u8]) -> Option<Verified<'a>> {
        let signed_len = m.len().checked_sub(NOTICE_TAG_BYTES)?;
        let body_len = signed_len.checked_sub(16)?;
        let (signed, tag) = m.split_at(signed_len);
        let mut data = notice_context(channel, signed_len);
        data.extend_from_slice(signed);
        self.macs
            .iter()
            .any(|k| hmac::verify(&hmac::Key::new(hmac::HMAC_SHA256, &k[..]), &data, tag).is_ok())
            .then(|| Verified {
                body: &m[..body_len],
                sent_at: i64::from_be_bytes(m[body_len..body_len + 8].try_into().expect("8 bytes")),
                id: u64::from_be_bytes(m[body_len + 8..signed_len].try_into().expect("8 bytes")),
            })
    }

    /// Version 1: bound to `aad` (the hashed user id) only.
    pub fn seal(&self, aad: &[u8], token: &SharedToken) -> Result<Vec<u8>, SealError> {
        Ok(self.seal_bytes(aad, &encode(token).ok_or(SealError)?))
    }

    pub fn open(&self, aad: &[u8], sealed: &[u8]) -> Result<SharedToken, OpenError> {
        decode(&self.open_bytes(aad, sealed)?).ok_or(OpenError)
    }

    /// A record's token, bound to `b` (version 2); `unbound`: version 1, as
    /// earlier releases write and read (`redis.upgrading`). `b.expires_at`
    /// must be the token's.
    pub fn seal_record(
        &self,
        b: &Binding,
        token: &SharedToken,
        unbound: bool,
    ) -> Result<Vec<u8>, SealError> {
        debug_assert_eq!(b.expires_at, token.expires_at);
        if unbound {
            return self.seal(b.id.as_bytes(), token);
        }
        let plain = encode(token).ok_or(SealError)?;
        Ok(self.seal_version(VERSION_BOUND, &b.aad(), &plain))
    }

    /// Opens a record's token if it is bound to `b` (version 2) or to its
    /// user (version 1), and its expiry is the one shown in clear.
    pub fn open_record(&self, b: &Binding, sealed: &[u8]) -> Result<SharedToken, OpenError> {
        let token = match sealed.first() {
            Some(&VERSION_BOUND) => {
                decode(&self.open_version(VERSION_BOUND, &b.aad(), sealed)?).ok_or(OpenError)?
            }
            _ => self.open(b.id.as_bytes(), sealed)?,
        };
        if token.expires_at != b.expires_at {
            return Err(OpenError);
        }
        Ok(token)
    }

    /// Seals any plaintext with the first key (announcements use it too).
    pub fn seal_bytes(&self, aad: &[u8], plain: &[u8]) -> Vec<u8> {
        self.seal_version(VERSION, aad, plain)
    }

    fn seal_version(&self, version: u8, aad: &[u8], plain: &[u8]) -> Vec<u8> {
        let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
        let sealed = self.ciphers[0]
            .encrypt(&nonce, Payload { msg: plain, aad })
            .expect("AES-GCM encryption only fails past 64 GiB per message");
        let mut out = Vec::with_capacity(1 + NONCE_LEN + sealed.len());
        out.push(version);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        out
    }

    /// Opens with the first key that fits.
    pub fn open_bytes(&self, aad: &[u8], sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, OpenError> {
        self.open_version(VERSION, aad, sealed)
    }

    fn open_version(
        &self,
        version: u8,
        aad: &[u8],
        sealed: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, OpenError> {
        if sealed.len() < 1 + NONCE_LEN || sealed.len() > MAX_SEALED_BYTES || sealed[0] != version {
            return Err(OpenError);
        }
        let (nonce, body) = sealed[1..].split_at(NONCE_LEN);
        self.ciphers
            .iter()
            .find_map(|k| {
                k.decrypt(Nonce::from_slice(nonce), Payload { msg: body, aad })
                    .ok()
            })
            .map(Zeroizing::new)
            .ok_or(OpenError)
    }
}

/// What the record stores to recognise its access token without holding it
/// in clear (`invalidate` compares it): SHA-256 over the user's hashed id
/// and the token, 128 bits in hex. The same in every instance, whatever its
/// keys. An access token is a long random or signed string, so the digest
/// gives nothing away.
pub fn fingerprint(id: &str, access: &SecretString) -> String {
    let mut h = Sha256::new();
    h.update(b"ttm-access\0");
    h.update(id.as_bytes());
    h.update(b"\0");
    h.update(access.expose().as_bytes());
    hex(&h.finalize()[..16])
}

// `codec.rs` with the expiry (`i64 BE`) as head, the access token, then the
// refresh token if any. Refuses what `decode` would: a token over
// MAX_TOKEN_BYTES.
fn encode(t: &SharedToken) -> Option<Zeroizing<Vec<u8>>> {
    let access = t.access.expose();
    let refresh = t.refresh.as_ref().map(SecretString::expose);
    if access.len() > MAX_TOKEN_BYTES || refresh.is_some_and(|r| r.len() > MAX_TOKEN_BYTES) {
        return None;
    }
    Some(codec::encode(t.expires_at.to_be_bytes(), access, refresh))
}

fn decode(b: &[u8]) -> Option<SharedToken> {
    let (expires_at, access, refresh) = codec::decode(b)?;
    Some(SharedToken {
        access: SecretString::new(access.to_owned()),
        refresh: refresh.map(|r| SecretString::new(r.to_owned())),
        expires_at: i64::from_be_bytes(expires_at),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY_A: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    const KEY_B: &str = "HxwdHhsaGRgXFhUUExIREA8ODQwLCgkIBwYFBAMCAQA=";
    const CH: &str = "ttm:refreshed";

    fn token(refresh: Option<&str>) -> SharedToken {
        SharedToken {
            access: "access-token-plain".into(),
            refresh: refresh.map(Into::into),
            expires_at: 1_769_372_068_000,
        }
    }

    #[test]
    fn seals_and_opens() {
        let k = SealKeys::from_base64(KEY_A).unwrap();
        for t in [token(Some("refresh-token-plain")), token(None)] {
            let sealed = k.seal(b"user", &t).unwrap();
            assert_eq!(k.open(b"user", &sealed).unwrap(), t);
            let text = String::from_utf8_lossy(&sealed);
            assert!(!text.contains("access-token-plain") && !text.contains("refresh-token-plain"));
        }
    }

    #[test]
    fn a_fresh_nonce_each_time() {
        let k = SealKeys::from_base64(KEY_A).unwrap();
        assert_ne!(k.seal(b"u", &token(None)), k.seal(b"u", &token(None)));
    }

    #[test]
    fn the_encoder_refuses_what_the_decoder_would() {
        let k = SealKeys::from_base64(KEY_A).unwrap();
        let at_limit = "a".repeat(MAX_TOKEN_BYTES);
        let over = "a".repeat(MAX_TOKEN_BYTES + 1);
        let t = |access: &str, refresh: Option<&str>| SharedToken {
            access: access.into(),
            refresh: refresh.map(Into::into),
            expires_at: 1,
        };
        let fits = t(&at_limit, Some(&at_limit));
        assert_eq!(k.open(b"u", &k.seal(b"u", &fits).unwrap()).unwrap(), fits);
        assert_eq!(k.seal(b"u", &fits).unwrap().len(), MAX_SEALED_BYTES);
        assert_eq!(k.seal(b"u", &t(&over, None)), Err(SealError));
        assert_eq!(k.seal(b"u", &t("a", Some(&over))), Err(SealError));
    }

    /// The plaintext layout other instances (older versions included) read:
    /// changing it strands every token already in Redis.
    #[test]
    fn the_plaintext_layout_is_unchanged() {
        let t = SharedToken {
            access: "ab".into(),
            refresh: Some("xyz".into()),
            expires_at: 0x0102_0304_0506_0708,
        };
        let with_refresh = b"\x01\x02\x03\x04\x05\x06\x07\x08\0\0\0\x02ab\x01\0\0\0\x03xyz";
        assert_eq!(encode(&t).unwrap().as_slice(), with_refresh);
        let t = SharedToken { refresh: None, ..t };
        let without = b"\x01\x02\x03\x04\x05\x06\x07\x08\0\0\0\x02ab\0";
        assert_eq!(encode(&t).unwrap().as_slice(), without);
        assert_eq!(decode(without), Some(t));
    }

    #[test]
    fn wrong_key_user_or_bytes_do_not_open() {
        let a = SealKeys::from_base64(KEY_A).unwrap();
        let b = SealKeys::from_base64(KEY_B).unwrap();
        let sealed = a.seal(b"user", &token(Some("r"))).unwrap();
        assert_eq!(b.open(b"user", &sealed), Err(OpenError));
        assert_eq!(a.open(b"other-user", &sealed), Err(OpenError));
        let mut flipped = sealed.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert_eq!(a.open(b"user", &flipped), Err(OpenError));
        for n in 0..sealed.len() {
            assert_eq!(a.open(b"user", &sealed[..n]), Err(OpenError));
        }
        assert_eq!(a.open(b"user", b""), Err(OpenError));
    }

    #[test]
    fn keys_must_be_32_base64_bytes() {
        assert!(SealKeys::from_base64(&format!(" {KEY_A}\n")).is_ok());
        assert_eq!(
            SealKeys::from_base64("not base64!").unwrap_err(),
            KeyError::NotBase64
        );
        assert_eq!(
            SealKeys::from_base64("AAAA").unwrap_err(),
            KeyError::WrongLength
        );
        assert_eq!(
            SealKeys::from_base64("").unwrap_err(),
            KeyError::WrongLength
        );
        // openssl rand -hex 32: the right bytes in the wrong encoding.
        let hex = "0123456789abcdef".repeat(4);
        assert_eq!(SealKeys::from_base64(&hex).unwrap_err(), KeyError::Hex);
        assert!(!KeyError::Hex.to_string().contains(&hex));
        assert!(!format!("{:?}", SealKeys::from_base64(KEY_A).unwrap()).contains(KEY_A));
    }

    #[test]
    fn the_first_key_seals_and_every_key_opens() {
        let old = SealKeys::from_base64(KEY_A).unwrap();
        let rolling = SealKeys::from_base64_list(&[KEY_B, KEY_A]).unwrap();
        let back = SealKeys::from_base64_list(&[KEY_A, KEY_B]).unwrap();
        let t = token(Some("r"));
        // Written with the old key: every list holding it opens it.
        let by_old = old.seal(b"u", &t).unwrap();
        assert_eq!(rolling.open(b"u", &by_old).unwrap(), t);
        // Written with the new key: an instance still on the old key alone cannot.
        let by_new = rolling.seal(b"u", &t).unwrap();
        assert_eq!(back.open(b"u", &by_new).unwrap(), t);
        assert_eq!(old.open(b"u", &by_new), Err(OpenError));
        assert_eq!(
            SealKeys::from_base64_list(&[KEY_A, "AAAA"]).unwrap_err(),
            (1, KeyError::WrongLength)
        );
        assert!(!format!("{rolling:?}").contains(KEY_A) && !format!("{rolling:?}").contains(KEY_B));
    }

    #[test]
    fn a_record_opens_only_with_the_clear_fields_it_was_sealed_with() {
        let k = SealKeys::from_base64(KEY_A).unwrap();
        let t = token(Some("r"));
        let b = Binding {
            id: "id",
            fence: 7,
            written_at: 1_700_000_000_000,
            expires_at: t.expires_at,
        };
        let sealed = k.seal_record(&b, &t, false).unwrap();
        assert_eq!(sealed[0], VERSION_BOUND);
        assert_eq!(k.open_record(&b, &sealed).unwrap(), t);
        for other in [
            Binding { id: "id2", ..b },
            Binding { fence: 8, ..b },
            Binding {
                written_at: b.written_at + 1,
                ..b
            },
            Binding {
                expires_at: b.expires_at + 1,
                ..b
            },
        ] {
            assert_eq!(k.open_record(&other, &sealed), Err(OpenError));
        }
        // Its version byte set back to 1: not an unbound record either.
        let mut downgraded = sealed.clone();
        downgraded[0] = VERSION;
        assert_eq!(k.open_record(&b, &downgraded), Err(OpenError));
        // An earlier release's record (bound to the user only) opens while
        // its expiry is the one shown; `unbound` writes one.
        let legacy = k.seal(b"id", &t).unwrap();
        assert_eq!(
            k.open_record(&Binding { fence: 99, ..b }, &legacy).unwrap(),
            t
        );
        assert_eq!(
            k.open_record(&Binding { expires_at: 1, ..b }, &legacy),
            Err(OpenError)
        );
        let unbound = k.seal_record(&b, &t, true).unwrap();
        assert_eq!(unbound[0], VERSION);
        assert_eq!(k.open(b"id", &unbound).unwrap(), t);
    }

    #[test]
    fn all_zero_and_repeated_keys_are_refused() {
        let zero = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
        assert_eq!(SealKeys::from_base64(zero).unwrap_err(), KeyError::AllZero);
        assert_eq!(
            SealKeys::from_base64_list(&[KEY_A, KEY_B, KEY_A]).unwrap_err(),
            (2, KeyError::Repeated)
        );
        // The same key written differently (surrounding whitespace) is the same key.
        assert_eq!(
            SealKeys::from_base64_list(&[KEY_A, &format!("{KEY_A}\n")]).unwrap_err(),
            (1, KeyError::Repeated)
        );
    }

    #[test]
    fn notices_verify_under_every_key_and_nothing_else() {
        let old = SealKeys::from_base64(KEY_A).unwrap();
        let rolling = SealKeys::from_base64_list(&[KEY_B, KEY_A]).unwrap();
        let m = old.sign_notice(CH, b"id|F|3", 1_700_000_000_000, 42);
        assert_eq!(m.len(), 6 + NOTICE_TRAILER_BYTES);
        let expect = Verified {
            body: b"id|F|3",
            sent_at: 1_700_000_000_000,
            id: 42,
        };
        assert_eq!(old.verify_notice(CH, &m), Some(expect));
        assert_eq!(rolling.verify_notice(CH, &m).map(|v| v.id), Some(42));
        // Copied to another prefix's channel: not verified there.
        assert_eq!(old.verify_notice("ttm2:refreshed", &m), None);
        assert_eq!(old.verify_notice("ttm:refreshe", &m), None);
        // Signed with the new key: an instance with the old one alone drops it.
        let by_new = rolling.sign_notice(CH, b"id|R", 1, 7);
        assert_eq!(old.verify_notice(CH, &by_new), None);
        // Any change to the body, time, id or tag, or a cut, is refused.
        for i in 0..m.len() {
            let mut bad = m.clone();
            bad[i] ^= 1;
            assert_eq!(old.verify_notice(CH, &bad), None);
            assert_eq!(old.verify_notice(CH, &m[..i]), None);
        }
        // The MAC key is not the encryption key: a tag made with the AES key itself does not verify.
        let raw = base64::engine::general_purpose::STANDARD
            .decode(KEY_A)
            .unwrap();
        let mut forged = b"id|F|3".to_vec();
        forged.extend_from_slice(&1i64.to_be_bytes());
        forged.extend_from_slice(&1u64.to_be_bytes());
        let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, &raw), &forged);
        forged.extend_from_slice(tag.as_ref());
        assert_eq!(old.verify_notice(CH, &forged), None);
    }

    #[test]
    fn fingerprints_tell_tokens_and_users_apart_without_the_token() {
        let a = fingerprint("id1", &"token-a".into());
        assert_eq!(a.len(), 32);
        assert_eq!(a, fingerprint("id1", &"token-a".into()));
        assert_ne!(a, fingerprint("id1", &"token-b".into()));
        assert_ne!(a, fingerprint("id2", &"token-a".into()));
        assert!(!a.contains("token"));
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn shared() -> impl Strategy<Value = SharedToken> {
            (".{0,64}", proptest::option::of(".{0,64}"), any::<i64>()).prop_map(
                |(access, refresh, expires_at)| SharedToken {
                    access: access.into(),
                    refresh: refresh.map(Into::into),
                    expires_at,
                },
            )
        }

        proptest! {
            /// Whatever bytes a record holds (a garbled value, another
            /// version, a hostile writer), decoding answers and never panics.
            #[test]
            fn any_plaintext_decodes_or_is_refused(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
                let _ = decode(&bytes);
            }

            /// Lengths that claim more than there is, or more than the limit.
            #[test]
            fn any_length_prefix_is_safe(expires_at in any::<i64>(), len in any::<u32>(), tail in proptest::collection::vec(any::<u8>(), 0..64)) {
                let mut b = expires_at.to_be_bytes().to_vec();
                b.extend_from_slice(&len.to_be_bytes());
                b.extend_from_slice(&tail);
                let _ = decode(&b);
            }

            #[test]
            fn what_is_encoded_decodes_to_itself(t in shared()) {
                let plain = encode(&t).unwrap();
                prop_assert_eq!(decode(&plain), Some(t));
            }

            /// Whatever arrives on the channel (random, or a signed notice
            /// mutated), verifying answers and never panics; only the
            /// untouched notice verifies.
            #[test]
            fn any_notice_bytes_verify_or_are_refused(
                bytes in proptest::collection::vec(any::<u8>(), 0..160),
                flip in any::<usize>(),
            ) {
                let k = SealKeys::from_base64(KEY_A).unwrap();
                prop_assert_eq!(k.verify_notice(CH, &bytes), None);
                let mut m = k.sign_notice(CH, &bytes, 1, 2);
                let i = flip % m.len();
                m[i] ^= 0x80;
                prop_assert_eq!(k.verify_notice(CH, &m), None);
            }

            #[test]
            fn any_sealed_bytes_open_or_are_refused(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
                let k = SealKeys::from_base64(KEY_A).unwrap();
                let mut sealed = bytes;
                if let Some(first) = sealed.first_mut() {
                    *first = VERSION;
                }
                prop_assert_eq!(k.open(b"u", &sealed), Err(OpenError));
            }
        }
    }
}
