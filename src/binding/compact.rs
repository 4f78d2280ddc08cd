//! The refresh path's two calls, answering with numbers.
//!
//! `begin` and `complete` answer with objects; napi-rs builds a JS object at
//! ~250 ns a property plus a JS string per token. index.js needs only a
//! flight id or an expiry in the common cases, and already holds the token
//! strings, so these variants answer with a number and leave building the
//! caller's object to JS (~10 ns). The decisions are the core's, exactly as
//! in `begin` / `complete`.

use napi::bindgen_prelude::Either;
use napi_derive::napi;

use super::error::{guard, to_js, Code, Result};
use super::manager::{presented, NativeManager, Plan};
use crate::engine::{time, Plan as CorePlan, Refreshed, SecretString};

#[napi]
impl NativeManager {
    /// `begin`, answering the common plans with a number:
    /// - `null`: use the presented token;
    /// - `n >= 0`: lead flight `n`, refreshing with the refresh token the
    ///   caller presented;
    /// - `n < 0`: join flight `-n - 1`;
    /// - a `Plan` otherwise (a held token, or a lead with a refresh token
    ///   the core holds).
    #[napi(ts_return_type = "number | Plan | null")]
    pub fn begin_compact(
        &self,
        user_id: String,
        access_token: String,
        refresh_token: Option<String>,
        expires_at_ms: f64,
    ) -> Result<Option<Either<f64, Plan>>, Code> {
        guard(|| {
            let presented = presented(access_token, refresh_token, expires_at_ms)?;
            let plan = self
                .engine
                .begin(&user_id, &presented, time::now_ms())
                .map_err(to_js)?;
            Ok(match plan {
                CorePlan::UsePresented => None,
                CorePlan::Join(id) => Some(Either::A(-(id as f64) - 1.0)),
                CorePlan::Lead { id, refresh_token } if refresh_token == presented.refresh => {
                    Some(Either::A(id as f64))
                }
                CorePlan::Lead { id, refresh_token } => Some(Either::B(Plan {
                    kind: "lead".into(),
                    flight_id: Some(id),
                    access_token: None,
                    refresh_token: refresh_token.as_ref().map(|s| s.expose().to_owned()),
                    expires_at_ms: None,
                    should_update: None,
                })),
                CorePlan::UseHeld(t) => Some(Either::B(Plan {
                    kind: "held".into(),
                    flight_id: None,
                    access_token: Some(t.access.expose().to_owned()),
                    refresh_token: t.refresh.as_ref().map(|s| s.expose().to_owned()),
                    expires_at_ms: Some(t.expires_at as f64),
                    should_update: Some(t.should_update),
                })),
            })
        })
    }

    /// `complete`, answering with the issued token's expiry (epoch ms): the
    /// caller already has the access token. Positive when the caller is to
    /// be handed the refresh token in the result (it rotated), negative
    /// when it is handed none.
    #[napi]
    pub fn complete_compact(
        &self,
        user_id: String,
        flight_id: u32,
        access_token: Option<String>,
        refresh_token: Option<String>,
        expires_at_ms: Option<f64>,
        expires_in: Option<f64>,
    ) -> Result<f64, Code> {
        guard(|| {
            let returned = refresh_token.map(SecretString::new);
            let refreshed = Refreshed {
                access: access_token.map(SecretString::new),
                refresh: returned.clone(),
                expires_at: expires_at_ms.filter(|v| v.is_finite()).map(|v| v as i64),
                expires_in,
            };
            let issued = self
                .engine
                .complete(&user_id, flight_id, refreshed, time::now_ms())
                .map_err(to_js)?;
            let expires = issued.expires_at as f64;
            Ok(match issued.refresh {
                Some(r) if Some(&r) == returned.as_ref() => expires,
                Some(_) => {
                    // The engine hands the leader only the result's refresh
                    // token; anything else is a bug, not a secret to leak.
                    return Err(napi::Error::new(
                        Code(crate::engine::ErrorCode::Internal),
                        "issued an unexpected refresh token",
                    ));
                }
                None => -expires,
            })
        })
    }
}
