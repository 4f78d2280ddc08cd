//! Tarabut Gateway's token call: a client-credentials POST per user.
//!
//! `POST {tokenUrl}` with `Content-Type: application/json`, the header
//! `X-TG-CustomerUserId: <userId>` (at most 40 characters) and the body
//! `{"clientId","clientSecret","grantType":"client_credentials","scope"?}`;
//! the answer is `{"accessToken","tokenType","expiresIn"}`. Asking again is
//! harmless (it mints a token, it consumes nothing), so connection failures,
//! 429 (after Retry-After) and 5xx are retried within the deadline.

use std::time::Duration;

use bytes::Bytes;
use reqwest::header::{HeaderValue, ACCEPT, CONTENT_TYPE};
use reqwest::{Client, Url};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::http::{self, Attempt, Backoff, SecretBytes, Verdict};
use super::{required, RefreshError, Token};
use crate::engine::policy::whole;
use crate::engine::SecretString;

/// Tarabut's sandbox token endpoint; production is set with `tokenUrl`.
pub const DEFAULT_TOKEN_URL: &str = "https://oauth.tarabutgateway.io/sandbox/token";
/// Tarabut's limit on `X-TG-CustomerUserId`.
pub const MAX_USER_ID_CHARS: usize = 40;
pub const DEFAULT_MAX_RETRIES: u32 = 3;
/// More retries than this only hammer a server that is down.
pub const MAX_RETRIES_LIMIT: u32 = 10;
pub const USER_HEADER: &str = "x-tg-customeruserid";

/// Options as the binding hands them over.
#[derive(Debug)]
pub struct TarabutConfig {
    pub client_id: String,
    pub client_secret: SecretString,
    pub token_url: Option<String>,
    pub scope: Option<String>,
    pub timeout_ms: Option<f64>,
    pub max_retries: Option<f64>,
}

impl Default for TarabutConfig {
    fn default() -> Self {
        Self {
            client_id: String::new(),
            client_secret: SecretString::new(String::new()),
            token_url: None,
            scope: None,
            timeout_ms: None,
            max_retries: None,
        }
    }
}

pub struct TarabutRefresher {
    client: Client,
    url: Url,
    /// The request body is the same for every user: serialised once. It
    /// holds the client secret: every attempt shares this buffer, which is
    /// wiped when the refresher and its last request are gone.
    body: Bytes,
    max_retries: u32,
    timeout: Duration,
    backoff: Backoff,
}

impl std::fmt::Debug for TarabutRefresher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TarabutRefresher")
            .field("max_retries", &self.max_retries)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Request<'a> {
    client_id: &'a str,
    client_secret: &'a str,
    grant_type: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    scope: Option<&'a str>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Answer {
    access_token: Option<serde_json::Value>,
    expires_in: Option<serde_json::Value>,
}

impl TarabutRefresher {
    pub fn new(config: TarabutConfig, client: Client) -> Result<Self, RefreshError> {
        required("clientId", &config.client_id)?;
        required("clientSecret", config.client_secret.expose())?;
        let url = http::token_url(
            "tokenUrl",
            config.token_url.as_deref().unwrap_or(DEFAULT_TOKEN_URL),
        )?;
        let scope = config.scope.as_deref().filter(|s| !s.is_empty());
        let max_retries = match config.max_retries {
            None => DEFAULT_MAX_RETRIES,
            Some(v) => whole(v, 0, MAX_RETRIES_LIMIT.into()).ok_or_else(|| {
                RefreshError::invalid_argument(
                    "maxRetries",
                    &format!("must be a whole number from 0 to {MAX_RETRIES_LIMIT}"),
                )
            })? as u32,
        };
        let timeout = super::timeout_option("timeoutMs", config.timeout_ms)?;
        let body = serde_json::to_vec(&Request {
            client_id: &config.client_id,
            client_secret: config.client_secret.expose(),
            grant_type: "client_credentials",
            scope,
        })
        .map_err(|_| RefreshError::invalid_argument("options", "could not be serialised"))?;
        Ok(Self {
            client,
            url,
            body: SecretBytes::new(body).into_body(),
            max_retries,
            timeout,
            backoff: Backoff::default(),
        })
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// For tests: faster backoff.
    pub fn with_backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// The user id as the header needs it; checked before any request.
    pub fn user_header(user: &str) -> Result<HeaderValue, RefreshError> {
        if user.is_empty() {
            return Err(RefreshError::invalid_argument(
                "userId",
                "must be a non-empty string",
            ));
        }
        if user.chars().count() > MAX_USER_ID_CHARS {
            return Err(RefreshError::invalid_argument(
                "userId",
                &format!("must be at most {MAX_USER_ID_CHARS} characters for Tarabut (X-TG-CustomerUserId)"),
            ));
        }
        // Header values are visible ASCII; anything else would be mangled.
        if !user.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
            return Err(RefreshError::invalid_argument(
                "userId",
                "must be printable ASCII without spaces for Tarabut (X-TG-CustomerUserId)",
            ));
        }
        HeaderValue::from_str(user)
            .map_err(|_| RefreshError::invalid_argument("userId", "is not a valid header value"))
    }

