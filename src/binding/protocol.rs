//! The wire protocol between `lib/protocol.js` and the engine: the calls
//! every `getValidToken` makes (`isFresh` on every call, `begin` and
//! `complete` on every refresh) as plain Node-API functions bound to one
//! engine, below napi-rs's generated glue, answering with numbers where a
//! number will do. The encoders are here ([`encode_plan`], [`encode_brief`]);
//! the one decoder is `lib/protocol.js`. Every answer:
//!
//! | call | answer | meaning |
//! |---|---|---|
//! | `isFresh(expiresAtMs, nowMs?)` | `true` / `false` | hand the presented token back / take the slow path |
//! | `begin(...)` | `null` | the presented token is good ([`Plan::UsePresented`]) |
//! | | `n >= 0` | lead flight `n` with the presented refresh token ([`Plan::Lead`]) |
//! | | `n < 0` | join flight `-n - 1` ([`Plan::Join`]) |
//! | | `{ kind: 'lead', flightId, refreshToken? }` | lead with a newer refresh token the engine holds |
//! | | `{ kind: 'held', accessToken, refreshToken?, expiresAtMs, shouldUpdate }` | use a token a refresh produced ([`Plan::UseHeld`]) |
//! | `complete(...)` | `e > 0` | issued, expires at `e`; the caller is handed the refresh token it passed (rotated) |
//! | | `e < 0` | issued, expires at `-e`; no refresh token handed (not rotated) |
//!
//! Each call's last argument, `nowMs`, is the caller's clock (`Date.now()`
//! as `lib/manager.js` read it; see `engine/time.rs`, "Clocks"): `begin(userId,
//! accessToken, refreshToken, expiresAtMs, nowMs)`, `complete(userId,
//! flightId, accessToken, refreshToken, expiresAtMs, expiresIn, nowMs)`.
//! `isFresh` is called without it when that clock is the unreplaced
//! `Date.now`: its answer is the system clock, read here for less.
//!
//! (An issued expiry is always after `now`, so never 0.) Errors are thrown
//! with the stable `code`, as napi-rs throws them; a panic becomes
//! `INTERNAL` and never unwinds into Node.
//!
//! Why not napi-rs methods: a napi-rs 3 class method costs ~700 ns a call
//! here before doing any work (receiver unwrap, type-tag check, a
//! process-wide borrow registry), and a `#[napi(object)]` answer ~250 ns a
//! property. A Node-API function whose callback data is the engine costs the
//! call itself (~50 ns), and a number lets JS build the caller's object
//! (~10 ns). `begin` reads the presented access token only if the engine
//! asks for it: on most refreshes it is never copied or hashed.
//!
//! Each function holds an `Arc<Engine>`, released by a finalizer when the
//! function is collected or its environment torn down.

