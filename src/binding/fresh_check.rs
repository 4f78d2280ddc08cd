//! The hot path's one native call, written against Node-API directly.
//!
//! `getValidToken` asks one question on the no-refresh path: is a token
//! expiring at `expiresAtMs` fresh ([`Engine::is_fresh_now`])? As a napi-rs 3
//! class method that call costs ~400 ns here (receiver unwrap, type-tag check,
//! borrow scope), as a free `#[napi]` function ~150 ns, and as a plain
//! Node-API function whose callback data is the engine ~60 ns: the price of
//! the call itself. That last one is what `NativeManager.freshCheck()` hands
//! to index.js. It holds an `Arc<Engine>`, released when the function is
//! garbage collected (or its environment torn down).

use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr;
use std::sync::Arc;

use napi::bindgen_prelude::{ToNapiValue, TypeName};
use napi::{sys, Env, ValueType};

use super::error::{Code, Result};
use crate::engine::{Engine, ErrorCode};

/// A JS function `(expiresAtMs: number) => boolean` bound to one engine.
pub struct FreshCheck(sys::napi_value);

impl FreshCheck {
    pub fn new(env: &Env, engine: Arc<Engine>) -> Result<Self, Code> {
        let data = Arc::into_raw(engine) as *mut c_void;
        let mut f = ptr::null_mut();
        // SAFETY: `env` is the live environment of this call; `data` stays
        // valid until `release` runs, which Node calls once, after the last
        // call of `f` can happen.
        unsafe {
            let created = sys::napi_create_function(
                env.raw(),
                c"isFresh".as_ptr(),
                7,
                Some(is_fresh),
                data,
                &mut f,
            );
            if created != sys::Status::napi_ok
                || sys::napi_add_finalizer(
                    env.raw(),
                    f,
                    data,
                    Some(release),
                    ptr::null_mut(),
                    ptr::null_mut(),
                ) != sys::Status::napi_ok
            {
                // `f` (if created) is unreachable from JS and never called.
                drop(Arc::from_raw(data as *const Engine));
                return Err(napi::Error::new(
                    Code(ErrorCode::Internal),
                    "could not create the freshness check function",
                ));
            }
        }
        Ok(Self(f))
    }
}

/// `isFresh(expiresAtMs)`: anything but a finite number answers `false`
/// (index.js has already validated it; this must merely not misbehave).
unsafe extern "C" fn is_fresh(
    env: sys::napi_env,
    info: sys::napi_callback_info,
) -> sys::napi_value {
    let mut argc = 1usize;
    let mut argv = [ptr::null_mut(); 1];
    let mut data = ptr::null_mut();
    let mut fresh = false;
    // SAFETY: called by Node with a valid env and callback info; `data` is
    // the `Arc<Engine>` pointer given at creation, alive while `f` is.
    unsafe {
        if sys::napi_get_cb_info(
            env,
            info,
            &mut argc,
            argv.as_mut_ptr(),
            ptr::null_mut(),
            &mut data,
        ) == sys::Status::napi_ok
            && argc >= 1
            && !data.is_null()
        {
            let mut ms = f64::NAN;
            if sys::napi_get_value_double(env, argv[0], &mut ms) == sys::Status::napi_ok
                && ms.is_finite()
            {
                let engine = &*(data as *const Engine);
                // A panic must not unwind into Node; there is none to expect here.
                fresh = catch_unwind(AssertUnwindSafe(|| engine.is_fresh_now(ms as i64)))
                    .unwrap_or(false);
            }
        }
        let mut out = ptr::null_mut();
        sys::napi_get_boolean(env, fresh, &mut out);
        out
    }
}

unsafe extern "C" fn release(_env: sys::napi_env, data: *mut c_void, _hint: *mut c_void) {
    // SAFETY: `data` came from `Arc::into_raw` in `FreshCheck::new`; Node
    // calls this finalizer exactly once.
    unsafe { drop(Arc::from_raw(data as *const Engine)) }
}

impl ToNapiValue for FreshCheck {
    unsafe fn to_napi_value(_env: sys::napi_env, val: Self) -> napi::Result<sys::napi_value> {
        Ok(val.0)
    }
}

impl TypeName for FreshCheck {
    fn type_name() -> &'static str {
        "Function"
    }

    fn value_type() -> ValueType {
        ValueType::Function
    }
}
