//! `BindingRefresher`: a Tarabut or OAuth2 refresher (see
//! [`crate::refreshers`]) for `lib/refreshers.js`, which wraps it as
//! `tarabutRefresher()` / `oauth2Refresher()`.
//!
//! `refresh()` runs on napi's tokio runtime and always resolves: with the
//! token, or with `{ code, message, status?, error? }` (a tagged result, so
//! the HTTP status and the provider's `error` field reach JS without parsing
//! a message). Its budget is the caller's `timeoutMs` (the manager passes its
//! refresh timeout); when it runs out, or `abort(abortId)` is called, the
//! HTTP request is dropped, which aborts it.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use napi::bindgen_prelude::PromiseRaw;
use napi::Env;
use napi_derive::napi;
use parking_lot::Mutex;
use tokio::sync::oneshot;

use super::errors::{guard, Code, Result};
use super::manager::{TokenArg, UserIdArg};
use super::strings::{BoundedString, MAX_OPTION_BYTES, MAX_PEM_BYTES};
use crate::engine::{EngineError, ErrorCode, SecretString};

/// A string option, refused over [`MAX_OPTION_BYTES`] before any copy.
type OptionArg = BoundedString<MAX_OPTION_BYTES>;
/// PEM text (keys, certificates), refused over [`MAX_PEM_BYTES`].
type PemArg = BoundedString<MAX_PEM_BYTES>;
use crate::refreshers::http::TlsConfig;
use crate::refreshers::oauth2::DpopConfig;
use crate::refreshers::{
    http, AuthMethod, OAuth2Config, OAuth2Refresher, RefreshError, Refresher, TarabutConfig,
    TarabutRefresher, Token,
};

/// The `tls` option of both refreshers: PEM text.
#[napi(object, object_to_js = false)]
pub struct BindingTlsOptions {
    /// Client certificate chain (mutual TLS), with `key`.
    #[napi(ts_type = "string")]
    pub cert: Option<PemArg>,
    #[napi(ts_type = "string")]
    pub key: Option<PemArg>,
    /// Roots to trust instead of the built-in ones.
    #[napi(ts_type = "string")]
    pub ca: Option<PemArg>,
}

/// Options for `BindingRefresher.tarabut`.
#[napi(object, object_to_js = false)]
pub struct BindingTarabutOptions {
    #[napi(ts_type = "string")]
    pub client_id: OptionArg,
    #[napi(ts_type = "string")]
    pub client_secret: OptionArg,
    /// Default: Tarabut's sandbox token endpoint.
    #[napi(ts_type = "string")]
    pub token_url: Option<OptionArg>,
    #[napi(ts_type = "string")]
    pub scope: Option<OptionArg>,
    /// Budget of one refresh, all attempts. Default 30000.
    pub timeout_ms: Option<f64>,
    /// Retries of connection failures, 429 and 5xx. Default 3.
    pub max_retries: Option<f64>,
    pub tls: Option<BindingTlsOptions>,
}

/// Options for `BindingRefresher.oauth2`.
#[napi(object, object_to_js = false)]
pub struct BindingOAuth2Options {
    #[napi(ts_type = "string")]
    pub token_url: OptionArg,
    #[napi(ts_type = "string")]
    pub client_id: OptionArg,
    /// For `client_secret_basic` / `client_secret_post` only.
    #[napi(ts_type = "string")]
    pub client_secret: Option<OptionArg>,
    /// `'client_secret_basic'` (default), `'client_secret_post'`,
    /// `'private_key_jwt'`, `'tls_client_auth'` or
    /// `'self_signed_tls_client_auth'`.
    #[napi(ts_type = "string")]
    pub auth_method: Option<OptionArg>,
    /// `private_key_jwt`: PKCS#8 PEM, or a private JWK as JSON.
    #[napi(ts_type = "string")]
    pub private_key: Option<PemArg>,
    #[napi(ts_type = "string")]
    pub key_id: Option<OptionArg>,
    #[napi(ts_type = "string")]
    pub algorithm: Option<OptionArg>,
    #[napi(ts_type = "string")]
    pub audience: Option<OptionArg>,
    #[napi(ts_type = "string")]
    pub scope: Option<OptionArg>,
    /// Budget of one refresh. Default 30000.
    pub timeout_ms: Option<f64>,
    /// The RFC 7009 revocation endpoint.
    #[napi(ts_type = "string")]
    pub revocation_url: Option<OptionArg>,
    pub tls: Option<BindingTlsOptions>,
    pub dpop: Option<BindingDpopOptions>,
}

