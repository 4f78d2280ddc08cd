//! The RFC 6749 section 6 refresh: `grant_type=refresh_token`, form-urlencoded,
//! client authentication by `client_secret_basic` (the default, which every
//! server must support) or `client_secret_post`; and the RFC 7009
//! revocation of a refresh token, with the same client authentication.
//!
//! With refresh-token rotation a refresh token works once, and a server that
//! sees it twice revokes the whole grant. So a request is repeated only when
//! it certainly never left (the connection could not be made): once it may
//! have reached the server, a lost answer is an error, not a retry.

use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use reqwest::header::{HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_TYPE};
use reqwest::{Client, RequestBuilder, Url};
use serde::Deserialize;
use tokio::time::Instant;

use super::http::{self, Attempt, Backoff, SecretBytes, Verdict};
use super::jose::{self, Algorithm, SigningKey};
use super::{required, RefreshError, Token};
use crate::engine::{ErrorCode, SecretString};

/// Used when the server leaves `expires_in` out (RFC 6749 makes it
/// optional): the common lifetime. If the real one is shorter, the API's 401
/// and `invalidate()` recover; failing instead would lose a rotated refresh
/// token the server has already issued.
pub const FALLBACK_EXPIRES_IN: f64 = 3600.0;
/// Retries of a connection that could not be made (the request never left).
const CONNECT_RETRIES: u32 = 2;

/// A client assertion lives this long (FAPI 2.0: at most 60 s).
const ASSERTION_LIFETIME_S: u64 = 60;
/// What `private_key_jwt` may sign with (FAPI 2.0 allows PS256, ES256 and
/// EdDSA; RS256 on request, for older servers).
const ASSERTION_ALGORITHMS: &[Algorithm] = &[
    Algorithm::Ps256,
    Algorithm::Es256,
    Algorithm::EdDsa,
    Algorithm::Rs256,
];

/// What a DPoP key may sign with (FAPI 2.0's algorithms).
const DPOP_ALGORITHMS: &[Algorithm] = &[Algorithm::Es256, Algorithm::Ps256, Algorithm::EdDsa];

/// The `dpop` option.
#[derive(Debug)]
pub struct DpopConfig {
    /// PKCS#8 PEM or a private JWK.
    pub private_key: SecretString,
    pub algorithm: Option<String>,
}

/// DPoP state: the key, and the last nonce each server gave.
struct Dpop {
    key: Box<SigningKey>,
    /// By origin (RFC 9449 section 8: a nonce is the server's): the token
    /// endpoint's, and each resource server's `manager.fetch` called.
    nonces: parking_lot::Mutex<std::collections::HashMap<String, String>>,
}

/// Origins whose nonce is kept; past it the map starts over (a server
/// whose nonce was dropped answers `use_dpop_nonce` once more).
const MAX_NONCE_ORIGINS: usize = 256;
/// Longest nonce kept: a server's nonce is an opaque short string.
const MAX_NONCE_BYTES: usize = 1024;

impl Dpop {
    /// A proof for `htm` to `url` (RFC 9449 section 4.2), with the
    /// server's nonce if one is known and, for a resource request, `ath`:
    /// the access token's SHA-256.
    fn proof(
        &self,
        htm: &str,
        url: &Url,
        access_token: Option<&SecretString>,
    ) -> Result<String, RefreshError> {
        let mut htu = url.clone();
        htu.set_query(None);
        htu.set_fragment(None);
        let mut claims = serde_json::json!({
            "jti": jose::random_id(),
            "htm": htm,
            "htu": htu.as_str(),
            "iat": jose::now_secs(),
        });
        if let Some(nonce) = self.nonces.lock().get(&origin(url)) {
            claims["nonce"] = nonce.as_str().into();
        }
        if let Some(token) = access_token {
            use sha2::Digest as _;
            let digest = sha2::Sha256::digest(token.expose().as_bytes());
            claims["ath"] = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .encode(digest)
                .into();
        }
        self.key.sign("dpop+jwt", true, &claims)
    }

    fn remember(&self, url: &Url, attempt: &Attempt) {
        if let Attempt::Answered {
            dpop_nonce: Some(nonce),
            ..
        } = attempt
        {
            self.keep_nonce(url, nonce);
        }
    }

    fn keep_nonce(&self, url: &Url, nonce: &str) {
        if nonce.is_empty() || nonce.len() > MAX_NONCE_BYTES {
            return;
        }
        let mut nonces = self.nonces.lock();
        if nonces.len() >= MAX_NONCE_ORIGINS && !nonces.contains_key(&origin(url)) {
            nonces.clear();
        }
        nonces.insert(origin(url), nonce.to_owned());
    }
}

fn origin(url: &Url) -> String {
    url.origin().ascii_serialization()
}

/// A resource server's URL: absolute http(s). Plain http is allowed here
/// (unlike token endpoints) as the app chose where to send its request.
fn resource_url(url: &str) -> Result<Url, RefreshError> {
    match Url::parse(url) {
        Ok(u) if matches!(u.scheme(), "https" | "http") && u.host().is_some() => Ok(u),
        _ => Err(RefreshError::invalid_argument(
            "url",
            "must be an absolute http(s) URL",
        )),
    }
}

/// RFC 9110 `tchar`: what an HTTP method is made of.
fn is_token_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AuthMethod {
    #[default]
    ClientSecretBasic,
    ClientSecretPost,
    /// RFC 7523: a JWT signed with the client's private key.
    PrivateKeyJwt,
    /// RFC 8705: the TLS client certificate, issued by a CA the server trusts.
    TlsClientAuth,
    /// RFC 8705: a self-signed TLS client certificate registered with the server.
    SelfSignedTlsClientAuth,
}

