//! Signed JWTs for `private_key_jwt` client assertions (RFC 7523) and DPoP
//! proofs (RFC 9449), with the client's private key.
//!
//! Keys arrive as PKCS#8 PEM or a private JWK and are parsed once, when the
//! refresher is made; every problem is an `INVALID_ARGUMENT` naming the
//! option. Parsing, key checks and signatures are RustCrypto's (`rsa`,
//! `p256`, `ed25519-dalek`; PEM by `rustls-pki-types`), but ES256
//! signatures, which are `ring`'s (see [`RingP256`]): this file only decodes
//! JWK fields into their constructors and joins the JWS compact
//! serialisation (base64url of the header, the claims and the signature).
//! The parsed keys wipe themselves on drop; `Debug` shows the algorithm only.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ed25519_dalek::pkcs8::DecodePrivateKey as _;
use rand::Rng;
use rsa::traits::PublicKeyParts;
use rsa::BoxedUint;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::PrivateKeyDer;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use signature::{SignatureEncoding, Signer};
use zeroize::Zeroizing;

use super::RefreshError;

/// FAPI 2.0 and most banks refuse RSA keys below this.
const MIN_RSA_BITS: usize = 2048;

/// A JWS algorithm this package signs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    Ps256,
    Rs256,
    Es256,
    EdDsa,
}

impl Algorithm {
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::Ps256 => "PS256",
            Algorithm::Rs256 => "RS256",
            Algorithm::Es256 => "ES256",
            Algorithm::EdDsa => "EdDSA",
        }
    }

    /// `value` among `allowed`, or `INVALID_ARGUMENT` naming `name`.
    pub fn parse(name: &str, value: &str, allowed: &[Algorithm]) -> Result<Self, RefreshError> {
        allowed
            .iter()
            .copied()
            .find(|a| a.as_str() == value)
            .ok_or_else(|| {
                let names: Vec<_> = allowed
                    .iter()
                    .map(|a| format!("'{}'", a.as_str()))
                    .collect();
                RefreshError::invalid_argument(name, &format!("must be {}", names.join(", ")))
            })
    }
}

enum Key {
    Ps256(rsa::pss::SigningKey<sha256::Sha256>),
    Rs256(rsa::pkcs1v15::SigningKey<sha256::Sha256>),
    Es256(RingP256),
    EdDsa(ed25519_dalek::SigningKey),
}

/// A P-256 key as `ring` holds it, for ES256 signatures: a DPoP proof is
/// signed per request, and `ring`'s assembly signs in about a quarter of
/// the time `p256` takes (40 against 160 µs on the 2-core benchmark
/// machine). `ring` does not wipe its keys, so its key pair lives in a box
/// of its own that is zeroed before it is freed.
struct RingP256(Option<Box<ring::signature::EcdsaKeyPair>>);

impl RingP256 {
    fn new(k: &p256::SecretKey) -> Result<Self, &'static str> {
        let d = Zeroizing::new(<[u8; 32]>::from(k.to_bytes()));
        let point = k.public_key().to_sec1_bytes();
        ring::signature::EcdsaKeyPair::from_private_key_and_public_key(
            &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            d.as_slice(),
            &point,
            &ring::rand::SystemRandom::new(),
        )
        .map(|pair| Self(Some(Box::new(pair))))
        .map_err(|_| "is a P-256 key ring refuses")
    }

    fn sign(&self, message: &[u8]) -> Option<Vec<u8>> {
        let pair = self.0.as_ref()?;
        let signature = pair.sign(&ring::rand::SystemRandom::new(), message).ok()?;
        Some(signature.as_ref().to_vec())
    }
}

