//! HTTP for the refreshers: one shared client (rustls, no redirects),
//! bounded response reads, and retry with jittered exponential backoff that
//! honours `Retry-After` and never sleeps past the deadline.

use std::future::Future;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use once_cell::sync::OnceCell;
use rand::Rng;
use reqwest::header::{HeaderMap, RETRY_AFTER};
use reqwest::{Certificate, Client, ClientBuilder, Identity, RequestBuilder, Url};
use tokio::time::Instant;
use zeroize::Zeroize;

use super::RefreshError;
use crate::engine::{ErrorCode, SecretString};

/// Token answers are a few hundred bytes; anything past this is not one.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

static SHARED: OnceCell<Client> = OnceCell::new();

/// The process-wide client: one connection pool (and TLS session cache) for
/// every refresher. Built on first use; a failure (no TLS backend) is an
/// error for the caller, not a panic.
pub fn shared_client() -> Result<Client, RefreshError> {
    SHARED.get_or_try_init(new_client).cloned()
}

/// A client configured as the shared one. Tests build their own: pooled
/// connections belong to the tokio runtime that opened them.
pub fn new_client() -> Result<Client, RefreshError> {
    builder()
        .build()
        .map_err(|_| RefreshError::new(ErrorCode::RefreshFailed, "could not build the HTTP client"))
}

fn builder() -> ClientBuilder {
    Client::builder()
        .use_rustls_tls()
        // A token endpoint that redirects is misconfigured; following it
        // would resend the client secret (and a refresh token) elsewhere.
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("tarabut-token-manager/", env!("CARGO_PKG_VERSION")))
        // Below common server keep-alive timeouts (Node's is 5 s): reusing
        // a connection the server is closing fails a request that may have
        // been sent, which an OAuth2 refresh must not resend.
        .pool_idle_timeout(Duration::from_secs(4))
}

/// The `tls` option: PEM text. `cert` + `key` present a client certificate
/// (mutual TLS); `ca` replaces the built-in roots.
#[derive(Default)]
pub struct TlsConfig {
    /// The client certificate chain, leaf first.
    pub cert: Option<String>,
    pub key: Option<SecretString>,
    /// The roots to trust instead of the built-in ones.
    pub ca: Option<String>,
}

impl std::fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConfig")
            .field("cert", &self.cert.is_some())
            .field("key", &self.key.as_ref().map(|_| "<redacted>"))
            .field("ca", &self.ca.is_some())
            .finish()
    }
}

impl TlsConfig {
    /// Whether a client certificate is presented.
    pub fn has_identity(&self) -> bool {
        self.cert.is_some() && self.key.is_some()
    }
}

/// The client for a refresher: the shared one, or with `tls` one of its own
/// (its own pool: connections made with a client certificate or other roots
/// must not serve another refresher). Every problem with the PEM text is an
/// `INVALID_ARGUMENT` naming the option, found here, before any request.
pub fn client_for(tls: Option<&TlsConfig>) -> Result<Client, RefreshError> {
    let Some(tls) = tls else {
        return shared_client();
    };
    let mut builder = builder();
    if let Some(ca) = &tls.ca {
        let roots = Certificate::from_pem_bundle(ca.as_bytes())
            .ok()
            .filter(|r| !r.is_empty())
            .ok_or_else(|| {
                RefreshError::invalid_argument("tls.ca", "must hold PEM certificates")
            })?;
        builder = builder.tls_built_in_root_certs(false);
        for root in roots {
            builder = builder.add_root_certificate(root);
        }
    }
    match (&tls.cert, &tls.key) {
        (None, None) => {}
        (Some(_), None) => {
            return Err(RefreshError::invalid_argument(
                "tls.key",
                "is required with tls.cert",
            ))
        }
        (None, Some(_)) => {
            return Err(RefreshError::invalid_argument(
                "tls.cert",
                "is required with tls.key",
            ))
        }
        (Some(cert), Some(key)) => {
            if !cert.contains("-----BEGIN CERTIFICATE-----") {
                return Err(RefreshError::invalid_argument(
                    "tls.cert",
                    "must hold a PEM certificate chain",
                ));
            }
            if cert.contains("PRIVATE KEY-----") {
                return Err(RefreshError::invalid_argument(
                    "tls.cert",
                    "must hold certificates only (the key goes in tls.key)",
                ));
            }
            if !key.expose().contains("PRIVATE KEY-----") {
                return Err(RefreshError::invalid_argument(
                    "tls.key",
                    "must hold a PEM private key",
                ));
            }
            // reqwest reads the key and the chain from one PEM buffer.
            let mut pem = SecretBytes::default();
            pem.extend(key.expose().as_bytes());
            pem.extend(b"\n");
            pem.extend(cert.as_bytes());
            let identity = Identity::from_pem(pem.as_ref()).map_err(|_| {
                RefreshError::invalid_argument("tls.key", "must hold a PEM private key")
            })?;
            builder = builder.identity(identity);
        }
    }
    builder.build().map_err(|_| {
        let name = if tls.has_identity() { "tls.key" } else { "tls.ca" };
        let problem = if tls.has_identity() {
            "could not be used: it must be the private key (PKCS#8, PKCS#1 or SEC1 PEM) of tls.cert's first certificate"
        } else {
            "could not be used as trusted roots"
        };
        RefreshError::invalid_argument(name, problem)
    })
}