impl AuthMethod {
    pub fn parse(value: Option<&str>) -> Result<Self, RefreshError> {
        match value {
            None | Some("client_secret_basic") => Ok(AuthMethod::ClientSecretBasic),
            Some("client_secret_post") => Ok(AuthMethod::ClientSecretPost),
            Some("private_key_jwt") => Ok(AuthMethod::PrivateKeyJwt),
            Some("tls_client_auth") => Ok(AuthMethod::TlsClientAuth),
            Some("self_signed_tls_client_auth") => Ok(AuthMethod::SelfSignedTlsClientAuth),
            Some(_) => Err(RefreshError::invalid_argument(
                "authMethod",
                "must be 'client_secret_basic', 'client_secret_post', 'private_key_jwt', 'tls_client_auth' or 'self_signed_tls_client_auth'",
            )),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            AuthMethod::ClientSecretBasic => "client_secret_basic",
            AuthMethod::ClientSecretPost => "client_secret_post",
            AuthMethod::PrivateKeyJwt => "private_key_jwt",
            AuthMethod::TlsClientAuth => "tls_client_auth",
            AuthMethod::SelfSignedTlsClientAuth => "self_signed_tls_client_auth",
        }
    }
}

#[derive(Debug)]
pub struct OAuth2Config {
    pub token_url: String,
    pub client_id: String,
    pub client_secret: SecretString,
    pub auth_method: AuthMethod,
    pub scope: Option<String>,
    pub timeout_ms: Option<f64>,
    /// The RFC 7009 revocation endpoint, if the provider has one.
    pub revocation_url: Option<String>,
    /// `private_key_jwt`: PKCS#8 PEM or a private JWK.
    pub private_key: Option<SecretString>,
    pub key_id: Option<String>,
    pub algorithm: Option<String>,
    /// The assertion's `aud`; default the token URL.
    pub audience: Option<String>,
    /// DPoP (RFC 9449): bind the tokens to this key.
    pub dpop: Option<DpopConfig>,
    /// Whether the client presents a TLS certificate (`tls.cert` +
    /// `tls.key`), which the two `tls_*` methods need.
    pub client_certificate: bool,
}

impl Default for OAuth2Config {
    fn default() -> Self {
        Self {
            revocation_url: None,
            private_key: None,
            key_id: None,
            algorithm: None,
            audience: None,
            client_certificate: false,
            dpop: None,
            token_url: String::new(),
            client_id: String::new(),
            client_secret: SecretString::new(String::new()),
            auth_method: AuthMethod::default(),
            scope: None,
            timeout_ms: None,
        }
    }
}

pub struct OAuth2Refresher {
    client: Client,
    url: Url,
    revocation_url: Option<Url>,
    auth: Auth,
    dpop: Option<Dpop>,
    scope: Option<String>,
    timeout: Duration,
}

enum Auth {
    /// The whole `Authorization: Basic ...` header value, marked sensitive,
    /// over a buffer wiped when the refresher and its last request are gone.
    Basic(HeaderValue),
    Post {
        client_id: String,
        client_secret: SecretString,
    },
    /// A fresh client assertion per request.
    Jwt {
        client_id: String,
        key: Box<SigningKey>,
        audience: String,
    },
    /// The TLS layer authenticates; the body names the client.
    Tls {
        client_id: String,
        method: AuthMethod,
    },
}

impl std::fmt::Debug for OAuth2Refresher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let method = match &self.auth {
            Auth::Basic(_) => "client_secret_basic",
            Auth::Post { .. } => "client_secret_post",
            Auth::Jwt { .. } => "private_key_jwt",
            Auth::Tls { method, .. } => method.as_str(),
        };
        f.debug_struct("OAuth2Refresher")
            .field("auth_method", &method)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct Answer {
    access_token: Option<serde_json::Value>,
    token_type: Option<serde_json::Value>,
    expires_in: Option<serde_json::Value>,
    refresh_token: Option<serde_json::Value>,
}