impl Drop for RingP256 {
    fn drop(&mut self) {
        let Some(pair) = self.0.take() else { return };
        let size = std::mem::size_of::<ring::signature::EcdsaKeyPair>();
        let raw = Box::into_raw(pair);
        // SAFETY: `raw` is the allocation of a Box nobody else refers to,
        // and it is never used as a key pair again: its bytes (as
        // MaybeUninit, so padding is fine) are zeroed with volatile writes,
        // then it is freed with the layout Box allocated it with. Its drop
        // is skipped, which leaks nothing: ring's EcdsaKeyPair is plain
        // arrays and &'static references, with no Drop of its own.
        unsafe {
            zeroize::Zeroize::zeroize(std::slice::from_raw_parts_mut(
                raw.cast::<std::mem::MaybeUninit<u8>>(),
                size,
            ));
            std::alloc::dealloc(
                raw.cast(),
                std::alloc::Layout::new::<ring::signature::EcdsaKeyPair>(),
            );
        }
    }
}

impl zeroize::ZeroizeOnDrop for RingP256 {}

/// A private key and the algorithm it signs with.
pub struct SigningKey {
    key: Key,
    /// The `kid` to put in headers: the caller's, else the JWK's.
    kid: Option<String>,
    /// The public half as a JWK (DPoP proofs carry it).
    public_jwk: Value,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("algorithm", &self.algorithm())
            .field("key", &"<redacted>")
            .finish()
    }
}

/// The parsed private key, before an algorithm is chosen.
enum Parsed {
    Rsa(rsa::PrivateKey),
    P256(p256::SecretKey),
    Ed25519(ed25519_dalek::SigningKey),
}

/// A private JWK's fields (RFC 7518 section 6), base64url where binary,
/// borrowed from the caller's (wiped) string: no copy of `d`, `p` or `q`.
#[derive(Deserialize)]
struct Jwk<'a> {
    kty: Option<&'a str>,
    crv: Option<&'a str>,
    kid: Option<String>,
    d: Option<&'a str>,
    x: Option<&'a str>,
    y: Option<&'a str>,
    n: Option<&'a str>,
    e: Option<&'a str>,
    p: Option<&'a str>,
    q: Option<&'a str>,
}

impl SigningKey {
    /// Parses `key` (PKCS#8 PEM, or a private JWK as JSON) for `algorithm`
    /// (default by key type: RSA → PS256, P-256 → ES256, Ed25519 → EdDSA)
    /// among `allowed`. `name` is the option, for messages.
    pub fn parse(
        name: &str,
        key: &str,
        algorithm: Option<Algorithm>,
        key_id: Option<String>,
        allowed: &[Algorithm],
    ) -> Result<Self, RefreshError> {
        let bad = |problem: &str| RefreshError::invalid_argument(name, problem);
        let trimmed = key.trim_start();
        let (parsed, jwk_kid) = if trimmed.starts_with('{') {
            parse_jwk(key).map_err(bad)?
        } else if trimmed.starts_with("-----BEGIN") {
            (parse_pem(key).map_err(bad)?, None)
        } else {
            return Err(bad("must be a PKCS#8 PEM private key or a private JWK"));
        };
        let algorithm = match (&parsed, algorithm) {
            (Parsed::Rsa(_), None) => Algorithm::Ps256,
            (Parsed::P256(_), None) => Algorithm::Es256,
            (Parsed::Ed25519(_), None) => Algorithm::EdDsa,
            (Parsed::Rsa(_), Some(a @ (Algorithm::Ps256 | Algorithm::Rs256)))
            | (Parsed::P256(_), Some(a @ Algorithm::Es256))
            | (Parsed::Ed25519(_), Some(a @ Algorithm::EdDsa)) => a,
            (_, Some(a)) => {
                return Err(bad(&format!(
                    "is not a key for {} (an RSA key signs PS256 or RS256, a P-256 key ES256, an Ed25519 key EdDSA)",
                    a.as_str()
                )))
            }
        };
        if !allowed.contains(&algorithm) {
            let names: Vec<_> = allowed.iter().map(|a| a.as_str()).collect();
            return Err(bad(&format!(
                "signs {}, which is not allowed here ({})",
                algorithm.as_str(),
                names.join(", ")
            )));
        }
        let (key, public_jwk) = match parsed {
            Parsed::Rsa(k) => {
                let public = k.to_public_key();
                let jwk = json!({
                    "kty": "RSA",
                    "n": b64(&public.n().to_be_bytes_trimmed_vartime()),
                    "e": b64(&public.e().to_be_bytes_trimmed_vartime()),
                });
                let key = if algorithm == Algorithm::Rs256 {
                    Key::Rs256(rsa::pkcs1v15::SigningKey::new(k))
                } else {
                    Key::Ps256(rsa::pss::SigningKey::new(k))
                };
                (key, jwk)
            }
            Parsed::P256(k) => {
                let point = k.public_key().to_sec1_bytes();
                // Uncompressed SEC1: 0x04, then x and y, 32 bytes each.
                let jwk = json!({
                    "kty": "EC", "crv": "P-256",
                    "x": b64(&point[1..33]), "y": b64(&point[33..65]),
                });
                (Key::Es256(RingP256::new(&k).map_err(bad)?), jwk)
            }
            Parsed::Ed25519(k) => {
                let jwk = json!({
                    "kty": "OKP", "crv": "Ed25519",
                    "x": b64(&k.verifying_key().to_bytes()),
                });
                (Key::EdDsa(k), jwk)
            }
        };
        Ok(Self {
            key,
            kid: key_id.or(jwk_kid),
            public_jwk,
        })
    }

