//! Errors with a stable `code` a caller can switch on. Messages never carry a
//! token, a secret or a provider's response body.

use thiserror::Error;

/// Stable error codes, as they reach JavaScript in `error.code`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// A caller passed a bad argument (surfaces as a `TypeError`).
    InvalidArgument,
    /// The refresh function (or provider) failed.
    RefreshFailed,
    /// The refresh did not settle within `refreshTimeoutMs`.
    RefreshTimeout,
    /// The refresh answered without a usable token or expiry.
    InvalidRefreshResult,
    /// The provider rejected the refresh grant: the user must reconnect.
    ReauthRequired,
    /// The provider rejected our client credentials.
    InvalidClient,
    /// Redis coordination was required (`onError: 'fail'`) but unavailable.
    CoordinatorUnavailable,
    /// A bug in this package (a caught Rust panic). Never expected.
    Internal,
}

impl ErrorCode {
    /// Every code, in the order the README's Errors table lists them.
    pub const ALL: [ErrorCode; 8] = [
        ErrorCode::InvalidArgument,
        ErrorCode::RefreshFailed,
        ErrorCode::RefreshTimeout,
        ErrorCode::InvalidRefreshResult,
        ErrorCode::ReauthRequired,
        ErrorCode::InvalidClient,
        ErrorCode::CoordinatorUnavailable,
        ErrorCode::Internal,
    ];

    /// The code `s` names, if it is one of ours.
    pub fn parse(s: &str) -> Option<ErrorCode> {
        Self::ALL.into_iter().find(|c| c.as_str() == s)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidArgument => "INVALID_ARGUMENT",
            ErrorCode::RefreshFailed => "REFRESH_FAILED",
            ErrorCode::RefreshTimeout => "REFRESH_TIMEOUT",
            ErrorCode::InvalidRefreshResult => "INVALID_REFRESH_RESULT",
            ErrorCode::ReauthRequired => "REAUTH_REQUIRED",
            ErrorCode::InvalidClient => "INVALID_CLIENT",
            ErrorCode::CoordinatorUnavailable => "COORDINATOR_UNAVAILABLE",
            ErrorCode::Internal => "INTERNAL",
        }
    }
}

/// An error from the core. `Display` is safe to show: it names arguments and
/// fields, never their values when those could be secrets.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum EngineError {
    #[error("{name} {problem}")]
    InvalidArgument { name: &'static str, problem: String },
    #[error("refresh result {0}")]
    InvalidRefreshResult(&'static str),
}

impl EngineError {
    pub fn code(&self) -> ErrorCode {
        match self {
            EngineError::InvalidArgument { .. } => ErrorCode::InvalidArgument,
            EngineError::InvalidRefreshResult(_) => ErrorCode::InvalidRefreshResult,
        }
    }

    pub fn invalid_argument(name: &'static str, problem: impl Into<String>) -> Self {
        EngineError::InvalidArgument {
            name,
            problem: problem.into(),
        }
    }
}