/// The `dpop` option of `BindingRefresher.oauth2`.
#[napi(object, object_to_js = false)]
pub struct BindingDpopOptions {
    /// PKCS#8 PEM, or a private JWK as JSON.
    #[napi(ts_type = "string")]
    pub private_key: PemArg,
    #[napi(ts_type = "string")]
    pub algorithm: Option<OptionArg>,
}

/// What `refresh` resolves to: the token, or (with `code` set) why not.
/// Fields are defined, never assigned (absent ones are `null`): a setter on
/// `Object.prototype` never sees a token.
#[napi(object, use_nullable = true)]
pub struct BindingRefreshOutcome {
    pub access_token: Option<String>,
    /// A rotated refresh token: the caller must persist it.
    pub refresh_token: Option<String>,
    /// Seconds.
    pub expires_in: Option<f64>,
    /// Set on failure: a stable code (`REAUTH_REQUIRED`, `INVALID_CLIENT`,
    /// `REFRESH_FAILED`, `REFRESH_TIMEOUT`, `INVALID_ARGUMENT`).
    pub code: Option<String>,
    /// On failure: a message safe to log (no token, secret or body).
    pub message: Option<String>,
    /// On failure: the token endpoint's HTTP status, when it answered.
    pub status: Option<u32>,
    /// On failure: the provider's `error` field, when it sent one.
    pub error: Option<String>,
}

#[napi]
pub struct BindingRefresher {
    inner: Arc<Refresher>,
    /// Calls that can be aborted, by the id the caller chose.
    aborts: Arc<Mutex<HashMap<u32, oneshot::Sender<()>>>>,
}

#[napi]
impl BindingRefresher {
    /// Tarabut Gateway's client-credentials token call.
    #[napi(factory)]
    pub fn tarabut(options: BindingTarabutOptions) -> Result<Self, Code> {
        guard(|| Self::tarabut_inner(options))
    }

    fn tarabut_inner(options: BindingTarabutOptions) -> Result<Self, Code> {
        let config = TarabutConfig {
            client_id: options.client_id.required("clientId").map_err(arg)?,
            client_secret: SecretString::new(
                options
                    .client_secret
                    .required("clientSecret")
                    .map_err(arg)?,
            ),
            token_url: optional(options.token_url, "tokenUrl")?,
            scope: optional(options.scope, "scope")?,
            timeout_ms: options.timeout_ms,
            max_retries: options.max_retries,
        };
        let tls = tls_config(options.tls)?;
        let client = http::client_for(tls.as_ref()).map_err(to_js)?;
        Ok(Self::wrap(Refresher::Tarabut(
            TarabutRefresher::new(config, client).map_err(to_js)?,
        )))
    }

    /// The RFC 6749 section 6 refresh_token grant.
    #[napi(factory)]
    pub fn oauth2(options: BindingOAuth2Options) -> Result<Self, Code> {
        guard(|| Self::oauth2_inner(options))
    }

    fn oauth2_inner(options: BindingOAuth2Options) -> Result<Self, Code> {
        let auth_method = optional(options.auth_method, "authMethod")?;
        let config = OAuth2Config {
            token_url: options.token_url.required("tokenUrl").map_err(arg)?,
            client_id: options.client_id.required("clientId").map_err(arg)?,
            client_secret: SecretString::new(
                optional(options.client_secret, "clientSecret")?.unwrap_or_default(),
            ),
            auth_method: AuthMethod::parse(auth_method.as_deref()).map_err(to_js)?,
            scope: optional(options.scope, "scope")?,
            timeout_ms: options.timeout_ms,
            revocation_url: optional(options.revocation_url, "revocationUrl")?,
            private_key: optional(options.private_key, "privateKey")?.map(SecretString::new),
            key_id: optional(options.key_id, "keyId")?,
            algorithm: optional(options.algorithm, "algorithm")?,
            audience: optional(options.audience, "audience")?,
            dpop: match options.dpop {
                None => None,
                Some(d) => Some(DpopConfig {
                    private_key: SecretString::new(
                        d.private_key.required("dpop.privateKey").map_err(arg)?,
                    ),
                    algorithm: optional(d.algorithm, "dpop.algorithm")?,
                }),
            },
            client_certificate: options
                .tls
                .as_ref()
                .is_some_and(|t| t.cert.is_some() && t.key.is_some()),
        };
        let tls = tls_config(options.tls)?;
        let client = http::client_for(tls.as_ref()).map_err(to_js)?;
        Ok(Self::wrap(Refresher::OAuth2(
            OAuth2Refresher::new(config, client).map_err(to_js)?,
        )))
    }