    pub fn algorithm(&self) -> Algorithm {
        match self.key {
            Key::Ps256(_) => Algorithm::Ps256,
            Key::Rs256(_) => Algorithm::Rs256,
            Key::Es256(_) => Algorithm::Es256,
            Key::EdDsa(_) => Algorithm::EdDsa,
        }
    }

    /// The public key as a JWK (no `kid`, no private field).
    pub fn public_jwk(&self) -> &Value {
        &self.public_jwk
    }

    /// A compact JWS of `claims` with `typ`; with `with_jwk` the header
    /// carries the public key (DPoP), else the `kid` if one is known.
    pub fn sign(&self, typ: &str, with_jwk: bool, claims: &Value) -> Result<String, RefreshError> {
        let mut header = Map::new();
        header.insert("alg".into(), self.algorithm().as_str().into());
        header.insert("typ".into(), typ.into());
        if with_jwk {
            header.insert("jwk".into(), self.public_jwk.clone());
        } else if let Some(kid) = &self.kid {
            header.insert("kid".into(), kid.as_str().into());
        }
        let encode = |v: &Value| -> Result<String, RefreshError> {
            serde_json::to_vec(v).map(|bytes| b64(&bytes)).map_err(|_| {
                RefreshError::new(
                    crate::engine::ErrorCode::RefreshFailed,
                    "could not encode a JWT",
                )
            })
        };
        let mut jws = encode(&Value::Object(header))?;
        jws.push('.');
        jws.push_str(&encode(claims)?);
        let signature = match &self.key {
            Key::Ps256(k) => k.try_sign(jws.as_bytes()).map(|s| s.to_vec()).ok(),
            Key::Rs256(k) => k.try_sign(jws.as_bytes()).map(|s| s.to_vec()).ok(),
            Key::Es256(k) => k.sign(jws.as_bytes()),
            Key::EdDsa(k) => Signer::<ed25519_dalek::Signature>::try_sign(k, jws.as_bytes())
                .map(|s| s.to_bytes().to_vec())
                .ok(),
        }
        .ok_or_else(|| {
            RefreshError::new(
                crate::engine::ErrorCode::RefreshFailed,
                "could not sign a JWT",
            )
        })?;
        jws.push('.');
        jws.push_str(&b64(&signature));
        Ok(jws)
    }
}

/// A random `jti`: 128 bits, base64url.
pub fn random_id() -> String {
    b64(&rand::rng().random::<[u8; 16]>())
}

/// Seconds since the epoch, as JWT claims want them (the system clock: the
/// server compares it with its own).
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