use std::ffi::{c_char, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr;
use std::sync::Arc;

use super::errors::Code;
use super::strings::{self, type_of, Text};
use crate::engine::{
    time, validate_user, Engine, EngineError, ErrorCode, IssuedBrief, Plan, Refreshed,
    SecretString, MAX_TOKEN_BYTES, MAX_USER_ID_BYTES,
};
use napi::bindgen_prelude::{ToNapiValue, TypeName};
use napi::sys::{self, napi_callback_info, napi_env, napi_value};
use napi::ValueType;

/// `{ isFresh, begin, complete }`, each bound to `engine`.
pub fn bind(env: napi_env, engine: &Arc<Engine>) -> Result<JsRaw, napi::Error<Code>> {
    type Callback = unsafe extern "C" fn(napi_env, napi_callback_info) -> napi_value;
    let fns: [(&'static CStr, Callback); 3] = [
        (c"isFresh", is_fresh),
        (c"begin", begin),
        (c"complete", complete),
    ];
    // SAFETY: `env` is the live environment of the calling napi export.
    unsafe {
        let mut obj = Object::default();
        for (name, cb) in fns {
            let data = Arc::into_raw(engine.clone()) as *mut c_void;
            let mut f = ptr::null_mut();
            let created = ok(sys::napi_create_function(
                env,
                name.as_ptr(),
                name.count_bytes() as isize,
                Some(cb),
                data,
                &mut f,
            ))
            .and_then(|_| {
                ok(sys::napi_add_finalizer(
                    env,
                    f,
                    data,
                    Some(release),
                    ptr::null_mut(),
                    ptr::null_mut(),
                ))
            });
            if created.is_err() {
                // `f` (if made) is unreachable and never called. Functions
                // already on `obj` are released when it is collected.
                drop(Arc::from_raw(data as *const Engine));
                return Err(internal("could not create the native functions"));
            }
            obj.field(name, f);
        }
        let obj = obj
            .build(env)
            .map_err(|_| internal("could not create the native functions"))?;
        Ok(JsRaw(obj))
    }
}

/// `isFresh(expiresAtMs, nowMs)`: [`Engine::is_fresh`]; without `nowMs`
/// (the caller's clock is the unreplaced `Date.now`, the system clock),
/// [`Engine::is_fresh_now`]. Anything but numbers a `Date` can hold answers
/// `false`: the slow path's `begin` then refuses them with
/// `INVALID_ARGUMENT`.
unsafe extern "C" fn is_fresh(env: napi_env, info: napi_callback_info) -> napi_value {
    // SAFETY (all callbacks): Node calls them with a valid env and callback
    // info; their data is the `Arc<Engine>` pointer given at creation, alive
    // until `release`, which runs after the last call.
    unsafe {
        let mut argc = 2usize;
        let mut argv = [ptr::null_mut(); 2];
        let mut data = ptr::null_mut();
        let mut fresh = false;
        if sys::napi_get_cb_info(
            env,
            info,
            &mut argc,
            argv.as_mut_ptr(),
            ptr::null_mut(),
            &mut data,
        ) == sys::Status::napi_ok
            && !data.is_null()
        {
            let mut ms = f64::NAN;
            if sys::napi_get_value_double(env, argv[0], &mut ms) == sys::Status::napi_ok {
                let engine = &*(data as *const Engine);
                // Out of a Date's range: not fresh, so `begin` refuses it.
                if argc < 2 {
                    if let Some(ms) = time::js_ms(ms) {
                        fresh = catch_unwind(AssertUnwindSafe(|| engine.is_fresh_now(ms)))
                            .unwrap_or(false);
                    }
                } else {
                    let mut now = f64::NAN;
                    sys::napi_get_value_double(env, argv[1], &mut now);
                    if let (Some(ms), Some(now)) = (time::js_ms(ms), time::js_ms(now)) {
                        fresh = catch_unwind(AssertUnwindSafe(|| engine.is_fresh(ms, now)))
                            .unwrap_or(false);
                    }
                }
            }
        }
        let mut out = ptr::null_mut();
        sys::napi_get_boolean(env, fresh, &mut out);
        out
    }
}

/// `begin(userId, accessToken, refreshToken, expiresAtMs, nowMs)`: the engine's
/// plan ([`Engine::begin`]), encoded by [`encode_plan`].
unsafe extern "C" fn begin(env: napi_env, info: napi_callback_info) -> napi_value {
    unsafe {
        call::<5>(env, info, |engine, a| {
            let user = user_id(env, a[0])?;
            // Measured, not copied: the access token crosses only if the
            // engine needs to compare it (a held token, revocations),
            // rarely on a refresh.
            let access_units = strings::measure(env, a[1], MAX_TOKEN_BYTES).map_err(|t| {
                t.required("token.accessToken")
                    .err()
                    .unwrap_or_else(unreadable)
            })?;
            let refresh = token(env, a[2], "token.refreshToken")?.map(SecretString::new);
            let expires_at =
                time::from_js_ms("token.expiresAt", number(env, a[3], "token.expiresAt")?)?;
            let now = now_ms(env, a[4])?;
            let fingerprint = || {
                let token = token(env, a[1], "token.accessToken")
                    .ok()
                    .flatten()
                    .map(SecretString::new)
                    .ok_or_else(|| {
                        EngineError::invalid_argument("token.accessToken", "could not be read")
                    })?;
                Ok(token.fingerprint())
            };
            let plan = engine.begin(
                &user,
                access_units == 0,
                refresh.as_ref(),
                expires_at,
                fingerprint,
                now,
            )?;
            encode_plan(env, plan, refresh.as_ref())
        })
    }
}

/// A [`Plan`] as `begin` answers it (the table at the top of this file).
/// `presented_refresh` is the refresh token the caller passed: a lead with
/// that one needs no object.
unsafe fn encode_plan(
    env: napi_env,
    plan: Plan,
    presented_refresh: Option<&SecretString>,
) -> Result<napi_value, Thrown> {
    unsafe {
        Ok(match plan {
            Plan::UsePresented => null(env),
            Plan::Join(id) => double(env, -(id as f64) - 1.0),
            Plan::Lead { id, refresh_token } if refresh_token.as_ref() == presented_refresh => {
                double(env, id as f64)
            }
            Plan::Lead { id, refresh_token } => {
                let mut o = Object::default();
                o.field(c"kind", string_value(env, "lead")?);
                o.field(c"flightId", double(env, id as f64));
                if let Some(r) = &refresh_token {
                    o.field(c"refreshToken", string_value(env, r.expose())?);
                }
                o.build(env)?
            }
            Plan::UseHeld(t) => {
                let mut o = Object::default();
                o.field(c"kind", string_value(env, "held")?);
                o.field(c"accessToken", string_value(env, t.access.expose())?);
                if let Some(r) = &t.refresh {
                    o.field(c"refreshToken", string_value(env, r.expose())?);
                }
                o.field(c"expiresAtMs", double(env, t.expires_at as f64));
                o.field(c"shouldUpdate", boolean(env, t.should_update));
                o.build(env)?
            }
        })
    }
}

/// `complete(userId, flightId, accessToken, refreshToken, expiresAtMs,
/// expiresIn, nowMs)`: hands the refresh result to the engine
/// ([`Engine::complete`]); answers [`encode_brief`]. Throws
/// `INVALID_REFRESH_RESULT` when the result is unusable.
unsafe extern "C" fn complete(env: napi_env, info: napi_callback_info) -> napi_value {
    unsafe {
        call::<7>(env, info, |engine, a| {
            let user = user_id(env, a[0])?;
            let mut flight_id = 0u32;
            if sys::napi_get_value_uint32(env, a[1], &mut flight_id) != sys::Status::napi_ok {
                return Err(EngineError::invalid_argument("flightId", "must be a number").into());
            }
            // A token over the limit is an unusable refresh result.
            let refreshed_token = |v, name| match strings::read(env, v, MAX_TOKEN_BYTES) {
                Text::TooLong { .. } => Err(Thrown::from(EngineError::InvalidRefreshResult(
                    "has a token longer than 65536 bytes",
                ))),
                t => t.optional(name).map_err(Thrown::from),
            };
            let refreshed = Refreshed {
                access: refreshed_token(a[2], "accessToken")?.map(SecretString::new),
                refresh: refreshed_token(a[3], "refreshToken")?.map(SecretString::new),
                expires_at: opt_number(env, a[4], "expiresAtMs")?,
                expires_in: opt_number(env, a[5], "expiresIn")?,
            };
            let now = now_ms(env, a[6])?;
            let issued = engine.complete(&user, flight_id, refreshed, now)?;
            Ok(double(env, encode_brief(issued)))
        })
    }
}

/// What `complete` answers: the issued expiry, its sign saying whether the
/// caller is handed the refresh token it passed (the table above).
fn encode_brief(issued: IssuedBrief) -> f64 {
    let expires = issued.expires_at as f64;
    if issued.hands_refresh {
        expires
    } else {
        -expires
    }
}

unsafe extern "C" fn release(_env: napi_env, data: *mut c_void, _hint: *mut c_void) {
    // SAFETY: `data` came from `Arc::into_raw` in `functions`; Node runs
    // each function's finalizer once.
    unsafe { drop(Arc::from_raw(data as *const Engine)) }
}

/// What a call throws: an engine error (with its code) or an internal one.
struct Thrown(ErrorCode, String);

impl From<EngineError> for Thrown {
    fn from(e: EngineError) -> Self {
        Thrown(e.code(), e.to_string())
    }
}

/// Reads `N` arguments (missing ones are `undefined`) and the engine, runs
/// `f`, and throws what it returns as an error; a panic throws `INTERNAL`.
unsafe fn call<const N: usize>(
    env: napi_env,
    info: napi_callback_info,
    f: impl FnOnce(&Engine, &[napi_value; N]) -> Result<napi_value, Thrown>,
) -> napi_value {
    unsafe {
        let mut argc = N;
        let mut argv = [ptr::null_mut(); N];
        let mut data = ptr::null_mut();
        let status = sys::napi_get_cb_info(
            env,
            info,
            &mut argc,
            argv.as_mut_ptr(),
            ptr::null_mut(),
            &mut data,
        );
        let result = if status != sys::Status::napi_ok || data.is_null() {
            Err(Thrown(
                ErrorCode::Internal,
                "native call without its engine".into(),
            ))
        } else {
            let engine = &*(data as *const Engine);
            catch_unwind(AssertUnwindSafe(|| f(engine, &argv))).unwrap_or_else(|_| {
                Err(Thrown(
                    ErrorCode::Internal,
                    "internal error in tarabut-token-manager (a bug: please report it)".into(),
                ))
            })
        };
        match result {
            Ok(v) => v,
            Err(Thrown(code, message)) => {
                let message = CString::new(message).unwrap_or_else(|_| c"error".to_owned());
                let code = CString::new(code.as_str()).unwrap_or_else(|_| c"INTERNAL".to_owned());
                sys::napi_throw_error(env, code.as_ptr(), message.as_ptr());
                ptr::null_mut()
            }
        }
    }
}

fn internal(message: &str) -> napi::Error<Code> {
    napi::Error::new(Code(ErrorCode::Internal), message)
}

fn ok(status: sys::napi_status) -> Result<(), napi::Error<Code>> {
    if status == sys::Status::napi_ok {
        Ok(())
    } else {
        Err(internal("a Node-API call failed"))
    }
}

fn napi_ok(status: sys::napi_status) -> Result<(), Thrown> {
    if status == sys::Status::napi_ok {
        Ok(())
    } else {
        Err(Thrown(ErrorCode::Internal, "a Node-API call failed".into()))
    }
}

/// The user id argument: a string of at most [`MAX_USER_ID_BYTES`], read
/// only if it fits.
unsafe fn user_id(env: napi_env, v: napi_value) -> Result<String, Thrown> {
    let user = unsafe { strings::read(env, v, MAX_USER_ID_BYTES) }.required("userId")?;
    validate_user(&user)?;
    Ok(user)
}

/// A token argument: a string of at most [`MAX_TOKEN_BYTES`] read only if it
/// fits, or `None` for `null` / `undefined`.
unsafe fn token(
    env: napi_env,
    v: napi_value,
    name: &'static str,
) -> Result<Option<String>, Thrown> {
    Ok(unsafe { strings::read(env, v, MAX_TOKEN_BYTES) }.optional(name)?)
}

fn unreadable() -> EngineError {
    EngineError::invalid_argument("token.accessToken", "could not be read")
}

unsafe fn number(env: napi_env, v: napi_value, name: &'static str) -> Result<f64, Thrown> {
    let mut n = 0f64;
    if unsafe { sys::napi_get_value_double(env, v, &mut n) } != sys::Status::napi_ok {
        return Err(EngineError::invalid_argument(name, "must be a number").into());
    }
    Ok(n)
}

/// The caller's clock reading (`nowMs`), as epoch milliseconds.
unsafe fn now_ms(env: napi_env, v: napi_value) -> Result<i64, Thrown> {
    let now = unsafe { number(env, v, "nowMs")? };
    Ok(time::now_from_js(now)?)
}

/// A number, or `None` for `null` / `undefined`.
unsafe fn opt_number(
    env: napi_env,
    v: napi_value,
    name: &'static str,
) -> Result<Option<f64>, Thrown> {
    unsafe {
        match type_of(env, v) {
            sys::ValueType::napi_null | sys::ValueType::napi_undefined => Ok(None),
            _ => number(env, v, name).map(Some),
        }
    }
}

unsafe fn null(env: napi_env) -> napi_value {
    let mut v = ptr::null_mut();
    unsafe { sys::napi_get_null(env, &mut v) };
    v
}

unsafe fn double(env: napi_env, n: f64) -> napi_value {
    let mut v = ptr::null_mut();
    unsafe { sys::napi_create_double(env, n, &mut v) };
    v
}

unsafe fn boolean(env: napi_env, b: bool) -> napi_value {
    let mut v = ptr::null_mut();
    unsafe { sys::napi_get_boolean(env, b, &mut v) };
    v
}

unsafe fn string_value(env: napi_env, s: &str) -> Result<napi_value, Thrown> {
    let mut v = ptr::null_mut();
    napi_ok(unsafe {
        sys::napi_create_string_utf8(env, s.as_ptr() as *const c_char, s.len() as isize, &mut v)
    })?;
    Ok(v)
}

/// An answer object under construction. Its properties are defined, not
/// assigned (`napi_define_properties`): a setter someone put on
/// `Object.prototype` for `accessToken` never sees the token, and the
/// answer keeps its own property.
#[derive(Default)]
struct Object(Vec<sys::napi_property_descriptor>);

impl Object {
    fn field(&mut self, key: &'static CStr, value: napi_value) {
        self.0.push(sys::napi_property_descriptor {
            utf8name: key.as_ptr(),
            name: ptr::null_mut(),
            method: None,
            getter: None,
            setter: None,
            value,
            attributes: sys::PropertyAttributes::writable
                | sys::PropertyAttributes::enumerable
                | sys::PropertyAttributes::configurable,
            data: ptr::null_mut(),
        });
    }

    unsafe fn build(self, env: napi_env) -> Result<napi_value, Thrown> {
        let mut o = ptr::null_mut();
        unsafe {
            napi_ok(sys::napi_create_object(env, &mut o))?;
            napi_ok(sys::napi_define_properties(
                env,
                o,
                self.0.len(),
                self.0.as_ptr(),
            ))?;
        }
        Ok(o)
    }
}

/// A JS value made here, handed to napi-rs as it is.
pub struct JsRaw(napi_value);

impl ToNapiValue for JsRaw {
    unsafe fn to_napi_value(_env: napi_env, val: Self) -> napi::Result<napi_value> {
        Ok(val.0)
    }
}

impl TypeName for JsRaw {
    fn type_name() -> &'static str {
        "Object"
    }

    fn value_type() -> ValueType {
        ValueType::Object
    }
}