    fn wrap(refresher: Refresher) -> Self {
        Self {
            inner: Arc::new(refresher),
            aborts: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// One refresh for `userId` (OAuth2: with `refreshToken`), within
    /// `min(timeoutMs, the refresher's own timeoutMs)`. Never rejects for a
    /// failed refresh: the outcome carries `code`. With `abortId`, the call
    /// can be cut short by `abort(abortId)`.
    #[napi(ts_return_type = "Promise<BindingRefreshOutcome>")]
    pub fn refresh<'env>(
        &self,
        env: &'env Env,
        #[napi(ts_arg_type = "string")] user_id: UserIdArg,
        #[napi(ts_arg_type = "string | undefined | null")] refresh_token: Option<TokenArg>,
        timeout_ms: Option<f64>,
        abort_id: Option<u32>,
    ) -> Result<PromiseRaw<'env, BindingRefreshOutcome>, Code> {
        guard(|| {
            let user_id = user_id.required("userId").map_err(arg)?;
            let refresh_token = optional(refresh_token, "refreshToken")?;
            self.start(env, user_id, refresh_token, timeout_ms, abort_id)
        })
    }

    fn start<'env>(
        &self,
        env: &'env Env,
        user_id: String,
        refresh_token: Option<String>,
        timeout_ms: Option<f64>,
        abort_id: Option<u32>,
    ) -> Result<PromiseRaw<'env, BindingRefreshOutcome>, Code> {
        let inner = self.inner.clone();
        let refresh_token = refresh_token.map(SecretString::new);
        let timeout = timeout_arg(timeout_ms);
        // Registered before the future starts, so an abort that comes
        // before tokio polls it is not lost.
        let abort = abort_id.map(|id| {
            let (tx, rx) = oneshot::channel();
            self.aborts.lock().insert(id, tx);
            (id, rx, self.aborts.clone())
        });
        env.spawn_future(async move {
            let run = async {
                let timeout = timeout?;
                inner.refresh(&user_id, refresh_token.as_ref(), timeout).await
            };
            // No panic may cross into Node, nor leave the promise pending.
            let run = AssertUnwindSafe(run).catch_unwind();
            let result = match abort {
                None => run.await,
                Some((id, rx, aborts)) => {
                    let result = tokio::select! {
                        r = run => r,
                        _ = rx => Ok(Err(RefreshError::new(ErrorCode::RefreshFailed, "refresh aborted"))),
                    };
                    aborts.lock().remove(&id);
                    result
                }
            };
            Ok(match result {
                Ok(Ok(token)) => outcome(Some(token)),
                Ok(Err(e)) => failure(e),
                Err(_) => panicked(),
            })
        })
        .map_err(|_| napi::Error::new(Code(ErrorCode::Internal), "could not start the refresh"))
    }

    /// Whether `revoke` can run (an OAuth2 refresher with a revocation URL).
    #[napi]
    pub fn can_revoke(&self) -> Result<bool, Code> {
        guard(|| Ok(self.inner.can_revoke()))
    }

    /// RFC 7009: revokes `refreshToken` at the provider, within
    /// `min(timeoutMs, the refresher's own timeoutMs)`. Never rejects for a
    /// failed revocation: the outcome carries `code` (`REVOKE_FAILED`);
    /// success is an outcome with every field null.
    #[napi(ts_return_type = "Promise<BindingRefreshOutcome>")]
    pub fn revoke<'env>(
        &self,
        env: &'env Env,
        #[napi(ts_arg_type = "string")] refresh_token: TokenArg,
        timeout_ms: Option<f64>,
    ) -> Result<PromiseRaw<'env, BindingRefreshOutcome>, Code> {
        guard(|| {
            let refresh_token =
                SecretString::new(refresh_token.required("refreshToken").map_err(arg)?);
            let timeout = timeout_arg(timeout_ms);
            let inner = self.inner.clone();
            env.spawn_future(async move {
                let run = async { inner.revoke(&refresh_token, timeout?).await };
                let result = AssertUnwindSafe(run).catch_unwind().await;
                Ok(match result {
                    Ok(Ok(())) => outcome(None),
                    Ok(Err(e)) => failure(e),
                    Err(_) => panicked(),
                })
            })
            .map_err(|_| {
                napi::Error::new(Code(ErrorCode::Internal), "could not start the revocation")
            })
        })
    }

    /// Whether tokens are DPoP-bound (an OAuth2 refresher with `dpop`).
    #[napi]
    pub fn uses_dpop(&self) -> Result<bool, Code> {
        guard(|| Ok(self.inner.uses_dpop()))
    }

    /// A DPoP proof (a compact JWS) for `method` to `url` carrying
    /// `accessToken`'s hash (`ath`) and the nonce that server last gave.
    /// Signed here: the key never leaves Rust.
    #[napi]
    pub fn dpop_proof(
        &self,
        #[napi(ts_arg_type = "string")] method: OptionArg,
        #[napi(ts_arg_type = "string")] url: OptionArg,
        #[napi(ts_arg_type = "string")] access_token: TokenArg,
    ) -> Result<String, Code> {
        guard(|| {
            let method = method.required("method").map_err(arg)?;
            let url = url.required("url").map_err(arg)?;
            let token = SecretString::new(access_token.required("accessToken").map_err(arg)?);
            self.inner.dpop_proof(&method, &url, &token).map_err(to_js)
        })
    }

    /// Keeps `nonce` (a resource server's `DPoP-Nonce`) for later proofs
    /// to `url`'s origin.
    #[napi]
    pub fn keep_dpop_nonce(
        &self,
        #[napi(ts_arg_type = "string")] url: OptionArg,
        #[napi(ts_arg_type = "string")] nonce: OptionArg,
    ) -> Result<(), Code> {
        guard(|| {
            let url = url.required("url").map_err(arg)?;
            let nonce = nonce.required("nonce").map_err(arg)?;
            self.inner.keep_dpop_nonce(&url, &nonce).map_err(to_js)
        })
    }

    /// Aborts the call started with `abortId` (drops its HTTP request). A
    /// call already settled is left alone.
    #[napi]
    pub fn abort(&self, abort_id: u32) -> Result<(), Code> {
        guard(|| {
            if let Some(tx) = self.aborts.lock().remove(&abort_id) {
                let _ = tx.send(());
            }
            Ok(())
        })
    }
}

