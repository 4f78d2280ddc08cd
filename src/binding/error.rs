//! Core errors as JavaScript errors: `error.code` is the stable code.

use crate::engine::{EngineError, ErrorCode};

/// A napi error status that is our stable code string.
#[derive(Debug, Clone, Copy)]
pub struct Code(pub ErrorCode);

impl AsRef<str> for Code {
    fn as_ref(&self) -> &str {
        self.0.as_str()
    }
}

// The napi macro recognises fallible returns by the name `Result`.
pub use napi::Result;

pub fn to_js(e: EngineError) -> napi::Error<Code> {
    napi::Error::new(Code(e.code()), e.to_string())
}