    /// One token for `user`, retrying what is safe to retry until `deadline`.
    pub async fn refresh(&self, user: &str, deadline: Instant) -> Result<Token, RefreshError> {
        let user_header = Self::user_header(user)?;
        http::with_retries(deadline, self.max_retries, self.backoff, || {
            let request = self
                .client
                .post(self.url.clone())
                .header(CONTENT_TYPE, "application/json")
                .header(ACCEPT, "application/json")
                .header(USER_HEADER, user_header.clone())
                .body(self.body.clone());
            async move { judge(http::send(request).await) }
        })
        .await
    }
}

fn judge(attempt: Attempt) -> Verdict<Token> {
    match attempt {
        // Nothing was consumed: any failure before an answer is retried.
        Attempt::Failed { error, .. } => Verdict::Retry { error, after: None },
        Attempt::BrokenBody { status } if status >= 500 => Verdict::Retry {
            error: RefreshError::from_status(status, None),
            after: None,
        },
        Attempt::BrokenBody { status } if (200..300).contains(&status) => Verdict::Retry {
            error: RefreshError::malformed(status, "a body that broke off or is too large"),
            after: None,
        },
        Attempt::BrokenBody { status } => {
            Verdict::Done(Err(RefreshError::from_status(status, None)))
        }
        Attempt::Answered {
            status,
            retry_after,
            body,
            ..
        } => {
            if (200..300).contains(&status) {
                return Verdict::Done(parse(status, body.as_ref()));
            }
            let error = RefreshError::from_status(status, http::provider_error(body.as_ref()));
            if status == 429 || status >= 500 {
                Verdict::Retry {
                    error,
                    after: retry_after,
                }
            } else {
                Verdict::Done(Err(error))
            }
        }
    }
}

