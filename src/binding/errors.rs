//! Core errors as JavaScript errors (`error.code` is the stable code), and
//! the panic guard every exported function runs in.

use std::panic::{catch_unwind, AssertUnwindSafe};

use napi_derive::napi;

use crate::engine::{EngineError, ErrorCode};

// The guard catches unwinding panics only: with `panic = "abort"` a panic
// would take the Node process down instead of becoming `INTERNAL`.
#[cfg(panic = "abort")]
compile_error!("the panic guard needs panic = \"unwind\" (see guard below)");

// The napi macro recognises fallible returns by the name `Result`.
pub use napi::Result;

/// A napi error status that is our stable code string.
#[derive(Debug, Clone, Copy)]
pub struct Code(pub ErrorCode);

impl AsRef<str> for Code {
    fn as_ref(&self) -> &str {
        self.0.as_str()
    }
}

/// What a caught panic says: a bug in this package, never the caller's.
pub const INTERNAL: &str = "internal error in tarabut-token-manager (a bug: please report it)";

pub fn to_js(e: EngineError) -> napi::Error<Code> {
    napi::Error::new(Code(e.code()), e.to_string())
}

/// Runs `f`, turning a panic into an `INTERNAL` error: a panic unwinding
/// out of an `extern "C"` callback would abort the whole Node process.
/// parking_lot locks do not poison, so the engine stays usable afterwards.
pub fn guard<T>(f: impl FnOnce() -> Result<T, Code>) -> Result<T, Code> {
    catch_unwind(AssertUnwindSafe(f))
        .unwrap_or_else(|_| Err(napi::Error::new(Code(ErrorCode::Internal), INTERNAL)))
}

/// Every stable `code`, in the order README's Errors table lists them:
/// `lib/errors.js` knows the package's own errors by them.
#[cfg_attr(test, allow(dead_code))]
#[napi]
pub fn error_codes() -> Result<Vec<&'static str>, Code> {
    guard(|| Ok(ErrorCode::ALL.iter().map(|c| c.as_str()).collect()))
}

#[cfg(test)]
mod tests {
    // A napi error is never dropped here (`ManuallyDrop`): its drop glue
    // needs Node-API, which a `cargo test` binary does not link.
    use std::mem::ManuallyDrop;

    use super::*;
    use crate::engine::{Engine, Plan, Policy, SecretString};

    /// What the JavaScript tests cannot show without a panicking export in
    /// the release binary: a panic inside the guard, here while the engine
    /// holds the user's shard lock, becomes the `INTERNAL` error (a napi
    /// status JavaScript reads as `code`), and the engine keeps answering.
    #[test]
    fn a_panic_in_the_guard_is_an_internal_error_and_the_engine_goes_on() {
        let engine = Engine::new(Policy::default());
        let now = 1_000_000;
        let token = SecretString::from("a");
        // A revocation makes `begin` fingerprint the token under the lock.
        engine.invalidate("u", Some(&token), now).unwrap();
        let fresh = now + 3_600_000;
        let r = ManuallyDrop::new(guard(|| -> Result<(), Code> {
            let _ = engine.begin("u", false, None, fresh, || panic!("deliberate"), now);
            unreachable!()
        }));
        let Err(e) = &*r else { panic!("no error") };
        assert_eq!(e.status.as_ref(), "INTERNAL");
        assert!(e
            .reason
            .starts_with("internal error in tarabut-token-manager"));
        let other = SecretString::from("b");
        let plan = engine.begin("u", false, None, fresh, || Ok(other.fingerprint()), now);
        assert!(matches!(plan, Ok(Plan::UsePresented)));
    }

    #[test]
    fn errors_keep_their_code() {
        let r = ManuallyDrop::new(guard(|| -> Result<(), Code> {
            Err(to_js(EngineError::invalid_argument("x", "is bad")))
        }));
        let Err(e) = &*r else { panic!("no error") };
        assert_eq!(
            (e.status.as_ref(), e.reason.as_str()),
            ("INVALID_ARGUMENT", "x is bad")
        );
        let r = ManuallyDrop::new(error_codes());
        let Ok(codes) = &*r else { panic!("no codes") };
        assert_eq!(codes.len(), ErrorCode::ALL.len());
        assert!(codes
            .iter()
            .all(|c| c.chars().all(|c| c.is_ascii_uppercase() || c == '_')));
    }
}
