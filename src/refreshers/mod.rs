//! Native refreshers: the token endpoint calls most users need, run in Rust
//! on tokio with no JavaScript round trip. No napi types live here.
//!
//! - [`tarabut`]: Tarabut Gateway's client-credentials token call (safe to
//!   repeat, so retried).
//! - [`oauth2`]: the RFC 6749 section 6 `refresh_token` grant (never resent
//!   once it may have reached the server: with rotation a resend revokes the
//!   grant).
//! - [`http`]: the shared HTTP client, bounded reads and retry with backoff.
//!
//! Errors carry a stable [`ErrorCode`] and, where known, the HTTP status and
//! the provider's `error` field. Their `Display` never holds a token, a
//! secret, a URL or a response body.

pub mod http;
pub mod jose;
pub mod oauth2;
pub mod tarabut;

use std::time::Duration;

use thiserror::Error;

use crate::engine::policy::whole_ms;
use crate::engine::{ErrorCode, SecretString};

pub use oauth2::{AuthMethod, OAuth2Config, OAuth2Refresher};
pub use tarabut::{TarabutConfig, TarabutRefresher};

/// Budget of one refresh (all attempts) when nobody gives a shorter one;
/// the token manager's default `refreshTimeoutMs`.
pub const DEFAULT_TIMEOUT_MS: u64 = 30_000;
/// Largest `timeoutMs` accepted: ten minutes. A token call slower than that
/// is a hung call, not a policy.
pub const MAX_TIMEOUT_MS: u64 = 600_000;

/// A token a refresher obtained.
#[derive(Debug)]
pub struct Token {
    pub access: SecretString,
    /// A refresh token the server returned (rotation). The caller must
    /// persist it: the one it sent may no longer work.
    pub refresh: Option<SecretString>,
    /// Lifetime in seconds, as the server said.
    pub expires_in: f64,
}

/// Why a refresh failed. `Display` is safe to log: it names what happened,
/// never a token, a secret, a URL or a response body.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{message}")]
pub struct RefreshError {
    pub code: ErrorCode,
    /// The token endpoint's HTTP status, when it answered.
    pub status: Option<u16>,
    /// The provider's `error` field (e.g. `invalid_grant`), when it sent a
    /// short printable one.
    pub provider_error: Option<String>,
    message: String,
}

impl RefreshError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            status: None,
            provider_error: None,
            message: message.into(),
        }
    }

    pub fn invalid_argument(name: &str, problem: &str) -> Self {
        Self::new(ErrorCode::InvalidArgument, format!("{name} {problem}"))
    }

    pub fn timeout(budget: Duration) -> Self {
        Self::new(
            ErrorCode::RefreshTimeout,
            format!("refresh did not settle within {} ms", budget.as_millis()),
        )
    }

    /// The token endpoint answered with a status other than success.
    pub fn from_status(status: u16, provider_error: Option<String>) -> Self {
        let code = classify(status, provider_error.as_deref());
        let what = match code {
            ErrorCode::ReauthRequired => ": the grant is no longer valid, the user must reconnect",
            ErrorCode::InvalidClient => ": the client credentials were rejected",
            _ => "",
        };
        let message = match &provider_error {
            Some(e) => format!("token endpoint answered HTTP {status} ({e}){what}"),
            None => format!("token endpoint answered HTTP {status}{what}"),
        };
        Self {
            code,
            status: Some(status),
            provider_error,
            message,
        }
    }

    /// The revocation endpoint answered with a status other than success.
    pub fn revocation_status(status: u16, provider_error: Option<String>) -> Self {
        let message = match &provider_error {
            Some(e) => format!("revocation endpoint answered HTTP {status} ({e})"),
            None => format!("revocation endpoint answered HTTP {status}"),
        };
        Self {
            code: ErrorCode::RevokeFailed,
            status: Some(status),
            provider_error,
            message,
        }
    }

    /// The same failure, reported as a failed revocation.
    pub fn revoke_failed(self) -> Self {
        Self {
            code: ErrorCode::RevokeFailed,
            ..self
        }
    }

    /// A success status with a body we cannot use. `problem` is ours, never
    /// a piece of the body.
    pub fn malformed(status: u16, problem: &str) -> Self {
        Self {
            code: ErrorCode::RefreshFailed,
            status: Some(status),
            provider_error: None,
            message: format!("token endpoint answered HTTP {status} with {problem}"),
        }
    }
}

/// The stable code for a failed token call: `400 invalid_grant` means the
/// user must reconnect; `401` or `invalid_client` means our credentials are
/// wrong; anything else is a plain failure.
pub fn classify(status: u16, provider_error: Option<&str>) -> ErrorCode {
    match (status, provider_error) {
        (400, Some("invalid_grant")) => ErrorCode::ReauthRequired,
        (401, _) | (_, Some("invalid_client")) => ErrorCode::InvalidClient,
        _ => ErrorCode::RefreshFailed,
    }
}

/// Either native refresher, behind one call.
#[derive(Debug)]
pub enum Refresher {
    Tarabut(TarabutRefresher),
    OAuth2(OAuth2Refresher),
}

impl Refresher {
    /// Runs one refresh for `user` within `min(timeout, the refresher's own
    /// timeoutMs)`. When the budget runs out the HTTP request is dropped
    /// (aborted) and the error is `REFRESH_TIMEOUT`.
    pub async fn refresh(
        &self,
        user: &str,
        refresh_token: Option<&SecretString>,
        timeout: Option<Duration>,
    ) -> Result<Token, RefreshError> {
        let own = match self {
            Refresher::Tarabut(t) => t.timeout(),
            Refresher::OAuth2(o) => o.timeout(),
        };
        let budget = timeout.map_or(own, |t| t.min(own));
        let deadline = tokio::time::Instant::now() + budget;
        let call = async {
            match self {
                Refresher::Tarabut(t) => t.refresh(user, deadline).await,
                Refresher::OAuth2(o) => o.refresh(refresh_token, deadline).await,
            }
        };
        match tokio::time::timeout_at(deadline, call).await {
            Ok(result) => result,
            Err(_) => Err(RefreshError::timeout(budget)),
        }
    }