impl OAuth2Refresher {
    pub fn new(config: OAuth2Config, client: Client) -> Result<Self, RefreshError> {
        if config.token_url.is_empty() {
            return Err(RefreshError::invalid_argument("tokenUrl", "is required"));
        }
        let url = http::token_url("tokenUrl", &config.token_url)?;
        let revocation_url = config
            .revocation_url
            .as_deref()
            .map(|u| http::token_url("revocationUrl", u))
            .transpose()?;
        required("clientId", &config.client_id)?;
        let timeout = super::timeout_option("timeoutMs", config.timeout_ms)?;
        let method = config.auth_method;
        let uses_secret = matches!(
            method,
            AuthMethod::ClientSecretBasic | AuthMethod::ClientSecretPost
        );
        let only_for = |name: &str, which: &str| {
            RefreshError::invalid_argument(
                name,
                &format!("is only for {which} (authMethod is '{}')", method.as_str()),
            )
        };
        if !uses_secret && !config.client_secret.is_empty() {
            return Err(only_for(
                "clientSecret",
                "client_secret_basic and client_secret_post",
            ));
        }
        if method != AuthMethod::PrivateKeyJwt {
            for (name, set) in [
                ("privateKey", config.private_key.is_some()),
                ("keyId", config.key_id.is_some()),
                ("algorithm", config.algorithm.is_some()),
                ("audience", config.audience.is_some()),
            ] {
                if set {
                    return Err(only_for(name, "private_key_jwt"));
                }
            }
        }
        let auth = match method {
            AuthMethod::ClientSecretBasic => {
                required("clientSecret", config.client_secret.expose())?;
                // RFC 6749 section 2.3.1: each part form-urlencoded, then Base64.
                // Intermediate copies are SecretStrings too: wiped on drop.
                let pair = SecretString::new(format!(
                    "{}:{}",
                    form(&config.client_id),
                    form(config.client_secret.expose())
                ));
                let encoded = SecretString::new(
                    base64::engine::general_purpose::STANDARD.encode(pair.expose()),
                );
                let header = SecretBytes::from(format!("Basic {}", encoded.expose()).as_str());
                let mut value =
                    HeaderValue::from_maybe_shared(header.into_body()).map_err(|_| {
                        RefreshError::invalid_argument("clientSecret", "could not be encoded")
                    })?;
                value.set_sensitive(true);
                Auth::Basic(value)
            }
            AuthMethod::ClientSecretPost => {
                required("clientSecret", config.client_secret.expose())?;
                Auth::Post {
                    client_id: config.client_id,
                    client_secret: config.client_secret,
                }
            }
            AuthMethod::PrivateKeyJwt => {
                let key = config.private_key.as_ref().ok_or_else(|| {
                    RefreshError::invalid_argument(
                        "privateKey",
                        "is required by authMethod 'private_key_jwt'",
                    )
                })?;
                let algorithm = config
                    .algorithm
                    .as_deref()
                    .map(|a| Algorithm::parse("algorithm", a, ASSERTION_ALGORITHMS))
                    .transpose()?;
                let key = SigningKey::parse(
                    "privateKey",
                    key.expose(),
                    algorithm,
                    config.key_id,
                    ASSERTION_ALGORITHMS,
                )?;
                let audience = config.audience.unwrap_or_else(|| config.token_url.clone());
                required("audience", &audience)?;
                Auth::Jwt {
                    client_id: config.client_id,
                    key: Box::new(key),
                    audience,
                }
            }
            AuthMethod::TlsClientAuth | AuthMethod::SelfSignedTlsClientAuth => {
                if !config.client_certificate {
                    return Err(RefreshError::invalid_argument(
                        "tls",
                        &format!(
                            "needs cert and key: authMethod '{}' authenticates with the client certificate",
                            method.as_str()
                        ),
                    ));
                }
                Auth::Tls {
                    client_id: config.client_id,
                    method,
                }
            }
        };
        let dpop = match config.dpop {
            None => None,
            Some(d) => {
                let algorithm = d
                    .algorithm
                    .as_deref()
                    .map(|a| Algorithm::parse("dpop.algorithm", a, DPOP_ALGORITHMS))
                    .transpose()?;
                let key = SigningKey::parse(
                    "dpop.privateKey",
                    d.private_key.expose(),
                    algorithm,
                    None,
                    DPOP_ALGORITHMS,
                )?;
                Some(Dpop {
                    key: Box::new(key),
                    nonces: parking_lot::Mutex::new(std::collections::HashMap::new()),
                })
            }
        };
        Ok(Self {
            client,
            url,
            revocation_url,
            auth,
            dpop,
            scope: config.scope.filter(|s| !s.is_empty()),
            timeout,
        })
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Exchanges `refresh_token` for a new access token (and, with
    /// rotation, a new refresh token the caller must persist).
    pub async fn refresh(
        &self,
        refresh_token: Option<&SecretString>,
        deadline: Instant,
    ) -> Result<Token, RefreshError> {
        let refresh_token = refresh_token.filter(|t| !t.is_empty()).ok_or_else(|| {
            RefreshError::new(
                ErrorCode::ReauthRequired,
                "no refresh token to refresh with: the user must reconnect",
            )
        })?;
        let mut form: Vec<(&str, &str)> = vec![
            ("grant_type", "refresh_token"),
            ("refresh_token", refresh_token.expose()),
        ];
        if let Some(scope) = &self.scope {
            form.push(("scope", scope));
        }
        let dpop = self.dpop.as_ref();
        let mut nonce_retried = false;
        loop {
            // Built per try: a client assertion's jti is single-use.
            let body = self.body(form.clone())?;
            let result = http::with_retries(deadline, CONNECT_RETRIES, Backoff::default(), || {
                let request = self.request(&self.url, body.clone());
                // A fresh proof per attempt (its jti is single-use too).
                let proof = dpop.map(|d| d.proof("POST", &self.url, None)).transpose();
                async move {
                    let request = match proof {
                        Ok(Some(proof)) => request.header("dpop", proof),
                        Ok(None) => request,
                        Err(e) => return Verdict::Done(Err(e)),
                    };
                    let attempt = http::send(request).await;
                    if let Some(d) = dpop {
                        d.remember(&self.url, &attempt);
                    }
                    judge(attempt, dpop.is_some())
                }
            })
            .await;
            match result {
                // RFC 9449 section 8: the server refused the proof for its
                // missing or stale nonce, before looking at the grant; one
                // more try with the nonce it just gave is what it asks for.
                Err(e)
                    if dpop.is_some()
                        && !nonce_retried
                        && e.provider_error.as_deref() == Some("use_dpop_nonce") =>
                {
                    nonce_retried = true;
                }
                other => return other,
            }
        }
    }

    /// Whether tokens are DPoP-bound (the `dpop` option).
    pub fn uses_dpop(&self) -> bool {
        self.dpop.is_some()
    }

    /// A DPoP proof for a request to a resource server with
    /// `access_token` (RFC 9449 section 7): `method` as sent, `url` with
    /// its query and fragment left out of `htu`, `ath`, and the nonce this
    /// server last gave.
    pub fn resource_proof(
        &self,
        method: &str,
        url: &str,
        access_token: &SecretString,
    ) -> Result<String, RefreshError> {
        let dpop = self.dpop_for("dpopProof")?;
        let url = resource_url(url)?;
        if method.is_empty() || !method.bytes().all(is_token_char) {
            return Err(RefreshError::invalid_argument(
                "method",
                "must be an HTTP method",
            ));
        }
        dpop.proof(method, &url, Some(access_token))
    }

    /// Keeps the nonce a resource server sent (its `DPoP-Nonce` header)
    /// for the next proofs to its origin.
    pub fn keep_dpop_nonce(&self, url: &str, nonce: &str) -> Result<(), RefreshError> {
        let dpop = self.dpop_for("keepDpopNonce")?;
        // RFC 9449 section 8.1: a nonce is printable ASCII without spaces.
        if nonce.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
            dpop.keep_nonce(&resource_url(url)?, nonce);
        }
        Ok(())
    }

    fn dpop_for(&self, what: &str) -> Result<&Dpop, RefreshError> {
        self.dpop.as_ref().ok_or_else(|| super::no_dpop(what))
    }

    pub fn can_revoke(&self) -> bool {
        self.revocation_url.is_some()
    }

    /// RFC 7009: asks the provider to revoke `refresh_token` (and, as most
    /// do, the grant it belongs to). A 2xx answer is success, also for a
    /// token the provider no longer knows (RFC 7009 section 2.2). Resent
    /// only when the request certainly never left, as a refresh is.
    pub async fn revoke(
        &self,
        refresh_token: &SecretString,
        deadline: Instant,
    ) -> Result<(), RefreshError> {
        let Some(url) = &self.revocation_url else {
            return Err(RefreshError::invalid_argument(
                "revocationUrl",
                "is not set: this refresher cannot revoke",
            ));
        };
        if refresh_token.is_empty() {
            return Err(RefreshError::invalid_argument(
                "refreshToken",
                "must be a non-empty string",
            ));
        }
        let body = self.body(vec![
            ("token", refresh_token.expose()),
            ("token_type_hint", "refresh_token"),
        ])?;
        http::with_retries(deadline, CONNECT_RETRIES, Backoff::default(), || {
            let request = self.request(url, body.clone());
            async move { judge_revocation(http::send_to(request, "revocation").await) }
        })
        .await
    }

    /// The form body with the client's credentials when they go in it
    /// (`client_secret_post`). It holds a refresh token (and maybe the
    /// secret): one buffer for every attempt, wiped once the last is gone.
    fn body(&self, fields: Vec<(&str, &str)>) -> Result<Bytes, RefreshError> {
        let assertion;
        let mut form = fields;
        match &self.auth {
            Auth::Basic(_) => {}
            Auth::Post {
                client_id,
                client_secret,
            } => {
                form.push(("client_id", client_id));
                form.push(("client_secret", client_secret.expose()));
            }
            Auth::Jwt {
                client_id,
                key,
                audience,
            } => {
                // RFC 7523 section 3; a fresh one per request (its jti is
                // single-use at the server).
                let iat = jose::now_secs();
                assertion = key.sign(
                    "JWT",
                    false,
                    &serde_json::json!({
                        "iss": client_id,
                        "sub": client_id,
                        "aud": audience,
                        "jti": jose::random_id(),
                        "iat": iat,
                        "exp": iat + ASSERTION_LIFETIME_S,
                    }),
                )?;
                form.push(("client_id", client_id));
                form.push((
                    "client_assertion_type",
                    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                ));
                form.push(("client_assertion", &assertion));
            }
            Auth::Tls { client_id, .. } => form.push(("client_id", client_id)),
        }
        let body = SecretString::new(serde_urlencoded::to_string(&form).map_err(|_| {
            RefreshError::new(ErrorCode::RefreshFailed, "could not encode the request")
        })?);
        drop(form);
        Ok(SecretBytes::from(body.expose()).into_body())
    }

    /// A POST of `body` to `url` with the client's authentication header.
    fn request(&self, url: &Url, body: Bytes) -> RequestBuilder {
        let mut request = self
            .client
            .post(url.clone())
            .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(ACCEPT, "application/json")
            .body(body);
        if let Auth::Basic(value) = &self.auth {
            request = request.header(AUTHORIZATION, value.clone());
        }
        request
    }
}

fn form(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

fn judge(attempt: Attempt, dpop: bool) -> Verdict<Token> {
    match attempt {
        // The connection was never made: the refresh token never left.
        Attempt::Failed { sent: false, error } => Verdict::Retry { error, after: None },
        // It may have been used: resending could revoke the grant.
        Attempt::Failed { sent: true, error } => Verdict::Done(Err(error)),
        Attempt::BrokenBody { status } if (200..300).contains(&status) => Verdict::Done(Err(
            RefreshError::malformed(status, "a body that broke off or is too large"),
        )),
        Attempt::BrokenBody { status } => {
            Verdict::Done(Err(RefreshError::from_status(status, None)))
        }
        Attempt::Answered { status, body, .. } if (200..300).contains(&status) => {
            Verdict::Done(parse(status, body.as_ref(), dpop))
        }
        Attempt::Answered { status, body, .. } => Verdict::Done(Err(RefreshError::from_status(
            status,
            http::provider_error(body.as_ref()),
        ))),
    }
}

fn judge_revocation(attempt: Attempt) -> Verdict<()> {
    match attempt {
        Attempt::Failed { sent: false, error } => Verdict::Retry {
            error: error.revoke_failed(),
            after: None,
        },
        Attempt::Failed { sent: true, error } => Verdict::Done(Err(error.revoke_failed())),
        // The status is the answer; a body is neither needed nor promised.
        Attempt::Answered { status, .. } | Attempt::BrokenBody { status }
            if (200..300).contains(&status) =>
        {
            Verdict::Done(Ok(()))
        }
        Attempt::Answered { status, body, .. } => Verdict::Done(Err(
            RefreshError::revocation_status(status, http::provider_error(body.as_ref())),
        )),
        Attempt::BrokenBody { status } => {
            Verdict::Done(Err(RefreshError::revocation_status(status, None)))
        }
    }
}

fn parse(status: u16, body: &[u8], dpop: bool) -> Result<Token, RefreshError> {
    let answer: Answer = serde_json::from_slice(body)
        .map_err(|_| RefreshError::malformed(status, "a body that is not a JSON object"))?;
    // RFC 9449 section 5: a DPoP request gets a DPoP-bound token. A Bearer
    // one would work for anyone who takes it: not a silent downgrade.
    if dpop
        && !matches!(&answer.token_type, Some(serde_json::Value::String(t)) if t.eq_ignore_ascii_case("DPoP"))
    {
        return Err(RefreshError::malformed(
            status,
            "a token_type other than DPoP to a DPoP request (a token not bound to the key)",
        ));
    }
    let access = match answer.access_token {
        Some(serde_json::Value::String(s)) if !s.is_empty() => SecretString::new(s),
        _ => return Err(RefreshError::malformed(status, "no access_token string")),
    };
    let expires_in = match answer.expires_in {
        None | Some(serde_json::Value::Null) => FALLBACK_EXPIRES_IN,
        Some(v) => http::expires_in(Some(&v))
            .ok_or_else(|| RefreshError::malformed(status, "an invalid expires_in"))?,
    };
    let refresh = match answer.refresh_token {
        Some(serde_json::Value::String(s)) if !s.is_empty() => Some(SecretString::new(s)),
        _ => None,
    };
    Ok(Token {
        access,
        refresh,
        expires_in,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::refreshers::Refresher;
    use serde_json::json;
    use wiremock::matchers::{body_string, header, header_exists, method, path};
    use wiremock::{Mock, MockServer, Request, ResponseTemplate};

    const SECRET: &str = "s3cr3t:with&odd=chars";
    const RT: &str = "rt-original-0001";
    const BUDGET: Option<Duration> = Some(Duration::from_secs(10));

    fn refresher(url: String, auth_method: AuthMethod) -> Refresher {
        let config = OAuth2Config {
            token_url: url,
            client_id: "my app".into(),
            client_secret: SECRET.into(),
            auth_method,
            ..Default::default()
        };
        Refresher::OAuth2(OAuth2Refresher::new(config, http::new_client().unwrap()).unwrap())
    }

    fn rt() -> SecretString {
        SecretString::from(RT)
    }

    async fn requests(server: &MockServer) -> Vec<Request> {
        server.received_requests().await.unwrap_or_default()
    }

    #[tokio::test]
    async fn basic_auth_sends_the_rfc_request_and_returns_the_rotated_token() {
        let server = MockServer::start().await;
        // RFC 6749 2.3.1: form-encode id and secret, then Base64 "id:secret".
        let expected = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode("my+app:s3cr3t%3Awith%26odd%3Dchars")
        );
        Mock::given(method("POST"))
            .and(path("/token"))
            .and(header("content-type", "application/x-www-form-urlencoded"))
            .and(header("authorization", expected.as_str()))
            .and(body_string(format!("grant_type=refresh_token&refresh_token={RT}")))
            .respond_with(ResponseTemplate::new(200).set_body_json(json!({
                "access_token": "at-2", "token_type": "Bearer", "expires_in": 300, "refresh_token": "rt-2"
            })))
            .expect(1)
            .mount(&server)
            .await;
        let t = refresher(
            format!("{}/token", server.uri()),
            AuthMethod::ClientSecretBasic,
        )
        .refresh("any-user", Some(&rt()), BUDGET)
        .await
        .unwrap();
        assert_eq!(t.access.expose(), "at-2");
        assert_eq!(t.refresh.as_ref().map(|s| s.expose()), Some("rt-2"));
        assert_eq!(t.expires_in, 300.0);
    }

    #[tokio::test]
    async fn post_auth_puts_the_client_in_the_body_and_scope_is_sent() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .and(body_string(format!(
                "grant_type=refresh_token&refresh_token={RT}&scope=accounts+offline_access&client_id=my+app&client_secret=s3cr3t%3Awith%26odd%3Dchars"
            )))
            .respond_with(ResponseTemplate::new(200).set_body_json(json!({ "access_token": "at-3", "token_type": "Bearer" })))
            .expect(1)
            .mount(&server)
            .await;
        let config = OAuth2Config {
            token_url: server.uri(),
            client_id: "my app".into(),
            client_secret: SECRET.into(),
            auth_method: AuthMethod::ClientSecretPost,
            scope: Some("accounts offline_access".into()),
            ..Default::default()
        };
        let r =
            Refresher::OAuth2(OAuth2Refresher::new(config, http::new_client().unwrap()).unwrap());
        let t = r.refresh("u", Some(&rt()), BUDGET).await.unwrap();
        assert_eq!(t.access.expose(), "at-3");
        assert!(t.refresh.is_none(), "no rotation: nothing new to persist");
        assert_eq!(t.expires_in, FALLBACK_EXPIRES_IN);
        let sent = requests(&server).await;
        assert!(!sent[0].headers.contains_key("authorization"));
    }

    #[tokio::test]
    async fn invalid_grant_means_reauth_and_is_never_resent() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(400).set_body_json(json!({
                "error": "invalid_grant", "error_description": "grant request is invalid rt-original-0001"
            })))
            .mount(&server)
            .await;
        let e = refresher(server.uri(), AuthMethod::ClientSecretBasic)
            .refresh("u", Some(&rt()), BUDGET)
            .await
            .unwrap_err();
        assert_eq!(
            (e.code, e.status, e.provider_error.as_deref()),
            (ErrorCode::ReauthRequired, Some(400), Some("invalid_grant"))
        );
        assert!(
            !e.to_string().contains(RT) && !e.to_string().contains("description"),
            "{e}"
        );
        assert_eq!(requests(&server).await.len(), 1);
    }