/// The caller's budget, checked before the call starts.
fn timeout_arg(timeout_ms: Option<f64>) -> std::result::Result<Option<Duration>, RefreshError> {
    match timeout_ms {
        None => Ok(None),
        Some(ms) if ms.is_finite() && ms >= 1.0 => Ok(Some(Duration::from_millis(ms as u64))),
        Some(_) => Err(RefreshError::invalid_argument(
            "timeoutMs",
            "must be a positive number of milliseconds",
        )),
    }
}

/// A success: the token, or (a revocation) none.
fn outcome(t: Option<Token>) -> BindingRefreshOutcome {
    BindingRefreshOutcome {
        access_token: t.as_ref().map(|t| t.access.expose().to_owned()),
        refresh_token: t
            .as_ref()
            .and_then(|t| t.refresh.as_ref())
            .map(|r| r.expose().to_owned()),
        expires_in: t.as_ref().map(|t| t.expires_in),
        code: None,
        message: None,
        status: None,
        error: None,
    }
}

fn panicked() -> BindingRefreshOutcome {
    failure(RefreshError::new(
        ErrorCode::Internal,
        "internal error in the native refresher (a bug: please report it)",
    ))
}

fn failure(e: RefreshError) -> BindingRefreshOutcome {
    BindingRefreshOutcome {
        access_token: None,
        refresh_token: None,
        expires_in: None,
        code: Some(e.code.as_str().to_owned()),
        message: Some(e.to_string()),
        status: e.status.map(u32::from),
        error: e.provider_error,
    }
}

fn tls_config(
    tls: Option<BindingTlsOptions>,
) -> std::result::Result<Option<TlsConfig>, napi::Error<Code>> {
    let Some(tls) = tls else { return Ok(None) };
    Ok(Some(TlsConfig {
        // Read first: a bad cert or ca leaves no key copy behind.
        cert: optional(tls.cert, "tls.cert")?,
        ca: optional(tls.ca, "tls.ca")?,
        key: optional(tls.key, "tls.key")?.map(SecretString::new),
    }))
}

fn to_js(e: RefreshError) -> napi::Error<Code> {
    napi::Error::new(Code(e.code), e.to_string())
}

fn arg(e: EngineError) -> napi::Error<Code> {
    napi::Error::new(Code(e.code()), e.to_string())
}

fn optional<const MAX: usize>(
    v: Option<BoundedString<MAX>>,
    name: &'static str,
) -> Result<Option<String>, Code> {
    v.map(|s| s.required(name)).transpose().map_err(arg)
}