fn parse_pem(pem: &str) -> Result<Parsed, &'static str> {
    if pem.contains("PUBLIC KEY-----") || pem.contains("CERTIFICATE-----") {
        return Err("is a public key or certificate: the private key is needed");
    }
    let der = match PrivateKeyDer::from_pem_slice(pem.as_bytes()) {
        Ok(PrivateKeyDer::Pkcs8(der)) => der,
        Ok(_) => return Err("must be PKCS#8 PEM (-----BEGIN PRIVATE KEY-----); convert it with `openssl pkcs8 -topk8 -nocrypt`"),
        Err(_) => return Err("must be a PKCS#8 PEM private key or a private JWK"),
    };
    let der = der.secret_pkcs8_der();
    if let Ok(k) = rsa::PrivateKey::from_pkcs8_der(der) {
        return rsa_checked(k);
    }
    if let Ok(k) = p256::SecretKey::from_pkcs8_der(der) {
        return Ok(Parsed::P256(k));
    }
    if let Ok(k) = ed25519_dalek::SigningKey::from_pkcs8_der(der) {
        return Ok(Parsed::Ed25519(k));
    }
    Err("must be an RSA, P-256 or Ed25519 private key")
}

fn rsa_checked(k: rsa::PrivateKey) -> Result<Parsed, &'static str> {
    if k.size() * 8 < MIN_RSA_BITS {
        return Err("is an RSA key of fewer than 2048 bits");
    }
    Ok(Parsed::Rsa(k))
}

fn parse_jwk(json: &str) -> Result<(Parsed, Option<String>), &'static str> {
    let jwk: Jwk = serde_json::from_str(json).map_err(|_| "is not a JWK (a JSON object)")?;
    let Some(d) = &jwk.d else {
        return Err("is a public JWK (no \"d\"): the private key is needed");
    };
    let d = unb64(d)?;
    let parsed = match (jwk.kty, jwk.crv) {
        (Some("RSA"), _) => {
            let (Some(n), Some(e)) = (jwk.n, jwk.e) else {
                return Err("is an RSA JWK without n or e");
            };
            let (n, e) = (unb64(n)?, unb64(e)?);
            let primes = match (jwk.p, jwk.q) {
                (Some(p), Some(q)) => vec![uint(&unb64(p)?), uint(&unb64(q)?)],
                _ => Vec::new(),
            };
            let k = rsa::PrivateKey::from_components(uint(&n), uint(&e), uint(&d), primes)
                .map_err(|_| "is an RSA JWK whose fields do not form a key")?;
            rsa_checked(k)?
        }
        (Some("EC"), Some("P-256")) => {
            let k =
                p256::SecretKey::from_slice(&d).map_err(|_| "is an EC JWK with an invalid d")?;
            let point = k.public_key().to_sec1_bytes();
            let (x, y) = (jwk.x.map(unb64), jwk.y.map(unb64));
            let differs = |v: Option<Result<Zeroizing<Vec<u8>>, &str>>, want: &[u8]| {
                v.is_some_and(|v| v.map_or(true, |v| v.as_slice() != want))
            };
            if differs(x, &point[1..33]) || differs(y, &point[33..65]) {
                return Err("is an EC JWK whose x, y do not match its d");
            }
            Parsed::P256(k)
        }
        (Some("OKP"), Some("Ed25519")) => {
            let seed: &[u8; 32] = d
                .as_slice()
                .try_into()
                .map_err(|_| "is an Ed25519 JWK with an invalid d")?;
            let k = ed25519_dalek::SigningKey::from_bytes(seed);
            if let Some(x) = jwk.x {
                if unb64(x)?.as_slice() != k.verifying_key().to_bytes() {
                    return Err("is an Ed25519 JWK whose x does not match its d");
                }
            }
            Parsed::Ed25519(k)
        }
        _ => return Err("must be an RSA, EC P-256 or OKP Ed25519 JWK"),
    };
    Ok((parsed, jwk.kid))
}

/// Decoded into a buffer wiped on drop (it may be `d`, `p` or `q`).
fn unb64(s: &str) -> Result<Zeroizing<Vec<u8>>, &'static str> {
    URL_SAFE_NO_PAD
        .decode(s.trim_end_matches('='))
        .map(Zeroizing::new)
        .map_err(|_| "is a JWK with a field that is not base64url")
}