    #[tokio::test]
    async fn server_errors_and_429_are_not_retried() {
        for status in [500, 502, 503, 429] {
            let server = MockServer::start().await;
            Mock::given(method("POST"))
                .respond_with(ResponseTemplate::new(status).insert_header("retry-after", "0"))
                .mount(&server)
                .await;
            let e = refresher(server.uri(), AuthMethod::ClientSecretBasic)
                .refresh("u", Some(&rt()), BUDGET)
                .await
                .unwrap_err();
            assert_eq!((e.code, e.status), (ErrorCode::RefreshFailed, Some(status)));
            assert_eq!(requests(&server).await.len(), 1, "HTTP {status} was resent");
        }
    }

    #[tokio::test]
    async fn client_rejections_are_invalid_client() {
        for (status, error) in [
            (401, Some("invalid_client")),
            (401, None),
            (400, Some("invalid_client")),
        ] {
            let server = MockServer::start().await;
            let body = error.map_or(json!({}), |e| json!({ "error": e }));
            Mock::given(method("POST"))
                .respond_with(ResponseTemplate::new(status).set_body_json(body))
                .mount(&server)
                .await;
            let e = refresher(server.uri(), AuthMethod::ClientSecretBasic)
                .refresh("u", Some(&rt()), BUDGET)
                .await
                .unwrap_err();
            assert_eq!(
                (e.code, e.status, e.provider_error.as_deref()),
                (ErrorCode::InvalidClient, Some(status), error)
            );
        }
    }