    /// Whether tokens are DPoP-bound: an OAuth2 refresher with `dpop`.
    pub fn uses_dpop(&self) -> bool {
        matches!(self, Refresher::OAuth2(o) if o.uses_dpop())
    }

    /// See [`OAuth2Refresher::resource_proof`]; `INVALID_ARGUMENT` without
    /// a DPoP key.
    pub fn dpop_proof(
        &self,
        method: &str,
        url: &str,
        access_token: &SecretString,
    ) -> Result<String, RefreshError> {
        match self {
            Refresher::OAuth2(o) => o.resource_proof(method, url, access_token),
            Refresher::Tarabut(_) => Err(no_dpop("dpopProof")),
        }
    }

    /// See [`OAuth2Refresher::keep_dpop_nonce`].
    pub fn keep_dpop_nonce(&self, url: &str, nonce: &str) -> Result<(), RefreshError> {
        match self {
            Refresher::OAuth2(o) => o.keep_dpop_nonce(url, nonce),
            Refresher::Tarabut(_) => Err(no_dpop("keepDpopNonce")),
        }
    }

    /// Whether [`Refresher::revoke`] can run: an OAuth2 refresher with a
    /// `revocationUrl`.
    pub fn can_revoke(&self) -> bool {
        matches!(self, Refresher::OAuth2(o) if o.can_revoke())
    }

    /// Revokes `refresh_token` at the provider (RFC 7009) within the same
    /// budget rule as [`Refresher::refresh`]. Every failure is
    /// `REVOKE_FAILED`, but a refresher that cannot revoke, which is
    /// `INVALID_ARGUMENT`.
    pub async fn revoke(
        &self,
        refresh_token: &SecretString,
        timeout: Option<Duration>,
    ) -> Result<(), RefreshError> {
        let Refresher::OAuth2(o) = self else {
            return Err(RefreshError::invalid_argument(
                "refresher",
                "cannot revoke: only oauth2Refresher with a revocationUrl can",
            ));
        };
        let budget = timeout.map_or(o.timeout(), |t| t.min(o.timeout()));
        let deadline = tokio::time::Instant::now() + budget;
        match tokio::time::timeout_at(deadline, o.revoke(refresh_token, deadline)).await {
            Ok(result) => result,
            Err(_) => Err(RefreshError::new(
                ErrorCode::RevokeFailed,
                format!("revocation did not settle within {} ms", budget.as_millis()),
            )),
        }
    }
}

fn no_dpop(what: &str) -> RefreshError {
    RefreshError::invalid_argument(what, "needs a refresher made with the dpop option")
}

/// `timeoutMs` as it arrives from JavaScript.
pub fn timeout_option(name: &'static str, value: Option<f64>) -> Result<Duration, RefreshError> {
    let ms = match value {
        None => DEFAULT_TIMEOUT_MS,
        Some(v) => whole_ms(name, v, 1, MAX_TIMEOUT_MS)
            .map_err(|e| RefreshError::new(e.code(), e.to_string()))?,
    };
    Ok(Duration::from_millis(ms))
}

/// A required non-empty string option (client ids and secrets).
pub(crate) fn required(name: &str, value: &str) -> Result<(), RefreshError> {
    if value.is_empty() {
        return Err(RefreshError::invalid_argument(
            name,
            "must be a non-empty string",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_follow_the_readme_errors_table() {
        assert_eq!(
            classify(400, Some("invalid_grant")),
            ErrorCode::ReauthRequired
        );
        assert_eq!(classify(401, None), ErrorCode::InvalidClient);
        assert_eq!(
            classify(401, Some("invalid_grant")),
            ErrorCode::InvalidClient
        );
        assert_eq!(
            classify(400, Some("invalid_client")),
            ErrorCode::InvalidClient
        );
        assert_eq!(
            classify(400, Some("invalid_request")),
            ErrorCode::RefreshFailed
        );
        assert_eq!(classify(400, None), ErrorCode::RefreshFailed);
        assert_eq!(classify(503, None), ErrorCode::RefreshFailed);
    }

    #[test]
    fn status_errors_carry_status_and_provider_error() {
        let e = RefreshError::from_status(400, Some("invalid_grant".into()));
        assert_eq!(e.code, ErrorCode::ReauthRequired);
        assert_eq!(e.status, Some(400));
        assert_eq!(e.provider_error.as_deref(), Some("invalid_grant"));
        assert_eq!(e.to_string(), "token endpoint answered HTTP 400 (invalid_grant): the grant is no longer valid, the user must reconnect");
        assert_eq!(
            RefreshError::from_status(500, None).to_string(),
            "token endpoint answered HTTP 500"
        );
    }

    #[test]
    fn timeout_option_validates() {
        assert_eq!(
            timeout_option("timeoutMs", None).unwrap(),
            Duration::from_millis(DEFAULT_TIMEOUT_MS)
        );
        assert_eq!(
            timeout_option("timeoutMs", Some(250.0)).unwrap(),
            Duration::from_millis(250)
        );
        for bad in [0.0, -1.0, 1.5, f64::NAN, f64::INFINITY, 1e9] {
            let e = timeout_option("timeoutMs", Some(bad)).unwrap_err();
            assert_eq!(e.code, ErrorCode::InvalidArgument);
            assert!(e.to_string().starts_with("timeoutMs "), "{e}");
        }
    }
}
