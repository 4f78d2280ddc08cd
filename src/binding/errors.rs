//! Core errors as JavaScript errors (`error.code` is the stable code), and
//! the panic guard every exported function runs in.

use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::engine::{EngineError, ErrorCode};

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

pub fn to_js(e: EngineError) -> napi::Error<Code> {
    napi::Error::new(Code(e.code()), e.to_string())
}

/// Runs `f`, turning a panic into an `INTERNAL` error: a panic unwinding
/// out of an `extern "C"` callback would abort the whole Node process.
/// parking_lot locks do not poison, so the engine stays usable afterwards.
pub fn guard<T>(f: impl FnOnce() -> Result<T, Code>) -> Result<T, Code> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|_| {
        Err(napi::Error::new(
            Code(ErrorCode::Internal),
            "internal error in tarabut-token-manager (a bug: please report it)",
        ))
    })
}