/// A token endpoint URL: absolute, https (plain http only to a loopback
/// host, for tests and local mocks), no credentials or fragment in it.
pub fn token_url(name: &str, value: &str) -> Result<Url, RefreshError> {
    let url = Url::parse(value)
        .map_err(|_| RefreshError::invalid_argument(name, "must be an absolute URL"))?;
    let loopback = match url.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    };
    match url.scheme() {
        "https" => {}
        "http" if loopback => {}
        _ => {
            return Err(RefreshError::invalid_argument(
                name,
                "must be an https URL (http only for a loopback host)",
            ))
        }
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(RefreshError::invalid_argument(
            name,
            "must not carry credentials",
        ));
    }
    if url.fragment().is_some() {
        return Err(RefreshError::invalid_argument(
            name,
            "must not have a fragment",
        ));
    }
    Ok(url)
}

/// Bytes that may hold a secret: a request body with the client secret or a
/// refresh token, a token endpoint's answer. Wiped when dropped; `Debug`
/// shows the length only. (Copies inside the HTTP stack, such as hyper's
/// write buffer and the chunks it reads into, are out of our reach.)
#[derive(Default)]
pub struct SecretBytes(Vec<u8>);

impl SecretBytes {
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(bytes)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Appends `more`. When the buffer must grow, the old one is wiped
    /// before it is freed (a plain `Vec` would leave it behind).
    pub fn extend(&mut self, more: &[u8]) {
        let needed = self.0.len() + more.len();
        if needed > self.0.capacity() {
            let mut grown = Vec::with_capacity(needed.max(2 * self.0.capacity()).max(1024));
            grown.extend_from_slice(&self.0);
            let mut old = std::mem::replace(&mut self.0, grown);
            old.zeroize();
        }
        self.0.extend_from_slice(more);
    }

    /// A request body over these bytes: attempts clone the handle (no
    /// copy), and the bytes are wiped when the last handle drops.
    pub fn into_body(self) -> Bytes {
        Bytes::from_owner(self)
    }
}

impl From<&str> for SecretBytes {
    fn from(s: &str) -> Self {
        Self(s.as_bytes().to_vec())
    }
}

impl AsRef<[u8]> for SecretBytes {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for SecretBytes {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl std::fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretBytes(<{} bytes redacted>)", self.0.len())
    }
}

/// One HTTP exchange with the token endpoint. `Debug` never shows the body.
#[derive(Debug)]
pub enum Attempt {
    /// The server answered and the whole body was read.
    Answered {
        status: u16,
        retry_after: Option<Duration>,
        body: SecretBytes,
        /// A `DPoP-Nonce` header (RFC 9449 section 8), when short and printable.
        dpop_nonce: Option<String>,
    },
    /// The server answered, but the body was too large or broke off.
    BrokenBody { status: u16 },
    /// No answer. `sent`: the request may have reached the server (anything
    /// but a failure to connect).
    Failed { sent: bool, error: RefreshError },
}

/// Sends `request` to a token endpoint and reads at most
/// [`MAX_BODY_BYTES`] of the answer. Dropping the future aborts the request.
pub async fn send(request: RequestBuilder) -> Attempt {
    send_to(request, "token").await
}