fn uint(bytes: &[u8]) -> BoxedUint {
    BoxedUint::from_be_slice_vartime(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: &[Algorithm] = &[
        Algorithm::Ps256,
        Algorithm::Rs256,
        Algorithm::Es256,
        Algorithm::EdDsa,
    ];

    #[test]
    fn every_held_key_wipes_itself_on_drop() {
        fn wiped<T: zeroize::ZeroizeOnDrop>() {}
        wiped::<rsa::pss::SigningKey<sha256::Sha256>>();
        wiped::<rsa::pkcs1v15::SigningKey<sha256::Sha256>>();
        wiped::<RingP256>();
        wiped::<p256::SecretKey>();
        wiped::<ed25519_dalek::SigningKey>();
    }

    #[test]
    fn algorithms_parse_by_name() {
        assert_eq!(
            Algorithm::parse("algorithm", "PS256", ALL).unwrap(),
            Algorithm::Ps256
        );
        let e = Algorithm::parse("algorithm", "HS256", ALL).unwrap_err();
        assert!(e.to_string().starts_with("algorithm must be"), "{e}");
    }

    macro_rules! fixture {
        ($name:literal) => {
            include_str!(concat!("../../__test__/fixtures/jose/", $name))
        };
    }

    fn claims() -> Value {
        json!({ "iss": "app", "jti": random_id(), "iat": now_secs() })
    }

    fn parts(jws: &str) -> (Value, Vec<u8>, Vec<u8>) {
        let mut it = jws.split('.');
        let (h, c, s) = (it.next().unwrap(), it.next().unwrap(), it.next().unwrap());
        assert!(it.next().is_none());
        let header = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(h).unwrap()).unwrap();
        (
            header,
            format!("{h}.{c}").into_bytes(),
            URL_SAFE_NO_PAD.decode(s).unwrap(),
        )
    }

    #[test]
    fn pem_and_jwk_of_one_key_agree_and_sign_what_the_public_key_verifies() {
        use signature::Verifier;
        for (pem, jwk, alg) in [
            (
                fixture!("rsa.pem"),
                fixture!("rsa.jwk.json"),
                Algorithm::Ps256,
            ),
            (
                fixture!("ec.pem"),
                fixture!("ec.jwk.json"),
                Algorithm::Es256,
            ),
            (
                fixture!("ed25519.pem"),
                fixture!("ed25519.jwk.json"),
                Algorithm::EdDsa,
            ),
        ] {
            let a = SigningKey::parse("privateKey", pem, None, None, ALL).unwrap();
            let b = SigningKey::parse("privateKey", jwk, None, None, ALL).unwrap();
            assert_eq!((a.algorithm(), b.algorithm()), (alg, alg));
            assert_eq!(a.public_jwk(), b.public_jwk());
            assert!(!format!("{a:?}").contains(pem.lines().nth(1).unwrap()));
            let (header, input, sig) = parts(&b.sign("JWT", false, &claims()).unwrap());
            assert_eq!(header["alg"], alg.as_str());
            assert!(
                header["kid"].as_str().unwrap().ends_with("-key"),
                "the JWK's kid"
            );
            let (header, input2, sig2) = parts(&a.sign("dpop+jwt", true, &claims()).unwrap());
            assert_eq!(&header["jwk"], a.public_jwk());
            assert!(header.get("kid").is_none());
            let jwk = a.public_jwk();
            let x = || URL_SAFE_NO_PAD.decode(jwk["x"].as_str().unwrap()).unwrap();
            match alg {
                Algorithm::Es256 => {
                    let mut point = vec![4u8];
                    point.extend(x());
                    point.extend(URL_SAFE_NO_PAD.decode(jwk["y"].as_str().unwrap()).unwrap());
                    let key = p256::ecdsa::VerifyingKey::from_sec1_bytes(&point).unwrap();
                    for (input, sig) in [(&input, &sig), (&input2, &sig2)] {
                        let sig = p256::ecdsa::Signature::from_slice(sig).unwrap();
                        key.verify(input, &sig).unwrap();
                    }
                }
                Algorithm::EdDsa => {
                    let key =
                        ed25519_dalek::VerifyingKey::from_bytes(&x().try_into().unwrap()).unwrap();
                    let sig = ed25519_dalek::Signature::from_slice(&sig).unwrap();
                    key.verify(&input, &sig).unwrap();
                }
                _ => {
                    let n = URL_SAFE_NO_PAD.decode(jwk["n"].as_str().unwrap()).unwrap();
                    let e = URL_SAFE_NO_PAD.decode(jwk["e"].as_str().unwrap()).unwrap();
                    let public = rsa::PublicKey::new(uint(&n), uint(&e)).unwrap();
                    let key = rsa::pss::VerifyingKey::<sha256::Sha256>::new(public);
                    let sig = rsa::pss::Signature::try_from(sig.as_slice()).unwrap();
                    key.verify(&input, &sig).unwrap();
                }
            }
        }
        let rs = SigningKey::parse(
            "privateKey",
            fixture!("rsa.pem"),
            Some(Algorithm::Rs256),
            Some("mine".into()),
            ALL,
        )
        .unwrap();
        let (header, _, _) = parts(&rs.sign("JWT", false, &claims()).unwrap());
        assert_eq!(
            (header["alg"].as_str(), header["kid"].as_str()),
            (Some("RS256"), Some("mine"))
        );
    }

    #[test]
    fn wrong_keys_are_refused_naming_the_option_and_never_quoted() {
        for (key, alg, want) in [
            (fixture!("ec.pub.pem"), None, "public"),
            (fixture!("rsa.pub.pem"), None, "public"),
            (fixture!("ec.sec1.pem"), None, "PKCS#8"),
            (fixture!("ec-p384.pem"), None, "RSA, P-256 or Ed25519"),
            (fixture!("ec-p384.jwk.json"), None, "P-256"),
            (fixture!("rsa-1024.pem"), None, "2048"),
            (
                fixture!("rsa.pem"),
                Some(Algorithm::Es256),
                "not a key for ES256",
            ),
            (
                fixture!("ec.jwk.json"),
                Some(Algorithm::EdDsa),
                "not a key for EdDSA",
            ),
        ] {
            let e = SigningKey::parse("privateKey", key, alg, None, ALL).unwrap_err();
            assert_eq!(e.code, crate::engine::ErrorCode::InvalidArgument);
            assert!(e.to_string().starts_with("privateKey "), "{e}");
            assert!(e.to_string().contains(want), "{e}");
        }
        let public_jwk = {
            let mut v: Value = serde_json::from_str(fixture!("ec.jwk.json")).unwrap();
            v.as_object_mut().unwrap().remove("d");
            v.to_string()
        };
        let e = SigningKey::parse("dpop.privateKey", &public_jwk, None, None, ALL).unwrap_err();
        assert!(
            e.to_string().starts_with("dpop.privateKey is a public JWK"),
            "{e}"
        );
        let mismatched = {
            let mut v: Value = serde_json::from_str(fixture!("ec.jwk.json")).unwrap();
            let other: Value = serde_json::from_str(fixture!("ed25519.jwk.json")).unwrap();
            v["d"] = other["d"].clone();
            v.to_string()
        };
        let e = SigningKey::parse("privateKey", &mismatched, None, None, ALL).unwrap_err();
        assert!(e.to_string().contains("do not match"), "{e}");
        let e = SigningKey::parse(
            "privateKey",
            fixture!("rsa.pem"),
            None,
            None,
            &[Algorithm::Es256],
        )
        .unwrap_err();
        assert!(e.to_string().contains("not allowed"), "{e}");
    }

    #[test]
    fn garbage_is_refused_naming_the_option() {
        for key in [
            "",
            "nope",
            "{}",
            "{\"kty\":\"EC\",\"crv\":\"P-256\",\"x\":\"AA\",\"y\":\"AA\"}",
            "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
        ] {
            let e = SigningKey::parse("privateKey", key, None, None, ALL).unwrap_err();
            assert!(e.to_string().starts_with("privateKey "), "{e}");
        }
    }
}
