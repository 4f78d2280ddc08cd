//! Errors with a stable `code` a caller can switch on. Messages never carry a
//! token, a secret or a provider's response body.

use thiserror::Error;

/// Writes the codes once: the enum, its strings and [`ErrorCode::ALL`],
/// which the binding hands to JavaScript (`errorCodes()`, read by
/// `lib/errors.js`; a test keeps README and `index.d.ts` in step with it).
macro_rules! codes {
    ($($(#[$doc:meta])* $variant:ident = $code:literal,)*) => {
        /// Stable error codes, as they reach JavaScript in `error.code`.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum ErrorCode {
            $($(#[$doc])* $variant,)*
        }

        impl ErrorCode {
            /// Every code, in the order README's Errors table lists them.
            pub const ALL: &[ErrorCode] = &[$(ErrorCode::$variant,)*];

            pub fn as_str(self) -> &'static str {
                match self {
                    $(ErrorCode::$variant => $code,)*
                }
            }

            /// The code `s` names, if it is one of ours.
            pub fn parse(s: &str) -> Option<ErrorCode> {
                Self::ALL.iter().copied().find(|c| c.as_str() == s)
            }
        }
    };
}

codes! {
    /// A caller passed a bad argument (surfaces as a `TypeError`).
    InvalidArgument = "INVALID_ARGUMENT",
    /// The refresh function (or provider) failed.
    RefreshFailed = "REFRESH_FAILED",
    /// The refresh did not settle within `refreshTimeoutMs`.
    RefreshTimeout = "REFRESH_TIMEOUT",
    /// The refresh answered without a usable token or expiry.
    InvalidRefreshResult = "INVALID_REFRESH_RESULT",
    /// The provider rejected the refresh grant: the user must reconnect.
    ReauthRequired = "REAUTH_REQUIRED",
    /// The store holds no token for the user (never connected, or
    /// forgotten): they must connect their bank first.
    NotConnected = "NOT_CONNECTED",
    /// `options.store` failed to load the user's token.
    StoreFailed = "STORE_FAILED",
    /// The provider rejected our client credentials.
    InvalidClient = "INVALID_CLIENT",
    /// The provider's revocation endpoint (RFC 7009) did not confirm.
    RevokeFailed = "REVOKE_FAILED",
    /// Redis coordination was required (`onError: 'fail'`) but unavailable.
    CoordinatorUnavailable = "COORDINATOR_UNAVAILABLE",
    /// A bug in this package (a caught Rust panic). Never expected.
    Internal = "INTERNAL",
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