/// [`send`] to the `endpoint` its transport errors name ("token",
/// "revocation").
pub async fn send_to(request: RequestBuilder, endpoint: &'static str) -> Attempt {
    let mut response = match request.send().await {
        Ok(r) => r,
        Err(e) => {
            return Attempt::Failed {
                sent: !e.is_connect(),
                error: transport_error(&e, endpoint),
            }
        }
    };
    let status = response.status().as_u16();
    let retry_after = retry_after(response.headers(), SystemTime::now());
    let dpop_nonce = response
        .headers()
        .get("dpop-nonce")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 512)
        .map(String::from);
    let mut body = SecretBytes::default();
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > MAX_BODY_BYTES {
                    return Attempt::BrokenBody { status };
                }
                body.extend(&chunk);
            }
            Ok(None) => {
                return Attempt::Answered {
                    status,
                    retry_after,
                    body,
                    dpop_nonce,
                }
            }
            Err(_) => return Attempt::BrokenBody { status },
        }
    }
}

/// A transport failure, described without the URL (reqwest's own message
/// includes it) or anything the server sent.
fn transport_error(e: &reqwest::Error, endpoint: &str) -> RefreshError {
    let kind = io_kind(e).map(|k| format!(" ({k:?})")).unwrap_or_default();
    let what = if e.is_connect() {
        format!("could not connect to the {endpoint} endpoint")
    } else if e.is_timeout() {
        format!("the {endpoint} request timed out")
    } else {
        format!("the {endpoint} request failed before an answer arrived")
    };
    RefreshError::new(ErrorCode::RefreshFailed, format!("{what}{kind}"))
}

fn io_kind(e: &reqwest::Error) -> Option<std::io::ErrorKind> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return Some(io.kind());
        }
        source = s.source();
    }
    None
}

/// `Retry-After` as delay-seconds or an HTTP-date (RFC 9110 section 10.2.3).
pub fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// What one attempt concluded.
pub enum Verdict<T> {
    Done(Result<T, RefreshError>),
    /// Worth another try after at least `after` (the server's Retry-After).
    Retry {
        error: RefreshError,
        after: Option<Duration>,
    },
}

/// Backoff between attempts: "equal jitter" (half the exponential step
/// fixed, half random), so retries from many users spread out but never
/// come back at once.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub base: Duration,
    pub cap: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            base: Duration::from_millis(100),
            cap: Duration::from_secs(5),
        }
    }
}

impl Backoff {
    /// The wait before retry number `retry` (0 = first retry): the jittered
    /// step, or the server's Retry-After if that is longer.
    pub fn delay(&self, retry: u32, retry_after: Option<Duration>) -> Duration {
        let step = self
            .base
            .saturating_mul(1u32 << retry.min(16))
            .min(self.cap);
        let half = step / 2;
        let jitter = Duration::from_nanos(rand::rng().random_range(0..=half.as_nanos() as u64));
        let wait = half + jitter;
        retry_after.map_or(wait, |ra| ra.max(wait))
    }
}

/// Runs `attempt` until it is done, `max_retries` retries are used up, or the
/// next wait would end past `deadline`; then the last error stands (more
/// useful than a timeout when the server said 503 or Retry-After: 3600).
pub async fn with_retries<T, F, Fut>(
    deadline: Instant,
    max_retries: u32,
    backoff: Backoff,
    mut attempt: F,
) -> Result<T, RefreshError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Verdict<T>>,
{
    let mut retries = 0;
    loop {
        match attempt().await {
            Verdict::Done(result) => return result,
            Verdict::Retry { error, after } => {
                if retries >= max_retries {
                    return Err(error);
                }
                // A wait past the deadline (a Retry-After of 10^19 s, which
                // would overflow an Instant) ends the retries at once.
                let wait = backoff.delay(retries, after);
                match Instant::now().checked_add(wait) {
                    Some(end) if end < deadline => {}
                    _ => return Err(error),
                }
                tokio::time::sleep(wait).await;
                retries += 1;
            }
        }
    }
}

/// The provider's `error` field from an error answer, kept only when it
/// looks like an OAuth error code (short, printable ASCII): it goes into
/// messages and onto the JS error, so it must not be able to carry a body.
pub fn provider_error(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct ErrorBody {
        error: Option<serde_json::Value>,
    }
    let parsed: ErrorBody = serde_json::from_slice(body).ok()?;
    let serde_json::Value::String(e) = parsed.error? else {
        return None;
    };
    let printable = e
        .bytes()
        .all(|b| (0x20..=0x7e).contains(&b) && b != b'"' && b != b'\\');
    (!e.is_empty() && e.len() <= 64 && printable).then_some(e)
}