    #[tokio::test]
    async fn a_lost_answer_is_an_error_not_a_resend() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(
                ResponseTemplate::new(200)
                    .set_body_json(json!({ "access_token": "at", "expires_in": 60 }))
                    .set_delay(Duration::from_secs(5)),
            )
            .mount(&server)
            .await;
        let e = refresher(server.uri(), AuthMethod::ClientSecretBasic)
            .refresh("u", Some(&rt()), Some(Duration::from_millis(300)))
            .await
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::RefreshTimeout);
        assert_eq!(requests(&server).await.len(), 1);
    }

    #[tokio::test]
    async fn no_refresh_token_means_reauth_without_a_request() {
        let server = MockServer::start().await;
        Mock::given(header_exists("content-type"))
            .respond_with(ResponseTemplate::new(500))
            .mount(&server)
            .await;
        let r = refresher(server.uri(), AuthMethod::ClientSecretBasic);
        for token in [None, Some(SecretString::from(""))] {
            let e = r.refresh("u", token.as_ref(), BUDGET).await.unwrap_err();
            assert_eq!(e.code, ErrorCode::ReauthRequired);
        }
        assert!(requests(&server).await.is_empty());
    }

    #[tokio::test]
    async fn malformed_success_is_refresh_failed() {
        for body in [
            "[]",
            "{\"token_type\":\"Bearer\"}",
            "{\"access_token\":\"at\",\"expires_in\":\"never\"}",
            "nope",
        ] {
            let server = MockServer::start().await;
            Mock::given(method("POST"))
                .respond_with(ResponseTemplate::new(200).set_body_string(body))
                .mount(&server)
                .await;
            let e = refresher(server.uri(), AuthMethod::ClientSecretBasic)
                .refresh("u", Some(&rt()), BUDGET)
                .await
                .unwrap_err();
            assert_eq!(
                (e.code, e.status),
                (ErrorCode::RefreshFailed, Some(200)),
                "{body}"
            );
        }
    }

    fn revoking(url: String, revocation_url: Option<String>, auth_method: AuthMethod) -> Refresher {
        let config = OAuth2Config {
            token_url: url,
            revocation_url,
            client_id: "my app".into(),
            client_secret: SECRET.into(),
            auth_method,
            ..Default::default()
        };
        Refresher::OAuth2(OAuth2Refresher::new(config, http::new_client().unwrap()).unwrap())
    }

    #[tokio::test]
    async fn revoke_sends_the_rfc_7009_request_with_the_client_authentication() {
        let server = MockServer::start().await;
        let expected = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode("my+app:s3cr3t%3Awith%26odd%3Dchars")
        );
        Mock::given(method("POST"))
            .and(path("/revoke"))
            .and(header("content-type", "application/x-www-form-urlencoded"))
            .and(header("authorization", expected.as_str()))
            .and(body_string(format!(
                "token={RT}&token_type_hint=refresh_token"
            )))
            .respond_with(ResponseTemplate::new(200))
            .expect(1)
            .mount(&server)
            .await;
        let r = revoking(
            format!("{}/token", server.uri()),
            Some(format!("{}/revoke", server.uri())),
            AuthMethod::ClientSecretBasic,
        );
        assert!(r.can_revoke());
        r.revoke(&rt(), BUDGET).await.unwrap();

        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .and(body_string(format!(
                "token={RT}&token_type_hint=refresh_token&client_id=my+app&client_secret=s3cr3t%3Awith%26odd%3Dchars"
            )))
            .respond_with(ResponseTemplate::new(200).set_body_string("{}"))
            .expect(1)
            .mount(&server)
            .await;
        revoking(
            server.uri(),
            Some(server.uri()),
            AuthMethod::ClientSecretPost,
        )
        .revoke(&rt(), BUDGET)
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn a_refused_or_lost_revocation_is_revoke_failed_and_never_resent() {
        for (status, error) in [
            (401, Some("invalid_client")),
            (503, None),
            (400, Some("unsupported_token_type")),
        ] {
            let server = MockServer::start().await;
            let body = error.map_or(
                json!({}),
                |e| json!({ "error": e, "error_description": RT }),
            );
            Mock::given(method("POST"))
                .respond_with(
                    ResponseTemplate::new(status)
                        .set_body_json(body)
                        .insert_header("retry-after", "0"),
                )
                .mount(&server)
                .await;
            let e = revoking(
                server.uri(),
                Some(server.uri()),
                AuthMethod::ClientSecretBasic,
            )
            .revoke(&rt(), BUDGET)
            .await
            .unwrap_err();
            assert_eq!(
                (e.code, e.status, e.provider_error.as_deref()),
                (ErrorCode::RevokeFailed, Some(status), error)
            );
            assert!(
                e.to_string().starts_with("revocation endpoint answered"),
                "{e}"
            );
            assert!(!e.to_string().contains(RT), "{e}");
            assert_eq!(requests(&server).await.len(), 1, "HTTP {status} was resent");
        }
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(200).set_delay(Duration::from_secs(5)))
            .mount(&server)
            .await;
        let e = revoking(
            server.uri(),
            Some(server.uri()),
            AuthMethod::ClientSecretBasic,
        )
        .revoke(&rt(), Some(Duration::from_millis(300)))
        .await
        .unwrap_err();
        assert_eq!((e.code, e.status), (ErrorCode::RevokeFailed, None));
        assert_eq!(requests(&server).await.len(), 1);
    }

    #[tokio::test]
    async fn only_a_refresher_with_a_revocation_url_revokes() {
        let server = MockServer::start().await;
        let r = revoking(server.uri(), None, AuthMethod::ClientSecretBasic);
        assert!(!r.can_revoke());
        let e = r.revoke(&rt(), BUDGET).await.unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidArgument);
        assert!(e.to_string().starts_with("revocationUrl "), "{e}");
        let r = revoking(
            server.uri(),
            Some(server.uri()),
            AuthMethod::ClientSecretBasic,
        );
        let e = r.revoke(&SecretString::from(""), BUDGET).await.unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidArgument);
        assert!(requests(&server).await.is_empty());
        let config = OAuth2Config {
            token_url: "https://idp.example/token".into(),
            revocation_url: Some("http://idp.example/revoke".into()),
            client_id: "c".into(),
            client_secret: SECRET.into(),
            ..Default::default()
        };
        let e = OAuth2Refresher::new(config, http::new_client().unwrap()).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidArgument);
        assert!(e.to_string().starts_with("revocationUrl "), "{e}");
    }

    #[tokio::test]
    async fn private_key_jwt_sends_a_fresh_assertion_and_no_secret() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(200).set_body_json(json!({ "access_token": "at" })))
            .expect(2)
            .mount(&server)
            .await;
        let config = OAuth2Config {
            token_url: server.uri(),
            client_id: "bank-app".into(),
            auth_method: AuthMethod::PrivateKeyJwt,
            private_key: Some(SecretString::from(include_str!(
                "../../__test__/fixtures/jose/ed25519.pem"
            ))),
            audience: Some("https://bank.example".into()),
            ..Default::default()
        };
        let r = OAuth2Refresher::new(config, http::new_client().unwrap()).unwrap();
        assert!(!format!("{r:?}").contains("PRIVATE"));
        let r = Refresher::OAuth2(r);
        r.refresh("u", Some(&rt()), BUDGET).await.unwrap();
        r.refresh("u", Some(&rt()), BUDGET).await.unwrap();
        let sent = requests(&server).await;
        let assertions: Vec<serde_json::Value> = sent
            .iter()
            .map(|req| {
                assert!(!req.headers.contains_key("authorization"));
                let form: std::collections::HashMap<String, String> =
                    serde_urlencoded::from_bytes(&req.body).unwrap();
                assert_eq!(form["client_id"], "bank-app");
                assert_eq!(
                    form["client_assertion_type"],
                    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
                );
                assert!(!form.contains_key("client_secret"));
                let claims = form["client_assertion"].split('.').nth(1).unwrap();
                serde_json::from_slice(
                    &base64::engine::general_purpose::URL_SAFE_NO_PAD
                        .decode(claims)
                        .unwrap(),
                )
                .unwrap()
            })
            .collect();
        for c in &assertions {
            assert_eq!(
                (&c["iss"], &c["sub"]),
                (&json!("bank-app"), &json!("bank-app"))
            );
            assert_eq!(c["aud"], "https://bank.example");
            let (iat, exp) = (c["iat"].as_u64().unwrap(), c["exp"].as_u64().unwrap());
            assert!(exp > iat && exp - iat <= 60);
        }
        assert_ne!(assertions[0]["jti"], assertions[1]["jti"]);
    }

    fn dpop_refresher(url: String) -> Refresher {
        let config = OAuth2Config {
            token_url: url,
            client_id: "c".into(),
            client_secret: "s".into(),
            dpop: Some(DpopConfig {
                private_key: SecretString::from(include_str!(
                    "../../__test__/fixtures/jose/ec.pem"
                )),
                algorithm: None,
            }),
            ..Default::default()
        };
        Refresher::OAuth2(OAuth2Refresher::new(config, http::new_client().unwrap()).unwrap())
    }

    fn proof_claims(req: &Request) -> serde_json::Value {
        let proof = req.headers.get("dpop").unwrap().to_str().unwrap();
        let claims = proof.split('.').nth(1).unwrap();
        serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(claims)
                .unwrap(),
        )
        .unwrap()
    }

    #[tokio::test]
    async fn dpop_retries_once_with_the_servers_nonce_and_keeps_it() {
        let server = MockServer::start().await;
        Mock::given(header_exists("dpop"))
            .and(wiremock::matchers::body_string_contains("rt-"))
            .respond_with(|req: &Request| {
                if proof_claims(req).get("nonce") == Some(&json!("n-1")) {
                    ResponseTemplate::new(200)
                        .set_body_json(json!({ "access_token": "at", "token_type": "DPoP" }))
                } else {
                    ResponseTemplate::new(400)
                        .insert_header("dpop-nonce", "n-1")
                        .set_body_json(json!({ "error": "use_dpop_nonce" }))
                }
            })
            .mount(&server)
            .await;
        let r = dpop_refresher(format!("{}/token?x=1", server.uri()));
        r.refresh("u", Some(&rt()), BUDGET).await.unwrap();
        r.refresh("u", Some(&rt()), BUDGET).await.unwrap();
        let sent = requests(&server).await;
        assert_eq!(
            sent.len(),
            3,
            "one retry for the nonce, then the nonce is kept"
        );
        let claims: Vec<_> = sent.iter().map(proof_claims).collect();
        assert_eq!(claims[0]["htm"], "POST");
        assert_eq!(claims[0]["htu"], format!("{}/token", server.uri()));
        assert!(claims[0].get("nonce").is_none());
        assert_eq!(
            (&claims[1]["nonce"], &claims[2]["nonce"]),
            (&json!("n-1"), &json!("n-1"))
        );
        let jtis: std::collections::HashSet<_> =
            claims.iter().map(|c| c["jti"].to_string()).collect();
        assert_eq!(jtis.len(), 3);

        // A server that keeps asking gets one retry, not a loop.
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(
                ResponseTemplate::new(400)
                    .insert_header("dpop-nonce", "always-new")
                    .set_body_json(json!({ "error": "use_dpop_nonce" })),
            )
            .mount(&server)
            .await;
        let e = dpop_refresher(server.uri())
            .refresh("u", Some(&rt()), BUDGET)
            .await
            .unwrap_err();
        assert_eq!(e.provider_error.as_deref(), Some("use_dpop_nonce"));
        assert_eq!(requests(&server).await.len(), 2);
    }

    #[tokio::test]
    async fn a_bearer_answer_to_a_dpop_request_is_an_error() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(
                ResponseTemplate::new(200)
                    .set_body_json(json!({ "access_token": "at", "token_type": "Bearer" })),
            )
            .mount(&server)
            .await;
        let e = dpop_refresher(server.uri())
            .refresh("u", Some(&rt()), BUDGET)
            .await
            .unwrap_err();
        assert_eq!((e.code, e.status), (ErrorCode::RefreshFailed, Some(200)));
        assert!(e.to_string().contains("other than DPoP"), "{e}");
        assert_eq!(requests(&server).await.len(), 1);
    }

    fn jws_part(jws: &str, i: usize) -> serde_json::Value {
        let part = jws.split('.').nth(i).unwrap();
        serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(part)
                .unwrap(),
        )
        .unwrap()
    }

    #[test]
    fn resource_proofs_carry_ath_htm_htu_and_the_servers_nonce() {
        use sha2::Digest as _;
        let r = dpop_refresher("https://as.example/token".into());
        assert!(r.uses_dpop());
        let token = SecretString::from("at-123");
        let url = "https://api.bank.example/accounts?page=2#top";
        let first = r.dpop_proof("GET", url, &token).unwrap();
        let claims = jws_part(&first, 1);
        assert_eq!(claims["htm"], "GET");
        assert_eq!(claims["htu"], "https://api.bank.example/accounts");
        let ath = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(sha2::Sha256::digest(b"at-123"));
        assert_eq!(claims["ath"], ath.as_str());
        assert!(claims.get("nonce").is_none());
        let header = jws_part(&first, 0);
        assert_eq!(
            (&header["typ"], &header["alg"]),
            (&json!("dpop+jwt"), &json!("ES256"))
        );
        assert!(header["jwk"].get("d").is_none(), "the public key only");
        assert!(!first.contains("at-123"));

        // The nonce is the server's: kept by origin, not sent elsewhere.
        r.keep_dpop_nonce("https://api.bank.example/other", "n-7")
            .unwrap();
        let second = jws_part(&r.dpop_proof("POST", url, &token).unwrap(), 1);
        assert_eq!(
            (&second["nonce"], &second["htm"]),
            (&json!("n-7"), &json!("POST"))
        );
        assert_ne!(second["jti"], claims["jti"]);
        let elsewhere = jws_part(
            &r.dpop_proof("GET", "https://other.example/", &token)
                .unwrap(),
            1,
        );
        assert!(elsewhere.get("nonce").is_none());
        // A nonce with spaces or controls is not a nonce: ignored.
        r.keep_dpop_nonce("https://other.example/", "a b").unwrap();
        let still = jws_part(
            &r.dpop_proof("GET", "https://other.example/", &token)
                .unwrap(),
            1,
        );
        assert!(still.get("nonce").is_none());

        for (m, u, name) in [
            ("GET", "/relative", "url"),
            ("GET", "ftp://x.example/", "url"),
            ("G ET", url, "method"),
            ("", url, "method"),
        ] {
            let e = r.dpop_proof(m, u, &token).unwrap_err();
            assert_eq!(e.code, ErrorCode::InvalidArgument);
            assert!(e.to_string().starts_with(name), "{e}");
        }
        let plain = Refresher::OAuth2(
            OAuth2Refresher::new(
                OAuth2Config {
                    token_url: "https://as.example/token".into(),
                    client_id: "c".into(),
                    client_secret: "s".into(),
                    ..Default::default()
                },
                http::new_client().unwrap(),
            )
            .unwrap(),
        );
        assert!(!plain.uses_dpop());
        let e = plain.dpop_proof("GET", url, &token).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidArgument);
    }

    #[test]
    fn each_method_takes_its_own_credentials_only() {
        let client = http::new_client().unwrap();
        let key = || {
            Some(SecretString::from(include_str!(
                "../../__test__/fixtures/jose/ec.pem"
            )))
        };
        let base = || OAuth2Config {
            token_url: "https://idp.example/token".into(),
            client_id: "c".into(),
            ..Default::default()
        };
        for (config, prefix) in [
            (
                OAuth2Config {
                    auth_method: AuthMethod::PrivateKeyJwt,
                    ..base()
                },
                "privateKey is required",
            ),
            (
                OAuth2Config {
                    auth_method: AuthMethod::PrivateKeyJwt,
                    private_key: key(),
                    client_secret: "s".into(),
                    ..base()
                },
                "clientSecret is only for",
            ),
            (
                OAuth2Config {
                    client_secret: "s".into(),
                    private_key: key(),
                    ..base()
                },
                "privateKey is only for private_key_jwt",
            ),
            (
                OAuth2Config {
                    client_secret: "s".into(),
                    audience: Some("x".into()),
                    ..base()
                },
                "audience is only for private_key_jwt",
            ),
            (
                OAuth2Config {
                    auth_method: AuthMethod::TlsClientAuth,
                    ..base()
                },
                "tls needs cert and key",
            ),
            (
                OAuth2Config {
                    auth_method: AuthMethod::SelfSignedTlsClientAuth,
                    client_certificate: true,
                    client_secret: "s".into(),
                    ..base()
                },
                "clientSecret is only for",
            ),
        ] {
            let e = OAuth2Refresher::new(config, client.clone()).unwrap_err();
            assert_eq!(e.code, ErrorCode::InvalidArgument);
            assert!(e.to_string().starts_with(prefix), "{e}");
        }
        let ok = OAuth2Config {
            auth_method: AuthMethod::TlsClientAuth,
            client_certificate: true,
            ..base()
        };
        assert!(OAuth2Refresher::new(ok, client).is_ok());
    }

    #[test]
    fn options_are_validated_and_secrets_redacted() {
        let client = http::new_client().unwrap();
        let base = || OAuth2Config {
            token_url: "https://idp.example/token".into(),
            client_id: "c".into(),
            client_secret: SECRET.into(),
            ..Default::default()
        };
        let r = OAuth2Refresher::new(base(), client.clone()).unwrap();
        assert!(!format!("{r:?}").contains("s3cr3t"));
        assert!(!format!("{r:?}").contains("Basic"));
        assert_eq!(
            AuthMethod::parse(Some("client_secret_post")).unwrap(),
            AuthMethod::ClientSecretPost
        );
        assert_eq!(
            AuthMethod::parse(Some("client_secret_jwt"))
                .unwrap_err()
                .code,
            ErrorCode::InvalidArgument
        );
        for (config, prefix) in [
            (
                OAuth2Config {
                    token_url: String::new(),
                    ..base()
                },
                "tokenUrl ",
            ),
            (
                OAuth2Config {
                    token_url: "http://idp.example/token".into(),
                    ..base()
                },
                "tokenUrl ",
            ),
            (
                OAuth2Config {
                    client_id: String::new(),
                    ..base()
                },
                "clientId ",
            ),
            (
                OAuth2Config {
                    client_secret: "".into(),
                    ..base()
                },
                "clientSecret ",
            ),
        ] {
            let e = OAuth2Refresher::new(config, client.clone()).unwrap_err();
            assert_eq!(e.code, ErrorCode::InvalidArgument);
            assert!(e.to_string().starts_with(prefix), "{e}");
        }
    }
}