fn parse(status: u16, body: &[u8]) -> Result<Token, RefreshError> {
    let answer: Answer = serde_json::from_slice(body)
        .map_err(|_| RefreshError::malformed(status, "a body that is not a JSON object"))?;
    let access = match answer.access_token {
        Some(serde_json::Value::String(s)) if !s.is_empty() => SecretString::new(s),
        _ => return Err(RefreshError::malformed(status, "no accessToken string")),
    };
    let expires_in = http::expires_in(answer.expires_in.as_ref())
        .ok_or_else(|| RefreshError::malformed(status, "no positive expiresIn"))?;
    Ok(Token {
        access,
        refresh: None,
        expires_in,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::ErrorCode;
    use crate::refreshers::Refresher;
    use serde_json::json;
    use wiremock::matchers::{body_json, header, method, path};
    use wiremock::{Mock, MockServer, ResponseTemplate};

    const SECRET: &str = "s3cr3t-client-secret";

    fn fast() -> Backoff {
        Backoff {
            base: Duration::from_millis(10),
            cap: Duration::from_millis(40),
        }
    }

    fn refresher(server: &MockServer, max_retries: Option<f64>) -> Refresher {
        let config = TarabutConfig {
            client_id: "client-1".into(),
            client_secret: SECRET.into(),
            token_url: Some(format!("{}/sandbox/token", server.uri())),
            max_retries,
            ..Default::default()
        };
        Refresher::Tarabut(
            TarabutRefresher::new(config, http::new_client().unwrap())
                .unwrap()
                .with_backoff(fast()),
        )
    }

    fn ok(token: &str) -> ResponseTemplate {
        ResponseTemplate::new(200).set_body_json(
            json!({ "accessToken": token, "tokenType": "Bearer", "expiresIn": 3600 }),
        )
    }

    async fn requests(server: &MockServer) -> usize {
        server.received_requests().await.map_or(0, |r| r.len())
    }

    const BUDGET: Option<Duration> = Some(Duration::from_secs(10));

    #[tokio::test]
    async fn posts_the_documented_request_and_reads_the_token() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .and(path("/sandbox/token"))
            .and(header("content-type", "application/json"))
            .and(header("x-tg-customeruserid", "user-42"))
            .and(body_json(json!({ "clientId": "client-1", "clientSecret": SECRET, "grantType": "client_credentials" })))
            .respond_with(ok("tok-1"))
            .expect(1)
            .mount(&server)
            .await;
        let t = refresher(&server, None)
            .refresh("user-42", None, BUDGET)
            .await
            .unwrap();
        assert_eq!(t.access.expose(), "tok-1");
        assert_eq!(t.expires_in, 3600.0);
        assert!(t.refresh.is_none());
    }

    #[tokio::test]
    async fn sends_scope_when_set() {
        let server = MockServer::start().await;
        Mock::given(body_json(json!({
            "clientId": "client-1", "clientSecret": SECRET, "grantType": "client_credentials", "scope": "accounts payments"
        })))
        .respond_with(ok("tok-s"))
        .expect(1)
        .mount(&server)
        .await;
        let config = TarabutConfig {
            client_id: "client-1".into(),
            client_secret: SECRET.into(),
            token_url: Some(server.uri()),
            scope: Some("accounts payments".into()),
            ..Default::default()
        };
        let r =
            Refresher::Tarabut(TarabutRefresher::new(config, http::new_client().unwrap()).unwrap());
        assert_eq!(
            r.refresh("u", None, BUDGET).await.unwrap().access.expose(),
            "tok-s"
        );
    }

    #[tokio::test]
    async fn bad_user_ids_fail_before_any_request() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(ok("never"))
            .mount(&server)
            .await;
        let r = refresher(&server, None);
        let forty = "u".repeat(40);
        assert!(
            r.refresh(&forty, None, BUDGET).await.is_ok(),
            "40 characters is the limit, not over it"
        );
        let before = requests(&server).await;
        for bad in [
            "u".repeat(41),
            "é".repeat(41),
            "has space".into(),
            "naïve".into(),
            String::new(),
        ] {
            let e = r.refresh(&bad, None, BUDGET).await.unwrap_err();
            assert_eq!(e.code, ErrorCode::InvalidArgument, "{bad}");
            assert!(e.to_string().starts_with("userId "), "{e}");
        }
        assert_eq!(requests(&server).await, before);
    }

    #[tokio::test]
    async fn retries_5xx_then_succeeds() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(503))
            .up_to_n_times(2)
            .mount(&server)
            .await;
        Mock::given(method("POST"))
            .respond_with(ok("tok-after-503"))
            .mount(&server)
            .await;
        let t = refresher(&server, None)
            .refresh("u", None, BUDGET)
            .await
            .unwrap();
        assert_eq!(t.access.expose(), "tok-after-503");
        assert_eq!(requests(&server).await, 3);
    }

    #[tokio::test]
    async fn gives_up_after_max_retries_with_the_last_status() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(500))
            .mount(&server)
            .await;
        let e = refresher(&server, Some(2.0))
            .refresh("u", None, BUDGET)
            .await
            .unwrap_err();
        assert_eq!((e.code, e.status), (ErrorCode::RefreshFailed, Some(500)));
        assert_eq!(requests(&server).await, 3, "one try and two retries");

        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(500))
            .mount(&server)
            .await;
        refresher(&server, Some(0.0))
            .refresh("u", None, BUDGET)
            .await
            .unwrap_err();
        assert_eq!(requests(&server).await, 1);
    }

    #[tokio::test]
    async fn honours_retry_after_on_429() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(429).insert_header("retry-after", "1"))
            .up_to_n_times(1)
            .mount(&server)
            .await;
        Mock::given(method("POST"))
            .respond_with(ok("tok-after-429"))
            .mount(&server)
            .await;
        let started = std::time::Instant::now();
        let t = refresher(&server, None)
            .refresh("u", None, BUDGET)
            .await
            .unwrap();
        assert_eq!(t.access.expose(), "tok-after-429");
        assert!(
            started.elapsed() >= Duration::from_millis(990),
            "waited {:?}",
            started.elapsed()
        );
        assert_eq!(requests(&server).await, 2);
    }

    #[tokio::test]
    async fn a_retry_after_past_the_deadline_ends_with_the_429() {
        // 10^19 s does not fit an Instant: it used to panic the worker.
        for wait in ["3600", "10000000000000000000"] {
            let server = MockServer::start().await;
            Mock::given(method("POST"))
                .respond_with(ResponseTemplate::new(429).insert_header("retry-after", wait))
                .mount(&server)
                .await;
            let e = refresher(&server, None)
                .refresh("u", None, Some(Duration::from_secs(5)))
                .await
                .unwrap_err();
            assert_eq!((e.code, e.status), (ErrorCode::RefreshFailed, Some(429)));
            assert_eq!(requests(&server).await, 1);
        }
    }

    #[tokio::test]
    async fn client_errors_are_not_retried() {
        for (status, body, code) in [
            (
                401,
                json!({ "error": "unauthorized" }),
                ErrorCode::InvalidClient,
            ),
            (
                400,
                json!({ "error": "invalid_client" }),
                ErrorCode::InvalidClient,
            ),
            (
                400,
                json!({ "error": "invalid_grant" }),
                ErrorCode::ReauthRequired,
            ),
            (403, json!({}), ErrorCode::RefreshFailed),
        ] {
            let server = MockServer::start().await;
            Mock::given(method("POST"))
                .respond_with(ResponseTemplate::new(status).set_body_json(&body))
                .mount(&server)
                .await;
            let e = refresher(&server, None)
                .refresh("u", None, BUDGET)
                .await
                .unwrap_err();
            assert_eq!((e.code, e.status), (code, Some(status)), "{body}");
            assert_eq!(e.provider_error.as_deref(), body["error"].as_str());
            assert_eq!(requests(&server).await, 1);
        }
    }

    #[tokio::test]
    async fn malformed_answers_fail_without_echoing_the_body() {
        for body in [
            "{not json".to_string(),
            json!({ "accessToken": "tok-x", "tokenType": "Bearer" }).to_string(),
            json!({ "expiresIn": 60 }).to_string(),
            json!({ "accessToken": "", "expiresIn": 60 }).to_string(),
            json!({ "accessToken": "tok-x", "expiresIn": -1 }).to_string(),
        ] {
            let server = MockServer::start().await;
            Mock::given(method("POST"))
                .respond_with(ResponseTemplate::new(200).set_body_string(&body))
                .mount(&server)
                .await;
            let e = refresher(&server, None)
                .refresh("u", None, BUDGET)
                .await
                .unwrap_err();
            assert_eq!(
                (e.code, e.status),
                (ErrorCode::RefreshFailed, Some(200)),
                "{body}"
            );
            assert!(
                !e.to_string().contains("tok-x") && !e.to_string().contains("not json"),
                "{e}"
            );
            assert_eq!(requests(&server).await, 1, "a malformed 200 is not retried");
        }
    }

    #[tokio::test]
    async fn a_slow_answer_times_out() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(ok("late").set_delay(Duration::from_secs(5)))
            .mount(&server)
            .await;
        let e = refresher(&server, None)
            .refresh("u", None, Some(Duration::from_millis(200)))
            .await
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::RefreshTimeout);
        assert_eq!(e.to_string(), "refresh did not settle within 200 ms");
    }

    #[tokio::test]
    async fn connection_refused_is_reported_without_the_url() {
        // A port nothing listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let config = TarabutConfig {
            client_id: "c".into(),
            client_secret: SECRET.into(),
            token_url: Some(format!("http://127.0.0.1:{port}/token")),
            max_retries: Some(2.0),
            ..Default::default()
        };
        let r = Refresher::Tarabut(
            TarabutRefresher::new(config, http::new_client().unwrap())
                .unwrap()
                .with_backoff(fast()),
        );
        let e = r.refresh("u", None, BUDGET).await.unwrap_err();
        assert_eq!((e.code, e.status), (ErrorCode::RefreshFailed, None));
        assert!(
            e.to_string()
                .starts_with("could not connect to the token endpoint"),
            "{e}"
        );
        assert!(
            !e.to_string().contains("127.0.0.1"),
            "no URL in messages: {e}"
        );
    }

    #[test]
    fn options_are_validated_and_secrets_redacted() {
        let client = http::new_client().unwrap();
        let base = || TarabutConfig {
            client_id: "c".into(),
            client_secret: SECRET.into(),
            ..Default::default()
        };
        let r = TarabutRefresher::new(base(), client.clone()).unwrap();
        assert_eq!(r.url.as_str(), DEFAULT_TOKEN_URL);
        assert_eq!(r.max_retries, DEFAULT_MAX_RETRIES);
        assert!(!format!("{r:?}").contains(SECRET));
        let cases: Vec<(TarabutConfig, &str)> = vec![
            (
                TarabutConfig {
                    client_id: String::new(),
                    ..base()
                },
                "clientId ",
            ),
            (
                TarabutConfig {
                    client_secret: "".into(),
                    ..base()
                },
                "clientSecret ",
            ),
            (
                TarabutConfig {
                    token_url: Some("http://tarabut.example/token".into()),
                    ..base()
                },
                "tokenUrl ",
            ),
            (
                TarabutConfig {
                    max_retries: Some(11.0),
                    ..base()
                },
                "maxRetries ",
            ),
            (
                TarabutConfig {
                    max_retries: Some(-1.0),
                    ..base()
                },
                "maxRetries ",
            ),
            (
                TarabutConfig {
                    timeout_ms: Some(0.0),
                    ..base()
                },
                "timeoutMs ",
            ),
        ];
        for (config, prefix) in cases {
            let e = TarabutRefresher::new(config, client.clone()).unwrap_err();
            assert_eq!(e.code, ErrorCode::InvalidArgument);
            assert!(e.to_string().starts_with(prefix), "{e}");
            assert!(!e.to_string().contains(SECRET));
        }
    }
}