/// `expires_in` as a positive number of seconds; some servers send it as a
/// numeric string.
pub fn expires_in(value: Option<&serde_json::Value>) -> Option<f64> {
    let v = match value? {
        serde_json::Value::Number(n) => n.as_f64()?,
        serde_json::Value::String(s) => s.trim().parse::<f64>().ok()?,
        _ => return None,
    };
    (v.is_finite() && v > 0.0 && v <= 1e10).then_some(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    fn headers(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(RETRY_AFTER, HeaderValue::from_str(v).unwrap());
        h
    }

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        let now = httpdate::parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT").unwrap();
        assert_eq!(
            retry_after(&headers("3"), now),
            Some(Duration::from_secs(3))
        );
        assert_eq!(retry_after(&headers(" 0 "), now), Some(Duration::ZERO));
        assert_eq!(
            retry_after(&headers("Sun, 06 Nov 1994 08:49:40 GMT"), now),
            Some(Duration::from_secs(3))
        );
        assert_eq!(
            retry_after(&headers("Sun, 06 Nov 1994 08:49:30 GMT"), now),
            Some(Duration::ZERO),
            "a past date means now"
        );
        assert_eq!(retry_after(&headers("soon"), now), None);
        assert_eq!(retry_after(&headers("-1"), now), None);
        assert_eq!(retry_after(&HeaderMap::new(), now), None);
    }

    #[test]
    fn retry_after_beyond_any_instant_is_read_without_overflow() {
        let now = SystemTime::now();
        let huge = retry_after(&headers("10000000000000000000"), now).unwrap();
        assert_eq!(huge, Duration::from_secs(10_000_000_000_000_000_000));
        assert!(Instant::now().checked_add(huge).is_none());
        assert_eq!(retry_after(&headers("99999999999999999999999"), now), None);
    }

    #[tokio::test]
    async fn a_wait_past_the_deadline_ends_the_retries_without_panicking() {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut attempts = 0;
        let started = Instant::now();
        let r: Result<(), RefreshError> = with_retries(deadline, 3, Backoff::default(), || {
            attempts += 1;
            async {
                Verdict::Retry {
                    error: RefreshError::from_status(429, None),
                    after: Some(Duration::from_secs(10_000_000_000_000_000_000)),
                }
            }
        })
        .await;
        assert_eq!(r.unwrap_err().status, Some(429));
        assert_eq!(attempts, 1);
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn secret_bytes_grow_keep_their_content_and_never_print_it() {
        let mut b = SecretBytes::default();
        for _ in 0..300 {
            b.extend(b"client-secret=s3cr3t&");
        }
        assert_eq!(b.len(), 300 * 21);
        assert!(b.as_ref().starts_with(b"client-secret=s3cr3t&client"));
        let attempt = Attempt::Answered {
            status: 200,
            retry_after: None,
            body: b,
            dpop_nonce: None,
        };
        let shown = format!("{attempt:?}");
        assert!(!shown.contains("s3cr3t"), "{shown}");
        assert!(shown.contains("6300 bytes redacted"), "{shown}");
        let body = SecretBytes::from("refresh_token=rt-secret").into_body();
        assert_eq!(&body[..], b"refresh_token=rt-secret");
    }

    #[test]
    fn backoff_grows_is_capped_and_honours_retry_after() {
        let b = Backoff {
            base: Duration::from_millis(100),
            cap: Duration::from_millis(1000),
        };
        for _ in 0..200 {
            let d0 = b.delay(0, None);
            assert!(
                d0 >= Duration::from_millis(50) && d0 <= Duration::from_millis(100),
                "{d0:?}"
            );
            let d2 = b.delay(2, None);
            assert!(
                d2 >= Duration::from_millis(200) && d2 <= Duration::from_millis(400),
                "{d2:?}"
            );
            let d9 = b.delay(40, None);
            assert!(
                d9 >= Duration::from_millis(500) && d9 <= Duration::from_millis(1000),
                "{d9:?}"
            );
            assert!(b.delay(0, Some(Duration::from_secs(2))) == Duration::from_secs(2));
        }
    }

    const CA: &str = include_str!("../../__test__/fixtures/tls/ca.pem");
    const CERT: &str = include_str!("../../__test__/fixtures/tls/client.pem");
    const KEY: &str = include_str!("../../__test__/fixtures/tls/client.key");
    const OTHER_KEY: &str = include_str!("../../__test__/fixtures/tls/self-signed.key");

    fn tls(cert: Option<&str>, key: Option<&str>, ca: Option<&str>) -> TlsConfig {
        TlsConfig {
            cert: cert.map(String::from),
            key: key.map(SecretString::from),
            ca: ca.map(String::from),
        }
    }

    #[test]
    fn tls_options_are_checked_at_construction_and_never_shown() {
        assert!(client_for(Some(&tls(Some(CERT), Some(KEY), Some(CA)))).is_ok());
        assert!(client_for(Some(&tls(None, None, Some(CA)))).is_ok());
        assert!(client_for(Some(&tls(Some(CERT), Some(KEY), None))).is_ok());
        for (config, name) in [
            (tls(Some(CERT), None, None), "tls.key "),
            (tls(None, Some(KEY), None), "tls.cert "),
            (tls(None, None, Some("not pem")), "tls.ca "),
            (tls(None, None, Some(KEY)), "tls.ca "),
            (tls(Some("not pem"), Some(KEY), None), "tls.cert "),
            (tls(Some(KEY), Some(KEY), None), "tls.cert "),
            (tls(Some(CERT), Some(CERT), None), "tls.key "),
            (tls(Some(CERT), Some(OTHER_KEY), None), "tls.key "),
            (
                tls(
                    Some(CERT),
                    Some("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"),
                    None,
                ),
                "tls.key ",
            ),
        ] {
            let e = client_for(Some(&config)).unwrap_err();
            assert_eq!(e.code, ErrorCode::InvalidArgument, "{e}");
            assert!(e.to_string().starts_with(name), "{e}");
            assert!(!e.to_string().contains("BEGIN"), "{e}");
        }
        let shown = format!("{:?}", tls(Some(CERT), Some(KEY), Some(CA)));
        assert!(!shown.contains("PRIVATE"), "{shown}");
    }

    #[test]
    fn token_urls_must_be_https_except_loopback() {
        assert!(token_url("tokenUrl", "https://oauth.example.com/token").is_ok());
        assert!(token_url("tokenUrl", "http://127.0.0.1:8080/token").is_ok());
        assert!(token_url("tokenUrl", "http://localhost/token").is_ok());
        assert!(token_url("tokenUrl", "http://[::1]:9/token").is_ok());
        for bad in [
            "http://oauth.example.com/token",
            "ftp://127.0.0.1/x",
            "/token",
            "",
            "https://user:pass@oauth.example.com/token",
            "https://oauth.example.com/token#x",
        ] {
            let e = token_url("tokenUrl", bad).unwrap_err();
            assert_eq!(e.code, ErrorCode::InvalidArgument, "{bad}");
            assert!(!e.to_string().contains("pass"), "{e}");
        }
    }

    #[test]
    fn provider_error_is_kept_only_when_it_looks_like_a_code() {
        assert_eq!(
            provider_error(br#"{"error":"invalid_grant","error_description":"x"}"#).as_deref(),
            Some("invalid_grant")
        );
        assert_eq!(provider_error(br#"{"error":42}"#), None);
        assert_eq!(provider_error(br#"{"message":"nope"}"#), None);
        assert_eq!(provider_error(b"<html>"), None);
        let long = format!(r#"{{"error":"{}"}}"#, "a".repeat(65));
        assert_eq!(provider_error(long.as_bytes()), None);
        assert_eq!(
            provider_error("{\"error\":\"bad\\nline\"}".as_bytes()),
            None
        );
    }

    #[test]
    fn expires_in_accepts_numbers_and_numeric_strings() {
        use serde_json::json;
        assert_eq!(expires_in(Some(&json!(3600))), Some(3600.0));
        assert_eq!(expires_in(Some(&json!("120"))), Some(120.0));
        assert_eq!(expires_in(Some(&json!(0))), None);
        assert_eq!(expires_in(Some(&json!(-5))), None);
        assert_eq!(expires_in(Some(&json!("soon"))), None);
        assert_eq!(expires_in(Some(&json!(null))), None);
        assert_eq!(expires_in(None), None);
    }
}
